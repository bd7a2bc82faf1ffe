"""vsam inside optax's wrappers: inject_hyperparams, apply_if_finite, masked."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_psf

PARAMS = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3, 0.7])}


def loss_fn(params):
    return jnp.sum(params["a"] ** 4) + jnp.sum(jnp.sin(params["b"]) ** 2)


def grad_fn(params, _):
    return jax.grad(loss_fn)(params)


def run(tx, steps, grads_at=None):
    """Runs jitted steps; ``grads_at(step, grads)`` may replace a step's gradient."""
    params, state = PARAMS, tx.init(PARAMS)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    for index in range(steps):
        grads = jax.grad(loss_fn)(params)
        if grads_at is not None:
            grads = grads_at(index, grads)
        params, state = step(params, state, grads)
    return params, state


vsam = functools.partial(optax_psf.vsam, window=4, blocks=2, warmup_steps=2)


def test_inject_hyperparams_schedules_rho():
    schedule = optax.linear_schedule(0.0, 0.1, 10)
    injected = optax.inject_hyperparams(vsam, static_args=optax_psf.STATIC_HYPERPARAMETERS)(
        rho=schedule
    )
    _, state = run(optax.chain(injected, optax.sgd(0.01)), 5)
    # The state contains the value the fifth step used: schedule(4).
    np.testing.assert_allclose(state[0].hyperparams["rho"], 0.04, rtol=1e-6)
    assert int(optax_psf.metrics(state)["steps"]) == 5

    # rho = 0 on the first step, a sampled one: g_sam is the clean gradient.
    first = optax.inject_hyperparams(vsam, static_args=optax_psf.STATIC_HYPERPARAMETERS)(
        rho=schedule
    )
    grads = jax.grad(loss_fn)(PARAMS)
    direction, _ = first.update(grads, first.init(PARAMS), PARAMS, grad_fn=grad_fn)
    chex.assert_trees_all_close(direction, grads, rtol=1e-6)


def test_inject_hyperparams_constant_rho_matches_plain():
    injected = optax.inject_hyperparams(vsam, static_args=optax_psf.STATIC_HYPERPARAMETERS)(
        rho=0.05
    )
    injected_params, _ = run(optax.chain(injected, optax.sgd(0.01)), 12)
    plain_params, _ = run(optax.chain(vsam(rho=0.05), optax.sgd(0.01)), 12)
    chex.assert_trees_all_close(injected_params, plain_params, rtol=1e-6)


def test_inject_hyperparams_without_static_args_explains():
    injected = optax.inject_hyperparams(vsam)(rho=0.05)
    with pytest.raises(TypeError, match="STATIC_HYPERPARAMETERS"):
        run(injected, 1)


def test_apply_if_finite_skips_step_without_touching_controller():
    steps, bad_step = 10, 6

    def poison(index, grads):
        return jax.tree.map(lambda g: g * jnp.nan, grads) if index == bad_step else grads

    tx = optax.apply_if_finite(optax.chain(vsam(), optax.sgd(0.01)), max_consecutive_errors=3)
    _, state = run(tx, steps, grads_at=poison)
    assert int(state.total_notfinite) == 1
    inner = optax_psf.find_state(state)
    assert int(inner.count) == steps - 1
    for leaf in jax.tree.leaves(inner):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(leaf)))

    # The skipped step left no trace: the same run without it ends in the
    # same controller state.
    _, reference = run(optax.chain(vsam(), optax.sgd(0.01)), steps - 1)
    reference_inner = optax_psf.find_state(reference)
    assert int(inner.second_gradients) == int(reference_inner.second_gradients)
    np.testing.assert_allclose(inner.policy.rate, reference_inner.policy.rate, rtol=1e-6)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda inner: optax.masked(inner, {"a": True, "b": False}),
        lambda inner: optax.multi_transform(
            {"train": inner, "frozen": optax.set_to_zero()}, {"a": "train", "b": "frozen"}
        ),
    ],
    ids=["masked", "multi_transform"],
)
def test_masked_wrappers_raise_with_alternative(wrap):
    with pytest.raises(ValueError) as error:
        wrap(vsam()).init(PARAMS)
    message = str(error.value)
    assert "optax.masked" in message
    assert "set_to_zero" in message


def test_frozen_parameters_after_vsam():
    # The supported way to freeze: vsam gets every parameter, the optimizer
    # after it leaves the frozen ones alone.
    labels = {"a": "train", "b": "frozen"}
    tx = optax.chain(
        vsam(),
        optax.multi_transform({"train": optax.sgd(0.01), "frozen": optax.set_to_zero()}, labels),
    )
    params, state = run(tx, 6)
    np.testing.assert_array_equal(params["b"], PARAMS["b"])
    assert not np.allclose(params["a"], PARAMS["a"])
    assert int(optax_psf.metrics(state)["second_gradients"]) >= 2
