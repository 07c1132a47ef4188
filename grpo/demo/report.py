"""The demo's report.md, demo_curves.png and summary, built only from what the runs wrote.

Per seed: greedy accuracy on the test scenes (in distribution and shifted) with 95% Wilson
intervals, pass@1 and pass@k of SFT and GRPO, and the wall time of every stage. Over the seeds: the
mean and the spread (min..max) of each model's accuracy and of the two gains that matter (GRPO
minus SFT, GRPO minus continued SFT), and the pooled accuracy (every seed's test scenes together)
with its Wilson interval.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch
import transformers

from eval import wilson_interval as interval
from grpo.plot import plot_curves

MODELS = (
    ("base", "untrained tiny Qwen2.5-VL"),
    ("sft", "SFT (to its plateau)"),
    ("sft-continued", "SFT continued for GRPO's training time"),
    ("grpo", "SFT -> GRPO"),
)
DATASETS = (("synthetic", "in-distribution"), ("synthetic-shifted", "shifted (OOD)"))


def wilson_interval(correct: float, total: int) -> tuple[float, float]:
    return interval(round(correct), total)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _cell(summary: dict) -> str:
    low, high = summary["accuracy_ci95"]
    return f"{_pct(summary['accuracy'])} [{100 * low:.1f}, {100 * high:.1f}]"


def machine() -> dict:
    """CPU model, cores, library versions and the commit: what a reader needs to rerun this."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "commit": commit}


def seed_table(records: list[dict], pass_k: int) -> str:
    header = ("| seed | model | " + " | ".join(f"{label} [95% CI]" for _, label in DATASETS)
              + f" | pass@1 / pass@{pass_k} (sampled, in-distribution) |")
    lines = [header, "|---|---|" + "---|" * len(DATASETS) + "---|"]
    for record in records:
        for key, label in MODELS:
            result = record["results"][key]
            cells = [_cell(result[dataset]) for dataset, _ in DATASETS]
            sampled = result.get("pass@k")
            passes = (f"{_pct(sampled['accuracy'])} / {_pct(sampled[f'pass@{pass_k}'])}" if sampled else "")
            lines.append(f"| {record['seed']} | {label} | " + " | ".join(cells) + f" | {passes} |")
    return "\n".join(lines)


def _accuracy(record: dict, model: str, dataset: str) -> float:
    return record["results"][model][dataset]["accuracy"]


def _continued_points(record: dict) -> list[dict]:
    return [{"step": m["step"], "accuracy": m["val_accuracy"]} for m in record["continued_metrics"]
            if "val_accuracy" in m and m["step"] > record["plateau_step"]]


def _end_and_best(points: list[dict]) -> str:
    """'85.0% (89.5% at step 20)': validation accuracy at the last point and the best on the way."""
    if not points:
        return "n/a"
    best = max(points, key=lambda p: (p["accuracy"], -p["step"]))
    return f"{_pct(points[-1]['accuracy'])} ({_pct(best['accuracy'])} at step {best['step']})"


