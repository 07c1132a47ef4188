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
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_info, median, save_preset

HERE = Path(__file__).resolve().parent


def trainer_command(trainer: str, model_dir: str, args, num_iterations: int, beta: float, out: Path,
                    gate_fds: str | None) -> list[str]:
    cmd = [sys.executable, str(HERE / "trainers.py"), "--trainer", trainer, "--model_dir", model_dir,
           "--out", str(out), "--num_prompts", str(args.num_prompts), "--group_size", str(args.group_size),
           "--micro_batch_size", str(args.micro_batch_size), "--max_completion_length", str(args.max_completion_length),
           "--num_iterations", str(num_iterations), "--beta", str(beta), "--num_batches", str(args.num_batches),
           "--threads", str(args.threads), "--freeze_policy", args.freeze_policy]
    if args.trl_gradient_checkpointing:
        cmd.append("--trl_gradient_checkpointing")
    if gate_fds:
        cmd += ["--gate_fds", gate_fds]
    return cmd


def run_pair(model_dir: str, args, num_iterations: int, beta: float, workdir: str) -> dict:
    """Both trainers in their own processes, one generation batch at a time, alternating who goes first."""
    processes, gates, logs, outs = {}, {}, {}, {}
    for trainer in ("ours", "trl"):
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

    for batch in range(args.num_batches):
        order = ("ours", "trl") if batch % 2 == 0 else ("trl", "ours")
        for trainer in order:
            write_fd, read_fd = gates[trainer]
            os.write(write_fd, b"g")
            if os.read(read_fd, 1) != b"d":  # EOF: the trainer died
                fail(trainer)
    records = {}
    for trainer, process in processes.items():
        _, status, usage = os.wait4(process.pid, 0)
        for fd in gates[trainer]:
            os.close(fd)
        if status != 0:
            fail(trainer)
        records[trainer] = json.loads(outs[trainer].read_text())
        records[trainer]["wait4_maxrss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
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
        "vision_calls_images_per_batch": images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-small", help="tiny | tiny-small")
    parser.add_argument("--model_dir", default=None, help="use this save_pretrained folder instead of a preset")
    parser.add_argument("--configs", default="1:0,1:0.04,2:0,2:0.04", help="num_iterations:beta, comma-separated")
    parser.add_argument("--num_prompts", type=int, default=4, help="B")
    parser.add_argument("--group_size", type=int, default=8, help="G")
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=32, help="T (every completion exactly T)")
    parser.add_argument("--num_batches", type=int, default=4, help="generation batches per run; first = warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each trainer")
    parser.add_argument("--freeze_policy", default="full",
                        help="ours: full | language (vision frozen: rollout features reused); TRL always trains all")
    parser.add_argument("--trl_gradient_checkpointing", action="store_true",
                        help="leave TRL's default gradient checkpointing on (ours has none)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    print(machine_info(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = args.model_dir or save_preset(args.preset, Path(workdir) / args.preset)
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

    B, G, T = args.num_prompts, args.group_size, args.max_completion_length
    print(f"\nB={B} prompts x G={G}, T={T} tokens per completion, micro-batch {args.micro_batch_size}, "
          f"{args.num_batches - 1} measured generation batches per run\n")
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
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
