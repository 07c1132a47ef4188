"""The offline demo: does GRPO make a model better than simply training it more? On a laptop CPU.

    python -m grpo.demo                       # one seed (about 10 minutes on 2 CPU cores)
    python -m grpo.demo --seeds 0,1,2         # three seeds, one report with the mean and spread
    python -m grpo.demo --quick               # a smoke version of the same pipeline, tiny budget

The situation it sets up is the one where RL earns its place: the demonstrations are imperfect and
the answers can be checked. A tiny Qwen2.5-VL learns to count objects in synthetic scenes (one
object per cell of a 4 x 4 grid, each inside one image token: easy to see, so the comparison is
about what the labels teach, not about perception).

- SFT gets 1,000 demonstrations with reasoning traces, written by a demonstrator with a
  systematic blind spot: it does not see gray objects on the gray floor, so on every scene that
  holds one its trace and its answer undercount (about half the demonstrations are wrong).
- GRPO gets 8,000 prompts that carry only their verified answers (no traces), and a reward for the
  format and for the correct count.
- The first baseline is the same SFT run continued on the same demonstrations for as long as GRPO
  trained. SFT is first trained to its plateau (greedy accuracy on held-out scenes no longer
  improving), so "SFT had not converged yet" cannot explain the difference. Resumed with a longer
  --max_steps, its lr continues from where the SFT run left it and decays to 0 (never a rise).
- The baselines that use the same checkable answers as GRPO (so "correct labels beat wrong labels"
  cannot be the whole story):
  * RFT (rejection-sampling fine-tuning, expert iteration): from the SFT model, G samples at
    GRPO's temperature of exactly the prompts GRPO consumed (the same number of sampled
    completions), the ones the reward verifies (right count, right format) kept, then SFT on them.
    One round: GRPO's whole sampling budget drawn from the SFT model, the round the outside check
    of issue 26 measured; several rounds would be more on-policy (docs/demo.md).
  * Filtered demonstrations: the SFT stage from the untrained model on only the demonstrations
    whose answer is the true count, its checkpoint chosen by the SFT arm's plateau rule.
  * Answer-only SFT: from the SFT model, on the prompts GRPO consumed with their verified answers
    as the whole target (`<answer>N</answer>`).
  Every SFT arm uses the SFT stage's recipe (lr --sft_lr, warm-up then --sft_schedule, batch 32);
  the arms from the SFT model get GRPO's training time in SFT steps, as continued SFT does. Every
  arm but the two plateau-chosen SFT models is judged at its last step, like GRPO.

The stages drive the real command lines, so what it shows is what a user gets:

    1. eval.py      the untrained model (in-distribution and shifted scenes)
    2. train.py     --stage sft with early stopping on validation accuracy (its plateau)
    3. torchrun train.py --stage grpo from the plateau checkpoint
    4. train.py     --stage sft --resume: the continued-SFT baseline, for GRPO's training time
    5. eval.py      --num_samples G on GRPO's prompts (saved with save_to_disk), then train.py
                    --stage sft on the verified samples: RFT
    6. train.py     --stage sft on the correct demonstrations (filtered), and on GRPO's prompts
                    with their answers only (answer-only)
    7. eval.py      greedy accuracy of every model on the test scenes, pass@1 and pass@8 of SFT
                    and GRPO, and accuracy of GRPO's checkpoints on the validation scenes over time
    8. report.md, a plot and demo.json in --output_dir (one folder per seed under it), rewritten
       after every seed

Nothing in the report is typed in: every number is read from what the runs wrote. No arm reads a
validation or test scene to train; validation scenes choose the two SFT plateau checkpoints only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from transformers import HfArgumentParser

import eval as eval_cli
from data.index_stream import IndexStream
from data.loading import load_eval_dataset
from data.sources import extract_tag
from grpo.config import ConfigError, DataArguments
from grpo.demo.report import write_report
from grpo.reward_functions import extract_answer, format_reward
from grpo.runtime.start_checks import check_writable
from grpo.validation import EarlyStopping

ROOT = Path(__file__).resolve().parents[2]  # the repository: train.py, eval.py
MARKER = ".grpo-demo"  # written into every output_dir this demo creates; nothing else is ever deleted


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m grpo.demo", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--output_dir", default="runs/demo")
    add("--seeds", default="0", help="comma-separated seeds; each runs the whole demo, one report covers all")
    add("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    add("--quick", action="store_true", help="a tiny budget: checks the pipeline, proves nothing")
    # data
    add("--count_max", type=int, default=10, help="most objects in a scene")
    add("--demonstrator_misses", default="gray", help="the colour the demonstrator does not see ('' = a perfect demonstrator)")
    add("--trace", default="count_aloud", choices=("count_aloud", "by_shape"), help="how the demonstrations count: count_aloud | by_shape")
    add("--layout", default="grid", choices=("grid", "scatter"), help="scene layout: grid (one object per image token) | scatter")
    add("--sft_examples", type=int, default=1000, help="demonstrations (with traces) for SFT")
    add("--grpo_examples", type=int, default=8000, help="answer-only prompts for GRPO")
    add("--val_examples", type=int, default=200, help="held-out scenes for the plateau test and the curves")
    add("--eval_examples", type=int, default=500, help="test scenes per set for the final table")
    add("--pass_examples", type=int, default=200, help="test scenes for pass@1 / pass@k (k samples each)")
    # SFT to its plateau
    add("--sft_lr", type=float, default=1e-3)
    add("--sft_schedule", default="cosine", choices=("cosine", "constant"), help="SFT learning-rate schedule after warm-up: cosine | constant")
    add("--sft_max_steps", type=int, default=400, help="the schedule's length; SFT normally stops at its plateau first")
    add("--sft_eval_steps", type=int, default=50, help="validation accuracy (and a checkpoint) every N SFT steps")
    add("--sft_patience", type=int, default=2, help="evaluations without improvement that make a plateau")
    add("--sft_min_delta", type=float, default=0.01, help="smallest rise of validation accuracy that counts")
    # GRPO
    add("--grpo_steps", type=int, default=60)
    add("--grpo_lr", type=float, default=2e-4)
    add("--grpo_schedule", default="cosine", choices=("cosine", "constant"), help="GRPO learning-rate schedule: cosine (to 0 at the last step) | constant")
    add("--grpo_prompts", type=int, default=8, help="prompts per rank per generation batch (B)")
    add("--num_generations", type=int, default=8, help="G")
    add("--beta", type=float, default=0.04)
    add("--curve_every", type=int, default=20, help="GRPO steps between the checkpoints the curve evaluates")
    add("--pass_k", type=int, default=8, help="k of pass@k for the SFT and GRPO checkpoints")
    add("--nproc", type=int, default=2, help="torchrun ranks for the GRPO stage (one per core)")
    args = parser.parse_args(argv)
    try:
        args.seed_list = [args.seed] if args.seed is not None else [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    if not args.seed_list:
        parser.error("--seeds is empty")
    if len(set(args.seed_list)) < len(args.seed_list):  # each seed writes its own folder, seed-N
        parser.error(f"--seeds {args.seeds!r}: a seed is given twice; give each once, e.g. 0,1,2")
    # Numbers the later stages would refuse (train.py, eval.py) only after the earlier ones ran: refused now.
    for name in ("sft_examples", "grpo_examples", "val_examples", "eval_examples", "pass_examples", "sft_max_steps",
                 "sft_eval_steps", "grpo_steps", "grpo_prompts", "curve_every", "pass_k", "nproc"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.num_generations < 2 or args.sft_patience < 0:
        parser.error("--num_generations must be >= 2 (a group) and --sft_patience >= 0")
    generation_batch = args.grpo_prompts * args.num_generations
    if generation_batch % (generation_batch // 2):  # the GRPO stage's micro-batch is half the generation batch
        parser.error(f"--grpo_prompts {args.grpo_prompts} x --num_generations {args.num_generations} must be even")
    if not (0 < args.sft_lr < float("inf") and 0 < args.grpo_lr < float("inf")):  # NaN fails too
        parser.error(f"--sft_lr {args.sft_lr} / --grpo_lr {args.grpo_lr}: each must be a finite number > 0")
    if not (0 <= args.beta < float("inf") and 0 <= args.sft_min_delta < 1):
        parser.error(f"--beta {args.beta} must be finite and >= 0, --sft_min_delta {args.sft_min_delta} in [0, 1)")
    try:  # the data flags, as train.py will read them
        DataArguments(count_max=args.count_max, synthetic_layout=args.layout, synthetic_trace=args.trace,
                      demonstrator_misses=args.demonstrator_misses or None)  # fmt: skip
    except ConfigError as error:
        parser.error(str(error))
    try:  # a file where the folder goes, an unwritable place, '' (an unset variable)
        check_writable("--output_dir", args.output_dir)
    except ConfigError as error:
        parser.error(str(error))
    if args.quick:
        args.sft_examples, args.grpo_examples, args.val_examples, args.eval_examples, args.pass_examples = 64, 64, 16, 16, 8
        args.sft_max_steps, args.sft_eval_steps, args.sft_patience = 4, 2, 1
        args.grpo_steps, args.grpo_prompts, args.num_generations, args.curve_every, args.pass_k = 2, 2, 4, 1, 2
    return args


def prepare_output_dir(out: Path) -> None:
    """Refuse a folder this demo did not create: it would otherwise be emptied."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        print(
            f"demo: --output_dir {out} already holds files and is not an earlier demo's output "
            f"(no {MARKER} marker): pick another --output_dir, or empty it yourself",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by python -m grpo.demo; the demo may delete this folder when rerun\n")


