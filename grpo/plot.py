"""A run's training curves, drawn from its metrics.jsonl: reward per function, loss, KL, clip
fractions, entropy, completion lengths and group diagnostics, against step and against time.

    python -m grpo.plot runs/grpo                     # -> runs/grpo/curves.png
    python -m grpo.plot runs/sft --output sft.png

Works on any run of either stage, finished or still training (a half-written last line is
skipped); a panel whose metrics the run does not log (SFT has no rewards) is left out. The demo
draws its GRPO plot with the same code (grpo/demo/report.py). Needs matplotlib (the `plot` extra).

The time axis is the loops' own training time, summed from metrics.jsonl (which keeps no clock):
SFT adds up `step_seconds`; GRPO adds, per generation batch, `rollout_seconds` and the
`update_seconds` of its last step (update_seconds counts from the start of the batch's update, so
within a batch it grows and rollout_seconds repeats: that is how batches are told apart). Start-up,
data loading, reward scoring and checkpoint saving are not in it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from grpo.runtime.metrics import read_metrics

PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # formats matplotlib's Agg backend writes

# (title, metric names); "reward/*/mean" stands for every reward function's mean, total first.
PANELS = (
    ("rewards of the sampled completions", ("reward/*/mean",)),
    ("loss", ("loss", "val_loss")),
    ("KL to reference (k3)", ("kl",)),
    ("clip fraction", ("clip_frac_low", "clip_frac_high")),
    ("entropy (nats per token)", ("entropy",)),
    ("completion length (tokens)", ("completion_length_mean", "completion_length_max")),
    ("diagnostics", ("advantage/frac_zero_std_groups", "truncated_frac")),
)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def training_seconds(records: Sequence[dict]) -> list[float] | None:
    """Training time at the end of each step (see the module docstring); None without timings."""
    if all("step_seconds" in r for r in records):  # SFT
        total, times = 0.0, []
        for record in records:
            total += record["step_seconds"]
            times.append(total)
        return times
    if not all("rollout_seconds" in r and "update_seconds" in r for r in records):
        return None
    batch_start, times, previous = 0.0, [], None  # batch_start: time before this generation batch
    for record in records:
        same_batch = (
            previous is not None
            and record["rollout_seconds"] == previous["rollout_seconds"]
            and record["update_seconds"] > previous["update_seconds"]
        )
        if previous is not None and not same_batch:
            batch_start += previous["rollout_seconds"] + previous["update_seconds"]
        times.append(batch_start + record["rollout_seconds"] + record["update_seconds"])
        previous = record
    return times


def _series(records: Sequence[dict], names: Sequence[str]) -> list[str]:
    """The metric names of a panel that the run logs, in order (reward/*/mean expanded)."""
    keys = []
    for name in names:
        if name == "reward/*/mean":
            functions = [k for k in records[0] if k.startswith("reward/") and k.endswith("/mean") and k != "reward/total/mean"]
            keys += [k for k in ["reward/total/mean", *functions] if k in records[0]]
        elif any(name in r for r in records):  # val_loss: only on validation steps
            keys.append(name)
    return keys


def plot_curves(records: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """Draw every panel the records have, against step (left) and training time (right), into `path`.

    Raises ImportError (with the pip command) without matplotlib, ValueError without records.
    """
    try:
        import matplotlib  # optional: pip install .[plot]

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt  # optional: pip install .[plot]
    except ImportError as error:
        raise ImportError("matplotlib is not installed: pip install -e '.[plot]' (or pip install matplotlib)") from error
    if not records:
        raise ValueError("no metrics records to plot")
    panels = [(name, keys) for name, names in PANELS if (keys := _series(records, names))]
    seconds = training_seconds(records)
    axes_x = [("step", [r["step"] for r in records])]
    if seconds is not None:
        axes_x.append(("training time (min)", [s / 60 for s in seconds]))
    # Noisy per-step values are drawn faintly with a moving average over a tenth of the run on top.
    window = max(1, len(records) // 10)
    figure, axes = plt.subplots(len(panels), len(axes_x), figsize=(5.5 * len(axes_x), 2.6 * len(panels)), squeeze=False)
    for row, (panel_title, keys) in enumerate(panels):
        for column, (x_label, x_values) in enumerate(axes_x):
            axis = axes[row][column]
            for key in keys:
                points = [(x, r[key]) for x, r in zip(x_values, records, strict=True) if key in r]
                xs, ys = [x for x, _ in points], [y for _, y in points]
                if len(points) < len(records):  # logged on some steps only: markers, no smoothing
                    axis.plot(xs, ys, marker="o", label=key)
                    continue
                (line,) = axis.plot(xs, moving_average(ys, window), label=key)
                axis.plot(xs, ys, color=line.get_color(), alpha=0.25)
            axis.set_title(panel_title + (f" (moving average over {window})" if window > 1 else ""), fontsize=9)
            axis.set_xlabel(x_label)
            axis.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m grpo.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="A training run's --output_dir (the folder holding metrics.jsonl).")
    parser.add_argument("--output", default=None, help="Where to write the PNG (default: RUN_DIR/curves.png).")
    args = parser.parse_args(argv)
    metrics_path = Path(args.run_dir) / "metrics.jsonl"
    if not metrics_path.is_file():
        parser.exit(2, f"grpo.plot: error: {metrics_path} not found; pass the --output_dir of a training run\n")
    output = Path(args.output or Path(args.run_dir) / "curves.png")
    # Before drawing: matplotlib writes X.png for an --output X without a suffix (or a folder X) and
    # fails only after the figure is drawn on a missing folder or an unknown suffix.
    if output.is_dir() or output.suffix.lower() not in PLOT_SUFFIXES:
        parser.exit(2, f"grpo.plot: error: --output {output}: give an image file name ending in {', '.join(PLOT_SUFFIXES)}\n")
    if not output.parent.is_dir():
        parser.exit(2, f"grpo.plot: error: --output {output}: no folder {output.parent}; create it or choose another\n")
    try:
        records = read_metrics(metrics_path)
    except ValueError as error:
        parser.exit(2, f"grpo.plot: error: {error}\n")
    if not records:
        parser.exit(2, f"grpo.plot: error: {metrics_path} holds no complete step yet; try again after a step\n")
    try:
        written = plot_curves(records, output, title=str(args.run_dir))
    except ImportError as error:
        parser.exit(2, f"grpo.plot: error: {error}\n")
    except (KeyError, TypeError) as error:  # a record without "step", or a value that is not a number
        parser.exit(2, f"grpo.plot: error: {metrics_path} is not a metrics file train.py wrote ({type(error).__name__}: {error})\n")
    print(f"wrote {written} ({len(records)} steps)")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
