"""Vision-encoder calls per GRPO step: ours (vision trained / frozen) vs TRL's GRPOTrainer.

A forward pre-hook on `model.model.visual` (the Qwen2.5-VL vision tower) of the policy and of the
reference model counts calls and images (rows of image_grid_thw) during one generation batch,
split by forward kind: rollout (sampling), old (old-policy logprobs, num_iterations > 1), ref
(reference logprobs, beta > 0), train (the forward + backward of each micro-batch, every inner
epoch). The runs are the real training loops (bench/trainers.py: our train_grpo in-process, TRL's
GRPOTrainer.train()), with num_iterations=2 and beta=0.04 so that every forward kind happens.

What to expect with B prompts (one image each), G completions, micro-batches of M completions:
  ours, vision trained (--freeze_policy full): rollout 1 call / B images (all prompts at once);
       old 0 (the rollout's features are exact: the policy has not moved); ref and train: one
       call per micro-batch with only its prompts' images (M = G: one image per micro-batch);
  ours, vision frozen (--freeze_policy language): rollout 1 call / B images, and nothing else:
       every later forward reuses the rollout's features;
  TRL: every forward kind sees B*G images (each completion carries its own copy of the image).

    OMP_NUM_THREADS=1 .venv/bin/python bench/vision_calls.py          # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_info, save_preset

HERE = Path(__file__).resolve().parent
KINDS = ("rollout", "old", "ref", "train")


def run(trainer: str, model_dir: str, args, freeze_policy: str, workdir: str) -> dict:
    out = Path(workdir) / f"{trainer}_{freeze_policy}.json"
    cmd = [sys.executable, str(HERE / "trainers.py"), "--trainer", trainer, "--model_dir", model_dir,
           "--out", str(out), "--num_prompts", str(args.num_prompts), "--group_size", str(args.group_size),
           "--micro_batch_size", str(args.micro_batch_size), "--max_completion_length", str(args.max_completion_length),
           "--num_iterations", "2", "--beta", "0.04", "--num_batches", "1", "--freeze_policy", freeze_policy]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{trainer} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    record = json.loads(out.read_text())
    totals = {kind: [0, 0] for kind in KINDS}
    for kinds in record["vision"].values():  # every step of the one generation batch
        for kind, (calls, images) in kinds.items():
            totals[kind][0] += calls
            totals[kind][1] += images
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-small")
    parser.add_argument("--num_prompts", type=int, default=4, help="B")
    parser.add_argument("--group_size", type=int, default=8, help="G")
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=8, help="T (short: only calls are counted)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    print(machine_info(), flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = save_preset(args.preset, Path(workdir) / args.preset)
        results = {
            "ours, vision trained (freeze_policy full)": run("ours", model_dir, args, "full", workdir),
            "ours, vision frozen (freeze_policy language)": run("ours", model_dir, args, "language", workdir),
            "TRL GRPOTrainer": run("trl", model_dir, args, "full", workdir),
        }
    B, G, M = args.num_prompts, args.group_size, args.micro_batch_size
    print(f"\nOne generation batch: B={B} prompts (1 image each) x G={G}, micro-batch {M}, num_iterations 2, "
          f"beta 0.04 (2 optimizer steps). Cells: vision-tower calls / images encoded.\n")
    print("| trainer | rollout | old logprobs | ref logprobs | train (2 epochs) | total images |")
    print("|---|---|---|---|---|---|")
    for name, totals in results.items():
        cells = " | ".join(f"{totals[k][0]} / {totals[k][1]}" for k in KINDS)
        print(f"| {name} | {cells} | {sum(v[1] for v in totals.values())} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
