"""Perturbations: where the second gradient of a sharpness-aware step is taken."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_psf._src import tree_math

# Added to the gradient norm before dividing, as the reference implementation does.
NORM_EPS = 1e-12


class Perturbation(NamedTuple):
    """Maps the parameters and their clean gradient to the perturbed parameters.

    Attributes:
      apply: ``apply(params, grads) -> perturbed_params``. The result has the
        structure and dtypes of ``params``.
    """

    apply: Callable[[optax.Params, optax.Updates], optax.Params]


def sam_perturbation(rho: float) -> Perturbation:
    """Builds SAM's perturbation ``w + rho * g / (||g|| + 1e-12)``.

    The norm is the global L2 norm over every parameter, computed in float32.

    Args:
      rho: Radius of the neighbourhood, the length of the perturbation.

    Returns:
      A :class:`Perturbation`.

    Raises:
      ValueError: If ``rho`` is negative or not finite.

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """
    check_rho(rho)

    def apply(params, grads):
        scale = rho / (tree_math.global_norm(grads) + NORM_EPS)
        return jax.tree.map(lambda p, g: (p + scale * g).astype(jnp.result_type(p)), params, grads)

    return Perturbation(apply=apply)


def check_rho(rho: float | jax.Array) -> None:
    """Raises if ``rho`` is not a finite, non-negative number.

    A scalar array is accepted, as ``optax.inject_hyperparams`` passes one; its
    value is checked unless it is traced.
    """
    if isinstance(rho, (jax.Array, np.ndarray)) and rho.ndim == 0:
        if isinstance(rho, jax.core.Tracer):
            return
        rho = float(rho)
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise TypeError(
            f"rho must be a finite number >= 0, got {rho!r} of type {type(rho).__name__}."
        )
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}.")
