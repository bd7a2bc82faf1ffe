"""The metrics helper reads the state of vsam or sam, alone or in a chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_psf
from optax_psf._src import transform


def test_metrics_inside_chain_under_jit():
    params = jnp.ones(3)
    tx = optax.chain(optax_psf.vsam(0.05, window=4, blocks=2), optax.adam(1e-3))
    state = tx.init(params)

    @jax.jit
    def step(state):
        _, state = tx.update(params, state, params, grad_fn=lambda p, i: 1.5 * params)
        return state, optax_psf.metrics(state)

    for _ in range(3):
        state, metrics = step(state)
    assert set(metrics) == {"steps", "second_gradients", "target_rate", "psf_norm", "psf_ratio"}
    assert int(metrics["steps"]) == 3
    assert int(metrics["second_gradients"]) == 3  # all three are warm-up steps
    np.testing.assert_allclose(metrics["psf_norm"], np.linalg.norm(0.5 * np.ones(3)), rtol=1e-6)
    np.testing.assert_allclose(metrics["psf_ratio"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["target_rate"], 1 / 4)


def test_sam_target_rate_is_one():
    state = optax_psf.sam().init(jnp.ones(2))
    assert float(optax_psf.metrics(state)["target_rate"]) == 1.0


def test_metrics_without_psf_state_raises():
    state = optax.sgd(0.1).init(jnp.ones(2))
    with pytest.raises(ValueError, match="exactly one"):
        optax_psf.metrics(state)


def test_state_is_fixed_shape_arrays():
    params = {"w": jnp.ones((3, 2))}
    state = optax_psf.vsam(window=10, blocks=2).init(params)
    assert isinstance(state, optax_psf.PsfReuseState)
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array)
    assert state.statistics.psf_norms.shape == (10,)
    assert state.reuse.psf["w"].shape == (3, 2)


def test_vsam_docstring_example_runs():
    import doctest

    failures, _ = doctest.testmod(transform, verbose=False)
    assert failures == 0


def test_state_can_be_donated():
    # A jitted step that donates the optimizer state fails if two fields of
    # the state share one buffer.
    params = {"w": jnp.ones(3)}
    tx = optax.chain(optax_psf.vsam(window=4, blocks=2), optax.sgd(0.1, momentum=0.9))
    step = jax.jit(lambda p, s: tx.update(p, s, p, grad_fn=lambda q, i: q), donate_argnums=(1,))
    state = tx.init(params)
    for _ in range(3):
        _, state = step(params, state)
    assert int(optax_psf.metrics(state)["steps"]) == 3


@pytest.mark.parametrize("window", [10, 100])
def test_state_overhead_is_one_psf_buffer(window):
    params = {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(32, jnp.bfloat16)}
    base = optax.sgd(0.1, momentum=0.9)
    vsam = optax.chain(optax_psf.vsam(window=window, blocks=2), base)

    def state_bytes(state):
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))

    param_bytes = state_bytes(params)
    overhead = state_bytes(vsam.init(params)) - state_bytes(base.init(params))
    # One PSF buffer in the parameters' dtypes. Per window step: three float32
    # histories and the bool plan (13 bytes). Then 14 four-byte scalars and
    # the 8-byte PRNG key.
    assert overhead - param_bytes == 13 * window + 64
