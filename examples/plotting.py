"""The comparison figure: accuracy against time, and vSAM's controller."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

COLORS = {"sgd": "tab:gray", "sam": "tab:blue", "vsam": "tab:red"}


def plot_comparison(results: dict, path: pathlib.Path, window: int) -> None:
    """Draws test accuracy against training time, and vSAM's rate and PSF norm.

    Uses the first seed of each optimizer.

    Args:
      results: Per optimizer, a summary with a ``runs`` list as written by
        ``compare.py``.
      path: Where to write the PNG.
      window: vSAM's window, to express the target rate as samples per window.
    """
    has_vsam = "vsam" in results
    figure, axes = plt.subplots(
        2 if has_vsam else 1, 1, figsize=(8, 7 if has_vsam else 4), squeeze=False
    )
    accuracy_axis = axes[0, 0]
    for name, result in results.items():
        history = result["runs"][0]["history"]
        times = [0.0] + [entry["wall_time_s"] for entry in history]
        accuracies = [np.nan] + [100 * entry["test_accuracy"] for entry in history]
        accuracy_axis.plot(
            times, accuracies, marker=".", label=name.upper(), color=COLORS.get(name)
        )
    accuracy_axis.set_xlabel("training time (s, compilation excluded)")
    accuracy_axis.set_ylabel("test accuracy (%)")
    accuracy_axis.set_title("Test accuracy against wall-clock time")
    accuracy_axis.grid(alpha=0.3)
    accuracy_axis.legend()

    if has_vsam:
        trace = results["vsam"]["runs"][0]["trace"]
        steps = np.arange(1, len(trace["sampled"]) + 1)
        rate_axis = axes[1, 0]
        samples_per_window = window * np.asarray(trace["target_rate"])
        rate_axis.plot(
            steps, samples_per_window, color="tab:red", label="target samples per window"
        )
        sampled = steps[np.asarray(trace["sampled"], bool)]
        rate_axis.plot(
            sampled,
            np.zeros_like(sampled),
            "|",
            color="black",
            markersize=8,
            label="step that took g_sam",
        )
        rate_axis.set_xlabel("step")
        rate_axis.set_ylabel("samples per window")
        norm_axis = rate_axis.twinx()
        norm_axis.plot(
            steps,
            trace["psf_norm"],
            color="tab:green",
            alpha=0.7,
            label="||psf|| at the latest sample",
        )
        norm_axis.set_ylabel("PSF norm")
        handles = rate_axis.get_legend_handles_labels()
        norm_handles = norm_axis.get_legend_handles_labels()
        rate_axis.legend(
            handles[0] + norm_handles[0],
            handles[1] + norm_handles[1],
            loc="center right",
            fontsize="small",
        )
        rate_axis.set_title("vSAM controller")
        rate_axis.grid(alpha=0.3)

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
