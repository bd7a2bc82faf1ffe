"""Tree arithmetic shared by the modules: norms in float32 and masked norms."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def global_norm(tree: Any) -> jax.Array:
    """Returns the L2 norm over every leaf of ``tree``, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    squares = [jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves]
    return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def masked_norm(tree: Any, mask: Any) -> jax.Array:
    """Returns the float32 L2 norm over the leaves of ``tree`` whose mask is True.

    Args:
      tree: A pytree of arrays.
      mask: A pytree of Python booleans with the structure of ``tree``.
    """
    selected = [
        leaf
        for leaf, keep in zip(jax.tree.leaves(tree), jax.tree.leaves(mask), strict=True)
        if keep
    ]
    return global_norm(selected)
