"""Train vSAM on several devices of one process and print each device's decisions.

Runs the same 40 steps four ways and checks that every device takes the same
decisions: on one device with the whole batch, with ``jax.pmap``, with
``jax.jit`` over a ``Mesh`` and with ``jax.shard_map``. On a CPU, simulate
devices with an XLA flag set before JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/multi_device.py
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib

import datasets
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_psf

logger = logging.getLogger("multi_device")
AXIS = "batch"


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(nn.tanh(nn.Dense(64)(x)))


def make_tx(axis_name: str | None = None) -> optax.GradientTransformation:
    return optax.chain(
        optax_psf.vsam(
            0.05, window=10, blocks=5, warmup_steps=5, max_rate=0.5, axis_name=axis_name
        ),
        optax.sgd(0.05, momentum=0.9),
    )


def loss_fn(params, x, y):
    logits = MLP().apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def update(tx, params, opt_state, x, y, axis_name=None, average_loss=False):
    """Runs one step of ``tx`` on the batch ``(x, y)``.

    Under ``pmap``, pass ``axis_name`` so the clean gradient is averaged over
    the devices. Under ``shard_map``, pass ``average_loss=True`` as well: the
    loss is averaged with ``pmean``, and the gradient with respect to the
    replicated parameters then comes out averaged already.
    """

    def batch_loss(params):
        loss = loss_fn(params, x, y)
        return jax.lax.pmean(loss, axis_name) if average_loss else loss

    grads = jax.grad(batch_loss)(params)
    if axis_name is not None and not average_loss:
        grads = jax.lax.pmean(grads, axis_name)
    grad_fn = jax.grad(lambda p, _: batch_loss(p))
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state


def batches(steps: int, batch_size: int):
    data = datasets.load_mnist1d(seed=0, num_samples=1000)
    for step in range(steps):
        start = (step * batch_size) % (len(data.train_images) - batch_size)
        yield (
            data.train_images[start : start + batch_size],
            data.train_labels[start : start + batch_size],
        )


def per_device(value: jax.Array) -> list[int]:
    """Returns the copy of a replicated scalar that each device holds."""
    if value.ndim == 1:  # pmap output: one entry per device.
        return [int(v) for v in value]
    shards = sorted(value.addressable_shards, key=lambda shard: shard.device.id)
    return [int(shard.data) for shard in shards]


def run(mode: str, params, steps: int, batch_size: int) -> dict:
    """Trains ``steps`` steps in ``mode`` and returns per-device decisions and parameters."""
    devices = jax.devices()
    n = len(devices)
    mesh = Mesh(np.array(devices), (AXIS,))
    if mode == "single":
        tx = make_tx()
        step = jax.jit(lambda p, s, x, y: update(tx, p, s, x, y))
    elif mode == "pmap":
        tx = make_tx(AXIS)
        step = jax.pmap(lambda p, s, x, y: update(tx, p, s, x, y, AXIS), axis_name=AXIS)
    elif mode == "mesh_jit":
        tx = make_tx()
        replicated = NamedSharding(mesh, P())
        params = jax.device_put(params, replicated)
        step = jax.jit(lambda p, s, x, y: update(tx, p, s, x, y))
    elif mode == "shard_map":
        tx = make_tx(AXIS)
        params = jax.device_put(params, NamedSharding(mesh, P()))
        step = jax.jit(
            jax.shard_map(
                lambda p, s, x, y: update(tx, p, s, x, y, AXIS, average_loss=True),
                mesh=mesh,
                in_specs=(P(), P(), P(AXIS), P(AXIS)),
                out_specs=(P(), P()),
            )
        )
    else:
        raise ValueError(f"mode must be single, pmap, mesh_jit or shard_map, got {mode!r}.")

    opt_state = tx.init(params)
    if mode == "pmap":
        params, opt_state = jax.tree.map(
            lambda leaf: np.broadcast_to(np.asarray(leaf), (n, *np.shape(leaf))),
            (params, opt_state),
        )
    decisions = []  # per step, per device
    previous = None
    for x, y in batches(steps, batch_size):
        if mode == "pmap":
            x = x.reshape((n, -1, *x.shape[1:]))
            y = y.reshape((n, -1))
        elif mode in ("mesh_jit", "shard_map"):
            x = jax.device_put(x, NamedSharding(mesh, P(AXIS)))
            y = jax.device_put(y, NamedSharding(mesh, P(AXIS)))
        params, opt_state = step(params, opt_state, x, y)
        counts = per_device(optax_psf.metrics(opt_state)["second_gradients"])
        previous = previous or [0] * len(counts)
        decisions.append([int(c > p) for c, p in zip(counts, previous, strict=True)])
        previous = counts
    if mode == "pmap":
        params = jax.tree.map(lambda leaf: leaf[0], params)
    return {
        "decisions": decisions,
        "params": jax.tree.map(lambda leaf: np.asarray(leaf).tolist(), params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Check that vSAM takes the same decisions on every device.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps per mode")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="global examples per step, split over the devices",
    )
    parser.add_argument(
        "--json",
        type=pathlib.Path,
        default=None,
        help="where to write each mode's decisions and final parameters",
    )
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.INFO)

    n = jax.device_count()
    if args.batch_size % n:
        raise ValueError(f"--batch-size {args.batch_size} must divide by the {n} devices.")
    x0 = jnp.zeros((1, 40, 1))
    params = MLP().init(jax.random.PRNGKey(0), x0)["params"]
    results = {}
    for mode in ("single", "pmap", "mesh_jit", "shard_map"):
        results[mode] = run(mode, params, args.steps, args.batch_size)
        decisions = np.asarray(results[mode]["decisions"])
        same = bool((decisions == decisions[:, :1]).all())
        logger.info("%-9s devices agree at every step: %s", mode, same)
        for device in range(decisions.shape[1]):
            row = "".join("S" if d else "." for d in decisions[:, device])
            logger.info("  device %d  %s", device, row)
    if args.json:
        args.json.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
