"""make_train_step: the host-planned path follows the in-graph path exactly."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_psf

WINDOW = 10
WINDOWS = 3


class SmallCNN(nn.Module):
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(8, (3,))(x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).reshape((x.shape[0], -1))
        return nn.Dense(4)(nn.tanh(nn.Dense(16)(x)))


class SmallMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(4)(nn.tanh(nn.Dense(32)(x)))


def make_batches(steps, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(steps, 16, 12, 1)).astype(np.float32)
    labels = rng.integers(0, 4, size=(steps, 16)).astype(np.int32)
    return list(zip(images, labels, strict=True))


def vsam_chain(learning_rate=0.01):
    return optax.chain(
        optax_psf.vsam(0.05, window=WINDOW, blocks=2, warmup_steps=4, max_rate=0.5),
        optax.sgd(learning_rate, momentum=0.9),
    )


def run(model, path, steps, batch_norm=False, learning_rate=0.01):
    batches = make_batches(steps)
    variables = model.init(jax.random.PRNGKey(0), batches[0][0], train=False)
    params = variables["params"]
    model_state = variables.get("batch_stats")

    def loss_fn(params, *args):
        *state, (x, y) = args
        if batch_norm:
            logits, mutated = model.apply(
                {"params": params, "batch_stats": state[0]}, x, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, mutated["batch_stats"]
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = vsam_chain(learning_rate)
    step = optax_psf.make_train_step(loss_fn, tx, has_model_state=batch_norm, path=path)
    opt_state = tx.init(params)
    decisions = []
    for batch in batches:
        output = step(params, opt_state, batch, model_state)
        params, opt_state, model_state = output.params, output.opt_state, output.model_state
        decisions.append(int(output.metrics["second_gradients"]))
    return params, model_state, np.diff([0, *decisions]), step


def assert_close(tree, reference, rtol):
    for leaf, expected in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True):
        scale = float(jnp.max(jnp.abs(expected)))
        assert float(jnp.max(jnp.abs(leaf - expected))) <= rtol * scale


@pytest.mark.parametrize("model", [SmallMLP(), SmallCNN()], ids=["mlp", "cnn"])
def test_host_path_matches_in_graph(model):
    steps = 4 + WINDOWS * WINDOW
    in_graph_params, _, in_graph_decisions, _ = run(model, "in_graph", steps)
    host_params, _, host_decisions, host_step = run(model, "host", steps)

    np.testing.assert_array_equal(host_decisions, in_graph_decisions)
    assert 0 < in_graph_decisions[4:].sum() < steps - 4  # both kinds of step occur
    # XLA may compile a convolution's gradient differently inside and outside
    # a conditional, so sampled steps agree to rounding, not bit for bit.
    assert_close(host_params, in_graph_params, rtol=1e-6)
    assert host_step.path == "host"


def test_host_path_reads_plan_once_per_window():
    steps = 4 + WINDOWS * WINDOW
    _, _, _, step = run(SmallMLP(), "host", steps)
    # One read for the warm-up and the partial first window, then one per window.
    assert step.plan_reads <= WINDOWS + 2


def test_host_path_does_not_recompile():
    _, _, _, step = run(SmallMLP(), "host", 4 + WINDOWS * WINDOW)
    sizes = (step._sample_step._cache_size(), step._skip_step._cache_size())
    assert sizes == (1, 1)


@pytest.mark.parametrize("path", ["in_graph", "host"])
def test_model_state_follows_clean_pass_only(path):
    model = SmallCNN(batch_norm=True)
    x, y = make_batches(1)[0]
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def loss_fn(params, batch_stats, batch):
        logits, mutated = model.apply(
            {"params": params, "batch_stats": batch_stats}, batch[0], mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
        return loss, mutated["batch_stats"]

    tx = vsam_chain()
    step = optax_psf.make_train_step(loss_fn, tx, has_model_state=True, path=path)
    output = step(params, tx.init(params), (x, y), batch_stats)

    # The first step samples (warm-up), so a perturbed forward pass ran. The
    # statistics must still be those of the clean pass alone.
    assert int(output.metrics["second_gradients"]) == 1
    _, clean_stats = loss_fn(params, batch_stats, (x, y))
    chex.assert_trees_all_close(output.model_state, clean_stats, rtol=1e-5, atol=1e-7)

    # The rule is observable: a pass at the perturbed weights gives other statistics.
    grads = jax.grad(lambda p: loss_fn(p, batch_stats, (x, y))[0])(params)
    perturbed = optax_psf.sam_perturbation(0.05).apply(params, grads)
    _, perturbed_stats = loss_fn(perturbed, batch_stats, (x, y))
    differences = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), perturbed_stats, clean_stats)
    assert max(float(d) for d in jax.tree.leaves(differences)) > 1e-6


def test_restored_state_rereads_plan():
    batches = make_batches(30)
    model = SmallMLP()
    params = model.init(jax.random.PRNGKey(0), batches[0][0])["params"]

    def loss_fn(params, batch):
        x, y = batch
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = vsam_chain()
    host = optax_psf.make_train_step(loss_fn, tx, path="host")
    in_graph = optax_psf.make_train_step(loss_fn, tx, path="in_graph")
    opt_state = tx.init(params)
    for batch in batches[:17]:
        params, opt_state = host(params, opt_state, batch)[:2]
    checkpoint = (params, opt_state)

    # Continue from the checkpoint twice: the host step must notice the
    # state it did not produce and read its plan again.
    results = []
    for step in (host, in_graph, host):
        params, opt_state = checkpoint
        for batch in batches[17:]:
            params, opt_state = step(params, opt_state, batch)[:2]
        results.append(int(optax_psf.metrics(opt_state)["second_gradients"]))
    assert results[0] == results[1] == results[2]


def test_invalid_path_raises():
    with pytest.raises(ValueError, match="path"):
        optax_psf.make_train_step(lambda p, b: 0.0, optax.sgd(0.1), path="gpu")


def test_plain_optimizer_uses_single_step():
    step = optax_psf.make_train_step(lambda p, b: jnp.sum(p * b), optax.sgd(0.1), path="host")
    output = step(jnp.ones(3), optax.sgd(0.1).init(jnp.ones(3)), jnp.ones(3))
    np.testing.assert_allclose(output.params, 0.9 * np.ones(3))
    assert output.metrics == {}


def test_host_path_warns_on_rollback(caplog):
    model = SmallMLP()
    batches = make_batches(30)
    params = model.init(jax.random.PRNGKey(0), batches[0][0])["params"]

    def loss_fn(params, batch):
        x, y = batch
        logits = model.apply({"params": params}, x)
        # A non-finite loss on step 12 makes apply_if_finite keep the old state.
        scale = jnp.where(jnp.all(x == batches[12][0]), jnp.nan, 1.0)
        return scale * optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.apply_if_finite(vsam_chain(), max_consecutive_errors=3)
    step = optax_psf.make_train_step(loss_fn, tx, path="host")
    opt_state = tx.init(params)
    with caplog.at_level("WARNING", logger="optax_psf._src.train_step"):
        for batch in batches:
            params, opt_state = step(params, opt_state, batch)[:2]
    assert int(opt_state.total_notfinite) == 1
    assert "did not advance" in caplog.text