def summary_table(records: list[dict]) -> str:
    """Mean, spread and pooled accuracy per model, and the gains per seed."""
    lines = ["| model | " + " | ".join(f"{label}: mean (min..max) | pooled [95% CI]" for _, label in DATASETS) + " |",
             "|---|" + "---|---|" * len(DATASETS)]
    for key, label in MODELS:
        cells = []
        for dataset, _ in DATASETS:
            values = [_accuracy(r, key, dataset) for r in records]
            correct = sum(r["results"][key][dataset]["accuracy"] * r["results"][key][dataset]["num_examples"] for r in records)
            total = sum(r["results"][key][dataset]["num_examples"] for r in records)
            low, high = wilson_interval(correct, total)
            cells += [f"{_pct(statistics.mean(values))} ({_pct(min(values))}..{_pct(max(values))})",
                      f"{_pct(correct / total)} [{100 * low:.1f}, {100 * high:.1f}]"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gains(records: list[dict]) -> dict:
    """GRPO's gain over SFT and over continued SFT, in points, per seed and per set."""
    out = {}
    for dataset, _ in DATASETS:
        for baseline in ("sft", "sft-continued"):
            out[(dataset, baseline)] = [100 * (_accuracy(r, "grpo", dataset) - _accuracy(r, baseline, dataset))
                                        for r in records]
    return out


def gains_table(records: list[dict]) -> str:
    table = gains(records)
    seeds = [r["seed"] for r in records]
    lines = ["| gain of GRPO (points) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for dataset, label in DATASETS:
        for baseline, name in (("sft", "SFT"), ("sft-continued", "continued SFT")):
            values = table[(dataset, baseline)]
            lines.append(f"| over {name}, {label} | " + " | ".join(f"{v:+.1f}" for v in values)
                         + f" | {statistics.mean(values):+.1f} | {min(values):+.1f} |")
    return "\n".join(lines)


def time_table(records: list[dict]) -> str:
    stages = list(records[0]["seconds"])
    lines = ["| stage | " + " | ".join(f"seed {r['seed']}" for r in records) + " |", "|---|" + "---|" * len(records)]
    for stage in stages:
        lines.append(f"| {stage} | " + " | ".join(f"{r['seconds'][stage] / 60:.1f} min" for r in records) + " |")
    return "\n".join(lines)


def _curves(record: dict) -> tuple[list, list, list, list]:
    """(GRPO seconds, GRPO val accuracy, continued-SFT seconds, continued-SFT val accuracy), both
    from the plateau checkpoint at t = 0, on the same validation scenes."""
    plateau = record["plateau_step"]
    start = next(m["val_accuracy"] for m in record["sft_metrics"] if m["step"] == plateau and "val_accuracy" in m)
    elapsed, at_step = 0.0, {0: 0.0}
    for m in record["grpo_metrics"]:
        elapsed += m["rollout_seconds"] + m["update_seconds"]
        at_step[m["step"]] = elapsed
    grpo_t = [0.0] + [at_step[p["step"]] for p in record["grpo_curve"] if p["step"] in at_step]
    grpo_acc = [start] + [p["accuracy"] for p in record["grpo_curve"] if p["step"] in at_step]
    sft_t, sft_acc, elapsed = [0.0], [start], 0.0
    for m in record["continued_metrics"]:
        if m["step"] <= plateau:
            continue
        elapsed += m["step_seconds"]
        if "val_accuracy" in m:
            sft_t.append(elapsed)
            sft_acc.append(m["val_accuracy"])
    return grpo_t, grpo_acc, sft_t, sft_acc


def plot(records: list[dict], path: Path) -> bool:
    """Validation accuracy of GRPO and of continued SFT against training wall time (same axes),
    and GRPO's training reward; one line per seed."""
    try:
        import matplotlib  # optional: pip install .[plot]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional: pip install .[plot]
    except ImportError:
        print("demo: matplotlib is not installed (pip install -e '.[plot]'); no plot written")
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, record in enumerate(records):
        grpo_t, grpo_acc, sft_t, sft_acc = _curves(record)
        label = f" (seed {record['seed']})"
        left.plot(grpo_t, grpo_acc, "o-", color=f"C{i}", label="GRPO" + label)
        left.plot(sft_t, sft_acc, "s--", color=f"C{i}", alpha=0.7, label="continued SFT" + label)
        elapsed, times, reward = 0.0, [], []
        for m in record["grpo_metrics"]:
            elapsed += m["rollout_seconds"] + m["update_seconds"]
            times.append(elapsed)
            reward.append(m["reward/count_accuracy/mean"])
        window = max(1, len(reward) // 10)
        smooth = [sum(reward[max(0, j - window + 1): j + 1]) / len(reward[max(0, j - window + 1): j + 1]) for j in range(len(reward))]
        right.plot(times, smooth, color=f"C{i}", label=f"seed {record['seed']}")
    left.set_xlabel("training wall time from the SFT plateau (s)")
    left.set_ylabel("greedy accuracy, validation scenes")
    left.set_title("GRPO vs continued SFT, same time budget")
    left.legend(fontsize=7)
    right.set_xlabel("GRPO training wall time (s)")
    right.set_title("GRPO training reward: correct-count rate of the samples")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(out: Path, args, records: list[dict], argv: list[str]) -> str:
    plotted = plot(records, out / "demo_curves.png")
    if plotted:  # each GRPO run's own diagnostics (rewards, KL, clipping, entropy, lengths): grpo/plot.py

        for record in records:
            plot_curves(record["grpo_metrics"], out / f"seed-{record['seed']}" / "grpo_curves.png",
                        title=f"GRPO, seed {record['seed']}")
    info = machine()
    table = gains(records)
    over_sft = min(table[("synthetic", "sft")])
    over_continued = min(table[("synthetic", "sft-continued")])
    shifted = statistics.mean(table[("synthetic-shifted", "sft-continued")])
    lines = [
        "# Demo: does GRPO beat simply training SFT for longer? (tiny Qwen2.5-VL, synthetic counting, CPU)",
        "",
        f"Command: `python -m grpo.demo {' '.join(argv)}`".replace("demo ` ", "demo`"),
        f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, transformers "
        f"{info['transformers']}, Python {info['python']}; commit {info['commit']}.",
        "",
        f"Set-up: scenes of 1 to {args.count_max} objects ({args.layout} layout). SFT on {args.sft_examples} "
        f"demonstrations with `{args.trace}` traces from a demonstrator "
        + (f"that does not see {args.demonstrator_misses} objects" if args.demonstrator_misses else "without errors")
        + f", lr {args.sft_lr} ({args.sft_schedule} over {args.sft_max_steps} steps), batch 32, until greedy accuracy "
        f"on {args.val_examples} validation scenes rose by no more than {args.sft_min_delta} for {args.sft_patience} "
        f"evaluations in a row (every {args.sft_eval_steps} steps). "
        "The SFT model is its checkpoint with the best validation accuracy. "
        f"GRPO from it: {args.grpo_steps} steps of {args.nproc} ranks x {args.grpo_prompts} prompts "
        f"x G={args.num_generations} from {args.grpo_examples} answer-only prompts, lr {args.grpo_lr} "
        f"({args.grpo_schedule}), beta {args.beta}. "
        "Continued SFT: the same SFT run resumed from that checkpoint on the same demonstrations for GRPO's "
        "training time (its cosine schedule stretched to the longer run). GRPO and continued SFT are judged at "
        "their last step, where both schedules end; their best validation points are in the table below. Test: "
        f"{args.eval_examples} held-out scenes per set, greedy decoding; pass@{args.pass_k} samples at temperature 1.",
        "",
        "## Per seed",
        "",
        seed_table(records, args.pass_k),
        "",
        "| seed | SFT stopped at step | its best checkpoint (the SFT model) | validation accuracy there "
        "| continued SFT: steps, validation at the end (best on the way) | GRPO: steps, validation at the end (best on the way) |",
        "|---|---|---|---|---|---|",
        *[f"| {r['seed']} | {r['sft_metrics'][-1]['step']} | {r['plateau_step']} | "
          f"{_pct(next(m['val_accuracy'] for m in r['sft_metrics'] if m['step'] == r['plateau_step']))} | "
          f"+{r['extra_sft_steps']}: {_end_and_best(_continued_points(r))} | "
          f"{r['grpo_step']}: {_end_and_best(r['grpo_curve'])} |" for r in records],
        "",
        "## Over the seeds",
        "",
        summary_table(records),
        "",
        gains_table(records),
        "",
        f"Smallest in-distribution gain over any seed: {over_sft:+.1f} points over SFT, {over_continued:+.1f} over "
        f"continued SFT; mean gain on shifted scenes over continued SFT {shifted:+.1f}.",
        "",
        "## Wall time",
        "",
        time_table(records),
        "",
        "![accuracy against wall time](demo_curves.png)" if plotted else "(no plot: matplotlib missing)",
        "",
        "Each GRPO run's diagnostics: `seed-N/grpo_curves.png` (`python -m grpo.plot seed-N/grpo` draws them)."
        if plotted else "",
        "",
    ]
    report = "\n".join(lines)
    (out / "report.md").write_text(report)
    return report
