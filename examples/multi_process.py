"""Train vSAM with data parallelism over several processes on one machine.

Every process builds the same MNIST-1D data and the same initial parameters, joins one
``jax.sharding.Mesh`` over the devices of all processes and feeds its own rows of each global
batch. The step is one ``jax.jit`` with vSAM's in-graph ``jax.lax.cond``, and XLA averages the
gradients across processes with the Gloo CPU collectives. Each process writes its per-step
decisions and its copy of the final parameters to a JSON file, so the runs can be compared with
each other and with a single-process reference run. Start two processes on 127.0.0.1:

    python examples/multi_process.py --num-processes 2 --process-id 0 --port 12355 --out p0.json
    python examples/multi_process.py --num-processes 2 --process-id 1 --port 12355 --out p1.json

and the reference with all four devices in one process:

    python examples/multi_process.py --single --local-devices 4 --out single.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any

import datasets
import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_psf

logger = logging.getLogger("multi_process")

AXIS = "batch"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class MLP(nn.Module):
    """A one-hidden-layer perceptron over the flattened 40-step MNIST-1D signal.

    A dense model keeps the in-graph ``jax.lax.cond`` fast on CPU, where XLA compiles the
    gradient of a convolution inside a conditional into a slow loop.
    """

    hidden: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--single",
        action="store_true",
        help="run the reference in this process alone, without jax.distributed",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=2,
        help="number of processes in the distributed run, ignored with --single",
    )
    parser.add_argument(
        "--process-id", type=int, default=None, help="index of this process, from 0"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="TCP port of the JAX coordinator on 127.0.0.1, which process 0 starts",
    )
    parser.add_argument(
        "--local-devices", type=int, default=2, help="number of CPU devices of this process"
    )
    parser.add_argument(
        "--init-timeout",
        type=int,
        default=60,
        help="seconds to wait for all processes to connect to the coordinator",
    )
    parser.add_argument("--steps", type=int, default=40, help="number of training steps")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="global examples per step, split evenly over all devices of all processes",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=1000,
        help="MNIST-1D samples to generate, of which 80%% are used for training",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data, the initialization and vSAM"
    )
    parser.add_argument(
        "--out", type=pathlib.Path, required=True, help="path of the JSON file to write"
    )
    args = parser.parse_args(argv)

    if args.local_devices < 1:
        parser.error(f"--local-devices must be at least 1, got {args.local_devices}.")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}.")
    if args.single:
        if args.process_id is not None or args.port is not None:
            parser.error("--single runs one process: omit --process-id and --port.")
        args.num_processes = 1
        args.process_id = 0
    else:
        if args.process_id is None or args.port is None:
            parser.error("--process-id and --port are required unless --single is passed.")
        if args.num_processes < 1:
            parser.error(f"--num-processes must be at least 1, got {args.num_processes}.")
        if not 0 <= args.process_id < args.num_processes:
            parser.error(
                f"--process-id must be in [0, {args.num_processes}), got {args.process_id}."
            )
        if not 0 < args.port < 65536:
            parser.error(f"--port must be in [1, 65535], got {args.port}.")
    global_devices = args.num_processes * args.local_devices
    if args.batch_size % global_devices != 0:
        parser.error(
            f"--batch-size must be a multiple of the {global_devices} devices of all processes,"
            f" got {args.batch_size}."
        )
    return args


def request_cpu_devices(count: int) -> None:
    """Requests ``count`` CPU devices for this process through ``XLA_FLAGS``.

    XLA reads ``XLA_FLAGS`` when JAX creates its CPU backend, so this must run before the first
    JAX computation. :func:`start_jax` checks the device count afterwards. A device count
    already in ``XLA_FLAGS`` is replaced, and the other flags are kept.
    """
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags.strip()} {DEVICE_COUNT_FLAG}={count}".strip()


def start_jax(args: argparse.Namespace) -> None:
    """Configures the CPU backend and, for a distributed run, connects to the other processes."""
    request_cpu_devices(args.local_devices)
    jax.config.update("jax_platforms", "cpu")
    # Without a cross-process implementation, XLA:CPU rejects computations whose devices belong
    # to several processes. Gloo is the default in jax 0.10.2, and naming it keeps the script
    # independent of that default.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not args.single:
        address = f"127.0.0.1:{args.port}"
        logger.info(
            "process %d of %d: connecting to the coordinator at %s",
            args.process_id,
            args.num_processes,
            address,
        )
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=args.num_processes,
            process_id=args.process_id,
            # Process 0 listens on the loopback interface only, not on every interface.
            coordinator_bind_address=address,
            initialization_timeout=args.init_timeout,
        )
    if jax.local_device_count() != args.local_devices:
        raise RuntimeError(
            f"expected {args.local_devices} local CPU devices, got {jax.local_device_count()}:"
            f" JAX started its CPU backend before {DEVICE_COUNT_FLAG} was set. Create no JAX"
            " array before start_jax."
        )
    logger.info(
        "process %d of %d: %d local and %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def make_optimizer(seed: int) -> optax.GradientTransformationExtraArgs:
    """Builds vSAM with a short window in front of SGD with momentum."""
    return optax.chain(
        optax_psf.vsam(0.05, window=10, blocks=5, warmup_steps=5, max_rate=0.5, seed=seed),
        optax.sgd(0.05, momentum=0.9),
    )


def global_batches(steps: int, batch_size: int, num_samples: int, seed: int):
    """Yields the global ``(images, labels)`` batches, the same in every process.

    The training set is shuffled once with ``seed`` and cut into consecutive batches, starting
    again from its beginning when fewer than ``batch_size`` examples remain.
    """
    data = datasets.load_mnist1d(seed=seed, num_samples=num_samples)
    if len(data.train_images) < batch_size:
        raise ValueError(
            f"batch size {batch_size} is larger than the {len(data.train_images)} training"
            f" examples of {num_samples} samples: raise --num-samples."
        )
    order = np.random.default_rng(seed).permutation(len(data.train_images))
    images, labels = data.train_images[order], data.train_labels[order]
    batches_per_pass = len(images) // batch_size
    for step in range(steps):
        start = (step % batches_per_pass) * batch_size
        yield images[start : start + batch_size], labels[start : start + batch_size]


def process_rows(sharding: NamedSharding, global_rows: int) -> slice:
    """Returns the rows of a batch-sharded global array that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map((global_rows,))
    starts = sorted({index[0].indices(global_rows)[0] for index in index_map.values()})
    stops = sorted({index[0].indices(global_rows)[1] for index in index_map.values()})
    if starts[1:] != stops[:-1]:
        raise ValueError(f"this process's rows are not contiguous: starts {starts}, stops {stops}.")
    return slice(starts[0], stops[-1])


def replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Builds global arrays replicated over ``sharding`` from host values equal in every process."""

    def to_global(leaf):
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(to_global, tree)


def local_copy(tree: Any) -> Any:
    """Returns this process's copy of a replicated pytree as nested lists.

    Raises:
      RuntimeError: If two devices of this process hold different values.
    """

    def read(leaf):
        shards = [np.asarray(shard.data) for shard in leaf.addressable_shards]
        for shard in shards[1:]:
            if not np.array_equal(shard, shards[0]):
                raise RuntimeError(
                    f"the devices of process {jax.process_index()} hold different values of"
                    " a replicated parameter."
                )
        return shards[0].tolist()

    return jax.tree.map(read, tree)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Trains the MLP and returns this process's decisions, losses and final parameters."""
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(AXIS))
    rows = process_rows(batch_sharding, args.batch_size)
    logger.info(
        "process %d feeds rows %d to %d of each batch of %d",
        jax.process_index(),
        rows.start,
        rows.stop - 1,
        args.batch_size,
    )

    model = MLP()
    sample_input = np.zeros((1, 40, 1), np.float32)
    # One compiled call is faster than Flax's op-by-op initialization.
    init_params = jax.jit(model.init)(jax.random.PRNGKey(args.seed), sample_input)["params"]
    params = replicate(init_params, replicated)
    tx = make_optimizer(args.seed)
    # tx.init gives the PSF cache the parameters' sharding and replicates the rest of the
    # state over their mesh, so train_step gets the same input shardings on every call.
    opt_state = tx.init(params)

    def loss_fn(params, images, labels):
        logits = model.apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train_step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        # Called only on the steps that vSAM samples, inside its jax.lax.cond.
        grad_fn = jax.grad(lambda p, _: loss_fn(p, images, labels))
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, optax_psf.metrics(opt_state)

    start = time.perf_counter()
    decisions, losses = [], []
    sampled_before = 0
    batches = global_batches(args.steps, args.batch_size, args.num_samples, args.seed)
    for step, (images, labels) in enumerate(batches):
        images = jax.make_array_from_process_local_data(batch_sharding, images[rows], images.shape)
        labels = jax.make_array_from_process_local_data(batch_sharding, labels[rows], labels.shape)
        params, opt_state, loss, metrics = train_step(params, opt_state, images, labels)
        if step == 0:
            logger.info("compiled and ran the first step in %.1f s", time.perf_counter() - start)

        # The metrics are replicated scalars, so every process reads them from its own devices.
        sampled = int(metrics["second_gradients"])
        decisions.append(sampled - sampled_before)
        sampled_before = sampled
        losses.append(float(loss))
        if (step + 1) % 10 == 0:
            logger.info(
                "step %d: loss %.4f, %d of %d steps sampled, target rate %.2f",
                step + 1,
                losses[-1],
                sampled,
                step + 1,
                float(metrics["target_rate"]),
            )

    return {
        "process_id": jax.process_index(),
        "num_processes": jax.process_count(),
        "global_devices": jax.device_count(),
        "decisions": decisions,
        "losses": losses,
        "params": local_copy(params),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Runs one process of the distributed job, or the single-process reference."""
    args = parse_args(argv)
    # INFO for this script only, because JAX logs its backend setup at INFO.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    start_jax(args)
    record = train(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record))
    logger.info(
        "process %d: %d of %d steps sampled, wrote %s",
        record["process_id"],
        sum(record["decisions"]),
        len(record["decisions"]),
        args.out,
    )
    if not args.single:
        # Waits at a barrier for the other processes, so that process 0 keeps the coordinator
        # running until every process is done.
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
