"""The example training loops: Linen (compare.py) and NNX, end to end on small data."""

import json
import pathlib
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import compare
import datasets
import models
import nnx_train
import training

import optax_psf


@pytest.fixture(scope="module")
def small_mnist1d():
    return datasets.load_mnist1d(seed=0, num_samples=1000)


@pytest.mark.parametrize("model_name", ["cnn1d", "cnn1d_bn"])
@pytest.mark.parametrize("optimizer", training.OPTIMIZERS)
def test_linen_loop_two_epochs(small_mnist1d, model_name, optimizer):
    model = models.build_model(model_name, small_mnist1d.num_classes)
    config = training.TrainConfig(
        epochs=2, batch_size=64, vsam={"window": 10, "blocks": 5}, eval_batch_size=500
    )
    record = training.train(model, small_mnist1d, optimizer, config, progress=False)

    history = record["history"]
    assert len(history) == 2
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert record["steps"] == 2 * (800 // 64)
    if optimizer == "sgd":
        assert record["grad_evals"] == record["steps"]
        assert "trace" not in record
    else:
        sampled = record["trace"]["sampled"]
        assert len(sampled) == record["steps"]
        assert record["grad_evals"] == record["steps"] + sum(sampled)
        assert len(record["trace"]["psf_norm"]) == record["steps"]
    if optimizer == "sam":
        assert record["sample_fraction"] == 1.0


def test_linen_batch_norm_follows_clean_pass(small_mnist1d):
    model = models.build_model("cnn1d_bn", 10)
    x = small_mnist1d.train_images[:32]
    y = small_mnist1d.train_labels[:32]
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    loss_fn = training.make_loss_fn(model, has_batch_stats=True)
    tx = optax.chain(optax_psf.sam(0.5), optax.sgd(0.1))

    step = optax_psf.make_train_step(loss_fn, tx, has_model_state=True)
    output = step(params, tx.init(params), (x, y), batch_stats)

    _, clean_stats = loss_fn(params, batch_stats, (x, y))
    for leaf, expected in zip(
        jax.tree.leaves(output.model_state), jax.tree.leaves(clean_stats), strict=True
    ):
        np.testing.assert_allclose(leaf, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "vsam"])
def test_nnx_loop_two_epochs(small_mnist1d, optimizer, batch_norm):
    record = nnx_train.train_nnx(
        small_mnist1d, optimizer, epochs=2, batch_size=64, batch_norm=batch_norm, progress=False
    )
    history = record["history"]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    if optimizer == "vsam":
        assert 0 < history[-1]["second_gradients"] <= record["steps"]
        assert 0 < history[-1]["target_rate"] <= 1


def test_nnx_batch_norm_follows_clean_pass(small_mnist1d):
    model = nnx_train.CNN1D(10, batch_norm=True, rngs=nnx.Rngs(0))
    x = small_mnist1d.train_images[:32]
    y = small_mnist1d.train_labels[:32]
    reference = nnx.clone(model)
    optimizer = nnx.Optimizer(model, optax.chain(optax_psf.sam(0.5), optax.sgd(0.1)), wrt=nnx.Param)

    nnx_train.train_step(model, optimizer, x, y)
    reference(x)  # One clean forward pass in training mode.

    stats = nnx.state(model, nnx.BatchStat)
    expected = nnx.state(reference, nnx.BatchStat)
    for leaf, value in zip(jax.tree.leaves(stats), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(leaf, value, rtol=1e-5, atol=1e-7)


def test_compare_quick_writes_results(tmp_path):
    compare.main(["--quick", "--out", str(tmp_path), "--no-progress", "--epochs", "2"])
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("sgd", "sam", "vsam"):
        entry = results["optimizers"][name]
        for key in ("test_accuracy", "train_loss", "wall_time_s", "grad_evals", "sample_fraction"):
            assert key in entry, f"{name} lacks {key}"
    assert (tmp_path / "figure.png").stat().st_size > 10_000


def test_nnx_host_path_matches_in_graph(small_mnist1d):
    runs = {
        path: nnx_train.train_nnx(
            small_mnist1d, "vsam", epochs=2, batch_size=64, path=path, progress=False
        )
        for path in ("host", "in_graph")
    }
    counts = {
        path: [entry["second_gradients"] for entry in run["history"]] for path, run in runs.items()
    }
    assert counts["host"] == counts["in_graph"]
    np.testing.assert_allclose(
        runs["host"]["history"][-1]["train_loss"],
        runs["in_graph"]["history"][-1]["train_loss"],
        rtol=1e-4,
    )
