"""Training loops of the examples: one Linen model, one optimizer, one seed.

The same function trains SGD, SAM and vSAM from the same initialization, data
order and learning-rate schedule, so their results can be compared directly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import optax_psf

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "sam", "vsam")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by every optimizer of a comparison.

    Attributes:
      epochs: Passes over the training set.
      batch_size: Examples per step; the last partial batch is dropped.
      learning_rate: Peak learning rate of the cosine schedule.
      momentum: Heavy-ball momentum of SGD.
      weight_decay: L2 penalty added to the gradient.
      rho: Radius of SAM's perturbation, for SAM and vSAM.
      vsam: Keyword arguments of :func:`optax_psf.vsam` besides ``rho``.
      seed: Seed of the initialization, the data order and vSAM's draws.
      eval_batch_size: Examples per forward pass when evaluating.
      path: Execution path of the training step, see
        :func:`optax_psf.make_train_step`.
    """

    epochs: int = 60
    batch_size: int = 128
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    rho: float = 0.05
    vsam: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    eval_batch_size: int = 1000
    path: str = "auto"


def make_optimizer(
    name: str, config: TrainConfig, total_steps: int
) -> optax.GradientTransformation:
    """Returns SGD with momentum, optionally behind SAM or vSAM.

    Raises:
      ValueError: If ``name`` is not one of :data:`OPTIMIZERS`.
    """
    schedule = optax.cosine_decay_schedule(config.learning_rate, total_steps)
    base = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum),
    )
    if name == "sgd":
        return base
    if name == "sam":
        return optax.chain(optax_psf.sam(config.rho), base)
    if name == "vsam":
        return optax.chain(optax_psf.vsam(config.rho, seed=config.seed, **config.vsam), base)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}.")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_loss_fn(model: nn.Module, has_batch_stats: bool):
    """Returns the loss in the form :func:`optax_psf.make_train_step` expects.

    With BatchNorm: ``loss_fn(params, batch_stats, (x, y)) -> (loss,
    new_batch_stats)``; without: ``loss_fn(params, (x, y)) -> loss``.
    """

    if has_batch_stats:

        def loss_with_stats(params, batch_stats, batch):
            x, y = batch
            variables = {"params": params, "batch_stats": batch_stats}
            logits, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return cross_entropy(logits, y), mutated["batch_stats"]

        return loss_with_stats

    def loss(params, batch):
        x, y = batch
        return cross_entropy(model.apply({"params": params}, x, train=True), y)

    return loss


def make_predict(model: nn.Module):
    def predict(params, batch_stats, x):
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        return jnp.argmax(model.apply(variables, x, train=False), axis=-1)

    return jax.jit(predict)


def accuracy(predict, params, batch_stats, images, labels, batch_size) -> float:
    correct = 0
    for start in range(0, len(images), batch_size):
        predictions = predict(params, batch_stats, images[start : start + batch_size])
        correct += int(jnp.sum(predictions == labels[start : start + batch_size]))
    return correct / len(images)


def train(
    model: nn.Module,
    dataset,
    optimizer: str,
    config: TrainConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains ``model`` on ``dataset`` with one optimizer and returns its record.

    Args:
      model: A Linen module called as ``model(x, train=...)``.
      dataset: An object with ``train_images``, ``train_labels``,
        ``test_images`` and ``test_labels`` arrays.
      optimizer: One of :data:`OPTIMIZERS`.
      config: The hyperparameters.
      progress: Whether to show a tqdm bar per epoch.

    Returns:
      A dict with the final ``test_accuracy``, ``train_loss`` (mean over the
      last epoch), ``wall_time_s`` (training only, without compilation and
      evaluation), ``compile_time_s``, ``grad_evals``, ``sample_fraction``,
      ``time_per_epoch_s``, per-epoch ``history`` and, for SAM and vSAM,
      per-step ``trace`` lists of ``sampled``, ``target_rate`` and ``psf_norm``.
    """
    steps_per_epoch = len(dataset.train_images) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    tx = make_optimizer(optimizer, config, total_steps)
    tracks_psf = optimizer != "sgd"

    init_key = jax.random.PRNGKey(config.seed)
    variables = model.init(init_key, dataset.train_images[:1], train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    opt_state = tx.init(params)

    has_batch_stats = bool(batch_stats)
    step = optax_psf.make_train_step(
        make_loss_fn(model, has_batch_stats),
        tx,
        has_model_state=has_batch_stats,
        path=config.path,
        donate=True,
    )
    example_batch = (
        jnp.asarray(dataset.train_images[: config.batch_size]),
        jnp.asarray(dataset.train_labels[: config.batch_size]),
    )
    compile_time = step.compile(
        params, opt_state, example_batch, batch_stats if has_batch_stats else None
    )
    predict = make_predict(model)

    order_rng = np.random.default_rng(config.seed)
    trace = {"sampled": [], "target_rate": [], "psf_norm": []}
    history = []
    train_time = 0.0
    second_gradients = 0
    for epoch in range(1, config.epochs + 1):
        order = order_rng.permutation(len(dataset.train_images))
        losses, step_metrics = [], []
        epoch_start = time.perf_counter()
        batches = range(steps_per_epoch)
        bar = tqdm(batches, desc=f"{optimizer} epoch {epoch}", leave=False, disable=not progress)
        for b in bar:
            index = order[b * config.batch_size : (b + 1) * config.batch_size]
            x = jnp.asarray(dataset.train_images[index])
            y = jnp.asarray(dataset.train_labels[index])
            output = step(params, opt_state, (x, y), batch_stats if has_batch_stats else None)
            params, opt_state, loss = output.params, output.opt_state, output.loss
            if has_batch_stats:
                batch_stats = output.model_state
            losses.append(loss)
            step_metrics.append(output.metrics)
        jax.block_until_ready(params)
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time

        if tracks_psf:
            for metrics in jax.device_get(step_metrics):
                sampled = int(metrics["second_gradients"]) > second_gradients
                second_gradients = int(metrics["second_gradients"])
                trace["sampled"].append(sampled)
                trace["target_rate"].append(float(metrics["target_rate"]))
                trace["psf_norm"].append(float(metrics["psf_norm"]))
        train_loss = float(np.mean(jax.device_get(losses)))
        test_accuracy = accuracy(
            predict,
            params,
            batch_stats,
            dataset.test_images,
            dataset.test_labels,
            config.eval_batch_size,
        )
        history.append(
            {
                "epoch": epoch,
                "wall_time_s": train_time,
                "epoch_time_s": epoch_time,
                "train_loss": train_loss,
                "test_accuracy": test_accuracy,
            }
        )
        logger.debug("%s epoch %d: %s", optimizer, epoch, history[-1])

    grad_evals = total_steps + second_gradients
    record = {
        "optimizer": optimizer,
        "seed": config.seed,
        "test_accuracy": history[-1]["test_accuracy"],
        "train_loss": history[-1]["train_loss"],
        "wall_time_s": train_time,
        "compile_time_s": compile_time,
        "time_per_epoch_s": train_time / config.epochs,
        "steps": total_steps,
        "grad_evals": grad_evals,
        "sample_fraction": (grad_evals - total_steps) / total_steps,
        "history": history,
    }
    if tracks_psf:
        record["trace"] = trace
    return record
