"""The demo's table, plot and report.md, built only from what the runs wrote."""

from __future__ import annotations

from pathlib import Path

MODELS = (
    ("base", "untrained tiny Qwen2.5-VL"),
    ("sft", "SFT"),
    ("sft-continued", "SFT continued for GRPO's training time"),
    ("grpo", "SFT -> GRPO"),
)
DATASETS = (("synthetic", "in-distribution"), ("synthetic-shifted", "shifted (OOD)"))


def _cell(summary: dict) -> str:
    low, high = summary["accuracy_ci95"]
    return f"{100 * summary['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def results_table(results: dict) -> str:
    header = "| model | " + " | ".join(f"{label} accuracy [95% CI] | {label} format" for _, label in DATASETS) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(DATASETS))]
    for key, label in MODELS:
        if key not in results:
            continue
        cells = []
        for dataset, _ in DATASETS:
            summary = results[key][dataset]
            cells += [_cell(summary), f"{100 * summary['format_rate']:.1f}%"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(seconds: dict) -> str:
    lines = ["| stage | wall time |", "|---|---|"]
    lines += [f"| {stage} | {value / 60:.1f} min ({value:.0f} s) |" for stage, value in seconds.items()]
    return "\n".join(lines)


def plot_grpo(metrics: list[dict], path: Path) -> bool:
    """The GRPO run's curves: rewards per function, KL, clip fractions, entropy, lengths (grpo/plot.py)."""
    from grpo.plot import plot_curves

    try:
        plot_curves(metrics, path)
    except ImportError:
        print("demo: matplotlib is not installed (pip install -e '.[plot]'); no plot written")
        return False
    return True


def write_report(out: Path, args, results: dict, seconds: dict, grpo_metrics: list[dict], extra_sft_steps: int) -> str:
    plotted = plot_grpo(grpo_metrics, out / "grpo_curves.png")
    gain = {
        dataset: 100 * (results["grpo"][dataset]["accuracy"] - results["sft"][dataset]["accuracy"])
        for dataset, _ in DATASETS
    }
    versus_baseline = {
        dataset: 100 * (results["grpo"][dataset]["accuracy"] - results["sft-continued"][dataset]["accuracy"])
        for dataset, _ in DATASETS
    }
    verdict = (
        "GRPO beats the continued-SFT baseline in distribution"
        if versus_baseline["synthetic"] > 0
        else "GRPO does NOT beat the continued-SFT baseline in distribution"
    )
    report = "\n".join(
        [
            "# Demo: SFT -> GRPO on synthetic counting (tiny Qwen2.5-VL, CPU)",
            "",
            f"Command: `python -m grpo.demo --seed {args.seed}"
            + (" --quick" if args.quick else "") + "`",
            f"SFT: {args.sft_examples} demonstrations with traces, {args.sft_steps} steps of 32, lr {args.sft_lr}. "
            f"GRPO: {args.grpo_steps} steps, {args.grpo_prompts} prompts x G={args.num_generations} per step "
            f"from {args.grpo_examples} answer-only prompts, lr {args.grpo_lr}, beta {args.beta}. "
            f"Continued SFT: {extra_sft_steps} more steps on the same demonstrations (as long as GRPO trained). "
            f"Evaluation: {args.eval_examples} held-out scenes per set, greedy decoding.",
            "",
            results_table(results),
            "",
            f"GRPO vs SFT: {gain['synthetic']:+.1f} points in distribution, {gain['synthetic-shifted']:+.1f} shifted. "
            f"GRPO vs continued SFT: {versus_baseline['synthetic']:+.1f} in distribution, "
            f"{versus_baseline['synthetic-shifted']:+.1f} shifted. {verdict}.",
            "",
            time_table(seconds),
            "",
            "![GRPO curves](grpo_curves.png)" if plotted else "(no plot: matplotlib missing)",
            "",
        ]
    )
    (out / "report.md").write_text(report)
    return report
