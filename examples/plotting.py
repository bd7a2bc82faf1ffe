"""The comparison figure: accuracy against time, and vSAM's controller."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

COLORS = {"sgd": "tab:gray", "sam": "tab:blue", "vsam": "tab:red"}
LABELS = {"sgd": "SGD", "sam": "SAM", "vsam": "vSAM"}


def plot_comparison(results: dict, path: pathlib.Path, window: int) -> None:
    """Draws test accuracy against training time, and vSAM's controller.

    Uses the first seed of each optimizer. With vSAM, two more panels show its
    target samples per window with the PSF norm, and the steps that sampled.

    Args:
      results: Per optimizer, a summary with a ``runs`` list as written by
        ``compare.py``.
      path: Where to write the PNG.
      window: vSAM's window, to express the target rate as samples per window.
    """
    has_vsam = "vsam" in results
    if has_vsam:
        figure, (accuracy_axis, rate_axis, sample_axis) = plt.subplots(
            3, 1, figsize=(8, 8.5), gridspec_kw={"height_ratios": [3, 2.2, 0.8]}
        )
    else:
        figure, accuracy_axis = plt.subplots(figsize=(8, 4))

    for name, result in results.items():
        history = result["runs"][0]["history"]
        times = [0.0] + [entry["wall_time_s"] for entry in history]
        accuracies = [np.nan] + [100 * entry["test_accuracy"] for entry in history]
        accuracy_axis.plot(
            times, accuracies, marker=".", label=LABELS.get(name, name), color=COLORS.get(name)
        )
    accuracy_axis.set_xlabel("training time (s, compilation excluded)")
    accuracy_axis.set_ylabel("test accuracy (%)")
    accuracy_axis.set_title("Test accuracy against wall-clock time")
    accuracy_axis.grid(alpha=0.3)
    accuracy_axis.legend()

    if has_vsam:
        trace = results["vsam"]["runs"][0]["trace"]
        steps = np.arange(1, len(trace["sampled"]) + 1)
        samples_per_window = window * np.asarray(trace["target_rate"])
        rate_axis.plot(
            steps, samples_per_window, color="tab:red", label="target samples per window"
        )
        rate_axis.set_ylabel("samples per window")
        rate_axis.set_ylim(0, max(samples_per_window.max(), 1.0) * 1.15)
        norm_axis = rate_axis.twinx()
        norm_axis.plot(
            steps,
            trace["psf_norm"],
            color="tab:green",
            alpha=0.6,
            label="||psf|| at the latest sample",
        )
        norm_axis.set_ylabel("PSF norm")
        handles = rate_axis.get_legend_handles_labels()
        norm_handles = norm_axis.get_legend_handles_labels()
        rate_axis.legend(
            handles[0] + norm_handles[0],
            handles[1] + norm_handles[1],
            loc="lower left",
            fontsize="small",
        )
        rate_axis.set_title("vSAM controller")
        rate_axis.grid(alpha=0.3)
        rate_axis.sharex(sample_axis)
        rate_axis.tick_params(labelbottom=False)

        sampled = steps[np.asarray(trace["sampled"], bool)]
        sample_axis.eventplot(sampled, colors="black", linewidths=0.5)
        sample_axis.set_yticks([])
        sample_axis.set_ylabel("g_sam", rotation=0, ha="right", va="center")
        sample_axis.set_xlabel("step")
        sample_axis.set_title(
            f"steps that took the second gradient ({len(sampled)} of {len(steps)})",
            fontsize="small",
        )

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
