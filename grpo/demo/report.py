"""The demo's report.md, demo_curves.png and summary, built only from what the runs wrote.

Per seed: greedy accuracy on the test scenes (in distribution and shifted) with 95% Wilson
intervals, pass@1 and pass@k of SFT and GRPO, and the wall time of every stage. Over the seeds: the
mean and the spread (min..max) of each model's accuracy, the pooled accuracy (every seed's test
scenes together) with its Wilson interval, and GRPO's gain over every other arm per seed with its
mean and a 95% Student t interval over the seeds.

The pooled Wilson interval counts every test scene as an independent draw, so it is narrow; but
what varies most is the seed (which SFT checkpoint the plateau rule lands on), and it ignores that.
The t interval treats the seeds as the independent draws: mean gain d = sum(d_s) / n, its standard
error s / sqrt(n) with s the sample standard deviation of the n per-seed gains (n - 1 in the
denominator), and d +- t_{0.975, n-1} s / sqrt(n). With 3 seeds, t_{0.975, 2} = 4.303: an interval
that excludes 0 needs a gain consistent across seeds.
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
    ("rft", "SFT -> RFT (verified samples of GRPO's prompts)"),
    ("filtered", "SFT on the correct demonstrations only"),
    ("answer-only", "SFT -> answer-only SFT on GRPO's prompts"),
    ("grpo", "SFT -> GRPO"),
)
BASELINES = ("sft", "sft-continued", "rft", "filtered", "answer-only")  # what GRPO's gain is measured over

# Two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30, as printed in any table (e.g.
# the NIST/SEMATECH e-Handbook of Statistical Methods, 1.3.6.7.2); tests/test_demo_stats.py checks
# each against a numerical integral of the t density. Above 30 degrees of freedom the 30-dof value
# is used: a little wider than the exact one (which falls toward 1.960), never narrower.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom (2 seeds), got {df}")
    return T_975[min(df, len(T_975)) - 1]


def t_interval(values: list[float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the 95% Student t interval of the mean over independent values (the
    seeds); (mean, None, None) for a single value, which has no spread to estimate."""
    n = len(values)
    mean = statistics.mean(values)
    if n < 2:
        return mean, None, None
    half = t_quantile_975(n - 1) * statistics.stdev(values) / n**0.5  # stdev: n - 1 in the denominator
    return mean, mean - half, mean + half
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
    """GRPO's gain over every baseline, in points, per seed and per set."""
    out = {}
    for dataset, _ in DATASETS:
        for baseline in BASELINES:
            out[(dataset, baseline)] = [100 * (_accuracy(r, "grpo", dataset) - _accuracy(r, baseline, dataset))
                                        for r in records]
    return out


def _pooled(records: list[dict], model: str, dataset: str) -> float:
    correct = sum(r["results"][model][dataset]["accuracy"] * r["results"][model][dataset]["num_examples"] for r in records)
    return correct / sum(r["results"][model][dataset]["num_examples"] for r in records)


def gains_table(records: list[dict]) -> str:
    table = gains(records)
    seeds = [r["seed"] for r in records]
    names = dict(MODELS)
    lines = ["| gain of GRPO (points) | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean [95% t interval over seeds] | min | pooled gain |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for dataset, label in DATASETS:
        for baseline in BASELINES:
            values = table[(dataset, baseline)]
            mean, low, high = t_interval(values)
            interval = f" [{low:+.1f}, {high:+.1f}]" if low is not None else " (one seed: no interval)"
            pooled = 100 * (_pooled(records, "grpo", dataset) - _pooled(records, baseline, dataset))
            lines.append(f"| over {names[baseline]}, {label} | " + " | ".join(f"{v:+.1f}" for v in values)
                         + f" | {mean:+.1f}{interval} | {min(values):+.1f} | {pooled:+.1f} |")
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
    names = dict(MODELS)
    closing = []
    for dataset, label in DATASETS:
        parts = []
        for baseline in BASELINES:
            mean, low, high = t_interval(table[(dataset, baseline)])
            interval = f" [{low:+.1f}, {high:+.1f}]" if low is not None else ""
            parts.append(f"{mean:+.1f}{interval} over {names[baseline]}")
        closing.append(f"Mean gain of GRPO, {label}: " + "; ".join(parts) + ".")
    lines = [
        "# Demo: GRPO against SFT, continued SFT, RFT, filtered demonstrations and answer-only SFT (tiny Qwen2.5-VL, synthetic counting, CPU)",
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
        "training time in SFT steps (its lr continues from where the SFT run left it and decays to 0 over the "
        "added steps; it never rises). "
        f"RFT: from the SFT model, G={args.num_generations} samples at temperature 1 of each prompt GRPO consumed "
        "(the same number of sampled completions as GRPO), the ones with the right count and format kept, "
        "then SFT on them from the SFT model (one round) for as many steps as continued SFT. "
        "Answer-only SFT: from the SFT model, the prompts GRPO consumed with `<answer>N</answer>` as the target, "
        "as many steps. Filtered demonstrations: the SFT stage from the untrained model on only the demonstrations "
        "whose answer is the true count, its checkpoint chosen by the SFT arm's plateau rule on the same validation "
        f"scenes. Every SFT arm uses lr {args.sft_lr} with warm-up then {args.sft_schedule} over its own steps, "
        "batch 32. All arms but the two plateau-chosen SFT models are judged at their last step, where their "
        "schedules end; continued SFT's and GRPO's best validation points are in the table below. Test: "
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
        "| seed | RFT: samples, verified kept (from prompts), sample accuracy "
        "| filtered: correct demonstrations of all, stopped at, its checkpoint, validation there |",
        "|---|---|---|",
        *[f"| {r['seed']} | {r['rft']['samples']}, {r['rft']['kept']} ({r['rft']['prompts_with_a_kept_sample']} of "
          f"{r['rft']['prompts']}), {_pct(r['rft']['sampling_accuracy'])} | {r['filtered']['kept']} of "
          f"{r['filtered']['demonstrations']}, step {r['filtered']['stopped_at']}, step {r['filtered']['step']}, "
          f"{_pct(next(p['accuracy'] for p in r['filtered']['curve'] if p['step'] == r['filtered']['step']))} |"
          for r in records],
        "",
        "## Over the seeds",
        "",
        summary_table(records),
        "",
        gains_table(records),
        "",
        *closing,
        "The t interval is over the seeds (n - 1 degrees of freedom); the pooled gain counts every test scene "
        "as independent and ignores the spread across seeds.",
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
