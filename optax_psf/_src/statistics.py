"""Running statistics of the sampled PSF that drive vSAM's sampling rate.

PSF (projection of the second-order gradient onto the first-order gradient)
is ``psf = g_sam - g``. Each sampled step pushes ``||psf||`` and
``||psf|| / ||g||`` into fixed-length histories (oldest first), sorts the norm
history, splits it into equal blocks, and pushes the mean of the blocks'
unbiased variances into a third history.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PsfStatistics(NamedTuple):
    """Histories of the sampled PSF, each of length ``window``, oldest first.

    Attributes:
      psf_norms: ``||psf||`` at the last sampled steps. shape=(window,),
        dtype=float32.
      ratios: ``||psf|| / ||g||`` at the last sampled steps. shape=(window,),
        dtype=float32.
      variances: Mean block variance of the sorted ``psf_norms`` after each
        sampled step. shape=(window,), dtype=float32.
      last_psf_norm: ``||psf||`` at the latest sampled step. shape=(),
        dtype=float32.
      last_ratio: ``||psf|| / ||g||`` at the latest sampled step. shape=(),
        dtype=float32.
    """

    psf_norms: jax.Array
    ratios: jax.Array
    variances: jax.Array
    last_psf_norm: jax.Array
    last_ratio: jax.Array


def init_statistics(window: int) -> PsfStatistics:
    """Returns statistics whose histories are all zeros, as in the reference."""
    # Separate arrays per field, so that a jitted step may donate the state.
    return PsfStatistics(
        psf_norms=jnp.zeros((window,), jnp.float32),
        ratios=jnp.zeros((window,), jnp.float32),
        variances=jnp.zeros((window,), jnp.float32),
        last_psf_norm=jnp.zeros((), jnp.float32),
        last_ratio=jnp.zeros((), jnp.float32),
    )


def record_sample(
    statistics: PsfStatistics,
    psf_norm: jax.Array,
    grad_norm: jax.Array,
    blocks: int,
) -> PsfStatistics:
    """Pushes one sampled step's PSF norm, ratio and block variance.

    Args:
      statistics: The statistics before the step.
      psf_norm: ``||psf||`` over the statistics mask, float32 scalar.
      grad_norm: ``||g||`` over the statistics mask, float32 scalar.
      blocks: Number of equal blocks the sorted norm history is split into.

    Returns:
      The updated statistics.
    """
    # NOTE: the reference divides by ||g|| unguarded; a zero gradient gives
    # ratio 0 here instead of NaN.
    safe_grad_norm = jnp.where(grad_norm > 0, grad_norm, 1.0)
    ratio = jnp.where(grad_norm > 0, psf_norm / safe_grad_norm, 0.0)

    psf_norms = push(statistics.psf_norms, psf_norm)
    ratios = push(statistics.ratios, ratio)
    variances = push(statistics.variances, mean_block_variance(psf_norms, blocks))
    return PsfStatistics(psf_norms, ratios, variances, psf_norm, ratio)


def push(history: jax.Array, value: jax.Array) -> jax.Array:
    """Drops the oldest entry of ``history`` and appends ``value``."""
    value = jnp.asarray(value, history.dtype)
    return jnp.concatenate([history[1:], value[None]])


def mean_block_variance(norms: jax.Array, blocks: int) -> jax.Array:
    """Sorts ``norms``, splits them into equal blocks and averages the blocks'
    unbiased (``ddof=1``) variances."""
    sorted_blocks = jnp.sort(norms).reshape(blocks, -1)
    return jnp.mean(jnp.var(sorted_blocks, axis=1, ddof=1))


def mean_relative_change(history: jax.Array) -> jax.Array:
    """Returns the mean of ``(h[i+1] - h[i]) / h[i]`` over consecutive entries.

    NOTE: the reference divides by zero entries and yields NaN (or inf). Pairs
    whose older entry is zero are left out of the mean here, and the change is
    0 when no pair is left.
    """
    older, newer = history[:-1], history[1:]
    valid = older != 0
    safe_older = jnp.where(valid, older, 1.0)
    changes = jnp.where(valid, (newer - older) / safe_older, 0.0)
    count = jnp.sum(valid)
    return jnp.where(count > 0, jnp.sum(changes) / jnp.maximum(count, 1), 0.0)
