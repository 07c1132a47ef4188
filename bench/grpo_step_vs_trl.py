"""A full GRPO step (rollout + rewards + update), ours vs TRL's GRPOTrainer, same model, data, setting.

The model is a tiny preset (default "tiny-small", 27 M parameters, a real
Qwen2_5_VLForConditionalGeneration) written with save_pretrained to a temporary folder, so that
TRL loads it by path exactly as it would a Hub checkpoint; our loop loads the same folder
(--model DIR). Everything else that must match is set in bench/trainers.py (same prompts in the
same order, same rewards, same optimiser, float32, no gradient checkpointing, one torch thread,
every completion exactly T tokens: EOS made unreachable in ours, min_new_tokens=T in TRL).

For each (num_iterations, beta) in --configs, each trainer runs in its OWN subprocess (so peak
memory is per trainer) for --num_batches generation batches; the first is a warm-up. One
generation batch = B prompts x G completions, then num_iterations optimizer steps on it (B*G/micro
micro-batches each). The two processes are interleaved one generation batch at a time through a
pipe (bench/trainers.py Gate): ours runs a batch while TRL is parked, then TRL while ours is
parked, the order flipped every batch, so they never compete for the 2 cores and a slow spell of
the shared machine hits both. A batch's time is everything its trainer did between the end of the
previous batch and the end of its own last optimizer step (next prompts, rollout, rewards,
old/ref logprobs, the updates, logging), minus the time parked. Reported: median per-batch time
of each trainer and the ratio TRL / ours, the per-batch ratios of the back-to-back pairs, and the
same in CPU seconds (time.process_time of each process: on a shared machine the steadier measure,
since being descheduled costs wall time but no CPU time); peak RSS (VmHWM at the end of each process,
cross-checked with os.wait4's ru_maxrss) and the ratio ours / TRL; also the RSS when the first
rollout starts (model(s) and data loaded), to separate the training peak from the fixed cost of
imports and loading.

    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_step_vs_trl.py                     # ~15-20 min, 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_step_vs_trl.py --configs 1:0.04   # one setting, ~4 min

On a GPU (--device cuda --dtype bfloat16; bench/gpu_suite.sh runs this):

    python bench/grpo_step_vs_trl.py --device cuda --dtype bfloat16 --config qwen2.5-vl-3b \
        --configs 1:0.04 --max_completion_length 64

--config qwen2.5-vl-3b is the published Qwen2.5-VL-3B architecture (3.75 B parameters, vocabulary
151,936) with RANDOM weights, built on the device in --dtype and saved with the tiny processor;
its config's special-token ids are the tiny tokenizer's (bench/common.py save_model), so both
trainers load one self-consistent folder. --config_overrides shrinks it (e.g.
"num_hidden_layers=1,vocab_size=1024,vision.depth=1,vision.fullatt_block_indexes=[0]") to test
that path on a CPU. On CUDA the trainers run one after the other by default (--schedule
sequential): each holds policy + reference + gradients + AdamW moments (4x the weights in bf16,
~37.5 GB at 3B) and two such processes do not fit one 80 GB GPU side by side; a GPU nobody else
uses needs no interleaving for fairness. GPU memory is reported as torch.cuda.max_memory_allocated
(tensors' peak) and max_memory_reserved (the caching allocator's peak) of each trainer process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common import MODEL_CONFIGS, machine_info, median, save_model

HERE = Path(__file__).resolve().parent


def trainer_command(trainer: str, model_dir: str, args, num_iterations: int, beta: float, out: Path,
                    gate_fds: str | None) -> list[str]:
    cmd = [sys.executable, str(HERE / "trainers.py"), "--trainer", trainer, "--model_dir", model_dir,
           "--out", str(out), "--num_prompts", str(args.num_prompts), "--group_size", str(args.group_size),
           "--micro_batch_size", str(args.micro_batch_size), "--max_completion_length", str(args.max_completion_length),
           "--num_iterations", str(num_iterations), "--beta", str(beta), "--num_batches", str(args.num_batches),
           "--threads", str(args.threads), "--freeze_policy", args.freeze_policy,
           "--device", args.device, "--dtype", args.dtype, "--learning_rate", str(args.learning_rate)]
    if args.trl_gradient_checkpointing:
        cmd.append("--trl_gradient_checkpointing")
    if gate_fds:
        cmd += ["--gate_fds", gate_fds]
    return cmd


def run_pair(model_dir: str, args, num_iterations: int, beta: float, workdir: str) -> dict:
    """Both trainers in their own processes, one generation batch at a time, alternating who goes first
    (--schedule interleaved), or ours to the end and then TRL (sequential: one process alive at a time)."""
    processes, gates, logs, outs = {}, {}, {}, {}

    def start(trainer):
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        outs[trainer] = Path(workdir) / f"{trainer}_{num_iterations}_{beta}.json"
        logs[trainer] = Path(workdir) / f"{trainer}_{num_iterations}_{beta}.log"
        cmd = trainer_command(trainer, model_dir, args, num_iterations, beta, outs[trainer],
                              f"{to_child_r},{to_parent_w}")
        with open(logs[trainer], "w") as log:
            processes[trainer] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, pass_fds=(to_child_r, to_parent_w),
                env={**os.environ, "TQDM_DISABLE": "1"},
            )
        os.close(to_child_r)
        os.close(to_parent_w)
        gates[trainer] = (to_child_w, to_parent_r)

    def fail(trainer):
        for process in processes.values():
            process.kill()
        raise RuntimeError(f"{trainer} (num_iterations={num_iterations}, beta={beta}) failed:\n"
                           f"{logs[trainer].read_text()[-3000:]}")

    def run_batch(trainer):
        write_fd, read_fd = gates[trainer]
        os.write(write_fd, b"g")
        if os.read(read_fd, 1) != b"d":  # EOF: the trainer died
            fail(trainer)

    records = {}

    def finish(trainer):
        _, status, usage = os.wait4(processes[trainer].pid, 0)
        for fd in gates[trainer]:
            os.close(fd)
        if status != 0:
            fail(trainer)
        records[trainer] = json.loads(outs[trainer].read_text())
        records[trainer]["wait4_maxrss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes

    try:
        if args.schedule == "interleaved":
            for trainer in ("ours", "trl"):
                start(trainer)
            for batch in range(args.num_batches):
                for trainer in ("ours", "trl") if batch % 2 == 0 else ("trl", "ours"):
                    run_batch(trainer)
            for trainer in ("ours", "trl"):
                finish(trainer)
        else:  # sequential: the second trainer starts only after the first has exited
            for trainer in ("ours", "trl"):
                start(trainer)
                for _ in range(args.num_batches):
                    run_batch(trainer)
                finish(trainer)
    finally:
        if args.trainer_logs:  # every trainer's own log, also when one failed
            with open(args.trainer_logs, "a") as combined:
                for trainer, log in logs.items():
                    combined.write(f"===== {trainer} num_iterations={num_iterations} beta={beta} =====\n")
                    combined.write(log.read_text() if log.exists() else "(no log)\n")
    return records


def summarise(record: dict, num_iterations: int, max_completion_length: int) -> dict:
    ends, waited = record["batch_end"], record["waited"]
    # Batch k's own time: between the ends of batches k-1 and k, minus the time parked at the gate.
    batch_times = [(ends[k] - ends[k - 1]) - (waited[k] - waited[k - 1]) for k in range(1, len(ends))]
    cpu_ends = record["batch_end_cpu"]
    batch_cpu = [cpu_ends[k] - cpu_ends[k - 1] for k in range(1, len(cpu_ends))]
    if not all(abs(length - max_completion_length) < 1e-6 for length in record["completion_length_mean"]):
        raise AssertionError(f"{record['trainer']}: completion lengths {record['completion_length_mean']}, "
                             f"expected all {max_completion_length}")
    steps = len(record["step_end"])
    images = {}
    for step in (str(steps - i) for i in range(num_iterations)):  # the last generation batch's steps
        for kind, (calls, count) in record["vision"].get(step, {}).items():
            c, n = images.get(kind, (0, 0))
            images[kind] = (c + calls, n + count)
    return {
        "batch_seconds": batch_times,
        "median_batch_seconds": median(batch_times),
        "batch_cpu_seconds": batch_cpu,
        "median_batch_cpu_seconds": median(batch_cpu),
        "median_rollout_seconds": median(record["rollout_seconds"][1:]),
        "peak_rss_mb": record["peak_rss_mb"],
        "wait4_maxrss_mb": record["wait4_maxrss_mb"],
        "rss_train_start_mb": record["rss_train_start_mb"],
        "gpu_peak_allocated_mb": record.get("gpu_peak_allocated_mb"),
        "gpu_peak_reserved_mb": record.get("gpu_peak_reserved_mb"),
        "gpu_train_start_mb": record.get("gpu_train_start_mb"),
        "vision_calls_images_per_batch": images,
        "model_dtype": record.get("model_dtype"),
        "model_device": record.get("model_device"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", "--preset", dest="config", default="tiny-small", choices=MODEL_CONFIGS,
                        help="model to save and train: a tiny preset or the 3B architecture with random weights")
    parser.add_argument("--config_overrides", default=None,
                        help="qwen2.5-vl-3b only: KEY=VALUE,... (vision.KEY for the vision config), e.g. to shrink it")
    parser.add_argument("--model_dir", default=None, help="use this save_pretrained folder instead of --config")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="both trainers' weights (and the saved 3B model's)")
    parser.add_argument("--schedule", choices=("auto", "interleaved", "sequential"), default="auto",
                        help="auto: interleaved on CPU, sequential on CUDA (see the module docstring)")
    parser.add_argument("--trainer_logs", default=None, help="append every trainer process's log to this file")
    parser.add_argument("--configs", default="1:0,1:0.04,2:0,2:0.04", help="num_iterations:beta, comma-separated")
    parser.add_argument("--num_prompts", type=int, default=4, help="B")
    parser.add_argument("--group_size", type=int, default=8, help="G")
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=32, help="T (every completion exactly T)")
    parser.add_argument("--learning_rate", type=float, default=1e-5,
                        help="both trainers' AdamW lr. The random-weight 3B config diverges in bf16 at a real lr "
                             "(TRL's grad norm was NaN at its second step with 1e-5): use 1e-12 there, which keeps "
                             "every computation of the step (AdamW still runs) but leaves bf16 weights in place")
    parser.add_argument("--num_batches", type=int, default=4, help="generation batches per run; first = warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each trainer")
    parser.add_argument("--freeze_policy", default="full",
                        help="ours: full | language (vision frozen: rollout features reused); TRL always trains all")
    parser.add_argument("--trl_gradient_checkpointing", action="store_true",
                        help="leave TRL's default gradient checkpointing on (ours has none)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    # A timeout's SIGTERM exits through the finally blocks: --trainer_logs still gets the logs.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.schedule == "auto":
        args.schedule = "interleaved" if args.device == "cpu" else "sequential"

    print(machine_info(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = args.model_dir or save_model(args.config, Path(workdir) / args.config, device=args.device,
                                                 dtype=args.dtype, overrides=args.config_overrides)
        for spec in args.configs.split(","):
            num_iterations, beta = int(spec.split(":")[0]), float(spec.split(":")[1])
            records = run_pair(model_dir, args, num_iterations, beta, workdir)
            results = {}
            for trainer in ("ours", "trl"):
                results[trainer] = summarise(records[trainer], num_iterations, args.max_completion_length)
                print(json.dumps({"num_iterations": num_iterations, "beta": beta, "trainer": trainer,
                                  **results[trainer]}), flush=True)
            rows.append({"num_iterations": num_iterations, "beta": beta, **results,
                         "time_ratio_trl_over_ours": results["trl"]["median_batch_seconds"]
                         / results["ours"]["median_batch_seconds"],
                         "cpu_ratio_trl_over_ours": results["trl"]["median_batch_cpu_seconds"]
                         / results["ours"]["median_batch_cpu_seconds"],
                         # batch k of both ran back to back (Gate): their ratio sees the same machine
                         "paired_time_ratios": [t / o for o, t in zip(results["ours"]["batch_seconds"],
                                                                      results["trl"]["batch_seconds"], strict=True)],
                         "peak_ratio_ours_over_trl": results["ours"]["peak_rss_mb"] / results["trl"]["peak_rss_mb"]})
            if args.out:  # after every setting, so a later failure or timeout keeps the finished ones
                Path(args.out).write_text(json.dumps(rows, indent=1))

    B, G, T = args.num_prompts, args.group_size, args.max_completion_length
    print(f"\n{args.config if not args.model_dir else args.model_dir}, {args.device} {args.dtype}, "
          f"B={B} prompts x G={G}, T={T} tokens per completion, micro-batch {args.micro_batch_size}, "
          f"{args.num_batches - 1} measured generation batches per run, {args.schedule}\n")
    print("| num_iterations | beta | ours s/batch | TRL s/batch | TRL / ours (wall) | paired ratios "
          "| ours CPU s/batch | TRL CPU s/batch | TRL / ours (CPU) | ours rollout s | TRL rollout s "
          "| ours peak RSS MB | TRL peak RSS MB | ours / TRL peak | RSS at first rollout ours / TRL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, t = r["ours"], r["trl"]
        paired = ", ".join(f"{x:.2f}" for x in r["paired_time_ratios"])
        print(f"| {r['num_iterations']} | {r['beta']} | {o['median_batch_seconds']:.1f} | {t['median_batch_seconds']:.1f} "
              f"| {r['time_ratio_trl_over_ours']:.2f}x | {paired} | {o['median_batch_cpu_seconds']:.1f} "
              f"| {t['median_batch_cpu_seconds']:.1f} | {r['cpu_ratio_trl_over_ours']:.2f}x "
              f"| {o['median_rollout_seconds']:.1f} | {t['median_rollout_seconds']:.1f} "
              f"| {o['peak_rss_mb']:,.0f} | {t['peak_rss_mb']:,.0f} | {r['peak_ratio_ours_over_trl']:.2f} "
              f"| {o['rss_train_start_mb']:,.0f} / {t['rss_train_start_mb']:,.0f} |")
    if args.device == "cuda":
        print("\n| num_iterations | beta | GPU peak allocated MB ours / TRL | ours / TRL | GPU peak reserved MB ours / TRL "
              "| GPU allocated at first rollout MB ours / TRL |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            o, t = r["ours"], r["trl"]
            print(f"| {r['num_iterations']} | {r['beta']} | {o['gpu_peak_allocated_mb']:,.0f} / "
                  f"{t['gpu_peak_allocated_mb']:,.0f} | {o['gpu_peak_allocated_mb'] / t['gpu_peak_allocated_mb']:.2f} "
                  f"| {o['gpu_peak_reserved_mb']:,.0f} / {t['gpu_peak_reserved_mb']:,.0f} "
                  f"| {o['gpu_train_start_mb']:,.0f} / {t['gpu_train_start_mb']:,.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
