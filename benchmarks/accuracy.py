"""Multi-seed accuracy of SGD, SAM and vSAM on MNIST-1D with a 1-D CNN.

Trains every optimizer from the same initialization, data order and cosine
schedule for each seed, then writes per-seed and mean/std test accuracy,
gradient evaluations and training time to JSON and prints a table. vSAM runs
twice: with the reference defaults (``vsam_reference``) and with the setting
chosen for runs of this length (``vsam``), see ``TUNED_VSAM``.

    python benchmarks/accuracy.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import pathlib
import platform
import sys

import jax
import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import datasets  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402

logger = logging.getLogger("accuracy")

# The reference's controller starts at one sample per window and grows the rate
# by at most (1 + alpha_ratio + alpha_variance) per window. A 60-epoch MNIST-1D
# run has 1860 steps, only 37 windows of 50, so the rate stays near its floor
# of 2% and vSAM lands between SGD and SAM. A window of 10 gives 186 windows,
# enough for the rate to adapt, but it then climbs to its cap; max_rate=0.2
# caps it at 2 samples per 10 steps, about 0.6x SAM's gradient evaluations.
TUNED_VSAM = {"window": 10, "blocks": 5, "max_rate": 0.2}

VARIANTS = {
    "sgd": ("sgd", {}),
    "sam": ("sam", {}),
    "vsam_reference": ("vsam", {}),
    "vsam": ("vsam", TUNED_VSAM),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Multi-seed test accuracy of SGD, SAM and vSAM on MNIST-1D.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="seeds; each trains every optimizer once",
    )
    parser.add_argument("--epochs", type=int, default=60, help="passes over the training set")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="MNIST-1D examples to generate (default: the package's 5000)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="optimizers to train",
    )
    parser.add_argument(
        "--json",
        type=pathlib.Path,
        default=pathlib.Path(__file__).parent / "results" / "accuracy_mnist1d.json",
        help="where to write the results",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args()


def describe(values: list[float]) -> dict:
    return {
        "per_seed": values,
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
    }


def difference(a: dict, b: dict, n: int) -> dict:
    """Mean of ``a - b`` over seeds and its standard error, both in accuracy units."""
    diffs = np.asarray(a["per_seed"]) - np.asarray(b["per_seed"])
    # One seed has no spread; None keeps the JSON valid where NaN would not be.
    error = float(np.std(diffs, ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"mean": float(np.mean(diffs)), "standard_error": error}


def main() -> None:
    args = parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    dataset = datasets.load_mnist1d(seed=0, num_samples=args.num_samples)
    model = models.build_model("cnn1d", dataset.num_classes)

    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    for seed in args.seeds:
        for name in args.variants:
            optimizer, vsam_kwargs = VARIANTS[name]
            config = training.TrainConfig(epochs=args.epochs, vsam=vsam_kwargs, seed=seed)
            run = training.train(model, dataset, optimizer, config, progress=not args.no_progress)
            run.pop("trace", None)
            logger.info(
                "%s seed %d: test accuracy %.4f, %d gradient evaluations, %.1f s",
                name,
                seed,
                run["test_accuracy"],
                run["grad_evals"],
                run["wall_time_s"],
            )
            runs[name].append(run)

    results = {}
    for name, name_runs in runs.items():
        results[name] = {
            "optimizer": VARIANTS[name][0],
            "vsam_settings": VARIANTS[name][1],
            "test_accuracy": describe([run["test_accuracy"] for run in name_runs]),
            "grad_evals": describe([run["grad_evals"] for run in name_runs]),
            "wall_time_s": describe([run["wall_time_s"] for run in name_runs]),
            "sample_fraction": describe([run["sample_fraction"] for run in name_runs]),
            "train_loss": describe([run["train_loss"] for run in name_runs]),
        }
    comparisons = {}
    n = len(args.seeds)
    if {"sam", "sgd"} <= results.keys():
        comparisons["sam_minus_sgd"] = difference(
            results["sam"]["test_accuracy"], results["sgd"]["test_accuracy"], n
        )
    for name in ("vsam", "vsam_reference"):
        if {name, "sam"} <= results.keys():
            comparisons[f"{name}_minus_sam"] = difference(
                results[name]["test_accuracy"], results["sam"]["test_accuracy"], n
            )
            comparisons[f"{name}_grad_evals_over_sam"] = (
                results[name]["grad_evals"]["mean"] / results["sam"]["grad_evals"]["mean"]
            )

    header = (
        f"{'optimizer':<15} {'test acc % (mean ± std)':>24} {'grad evals':>11} "
        f"{'sampled':>8} {'train s':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        accuracy = result["test_accuracy"]
        print(
            f"{name:<15} {100 * accuracy['mean']:>15.2f} ± {100 * accuracy['std']:<6.2f} "
            f"{result['grad_evals']['mean']:>11.0f} {result['sample_fraction']['mean']:>8.3f} "
            f"{result['wall_time_s']['mean']:>8.1f}"
        )
    for name, value in comparisons.items():
        if isinstance(value, dict):
            error = value["standard_error"]
            spread = f"standard error {100 * error:.2f}" if error is not None else "one seed"
            print(f"{name}: {100 * value['mean']:+.2f} points ({spread})")
        else:
            print(f"{name}: {value:.3f}")

    record = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "backend": jax.default_backend(),
            "jax": jax.__version__,
        },
        "dataset": {
            "name": "mnist1d",
            "train": len(dataset.train_labels),
            "test": len(dataset.test_labels),
        },
        "model": "cnn1d",
        "epochs": args.epochs,
        "seeds": args.seeds,
        "optimizers": results,
        "comparisons": comparisons,
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
