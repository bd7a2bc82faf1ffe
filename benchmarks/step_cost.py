"""Cost per training step of SGD, SAM and vSAM's two kinds of step, per path.

For a 1-D CNN on MNIST-1D and an MLP of similar size (batch 128), times jitted
training steps built by ``optax_psf.make_train_step``:

- ``sgd``: SGD with momentum alone.
- ``sam_optax``: ``optax.contrib.sam`` in opaque mode.
- ``sam``: ``optax_psf.sam``.
- ``vsam_sample`` and ``vsam_skip``: vSAM's engine with a policy that always
  or never samples, decided inside the step (not fixed at trace time), so
  each path runs as it would inside a real vSAM run.

The programs run interleaved, in blocks of steps and in a shuffled order per
round, so machine load affects them alike. Ratios are taken within a round.
It prints a table and writes JSON:

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
PATHS = ("in_graph", "host")


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


def decided_at_run_time(take_sample: bool) -> optax_psf.SamplingPolicy:
    """Returns a policy that always (or never) samples, decided inside the step.

    The decision is computed from the step's random draw, so the compiler
    cannot fold it away and the in-graph path keeps its ``lax.cond``.
    """

    def decide(state, statistics, u):
        return (u >= 0.0) if take_sample else (u < 0.0), state

    return optax_psf.always_sample()._replace(decide=decide, static_decision=None)


def vsam_engine(take_sample: bool) -> optax.GradientTransformationExtraArgs:
    return optax_psf.psf_reuse(
        policy=decided_at_run_time(take_sample),
        perturbation=optax_psf.sam_perturbation(RHO),
        reuse=optax_psf.decayed_psf(),
    )


def programs() -> dict[str, tuple[optax.GradientTransformation, tuple[str, ...]]]:
    """Returns, per program, its optimizer and the paths it is timed in."""
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
        "vsam_sample": (optax.chain(vsam_engine(True), base_optimizer()), PATHS),
        "vsam_skip": (optax.chain(vsam_engine(False), base_optimizer()), PATHS),
    }


def tree_bytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time SGD, SAM and vSAM training steps side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--models", nargs="+", choices=("cnn", "mlp"), default=["cnn", "mlp"], help="models"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step")
    parser.add_argument(
        "--rounds",
        type=int,
        default=40,
        help="interleaved rounds; each times one block per program",
    )
    parser.add_argument("--block", type=int, default=5, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per program first")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="where to write JSON")
    return parser.parse_args()


def build_runners(loss_fn, params, batch, warmup: int) -> dict:
    """Compiles and warms up every program and path; returns their runners."""
    runners = {}
    for program, (tx, paths) in programs().items():
        for path in paths:
            step = optax_psf.make_train_step(
                loss_fn, tx, path="in_graph" if path == "none" else path, donate=True
            )
            opt_state = tx.init(params)
            compile_s = step.compile(params, opt_state, batch)
            state = {"params": jax.tree.map(jnp.copy, params), "opt_state": opt_state}
            for _ in range(warmup):
                output = step(state["params"], state["opt_state"], batch)
                state = {"params": output.params, "opt_state": output.opt_state}
            jax.block_until_ready(state["params"])
            runners[(program, path)] = {
                "step": step,
                "state": state,
                "compile_s": compile_s,
                "times": [],
                "state_bytes": tree_bytes(state["opt_state"]),
            }
    return runners


def time_rounds(runners: dict, rounds: int, block: int, batch) -> None:
    """Times one block of every program per round, in a shuffled order per round."""
    order_rng = np.random.default_rng(0)
    keys = list(runners)
    for _ in range(rounds):
        for index in order_rng.permutation(len(keys)):
            runner = runners[keys[index]]
            step, state = runner["step"], runner["state"]
            start = time.perf_counter()
            for _ in range(block):
                output = step(state["params"], state["opt_state"], batch)
                state = {"params": output.params, "opt_state": output.opt_state}
            jax.block_until_ready(state["params"])
            runner["times"].append(1e3 * (time.perf_counter() - start) / block)
            runner["state"] = state


def paired_ratio(runners: dict, numerator, denominator) -> dict[str, float]:
    """Summarizes the per-round ratio of two programs' times."""
    per_round = np.asarray(runners[numerator]["times"]) / np.asarray(runners[denominator]["times"])
    return {
        "median": float(np.median(per_round)),
        "p10": float(np.percentile(per_round, 10)),
        "p90": float(np.percentile(per_round, 90)),
    }


RATIOS = {
    "skip_over_sgd": ("vsam_skip", "sgd"),
    "sample_over_sam": ("vsam_sample", "sam_optax"),
    "sample_over_optax_psf_sam": ("vsam_sample", "sam"),
}


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
    ratios: dict[str, dict] = {}
    state_overhead: dict[str, int] = {}
    for model_name in args.models:
        model = models.CNN1D(10) if model_name == "cnn" else MLP()
        params = model.init(jax.random.PRNGKey(0), batch[0])["params"]

        def loss_fn(params, batch, model=model):
            logits = model.apply({"params": params}, batch[0])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

        base = base_optimizer()
        state_overhead[model_name] = tree_bytes(
            optax.chain(optax_psf.vsam(RHO), base).init(params)
        ) - tree_bytes(base.init(params))
        logger.info("compiling %s programs", model_name)
        runners = build_runners(loss_fn, params, batch, args.warmup)
        time_rounds(runners, args.rounds, args.block, batch)

        for (program, path), runner in runners.items():
            times = np.asarray(runner["times"])
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
                    "param_bytes": tree_bytes(params),
                    "steps_timed": args.rounds * args.block,
                }
            )
        ratios[model_name] = {}
        for path in PATHS:
            spread = {
                name: paired_ratio(runners, (numerator, path), (denominator, "none"))
                for name, (numerator, denominator) in RATIOS.items()
            }
            ratios[model_name][path] = {name: value["median"] for name, value in spread.items()}
            ratios[model_name][path]["spread"] = spread

    header = (
        f"{'model':<5} {'program':<12} {'path':<9} {'median ms':>10} {'p10':>8} {'p90':>8} "
        f"{'compile s':>10} {'state MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        print(
            f"{case['model']:<5} {case['program']:<12} {case['path']:<9} "
            f"{case['median_ms']:>10.2f} {case['p10_ms']:>8.2f} {case['p90_ms']:>8.2f} "
            f"{case['compile_s']:>10.2f} {case['state_bytes'] / 2**20:>9.3f}"
        )
    print("\nratio: median over rounds of the within-round ratio [p10, p90]")
    for model_name, by_path in ratios.items():
        for path, values in by_path.items():
            cells = [
                f"{name} {values[name]:.3f} "
                f"[{values['spread'][name]['p10']:.3f}, {values['spread'][name]['p90']:.3f}]"
                for name in RATIOS
            ]
            print(f"{model_name:<5} {path:<9} " + "  ".join(cells))
    for model_name in args.models:
        param_bytes = next(c["param_bytes"] for c in cases if c["model"] == model_name)
        overhead = state_overhead[model_name]
        print(
            f"{model_name}: vsam(window=50) state over SGD's: {overhead} bytes = one PSF buffer "
            f"({param_bytes}) + {overhead - param_bytes} bytes of counters, histories and plan"
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
            "vsam_state_overhead_bytes": state_overhead,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
        logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
