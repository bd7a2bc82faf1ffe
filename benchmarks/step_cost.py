"""Cost per training step of SGD, SAM and vSAM's two kinds of step, per path.

For a 1-D CNN on MNIST-1D and an MLP of similar size (batch 128), times jitted
training steps built by ``optax_psf.make_train_step``:

- ``sgd``: SGD with momentum alone.
- ``sam_optax``: ``optax.contrib.sam`` in opaque mode.
- ``sam``: ``optax_psf.sam``.
- ``vsam_sample`` and ``vsam_skip``: vSAM's engine with a policy that always
  or never samples, decided at run time (not fixed at trace time), so each
  path runs as it would inside a real vSAM run.

The programs run interleaved, in blocks of steps, so machine load affects
them alike. It prints a table and writes JSON:

    python benchmarks/step_cost.py --json benchmarks/results/step_cost.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import pathlib
import platform
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_psf

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import datasets  # noqa: E402
import models  # noqa: E402

logger = logging.getLogger("step_cost")
RHO = 0.05


class MLP(nn.Module):
    """40 -> 512 -> 384 -> 10, about as many parameters as the 1-D CNN."""

    @nn.compact
    def __call__(self, x, train=True):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(512)(x))
        x = nn.relu(nn.Dense(384)(x))
        return nn.Dense(10)(x)


def base_optimizer():
    return optax.sgd(0.01, momentum=0.9)


def run_time_policy(policy: optax_psf.SamplingPolicy) -> optax_psf.SamplingPolicy:
    """Returns ``policy`` with its decision made at run time, not at trace time."""
    return policy._replace(static_decision=None)


def vsam_engine(policy):
    return optax_psf.psf_reuse(
        policy=run_time_policy(policy),
        perturbation=optax_psf.sam_perturbation(RHO),
        reuse=optax_psf.decayed_psf(),
    )


def programs() -> dict[str, tuple[optax.GradientTransformation, tuple[str, ...]]]:
    """Returns, per program, its optimizer and the paths it is timed in."""
    both = ("in_graph", "host")
    return {
        "sgd": (base_optimizer(), ("none",)),
        "sam_optax": (
            optax.contrib.sam(
                base_optimizer(),
                optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
                opaque_mode=True,
            ),
            ("none",),
        ),
        "sam": (optax.chain(optax_psf.sam(RHO), base_optimizer()), ("none",)),
        "vsam_sample": (
            optax.chain(vsam_engine(optax_psf.always_sample()), base_optimizer()),
            both,
        ),
        "vsam_skip": (optax.chain(vsam_engine(optax_psf.never_sample()), base_optimizer()), both),
    }


def tree_bytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time SGD, SAM and vSAM training steps side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--models", nargs="+", choices=("cnn", "mlp"), default=["cnn", "mlp"], help="models to time"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step")
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="interleaved rounds; each times one block per program",
    )
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per program first")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="where to write JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    dataset = datasets.load_mnist1d(seed=0)
    batch = (
        jnp.asarray(dataset.train_images[: args.batch_size]),
        jnp.asarray(dataset.train_labels[: args.batch_size]),
    )

    cases = []
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for model_name in args.models:
        model = models.CNN1D(10) if model_name == "cnn" else MLP()
        params = model.init(jax.random.PRNGKey(0), batch[0])["params"]
        param_bytes = tree_bytes(params)

        def loss_fn(params, batch, model=model):
            logits = model.apply({"params": params}, batch[0])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

        runners = {}
        for program, (tx, paths) in programs().items():
            for path in paths:
                step = optax_psf.make_train_step(
                    loss_fn, tx, path="in_graph" if path == "none" else path, donate=True
                )
                opt_state = tx.init(params)
                compile_s = step.compile(params, opt_state, batch)
                state = {"params": jax.tree.map(jnp.copy, params), "opt_state": opt_state}
                for _ in range(args.warmup):
                    output = step(state["params"], state["opt_state"], batch)
                    state = {"params": output.params, "opt_state": output.opt_state}
                jax.block_until_ready(state["params"])
                runners[(program, path)] = {
                    "step": step,
                    "state": state,
                    "compile_s": compile_s,
                    "times": [],
                    "state_bytes": tree_bytes(opt_state) if program != "vsam_skip" else None,
                }
                runners[(program, path)]["state_bytes"] = tree_bytes(state["opt_state"])

        for _ in range(args.rounds):
            for runner in runners.values():
                step, state = runner["step"], runner["state"]
                start = time.perf_counter()
                for _ in range(args.block):
                    output = step(state["params"], state["opt_state"], batch)
                    state = {"params": output.params, "opt_state": output.opt_state}
                jax.block_until_ready(state["params"])
                runner["times"].append(1e3 * (time.perf_counter() - start) / args.block)
                runner["state"] = state

        medians = {}
        for (program, path), runner in runners.items():
            times = np.asarray(runner["times"])
            medians[(program, path)] = float(np.median(times))
            cases.append(
                {
                    "model": model_name,
                    "program": program,
                    "path": path,
                    "median_ms": float(np.median(times)),
                    "p10_ms": float(np.percentile(times, 10)),
                    "p90_ms": float(np.percentile(times, 90)),
                    "compile_s": runner["compile_s"],
                    "state_bytes": runner["state_bytes"],
                    "param_bytes": param_bytes,
                    "steps_timed": args.rounds * args.block,
                }
            )
        ratios[model_name] = {}
        for path in ("in_graph", "host"):
            ratios[model_name][path] = {
                "skip_over_sgd": medians[("vsam_skip", path)] / medians[("sgd", "none")],
                "sample_over_sam": medians[("vsam_sample", path)] / medians[("sam_optax", "none")],
                "sample_over_optax_psf_sam": (
                    medians[("vsam_sample", path)] / medians[("sam", "none")]
                ),
            }

    header = (
        f"{'model':<5} {'program':<12} {'path':<9} {'median ms':>10} {'p10':>8} {'p90':>8} "
        f"{'compile s':>10} {'state MB':>9}"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        print(
            f"{case['model']:<5} {case['program']:<12} {case['path']:<9} "
            f"{case['median_ms']:>10.2f} {case['p10_ms']:>8.2f} {case['p90_ms']:>8.2f} "
            f"{case['compile_s']:>10.2f} {case['state_bytes'] / 2**20:>9.3f}"
        )
    print()
    for model_name, by_path in ratios.items():
        for path, values in by_path.items():
            print(
                f"{model_name:<5} {path:<9} skip/SGD {values['skip_over_sgd']:.3f}   "
                f"sample/SAM(optax) {values['sample_over_sam']:.3f}   "
                f"sample/SAM(optax_psf) {values['sample_over_optax_psf_sam']:.3f}"
            )
    for model_name in args.models:
        by_program = {c["program"]: c for c in cases if c["model"] == model_name}
        overhead = by_program["vsam_skip"]["state_bytes"] - by_program["sgd"]["state_bytes"]
        print(
            f"{model_name}: vSAM state over SGD's: {overhead} bytes = parameters "
            f"({by_program['sgd']['param_bytes']}) + {overhead - by_program['sgd']['param_bytes']}"
        )

    if args.json:
        record = {
            "command": " ".join(["python", *sys.argv]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "backend": jax.default_backend(),
                "devices": [str(d) for d in jax.devices()],
                "jax": jax.__version__,
            },
            "batch_size": args.batch_size,
            "cases": cases,
            "ratios": ratios,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
        logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
