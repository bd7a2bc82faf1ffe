"""Training loops of the examples for Flax Linen models.

SGD, SAM and vSAM train from the same initialization, data order and
learning-rate schedule, so their results can be compared directly.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
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
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
        return jnp.argmax(model.apply(variables, x, train=False), axis=-1)

    return jax.jit(predict)


def accuracy(predict, params, batch_stats, images, labels, batch_size) -> float:
    correct = 0
    for start in range(0, len(images), batch_size):
        predictions = predict(params, batch_stats, images[start : start + batch_size])
        correct += int(jnp.sum(predictions == labels[start : start + batch_size]))
    return correct / len(images)


class Trainer:
    """Trains ``model`` on ``dataset`` with one optimizer, one epoch at a time.

    Building it initializes the model and compiles the step. Epochs of several
    trainers can then alternate, so that a slow spell of a shared machine
    falls on every optimizer alike.

    Args:
      model: A Linen module called as ``model(x, train=...)``.
      dataset: An object with ``train_images``, ``train_labels``,
        ``test_images`` and ``test_labels`` arrays.
      optimizer: One of :data:`OPTIMIZERS`.
      config: The hyperparameters.
      progress: Whether to show a tqdm bar per epoch (only on a terminal).
    """

    def __init__(
        self,
        model: nn.Module,
        dataset,
        optimizer: str,
        config: TrainConfig,
        *,
        progress: bool = True,
    ):
        self.optimizer = optimizer
        self.config = config
        self.dataset = dataset
        self.progress = progress and sys.stderr.isatty()
        self.steps_per_epoch = len(dataset.train_images) // config.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        tx = make_optimizer(optimizer, config, self.total_steps)
        self.tracks_psf = optimizer != "sgd"

        variables = model.init(
            jax.random.PRNGKey(config.seed), dataset.train_images[:1], train=False
        )
        self.params = variables["params"]
        self.has_batch_stats = "batch_stats" in variables
        self.batch_stats = variables.get("batch_stats")
        self.opt_state = tx.init(self.params)
        self.step = optax_psf.make_train_step(
            make_loss_fn(model, self.has_batch_stats),
            tx,
            has_model_state=self.has_batch_stats,
            path=config.path,
            donate=True,
        )
        example_batch = (
            jnp.asarray(dataset.train_images[: config.batch_size]),
            jnp.asarray(dataset.train_labels[: config.batch_size]),
        )
        self.compile_time = self.step.compile(
            self.params, self.opt_state, example_batch, self.batch_stats
        )
        self.predict = make_predict(model)
        self.order_rng = np.random.default_rng(config.seed)
        self.trace: dict[str, list] = {"sampled": [], "target_rate": [], "psf_norm": []}
        self.history: list[dict[str, float]] = []
        self.train_time = 0.0
        self.second_gradients = 0

    def train_epoch(self) -> dict[str, float]:
        """Trains one epoch, evaluates, and returns that epoch's history entry."""
        config, dataset = self.config, self.dataset
        epoch = len(self.history) + 1
        order = self.order_rng.permutation(len(dataset.train_images))
        losses, step_metrics = [], []
        bar = tqdm(
            range(self.steps_per_epoch),
            desc=f"{self.optimizer} epoch {epoch}",
            leave=False,
            disable=not self.progress,
        )
        epoch_start = time.perf_counter()
        for b in bar:
            index = order[b * config.batch_size : (b + 1) * config.batch_size]
            x = jnp.asarray(dataset.train_images[index])
            y = jnp.asarray(dataset.train_labels[index])
            output = self.step(self.params, self.opt_state, (x, y), self.batch_stats)
            self.params, self.opt_state = output.params, output.opt_state
            self.batch_stats = output.model_state
            losses.append(output.loss)
            step_metrics.append(output.metrics)
        jax.block_until_ready(self.params)
        epoch_time = time.perf_counter() - epoch_start
        self.train_time += epoch_time

        if self.tracks_psf:
            for metrics in jax.device_get(step_metrics):
                count = int(metrics["second_gradients"])
                self.trace["sampled"].append(count > self.second_gradients)
                self.trace["target_rate"].append(float(metrics["target_rate"]))
                self.trace["psf_norm"].append(float(metrics["psf_norm"]))
                self.second_gradients = count
        entry = {
            "epoch": epoch,
            "wall_time_s": self.train_time,
            "epoch_time_s": epoch_time,
            "train_loss": float(np.mean(jax.device_get(losses))),
            "test_accuracy": accuracy(
                self.predict,
                self.params,
                self.batch_stats,
                dataset.test_images,
                dataset.test_labels,
                config.eval_batch_size,
            ),
        }
        self.history.append(entry)
        logger.debug("%s epoch %d: %s", self.optimizer, epoch, entry)
        return entry

    def record(self) -> dict[str, Any]:
        """Returns the run's results; see :func:`train`."""
        grad_evals = self.total_steps + self.second_gradients
        record = {
            "optimizer": self.optimizer,
            "seed": self.config.seed,
            "test_accuracy": self.history[-1]["test_accuracy"],
            "train_loss": self.history[-1]["train_loss"],
            "wall_time_s": self.train_time,
            "compile_time_s": self.compile_time,
            "time_per_epoch_s": self.train_time / len(self.history),
            "steps": self.total_steps,
            "grad_evals": grad_evals,
            "sample_fraction": self.second_gradients / self.total_steps,
            "history": self.history,
        }
        if self.tracks_psf:
            record["trace"] = self.trace
        return record


def train_side_by_side(
    model: nn.Module, dataset, optimizers, config: TrainConfig, *, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Trains several optimizers with their epochs interleaved; returns each record.

    Every optimizer trains one epoch in turn, so drifts in the machine's speed
    affect their training times alike.
    """
    trainers = {
        name: Trainer(model, dataset, name, config, progress=progress) for name in optimizers
    }
    for _ in range(config.epochs):
        for trainer in trainers.values():
            trainer.train_epoch()
    return {name: trainer.record() for name, trainer in trainers.items()}


def train(
    model: nn.Module,
    dataset,
    optimizer: str,
    config: TrainConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains ``model`` on ``dataset`` with one optimizer and returns its record.

    The arguments are those of :class:`Trainer`.

    Returns:
      A dict with the final ``test_accuracy``, ``train_loss`` (mean over the
      last epoch), ``wall_time_s`` (training only, without compilation and
      evaluation), ``compile_time_s``, ``grad_evals``, ``sample_fraction``,
      ``time_per_epoch_s``, per-epoch ``history`` and, for SAM and vSAM,
      per-step ``trace`` lists of ``sampled``, ``target_rate`` and ``psf_norm``.
    """
    trainer = Trainer(model, dataset, optimizer, config, progress=progress)
    for _ in range(config.epochs):
        trainer.train_epoch()
    return trainer.record()
