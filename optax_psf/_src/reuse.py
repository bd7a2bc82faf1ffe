"""Reuse rules: the descent direction on steps that skip the second gradient."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ReuseRule(NamedTuple):
    """Caches what a sampled step learned and reuses it on skipped steps.

    Attributes:
      init: ``init(params) -> reuse_state``.
      store: ``store(reuse_state, psf) -> reuse_state``, called on every
        sampled step with ``psf = g_sam - g``.
      apply: ``apply(reuse_state, grads) -> (direction, reuse_state)``, called
        on every skipped step with the clean gradient.
    """

    init: Callable[[optax.Params], Any]
    store: Callable[[Any, optax.Updates], Any]
    apply: Callable[[Any, optax.Updates], tuple[optax.Updates, Any]]


def no_reuse() -> ReuseRule:
    """Builds the rule that descends along the clean gradient when skipping."""
    return ReuseRule(
        init=lambda params: optax.EmptyState(),
        store=lambda state, psf: state,
        apply=lambda state, grads: (grads, state),
    )


class DecayedPsfState(NamedTuple):
    """State of :func:`decayed_psf`.

    Attributes:
      psf: The PSF of the latest sampled step. Same structure and dtypes as
        the parameters.
      weight: Weight of ``psf`` at the latest step: 1 right after a sample,
        then ``beta ** k`` after the k-th reuse. shape=(), dtype=float32.
      reuses: Skipped steps that reused ``psf`` since the latest sample.
        shape=(), dtype=int32.
    """

    psf: optax.Params
    weight: jax.Array
    reuses: jax.Array


def decayed_psf(
    beta: float = 0.7, max_reuse: int = 6, *, psf_dtype: Any | None = None
) -> ReuseRule:
    """Builds vSAM's reuse rule: ``g + beta**k * psf`` for ``k = 1..max_reuse``.

    After ``max_reuse`` reuses the skipped steps descend along ``g`` until the
    next sample refreshes the cache.

    Args:
      beta: Decay of the cached PSF's weight per reuse, in ``(0, 1)``.
      max_reuse: Number of skipped steps after a sample that reuse the PSF.
      psf_dtype: dtype of the cached PSF, for example ``jnp.bfloat16`` to halve
        its memory. ``None`` keeps each parameter's dtype.

    Returns:
      A :class:`ReuseRule` whose state is a :class:`DecayedPsfState`.

    Raises:
      ValueError: If ``beta`` or ``max_reuse`` is outside its valid range.
    """
    check_beta(beta)
    check_max_reuse(max_reuse)
    if psf_dtype is not None:
        try:
            psf_dtype = jnp.dtype(psf_dtype)
        except TypeError:
            raise TypeError(f"psf_dtype must be a dtype or None, got {psf_dtype!r}.") from None
        if not jnp.issubdtype(psf_dtype, jnp.floating):
            raise ValueError(f"psf_dtype must be a floating dtype, got {psf_dtype}.")

    def init(params):
        return DecayedPsfState(
            psf=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=psf_dtype), params),
            weight=jnp.zeros((), jnp.float32),
            # Nothing is cached yet, so the count starts exhausted.
            reuses=jnp.full((), max_reuse, jnp.int32),
        )

    def store(state, psf):
        cache = jax.tree.map(lambda c, d: d.astype(c.dtype), state.psf, psf)
        return DecayedPsfState(
            psf=cache,
            weight=jnp.ones((), jnp.float32),
            reuses=jnp.zeros((), jnp.int32),
        )

    def apply(state, grads):
        # NOTE: the reference compares the weight with beta**6; counting the
        # reuses gives the same steps without depending on float rounding.
        active = state.reuses < max_reuse
        weight = jnp.where(active, state.weight * beta, state.weight)

        def add_psf(g, psf):
            reused = (g.astype(jnp.float32) + weight * psf.astype(jnp.float32)).astype(g.dtype)
            return jnp.where(active, reused, g)

        direction = jax.tree.map(add_psf, grads, state.psf)
        reuses = state.reuses + active.astype(jnp.int32)
        return direction, DecayedPsfState(state.psf, weight, reuses)

    return ReuseRule(init=init, store=store, apply=apply)


def check_beta(beta: float) -> None:
    """Raises if ``beta`` is not a number in ``(0, 1)``."""
    if not (isinstance(beta, numbers.Real) and not isinstance(beta, bool)) or not (0 < beta < 1):
        raise ValueError(f"beta must be a number in (0, 1), got {beta!r}.")


def check_max_reuse(max_reuse: int) -> None:
    """Raises if ``max_reuse`` is not a non-negative integer."""
    valid = isinstance(max_reuse, numbers.Integral) and not isinstance(max_reuse, bool)
    if not valid or max_reuse < 0:
        raise ValueError(f"max_reuse must be an int >= 0, got {max_reuse!r}.")
