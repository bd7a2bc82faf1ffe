"""Train one model with SGD, SAM and vSAM side by side and compare them.

Every optimizer starts from the same initialization and gets the same data
order and learning-rate schedule. Their epochs alternate, so a slow spell of
the machine affects each alike. The script prints a table, and
writes ``results.json`` and ``figure.png`` into ``--out``. Example:

    python examples/compare.py --dataset mnist1d --epochs 60 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import pathlib
import platform
import sys

import datasets
import jax
import models
import numpy as np
import plotting
import training

logger = logging.getLogger("compare")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for options whose default is chosen at run time."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train SGD, SAM and vSAM on the same model and data and compare them.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        choices=datasets.DATASETS,
        default="mnist1d",
        help="data set; mnist1d and digits are generated or bundled locally",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory with the CIFAR python-pickle batches (cifar only)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="MNIST-1D examples to generate, train and test together (default: the package's 5000)",
    )
    parser.add_argument(
        "--model",
        choices=models.MODELS,
        default=None,
        help="network (default: cnn1d for mnist1d, digits_cnn for digits, resnet18 for cifar)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=training.OPTIMIZERS,
        default=list(training.OPTIMIZERS),
        help="optimizers to train",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="passes over the training set (default: 60)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=0.05,
        help="peak learning rate of the cosine schedule",
    )
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="L2 penalty coefficient added to the gradient",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds of initialization, data order and vSAM draws; one run each",
    )
    parser.add_argument(
        "--rho",
        type=float,
        default=0.05,
        help="SAM/vSAM perturbation radius (L2 norm in parameter space)",
    )
    vsam = parser.add_argument_group(
        "vSAM",
        "Defaults follow the reference for cifar10/cifar100 (window 50, max rate 0.8). For the"
        " short mnist1d and digits runs they are window 10, max rate 0.2: with a window of 50 the"
        " rate would have too few windows to adapt.",
    )
    vsam.add_argument(
        "--window",
        type=int,
        default=None,
        help="controller window, in steps (default: 10 or 50, see above)",
    )
    vsam.add_argument("--blocks", type=int, default=5, help="blocks of the sorted PSF-norm history")
    vsam.add_argument(
        "--max-rate",
        type=float,
        default=None,
        help="max fraction of a window's steps that sample (default: 0.2 or 0.8, see above)",
    )
    vsam.add_argument(
        "--alpha",
        type=float,
        nargs=2,
        default=[0.13, 0.13],
        metavar=("RATIO", "VARIANCE"),
        help="sensitivity of the sampling rate to the two relative changes",
    )
    vsam.add_argument("--beta", type=float, default=0.7, help="decay of the cached PSF per reuse")
    vsam.add_argument(
        "--max-reuse", type=int, default=6, help="skipped steps after a sample that reuse the PSF"
    )
    vsam.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="steps at the start that all sample (default: one window)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 4 epochs unless --epochs is given, the first seed only, and for"
        " mnist1d 2500 generated examples",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="output directory (default: runs/compare-<dataset>-<time>)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 4 if args.quick else 60
    if args.quick:
        args.seeds = args.seeds[:1]
        if args.dataset == "mnist1d" and args.num_samples is None:
            args.num_samples = 2500
    short_run = args.dataset in ("mnist1d", "digits")
    if args.window is None:
        args.window = 10 if short_run else 50
    if args.max_rate is None:
        args.max_rate = 0.2 if short_run else 0.8
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = pathlib.Path("runs") / f"compare-{args.dataset}-{stamp}"
    return args


def vsam_kwargs(args: argparse.Namespace) -> dict:
    return {
        "window": args.window,
        "blocks": args.blocks,
        "max_rate": args.max_rate,
        "alpha": tuple(args.alpha),
        "beta": args.beta,
        "max_reuse": args.max_reuse,
        "warmup_steps": args.warmup_steps,
    }


def summarize(runs: list[dict]) -> dict:
    """Returns means over seeds, their standard deviations and the runs."""
    keys = (
        "test_accuracy",
        "train_loss",
        "wall_time_s",
        "compile_time_s",
        "time_per_epoch_s",
        "grad_evals",
        "sample_fraction",
    )
    summary = {key: float(np.mean([run[key] for run in runs])) for key in keys}
    summary.update({f"{key}_std": float(np.std([run[key] for run in runs])) for key in keys})
    summary["seeds"] = [run["seed"] for run in runs]
    summary["runs"] = runs
    return summary


def format_table(results: dict) -> str:
    header = (
        f"{'optimizer':<9} {'test acc %':>12} {'train loss':>10} {'train s':>8} "
        f"{'compile s':>9} {'s/epoch':>8} {'grad evals':>10} {'sampled':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        accuracy = f"{100 * result['test_accuracy']:.2f}"
        if len(result["seeds"]) > 1:
            accuracy += f"±{100 * result['test_accuracy_std']:.2f}"
        lines.append(
            f"{name:<9} {accuracy:>12} {result['train_loss']:>10.4f} "
            f"{result['wall_time_s']:>8.1f} {result['compile_time_s']:>9.1f} "
            f"{result['time_per_epoch_s']:>8.3f} {result['grad_evals']:>10.0f} "
            f"{result['sample_fraction']:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # INFO for this script only; JAX logs its backend probing at INFO.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    training.logger.setLevel(logging.INFO)

    if args.data_dir is not None and not args.dataset.startswith("cifar"):
        logger.warning("--data-dir is used only for cifar10 and cifar100; ignoring it.")
    try:
        dataset = datasets.load_dataset(
            args.dataset,
            data_dir=args.data_dir if args.dataset.startswith("cifar") else None,
            seed=0,
            num_samples=args.num_samples,
        )
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"compare.py: error: {error}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    model_name = args.model or models.DEFAULT_MODEL[args.dataset]
    model = models.build_model(model_name, dataset.num_classes)
    logger.info(
        "%s: %d train / %d test examples, model %s, %d epochs, seeds %s",
        args.dataset,
        len(dataset.train_labels),
        len(dataset.test_labels),
        model_name,
        args.epochs,
        args.seeds,
    )

    runs: dict[str, list[dict]] = {name: [] for name in args.optimizers}
    for seed in args.seeds:
        config = training.TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            rho=args.rho,
            vsam=vsam_kwargs(args),
            seed=seed,
        )
        logger.info("training %s side by side, seed %d", ", ".join(args.optimizers), seed)
        seed_runs = training.train_side_by_side(
            model, dataset, args.optimizers, config, progress=not args.no_progress
        )
        for name, run in seed_runs.items():
            logger.info(
                "%s seed %d: test accuracy %.4f, %.1f s, %d gradient evaluations",
                name,
                seed,
                run["test_accuracy"],
                run["wall_time_s"],
                run["grad_evals"],
            )
            runs[name].append(run)

    results = {name: summarize(name_runs) for name, name_runs in runs.items()}
    table = format_table(results)
    print(table)

    record = {
        "command": " ".join(["python", *sys.argv]) if argv is None else argv,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
        },
        "config": {
            key: (str(value) if isinstance(value, pathlib.Path) else value)
            for key, value in vars(args).items()
        },
        "dataset": args.dataset,
        "model": model_name,
        "optimizers": results,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    plotting.plot_comparison(results, args.out / "figure.png", window=args.window)
    logger.info("wrote %s and %s", args.out / "results.json", args.out / "figure.png")
    return record


if __name__ == "__main__":
    main()
