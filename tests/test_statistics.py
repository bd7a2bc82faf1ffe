"""PSF statistics: block variance, relative change and the statistics mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_psf
from optax_psf._src import statistics


def test_mean_block_variance_matches_numpy():
    norms = np.random.default_rng(0).uniform(size=20).astype(np.float32)
    blocks = np.sort(norms).reshape(4, 5)
    expected = np.mean(np.var(blocks, axis=1, ddof=1))
    np.testing.assert_allclose(statistics.mean_block_variance(norms, 4), expected, rtol=1e-6)


def test_mean_relative_change_matches_formula():
    history = jnp.array([1.0, 2.0, 1.0, 4.0])
    expected = np.mean([1.0, -0.5, 3.0])
    np.testing.assert_allclose(statistics.mean_relative_change(history), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ([0.0, 0.0, 0.0, 0.0], 0.0),  # nothing recorded yet: no change
        ([0.0, 0.0, 2.0, 3.0], 0.5),  # leading zeros are skipped
        ([5.0, 5.0, 5.0, 5.0], 0.0),
    ],
)
def test_mean_relative_change_is_finite_with_zero_entries(history, expected):
    change = statistics.mean_relative_change(jnp.array(history))
    assert np.isfinite(change)
    np.testing.assert_allclose(change, expected, rtol=1e-6)


def test_record_sample_pushes_newest_last():
    state = statistics.init_statistics(4)
    state = statistics.record_sample(state, jnp.float32(2.0), jnp.float32(4.0), blocks=2)
    state = statistics.record_sample(state, jnp.float32(3.0), jnp.float32(6.0), blocks=2)
    np.testing.assert_array_equal(state.psf_norms, [0, 0, 2, 3])
    np.testing.assert_array_equal(state.ratios, [0, 0, 0.5, 0.5])
    assert float(state.last_psf_norm) == 3.0
    # Sorted norms [0, 0 | 2, 3]: variances 0 and 0.5.
    np.testing.assert_allclose(state.variances[-1], 0.25)


def test_zero_gradient_gives_zero_ratio():
    state = statistics.record_sample(
        statistics.init_statistics(4), jnp.float32(1.0), jnp.float32(0.0), blocks=2
    )
    assert float(state.last_ratio) == 0.0


def test_warmup_shorter_than_window_stays_finite():
    # Two warm-up samples leave zeros in a 10-entry history: the reference
    # would divide by them at the first window update.
    params = jnp.ones(3)
    tx = optax_psf.vsam(0.05, window=10, blocks=2, warmup_steps=2)
    state = tx.init(params)
    update = jax.jit(lambda s, g: tx.update(g, s, params, grad_fn=lambda p, i: 2 * p))
    for step in range(30):
        _, state = update(state, jnp.full(3, 1.0 + 0.1 * step))
    assert np.isfinite(float(state.policy.rate))
    assert 1.0 <= float(state.policy.rate) <= 8.0


PARAMS = {"body": jnp.ones(4), "head": jnp.ones(2)}


def psf_norm_after_one_sample(stats_mask):
    tx = optax_psf.sam(0.05, stats_mask=stats_mask)
    state = tx.init(PARAMS)
    grads = {"body": jnp.ones(4), "head": jnp.ones(2)}
    grads_sam = {"body": 3 * jnp.ones(4), "head": 5 * jnp.ones(2)}
    _, state = tx.update(grads, state, PARAMS, grad_fn=lambda p, i: grads_sam)
    return optax_psf.metrics(state)


@pytest.mark.parametrize(
    ("stats_mask", "expected_norm", "expected_ratio"),
    [
        (None, np.sqrt(4 * 4 + 2 * 16), np.sqrt(48 / 6)),
        ({"body": True, "head": False}, np.sqrt(4 * 4), 2.0),
        (lambda params: {"body": False, "head": True}, np.sqrt(2 * 16), 4.0),
    ],
)
def test_stats_mask_selects_parameters(stats_mask, expected_norm, expected_ratio):
    metrics = psf_norm_after_one_sample(stats_mask)
    np.testing.assert_allclose(metrics["psf_norm"], expected_norm, rtol=1e-6)
    np.testing.assert_allclose(metrics["psf_ratio"], expected_ratio, rtol=1e-6)
