"""bfloat16 parameters, float32 statistics and the PSF cache's dtype."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_psf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import datasets
import models


def tree_bytes(tree):
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def test_bfloat16_cnn_trains_on_mnist1d():
    data = datasets.load_mnist1d(seed=0, num_samples=1000)
    model = models.build_model("cnn1d", data.num_classes)
    params = model.init(jax.random.PRNGKey(0), data.train_images[:1])["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    tx = optax.chain(
        optax_psf.vsam(0.05, window=10, blocks=5, max_rate=0.5), optax.sgd(0.05, momentum=0.9)
    )

    def loss_fn(params, batch):
        x, y = batch
        logits = model.apply({"params": params}, x.astype(jnp.bfloat16))
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()

    step = optax_psf.make_train_step(loss_fn, tx)
    opt_state = tx.init(params)
    full_batch = (data.train_images, data.train_labels)
    initial_loss = float(jax.jit(loss_fn)(params, full_batch))
    for epoch in range(3):
        order = np.random.default_rng(epoch).permutation(len(data.train_images))
        for start in range(0, len(order) - 63, 64):
            index = order[start : start + 64]
            output = step(params, opt_state, (data.train_images[index], data.train_labels[index]))
            params, opt_state = output.params, output.opt_state
    final_loss = float(jax.jit(loss_fn)(params, full_batch))

    assert final_loss < 0.7 * initial_loss
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.bfloat16
    state = optax_psf.find_state(opt_state)
    for leaf in jax.tree.leaves(state.statistics):
        assert leaf.dtype == jnp.float32
    assert np.isfinite(float(state.statistics.last_psf_norm))
    assert int(state.second_gradients) > 10


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_direction_keeps_gradient_dtype(param_dtype):
    params = jnp.ones(4, param_dtype)
    tx = optax_psf.vsam(window=4, blocks=2, warmup_steps=1)
    state = tx.init(params)
    update = jax.jit(lambda s: tx.update(params, s, params, grad_fn=lambda p, i: 2 * p))
    for _ in range(3):  # a sampled step, then reuse steps
        direction, state = update(state)
        assert direction.dtype == param_dtype


def test_bfloat16_psf_cache_halves_its_bytes():
    params = {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(32)}
    full = optax_psf.find_state(optax_psf.vsam().init(params))
    half = optax_psf.find_state(optax_psf.vsam(psf_dtype=jnp.bfloat16).init(params))
    assert tree_bytes(half.reuse.psf) * 2 == tree_bytes(full.reuse.psf)
    assert tree_bytes(full.reuse.psf) == tree_bytes(params)
    for leaf in jax.tree.leaves(half.reuse.psf):
        assert leaf.dtype == jnp.bfloat16


def test_bfloat16_psf_cache_reuses_close_to_float32():
    params = jnp.linspace(-1.0, 1.0, 8)

    def run(psf_dtype):
        tx = optax_psf.vsam(window=4, blocks=2, warmup_steps=1, psf_dtype=psf_dtype)
        state = tx.init(params)
        directions = []
        for _ in range(4):
            direction, state = tx.update(params, state, params, grad_fn=lambda p, i: p**3)
            directions.append(direction)
        return np.asarray(directions)

    np.testing.assert_allclose(run(jnp.bfloat16), run(None), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("psf_dtype", [jnp.int32, "not a dtype"])
def test_invalid_psf_dtype_raises(psf_dtype):
    with pytest.raises((TypeError, ValueError), match="psf_dtype"):
        optax_psf.vsam(psf_dtype=psf_dtype)
