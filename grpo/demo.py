"""The offline demo: a VLM that cannot count -> SFT warm-up -> GRPO -> evaluation, on a laptop CPU.

    python -m grpo.demo                       # the full demo (7.4 min measured on 2 idle CPU cores)
    python -m grpo.demo --quick               # a smoke version of the same pipeline, tiny budget

It drives the real command lines, so what it shows is what a user gets:

    1. eval.py      the untrained tiny Qwen2.5-VL (in-distribution and shifted scenes)
    2. train.py     --stage sft on a small set of demonstrations WITH reasoning traces
    3. eval.py      the SFT checkpoint
    4. torchrun train.py --stage grpo from the SFT checkpoint, on a larger pool of prompts that
                    carry only their answers (no traces): the seeds' set-up (37.8k traces for SFT,
                    70k answer-only prompts for GRPO)
    5. train.py     the fair baseline: the same SFT run continued (--resume) for as long as GRPO trained
    6. eval.py      the GRPO and continued-SFT checkpoints
    7. a table (accuracy with 95% intervals, format rate, wall time per stage), a plot of reward and
       accuracy over GRPO steps, and report.md, all in --output_dir

Nothing in the table is typed in: every number is read from the runs' summary.json / metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny budget: checks the pipeline, proves nothing")
    parser.add_argument("--sft_examples", type=int, default=1000, help="demonstrations (with traces) for SFT")
    parser.add_argument("--grpo_examples", type=int, default=8000, help="answer-only prompts for GRPO")
    parser.add_argument("--sft_steps", type=int, default=400)
    parser.add_argument("--sft_lr", type=float, default=1e-3)
    parser.add_argument("--grpo_steps", type=int, default=100)
    parser.add_argument("--grpo_lr", type=float, default=1e-4)
    parser.add_argument("--grpo_prompts", type=int, default=16, help="prompts per rank per generation batch (B)")
    parser.add_argument("--num_generations", type=int, default=8, help="G")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--eval_examples", type=int, default=500)
    parser.add_argument("--nproc", type=int, default=1, help="torchrun ranks for the GRPO stage")
    parser.add_argument("--question_kinds", default="total")
    parser.add_argument("--count_max", type=int, default=10)
    args = parser.parse_args(argv)
    if args.quick:
        args.sft_examples, args.grpo_examples, args.sft_steps, args.grpo_steps = 64, 64, 4, 2
        args.grpo_prompts, args.num_generations, args.eval_examples = 2, 4, 16
    return args


def run(command: list[str], log_name: str, out: Path, env: dict | None = None) -> float:
    """Run one stage, its output to the terminal and to a log file; returns its wall time."""
    print(f"\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with open(out / f"{log_name}.log", "w") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        )
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        if process.wait() != 0:
            raise SystemExit(f"demo: stage {log_name} failed (exit {process.returncode}); see {out / log_name}.log")
    return time.perf_counter() - started


def common_data_flags(args) -> list[str]:
    # No system prompt: the tiny model learns the <think>/<answer> format from SFT, and the R1
    # prompt would double every sequence (85 of ~165 tokens) on a CPU budget.
    return [
        "--dataset", "synthetic", "--question_kinds", args.question_kinds, "--count_max", str(args.count_max),
        "--system_prompt", "",
    ]


def evaluate(args, model: str, name: str, out: Path, seconds: dict) -> dict:
    """eval.py's command line, run in this process (eight evaluations would otherwise pay eight
    interpreter start-ups); results are read back from the summary.json it writes."""
    import eval as eval_cli

    results = {}
    for dataset in ("synthetic", "synthetic-shifted"):
        eval_dir = out / "eval" / f"{name}-{dataset}"
        flags = common_data_flags(args)
        flags[flags.index("synthetic")] = dataset
        argv = [
            "--model", model, "--output_dir", str(eval_dir), "--seed", str(args.seed), "--num_examples",
            str(args.eval_examples), "--batch_size", "64", "--max_completion_length", "64", *flags,
        ]
        print(f"\n$ python eval.py {' '.join(argv)}", flush=True)
        started = time.perf_counter()
        eval_cli.main(argv)
        seconds[f"eval {name}"] = seconds.get(f"eval {name}", 0.0) + time.perf_counter() - started
        results[dataset] = json.loads((eval_dir / "summary.json").read_text())
    return results


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    seconds: dict[str, float] = {}
    results: dict[str, dict] = {}
    seed = ["--seed", str(args.seed)]
    quiet = ["--progress_bar", "true"]
    demo_started = time.perf_counter()

    # --- 1. the untrained model ---
    results["base"] = evaluate(args, "tiny", "base", out, seconds)

    # --- 2. SFT on a small set of demonstrations with reasoning traces ---
    sft_dir = out / "sft"
    sft_flags = [
        sys.executable, "train.py", "--stage", "sft", "--output_dir", str(sft_dir), "--max_steps", str(args.sft_steps),
        "--learning_rate", str(args.sft_lr), "--warmup_steps", str(min(50, args.sft_steps // 10)),
        "--lr_scheduler", "constant", "--per_device_batch_size", "32", "--num_examples", str(args.sft_examples),
        "--eval_steps", "0", "--max_eval_examples", "64", "--save_steps", "0", *seed, *quiet, *common_data_flags(args),
    ]
    seconds["sft"] = run(sft_flags, "sft", out)
    results["sft"] = evaluate(args, str(sft_dir), "sft", out, seconds)

    # --- 3. GRPO from the SFT checkpoint, on answer-only prompts, through torchrun ---
    grpo_dir = out / "grpo"
    seconds["grpo"] = run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            "train.py", "--stage", "grpo", "--init_from", str(sft_dir), "--output_dir", str(grpo_dir),
            "--max_steps", str(args.grpo_steps), "--learning_rate", str(args.grpo_lr), "--beta", str(args.beta),
            "--per_device_prompts", str(args.grpo_prompts), "--num_generations", str(args.num_generations),
            "--micro_batch_size", str(args.grpo_prompts * args.num_generations // 2), "--max_completion_length", "64",
            "--num_examples", str(args.grpo_examples), "--reward_functions", "format,count_accuracy",
            "--reward_weights", "0.5,1.0", "--save_steps", "0", "--sample_log_steps", "10", "--max_grad_norm", "1.0",
            "--weight_decay", "0.0", *seed, *quiet, *common_data_flags(args),
        ],
        # One thread per rank: the sampler's token-by-token decode is many tiny ops, and with two
        # OpenMP threads each op waits for both. With another job on the machine, measured here, a
        # 2-thread GRPO step took 15-20 s; single-threaded runs beside the same load took ~1.5 s.
        "grpo", out, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    results["grpo"] = evaluate(args, str(grpo_dir), "grpo", out, seconds)

    # --- 4. the fair baseline: SFT continued for GRPO's training time ---
    # Both budgets are the loops' own time from their metrics (GRPO: rollout + update seconds of
    # every step; SFT: the median step), so start-up and data building count for neither.
    grpo_train_seconds = sum(m["rollout_seconds"] + m["update_seconds"] for m in read_metrics(grpo_dir / "metrics.jsonl"))
    step_times = sorted(m["step_seconds"] for m in read_metrics(sft_dir / "metrics.jsonl"))
    seconds_per_step = step_times[len(step_times) // 2]
    extra_steps = max(1, round(grpo_train_seconds / seconds_per_step))
    print(
        f"\n[demo] GRPO trained for {grpo_train_seconds:.0f} s; at {seconds_per_step:.3f} s per SFT step the "
        f"baseline gets {extra_steps} more SFT steps",
        flush=True,
    )
    continued_dir = out / "sft-continued"
    shutil.copytree(sft_dir, continued_dir)
    continued = list(sft_flags)
    continued[continued.index(str(sft_dir))] = str(continued_dir)
    continued[continued.index("--max_steps") + 1] = str(args.sft_steps + extra_steps)
    seconds["sft continued"] = run([*continued, "--resume"], "sft-continued", out)
    results["sft-continued"] = evaluate(args, str(continued_dir), "sft-continued", out, seconds)
    seconds["total"] = time.perf_counter() - demo_started

    # --- 5. table, plot, report ---
    from grpo.demo_report import write_report

    report = write_report(out, args, results, seconds, read_metrics(grpo_dir / "metrics.jsonl"), extra_steps)
    print("\n" + report, flush=True)
    return {"results": results, "seconds": seconds}


if __name__ == "__main__":
    main()
