"""Train a small Flax Linen CNN on scikit-learn's digits with vSAM.

The data ship with scikit-learn, so nothing is downloaded. Run:

    python examples/quickstart_linen.py --epochs 10
"""

from __future__ import annotations

import argparse
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import optax_psf

logger = logging.getLogger("quickstart")


class DigitsCNN(nn.Module):
    """Two convolutions and a linear classifier for 8x8 images."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(x)


def load_split(seed: int):
    """Returns train and test arrays, 1497 and 300 images scaled to [0, 1]."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(images))
    train, test = order[300:], order[:300]
    return (images[train], labels[train]), (images[test], labels[test])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step")
    parser.add_argument("--learning-rate", type=float, default=0.05, help="SGD step size")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM perturbation radius")
    parser.add_argument("--window", type=int, default=20, help="vSAM window, in steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and init")
    args = parser.parse_args()
    # INFO for this script only; JAX logs its backend probing at INFO.
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.INFO)

    (train_x, train_y), (test_x, test_y) = load_split(args.seed)
    model = DigitsCNN()
    params = model.init(jax.random.PRNGKey(args.seed), train_x[:1])
    tx = optax.chain(
        optax_psf.vsam(args.rho, window=args.window, blocks=5, seed=args.seed),
        optax.sgd(args.learning_rate, momentum=0.9),
    )
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        # vSAM calls grad_fn at the perturbed weights, only on sampled steps.
        grad_fn = jax.grad(lambda p, _: loss_fn(p, x, y))
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(model.apply(params, x), axis=-1) == y)

    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(train_x) // args.batch_size
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(train_x))
        losses = []
        for b in range(steps_per_epoch):
            index = order[b * args.batch_size : (b + 1) * args.batch_size]
            params, opt_state, loss = train_step(params, opt_state, train_x[index], train_y[index])
            losses.append(loss)
        metrics = optax_psf.metrics(opt_state)
        logger.info(
            "epoch %2d  train loss %.4f  test accuracy %.3f  second gradients %d/%d"
            "  target rate %.3f",
            epoch,
            float(np.mean(losses)),
            float(accuracy(params, test_x, test_y)),
            int(metrics["second_gradients"]),
            int(metrics["steps"]),
            float(metrics["target_rate"]),
        )


if __name__ == "__main__":
    main()