def run(command: list[str], log_name: str, out: Path, env: dict | None = None) -> float:
    """Run one stage, its output to the terminal and to a log file; returns its wall time."""
    print(f"\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with open(out / f"{log_name}.log", "w") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        )
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                log.write(line)
        except BaseException:  # Ctrl-C / SIGTERM of the demo: stop the stage too, never orphan it
            process.terminate()
            process.wait()
            raise
        if process.wait() != 0:
            raise SystemExit(f"demo: stage {log_name} failed (exit {process.returncode}); see {out / log_name}.log")
    return time.perf_counter() - started


def data_flags(args, dataset: str = "synthetic") -> list[str]:
    # No system prompt: the tiny model learns the <think>/<answer> format from SFT, and the R1
    # prompt would more than double every sequence on a CPU budget.
    return ["--dataset", dataset, "--question_kinds", "total", "--count_max", str(args.count_max),
            "--synthetic_trace", args.trace, "--synthetic_layout", args.layout, "--system_prompt", ""]


def evaluate(model: str, out_dir: Path, *, seed: int, dataset: str, part: str, num_examples: int, args,
             num_samples: int = 1) -> dict:
    """eval.py's command line, run in this process (many evaluations would otherwise pay many
    interpreter start-ups); the result is read back from the summary.json it writes."""
    argv = [
        "--model", model, "--output_dir", str(out_dir), "--seed", str(seed), "--eval_part", part,
        "--num_examples", str(num_examples), "--batch_size", "64", "--max_completion_length", "64",
        "--num_samples", str(num_samples), "--progress_bar", "false", *data_flags(args, dataset),
    ]
    print(f"$ python eval.py {' '.join(argv)}", flush=True)
    eval_cli.main(argv)
    return json.loads((out_dir / "summary.json").read_text())


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """train.py's name for the checkpoint of one step."""
    return run_dir / f"checkpoint-{step:08d}"


def consumed_prompt_indices(num_examples: int, seed: int, world_size: int, per_device_prompts: int,
                            steps: int) -> list[int]:
    """The rows of GRPO's prompt set its ranks read, in order: every rank's IndexStream, built as
    grpo/grpo_loop.py builds it, takes per_device_prompts a step."""
    streams = [IndexStream(num_examples, seed=seed, rank=rank, world_size=world_size) for rank in range(world_size)]
    return [index for _ in range(steps) for stream in streams for index in stream.take(per_device_prompts)]


def load_training_part(args, *, seed: int, num_examples: int, demonstrator_misses: str | None = None):
    """The training part train.py reads with these flags (data/loading.py), as a datasets.Dataset."""
    flags = [*data_flags(args), "--num_examples", str(num_examples),
             *(["--demonstrator_misses", demonstrator_misses] if demonstrator_misses else [])]
    (data_args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(args=flags)
    dataset, _ = load_eval_dataset(data_args, part="train", seed=seed)
    return dataset


def verified_rows(samples: list[dict]) -> tuple[list[int], list[str], list[str]]:
    """RFT's filter over eval.py's samples.jsonl records (one per prompt, in the dataset's order):
    every sample whose count is right (eval.py's `correct`) and whose format GRPO's format reward
    accepts. Returns (prompt row, trace, answer) per kept sample, the trace and answer read back
    from the sample's own <think> and <answer> tags."""
    rows, traces, answers = [], [], []
    for row, record in enumerate(samples):
        formatted = format_reward(record["outputs"], [record["gold"]] * len(record["outputs"]))
        for output, correct, well_formed in zip(record["outputs"], record["correct"], formatted, strict=True):
            if correct and well_formed > 0:
                rows.append(row)
                traces.append(extract_tag(output, "think"))
                answers.append(extract_answer(output))
    return rows, traces, answers


def correct_demonstrations(demonstrations) -> list[int]:
    """Rows whose demonstrated answer is the scene's true count (the synthetic `count` column)."""
    return [i for i, (answer, count) in enumerate(zip(demonstrations["answer"], demonstrations["count"], strict=True))
            if answer.strip() == str(count)]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_step(points: list[dict], key: str) -> int:
    """The step with the best validation accuracy (the earliest among ties): how SFT's plateau
    checkpoint is chosen, the starting point of both GRPO and continued SFT. GRPO and continued SFT
    are then judged at the end of their schedules (both decay to 0 there), not at their best
    validation point: a run that swings between checkpoints would otherwise be credited with its
    luckiest evaluation. The test scenes choose nothing."""
    return max(points, key=lambda p: (p[key], -p["step"]))["step"]


def run_seed(args, seed: int, out: Path) -> dict:
    """The whole demo for one seed, in out/; returns everything the report needs."""
    out.mkdir(parents=True)
    seconds = dict.fromkeys(("sft to plateau", "grpo", "sft continued", "rft sampling", "rft sft", "filtered sft",
                             "answer-only sft", "evaluation"), 0.0)
    results: dict[str, dict] = {}
    started = time.perf_counter()
    common = ["--seed", str(seed), "--progress_bar", "false"]

    def test_eval(model: str, name: str, num_examples: int = args.eval_examples) -> None:
        t = time.perf_counter()
        results[name] = {
            dataset: evaluate(model, out / "eval" / f"{name}-{dataset}", seed=seed, dataset=dataset, part="test",
                              num_examples=num_examples, args=args)
            for dataset in ("synthetic", "synthetic-shifted")
        }
        seconds["evaluation"] += time.perf_counter() - t

    def pass_at_k(model: str, name: str) -> None:
        t = time.perf_counter()
        results[name]["pass@k"] = evaluate(
            model, out / "eval" / f"{name}-pass{args.pass_k}", seed=seed, dataset="synthetic", part="test",
            num_examples=args.pass_examples, args=args, num_samples=args.pass_k,
        )
        seconds["evaluation"] += time.perf_counter() - t

    # --- 1. the untrained model (fewer scenes: it writes 64 tokens of noise for every one) ---
    test_eval("tiny", "base", num_examples=min(100, args.eval_examples))

    # --- 2. SFT on the imperfect demonstrations, until validation accuracy stops improving ---
    sft_dir = out / "sft"
    sft_command = [
        sys.executable, "train.py", "--stage", "sft", "--output_dir", str(sft_dir),
        "--max_steps", str(args.sft_max_steps), "--learning_rate", str(args.sft_lr),
        "--warmup_steps", str(min(30, args.sft_max_steps // 10)), "--lr_scheduler", args.sft_schedule,
        "--per_device_batch_size", "32", "--num_examples", str(args.sft_examples),
        "--eval_steps", str(args.sft_eval_steps), "--max_eval_examples", str(args.val_examples),
        "--eval_accuracy_reward", "count_accuracy", "--early_stopping_patience", str(args.sft_patience),
        # A checkpoint at every evaluation, so the plateau's best one can be picked afterwards.
        "--early_stopping_min_delta", str(args.sft_min_delta), "--save_steps", str(args.sft_eval_steps),
        "--save_total_limit", "1000",
        *(["--demonstrator_misses", args.demonstrator_misses] if args.demonstrator_misses else []),
        *common, *data_flags(args),
    ]
    seconds["sft to plateau"] = run(sft_command, "sft", out)
    sft_metrics = read_metrics(sft_dir / "metrics.jsonl")
    # The SFT model is the plateau's best checkpoint by validation accuracy (what a user would keep):
    # a later evaluation that dipped by chance must not hand GRPO or the baseline a weaker start.
    plateau_step = best_step([m for m in sft_metrics if "val_accuracy" in m], "val_accuracy")
    sft_model = str(checkpoint_dir(sft_dir, plateau_step))
    test_eval(sft_model, "sft")
    pass_at_k(sft_model, "sft")

    # --- 3. GRPO from the plateau checkpoint, on answer-only prompts, through torchrun ---
    grpo_dir = out / "grpo"
    seconds["grpo"] = run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            "train.py", "--stage", "grpo", "--init_from", sft_model, "--output_dir", str(grpo_dir),
            "--max_steps", str(args.grpo_steps), "--learning_rate", str(args.grpo_lr), "--beta", str(args.beta),
            "--lr_scheduler", args.grpo_schedule,
            "--per_device_prompts", str(args.grpo_prompts), "--num_generations", str(args.num_generations),
            "--micro_batch_size", str(args.grpo_prompts * args.num_generations // 2), "--max_completion_length", "64",
            "--num_examples", str(args.grpo_examples), "--reward_functions", "format,count_accuracy",
            "--reward_weights", "0.5,1.0", "--save_steps", str(args.curve_every), "--save_total_limit", "1000",
            "--sample_log_steps", "10", "--max_grad_norm", "1.0", "--weight_decay", "0.0", *common, *data_flags(args),
        ],
        # One thread per rank: the sampler's token-by-token decode is many tiny ops, and with two
        # OpenMP threads each op waits for both.
        "grpo", out, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    grpo_metrics = read_metrics(grpo_dir / "metrics.jsonl")

    # GRPO's checkpoints on the validation scenes the SFT curve uses: its curve. Its model is the
    # last checkpoint, where its schedule ends.
    t = time.perf_counter()
    curve = []
    for checkpoint in sorted(grpo_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(checkpoint.name.split("-")[1])
        summary = evaluate(str(checkpoint), out / "eval" / f"grpo-val-{step}", seed=seed, dataset="synthetic",
                           part="validation", num_examples=args.val_examples, args=args)
        curve.append({"step": step, "accuracy": summary["accuracy"]})
    seconds["evaluation"] += time.perf_counter() - t
    grpo_step = grpo_metrics[-1]["step"]
    grpo_model = str(checkpoint_dir(grpo_dir, grpo_step))
    test_eval(grpo_model, "grpo")
    pass_at_k(grpo_model, "grpo")

    # --- 4. the fair baseline: the same SFT continued, on the same demonstrations, for GRPO's time ---
    # Both budgets are the loops' own time from their metrics (GRPO: rollout + update seconds of
    # every step; SFT: its median step), so start-up, evaluation and data building count for neither.
    grpo_seconds = sum(m["rollout_seconds"] + m["update_seconds"] for m in grpo_metrics)
    step_times = sorted(m["step_seconds"] for m in sft_metrics if m["step"] <= plateau_step)
    sft_seconds_per_step = step_times[len(step_times) // 2]
    extra_steps = max(1, round(grpo_seconds / sft_seconds_per_step))
    print(f"\n[demo] GRPO trained for {grpo_seconds:.0f} s; at {sft_seconds_per_step:.3f} s per SFT step the "
          f"baseline gets {extra_steps} more SFT steps", flush=True)
    continued_dir = out / "sft-continued"
    shutil.copytree(sft_dir, continued_dir)
    for later in continued_dir.glob("checkpoint-*"):  # --resume then starts from the plateau's best
        if int(later.name.split("-")[1]) > plateau_step:
            shutil.rmtree(later)
    continued = list(sft_command)
    continued[continued.index(str(sft_dir))] = str(continued_dir)
    continued[continued.index("--max_steps") + 1] = str(plateau_step + extra_steps)
    continued[continued.index("--early_stopping_patience") + 1] = "0"  # it runs its whole budget
    # Its curve, as many points as GRPO's; its model is its last step, where its schedule (SFT's,
    # stretched to the longer run) ends.
    every = max(1, extra_steps // max(1, args.grpo_steps // args.curve_every))
    continued[continued.index("--eval_steps") + 1] = str(every)
    seconds["sft continued"] = run([*continued, "--resume"], "sft-continued", out)
    continued_metrics = read_metrics(continued_dir / "metrics.jsonl")
    continued_step = continued_metrics[-1]["step"]
    test_eval(str(checkpoint_dir(continued_dir, continued_step)), "sft-continued")

    # --- 5. the baselines that use the checkable answers too: RFT, filtered demonstrations, answer-only ---
    def sft_on(dataset_dir: Path, run_dir: Path, name: str, steps: int, *, init_from: str | None = None,
               save_every: int = 0) -> float:
        """The SFT stage's recipe (lr, warm-up, schedule, batch) on a saved dataset, no in-loop
        validation (--val_fraction 0: the saved rows are all training rows)."""
        return run([
            sys.executable, "train.py", "--stage", "sft", "--output_dir", str(run_dir), "--max_steps", str(steps),
            "--learning_rate", str(args.sft_lr), "--warmup_steps", str(min(30, steps // 10)),
            "--lr_scheduler", args.sft_schedule, "--per_device_batch_size", "32", "--val_fraction", "0",
            "--save_steps", str(save_every), "--save_total_limit", "1000",
            *(["--init_from", init_from] if init_from else []), *common, *data_flags(args, str(dataset_dir)),
        ], name, out)

    data_dir = out / "data"
    # GRPO's prompts, exactly those its ranks read, with their verified answers (no traces).
    prompts = load_training_part(args, seed=seed, num_examples=args.grpo_examples)
    consumed = consumed_prompt_indices(len(prompts), seed, args.nproc, args.grpo_prompts, grpo_step)
    prompts = prompts.select(consumed).remove_columns("thinking")
    prompts.save_to_disk(str(data_dir / "grpo-prompts"))

    # RFT: G samples of each at GRPO's temperature from the SFT model (eval.py's sampler), the
    # verified ones kept, SFT on them for GRPO's training time in SFT steps.
    t = time.perf_counter()
    rft_samples = evaluate(sft_model, out / "eval" / "rft-samples", seed=seed, dataset=str(data_dir / "grpo-prompts"),
                           part="all", num_examples=len(prompts), args=args, num_samples=args.num_generations)
    seconds["rft sampling"] = time.perf_counter() - t
    samples = read_metrics(out / "eval" / "rft-samples" / "samples.jsonl")
    rows, traces, answers = verified_rows(samples)
    rft = {"prompts": len(prompts), "samples": len(prompts) * args.num_generations, "kept": len(rows),
           "prompts_with_a_kept_sample": len(set(rows)), "sampling_accuracy": rft_samples["accuracy"]}
    print(f"\n[demo] RFT: {len(rows)} of {rft['samples']} samples verified, from {len(set(rows))} of "
          f"{len(prompts)} prompts", flush=True)
    if rows:
        kept = prompts.select(rows).remove_columns("answer").add_column("thinking", traces).add_column("answer", answers)
        kept.save_to_disk(str(data_dir / "rft"))
        seconds["rft sft"] = sft_on(data_dir / "rft", out / "rft", "rft", extra_steps, init_from=sft_model)
        rft_model = str(checkpoint_dir(out / "rft", extra_steps))
    else:  # nothing verified (the untrained model of --quick): RFT has nothing to learn from
        rft_model = sft_model
    test_eval(rft_model, "rft")

    # Answer-only SFT: the same prompts, the verified answer as the whole target, from the SFT model.
    seconds["answer-only sft"] = sft_on(data_dir / "grpo-prompts", out / "answer-only", "answer-only", extra_steps,
                                        init_from=sft_model)
    test_eval(str(checkpoint_dir(out / "answer-only", extra_steps)), "answer-only")

    # Filtered demonstrations: SFT from the untrained model on the demonstrations whose answer is
    # the true count, over the SFT stage's schedule, a checkpoint every --sft_eval_steps; its model
    # is chosen by the SFT arm's own plateau rule on the same validation scenes.
    demonstrations = load_training_part(args, seed=seed, num_examples=args.sft_examples,
                                        demonstrator_misses=args.demonstrator_misses or None)
    correct = correct_demonstrations(demonstrations)
    demonstrations.select(correct).save_to_disk(str(data_dir / "filtered-demonstrations"))
    filtered_dir = out / "filtered"
    seconds["filtered sft"] = sft_on(data_dir / "filtered-demonstrations", filtered_dir, "filtered",
                                     args.sft_max_steps, save_every=args.sft_eval_steps)
    t = time.perf_counter()
    stopping, filtered_curve = EarlyStopping(args.sft_patience, args.sft_min_delta), []
    for step in range(args.sft_eval_steps, args.sft_max_steps + 1, args.sft_eval_steps):
        summary = evaluate(str(checkpoint_dir(filtered_dir, step)), out / "eval" / f"filtered-val-{step}", seed=seed,
                           dataset="synthetic", part="validation", num_examples=args.val_examples, args=args)
        filtered_curve.append({"step": step, "accuracy": summary["accuracy"]})
        if stopping.update(step, summary["accuracy"]):
            break  # where the SFT arm's early stopping would have ended this run
    seconds["evaluation"] += time.perf_counter() - t
    stop_step, filtered_step = filtered_curve[-1]["step"], best_step(filtered_curve, "accuracy")
    test_eval(str(checkpoint_dir(filtered_dir, filtered_step)), "filtered")

    seconds["total"] = time.perf_counter() - started
    record = {
        "seed": seed, "results": results, "seconds": seconds, "plateau_step": plateau_step,
        "extra_sft_steps": extra_steps, "grpo_curve": curve, "sft_metrics": sft_metrics, "grpo_step": grpo_step,
        "continued_step": continued_step, "continued_metrics": continued_metrics, "grpo_metrics": grpo_metrics,
        "rft": rft, "filtered": {"demonstrations": len(demonstrations), "kept": len(correct), "curve": filtered_curve,
                                 "stopped_at": stop_step, "step": filtered_step},
    }
    (out / "demo.json").write_text(json.dumps(record))
    return record


def _exit_on_sigterm(signum, frame):
    # Python's default SIGTERM ends the process without unwinding, so run() never saw it and the
    # running stage (train.py, torchrun) was orphaned; as SystemExit it goes through run()'s cleanup.
    raise SystemExit(128 + signum)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    prepare_output_dir(out)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)

    records = []
    for seed in args.seed_list:  # the report is rewritten after every seed: a stopped run keeps what it did
        records.append(run_seed(args, seed, out / f"seed-{seed}"))
        report = write_report(out, args, records, argv if argv is not None else sys.argv[1:])
    print("\n" + report, flush=True)
    return {"records": records}


if __name__ == "__main__":
    main()
