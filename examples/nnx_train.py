"""Train a Flax NNX 1-D CNN on MNIST-1D with SGD, SAM or vSAM.

The NNX counterpart of the Linen loop in ``training.py``: ``grad_fn`` goes
through ``nnx.Optimizer.update(model, grads, grad_fn=...)`` to the optax
chain. Example:

    python examples/nnx_train.py --optimizer vsam --epochs 10
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import optax_psf

logger = logging.getLogger("nnx_train")


class CNN1D(nnx.Module):
    """Three convolution + max-pool stages and a two-layer head, optionally with BatchNorm."""

    def __init__(self, num_classes: int, *, batch_norm: bool = False, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(5,), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(5,), rngs=rngs)
        self.conv3 = nnx.Conv(64, 128, kernel_size=(5,), rngs=rngs)
        self.batch_norm = batch_norm
        if batch_norm:
            self.norm1 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
            self.norm2 = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
            self.norm3 = nnx.BatchNorm(128, momentum=0.9, rngs=rngs)
        self.hidden = nnx.Linear(5 * 128, 256, rngs=rngs)
        self.head = nnx.Linear(256, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for stage in (1, 2, 3):
            x = getattr(self, f"conv{stage}")(x)
            if self.batch_norm:
                x = getattr(self, f"norm{stage}")(x)
            x = nnx.max_pool(nnx.relu(x), window_shape=(2,), strides=(2,), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        return self.head(nnx.relu(self.hidden(x)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_tx(name: str, learning_rate: float, rho: float, total_steps: int, seed: int):
    base = optax.sgd(optax.cosine_decay_schedule(learning_rate, total_steps), momentum=0.9)
    if name == "sgd":
        return base
    if name == "sam":
        return optax.chain(optax_psf.sam(rho), base)
    if name == "vsam":
        return optax.chain(optax_psf.vsam(rho, seed=seed), base)
    raise ValueError(f"optimizer must be one of sgd, sam, vsam, got {name!r}.")


@functools.partial(nnx.jit, static_argnames="planned_sample")
def train_step(
    model: CNN1D,
    optimizer: nnx.Optimizer,
    x: jax.Array,
    y: jax.Array,
    planned_sample: bool | None = None,
):
    """Runs one step; ``planned_sample`` compiles it without vSAM's conditional.

    ``None`` lets vSAM decide inside the step with ``jax.lax.cond``. ``True``
    or ``False`` is the decision read ahead from the state by
    :class:`optax_psf.HostPlan`, which avoids XLA:CPU's slow convolution
    gradients inside a conditional.
    """

    def loss_fn(model):
        return cross_entropy(model(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)

    # grad_fn receives the parameters as a pure state. It rebuilds a copy of
    # the model from them, so BatchNorm statistics of the perturbed pass
    # update only that copy and are dropped.
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)

    def grad_fn(params, _):
        return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest)))(params)

    extra = {} if planned_sample is None else {"planned_sample": planned_sample}
    optimizer.update(model, grads, grad_fn=grad_fn, **extra)
    return loss


@nnx.jit
def predict(model: CNN1D, x: jax.Array) -> jax.Array:
    return jnp.argmax(model(x), axis=-1)


def train_nnx(
    dataset,
    optimizer_name: str,
    *,
    epochs: int,
    batch_size: int = 128,
    learning_rate: float = 0.05,
    rho: float = 0.05,
    batch_norm: bool = False,
    seed: int = 0,
    path: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Trains the NNX CNN and returns per-epoch history and final metrics.

    ``path`` picks how vSAM skips the second gradient, as in
    :func:`optax_psf.make_train_step`: ``"host"`` reads each window's
    decisions with :class:`optax_psf.HostPlan`, ``"in_graph"`` decides inside
    the step, and ``"auto"`` takes ``"host"`` on CPU.
    """
    if path == "auto":
        path = optax_psf.default_path()
    if path not in ("host", "in_graph"):
        raise ValueError(f"path must be auto, host or in_graph, got {path!r}.")
    model = CNN1D(dataset.num_classes, batch_norm=batch_norm, rngs=nnx.Rngs(seed))
    steps_per_epoch = len(dataset.train_images) // batch_size
    total_steps = epochs * steps_per_epoch
    tx = make_tx(optimizer_name, learning_rate, rho, total_steps, seed)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    host_plan = optax_psf.HostPlan() if path == "host" and optimizer_name != "sgd" else None

    rng = np.random.default_rng(seed)
    history = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(dataset.train_images))
        losses = []
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}",
            leave=False,
            disable=not (progress and sys.stderr.isatty()),
        )
        for b in bar:
            index = order[b * batch_size : (b + 1) * batch_size]
            planned = None
            if host_plan is not None:
                planned = host_plan.next(nnx.as_pure(optimizer.opt_state))
            loss = train_step(
                model, optimizer, dataset.train_images[index], dataset.train_labels[index], planned
            )
            losses.append(loss)
        model.eval()
        predictions = predict(model, dataset.test_images)
        entry = {
            "epoch": epoch,
            "wall_time_s": time.perf_counter() - start,
            "train_loss": float(np.mean(jax.device_get(losses))),
            "test_accuracy": float(np.mean(np.asarray(predictions) == dataset.test_labels)),
        }
        if optimizer_name != "sgd":
            metrics = optax_psf.metrics(optimizer.opt_state)
            entry["second_gradients"] = int(metrics["second_gradients"])
            entry["target_rate"] = float(metrics["target_rate"])
        history.append(entry)
        logger.info("%s epoch %d: %s", optimizer_name, epoch, entry)
    return {"optimizer": optimizer_name, "history": history, "steps": total_steps}


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Train a Flax NNX CNN on MNIST-1D with SGD, SAM or vSAM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--optimizer",
        choices=("sgd", "sam", "vsam"),
        default="vsam",
        help="optimizer to train with",
    )
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=0.05,
        help="peak learning rate of the cosine schedule",
    )
    parser.add_argument("--rho", type=float, default=0.05, help="SAM perturbation radius")
    parser.add_argument("--batch-norm", action="store_true", help="add BatchNorm after each conv")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, data order and draws")
    parser.add_argument(
        "--path",
        choices=("auto", "host", "in_graph"),
        default="auto",
        help="how vSAM skips the second gradient; auto picks host on CPU",
    )
    args = parser.parse_args()
    # INFO for this script only; JAX logs its backend probing at INFO.
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.INFO)
    dataset = datasets.load_mnist1d(seed=0)
    train_nnx(
        dataset,
        args.optimizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        rho=args.rho,
        batch_norm=args.batch_norm,
        seed=args.seed,
        path=args.path,
    )


if __name__ == "__main__":
    main()
