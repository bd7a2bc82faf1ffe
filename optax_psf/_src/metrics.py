"""Reading loggable metrics out of an optimizer state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_psf._src.transform import PsfReuseState


def find_state(opt_state: Any) -> PsfReuseState:
    """Returns the :class:`PsfReuseState` inside ``opt_state``.

    Args:
      opt_state: The state of a :func:`vsam` or :func:`sam` transformation, or
        of any chain or wrapper that contains exactly one of them.

    Raises:
      ValueError: If ``opt_state`` contains no such state, or several.
    """
    found = [
        leaf
        for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PsfReuseState))
        if isinstance(leaf, PsfReuseState)
    ]
    if len(found) != 1:
        raise ValueError(
            "opt_state must contain exactly one state of optax_psf.vsam or"
            f" optax_psf.sam, found {len(found)}."
        )
    return found[0]


def metrics(opt_state: Any) -> dict[str, jax.Array]:
    """Returns the scalars a training loop logs for vSAM or SAM.

    Works on the state of the transformation alone or of a chain holding it,
    inside or outside ``jax.jit``.

    Args:
      opt_state: An optimizer state that contains one :class:`PsfReuseState`.

    Returns:
      A dict of scalar arrays:

      - ``steps``: update steps taken.
      - ``second_gradients``: steps that computed ``g_sam``.
      - ``target_rate``: fraction of steps the policy currently aims to sample
        (for vSAM, target samples per window divided by the window).
      - ``psf_norm``: ``||psf||`` at the latest sampled step.
      - ``psf_ratio``: ``||psf|| / ||g||`` at the latest sampled step.
    """
    state = find_state(opt_state)
    values = {
        "steps": state.count,
        "second_gradients": state.second_gradients,
        "target_rate": state.target_rate,
        "psf_norm": state.statistics.last_psf_norm,
        "psf_ratio": state.statistics.last_ratio,
    }
    # Flax NNX wraps the optimizer state's arrays in variables; unwrap them.
    return {name: jnp.asarray(value) for name, value in values.items()}
