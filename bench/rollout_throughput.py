"""Rollout throughput: our sampler (`grpo.engine.rollout.sample_rollouts`) vs `model.generate` on G copies.

For each model preset, one batch of B synthetic counting prompts (data/synthetic.py, collated by
data/collators.py), G completions per prompt, exactly `--max_new_tokens` tokens each:

    ours   sample_rollouts(model, batch, group_size=G, ...)       vision once per prompt, prefill
                                                                 once per prompt, KV cache copied
                                                                 G ways, hand-written decode loop
    naive  generate_rollouts_naive(model, batch, group_size=G)   every prompt (and image) repeated
                                                                 G times, then model.generate

Equal lengths: both get `eos_token_ids=[V + 1]`, an id one past the vocabulary that no sampler can
ever emit (bench/common.py `never_sampled_eos`). Neither loop can stop early, both sample from the
same unmodified distribution (temperature 1, no top-p/top-k), and every row has exactly
max_new_tokens tokens; the script asserts it. Throughput = B * G * max_new_tokens / seconds.

Timing: one short warm-up call of each, then `--repeats` rounds, ours and naive alternating inside
each round, the order flipped every round (the 2-core machine is shared: only same-run medians and
ratios mean anything). One torch thread by default (--threads). Each round also times 1-token
rollouts, which splits the time into "prefill" (vision + prefill + one sampling step) and "decode
step" ((t(T) - t(1)) / (T - 1)); --no_breakdown skips them.

Ours draws tokens by inverse CDF on CPU (grpo/engine/rollout.py); `--sampling_method multinomial` times
it with `torch.multinomial`, as `generate` draws them (and as ours did before the sampler change).

    OMP_NUM_THREADS=1 .venv/bin/python bench/rollout_throughput.py          # ~1-1.5 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/rollout_throughput.py --presets tiny --sampling_method multinomial
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import counting_batch, machine_info, median, never_sampled_eos, tensors_only

from grpo.engine.hf_generate import generate_rollouts_naive
from grpo.engine.rollout import sample_rollouts
from grpo.engine.sampling import SAMPLING_METHODS, default_sampling_method
from models.loading import load_policy, special_token_ids


def time_call(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_preset(preset: str, num_prompts: int, group_size: int, max_new_tokens: int, repeats: int,
                 breakdown: bool, sampling_method: str | None = None) -> dict:
    model, processor = load_policy(preset)
    model.eval()
    tokens = special_token_ids(model, processor)
    batch = tensors_only(counting_batch(processor, num_prompts))
    eos = [never_sampled_eos(model)]
    common = dict(group_size=group_size, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                  pad_token_id=tokens.pad_token_id, temperature=1.0, top_p=1.0, top_k=0)
    generator = torch.Generator().manual_seed(0)

    def ours(num_tokens):
        return sample_rollouts(model, batch, generator=generator, sampling_method=sampling_method,
                               **{**common, "max_new_tokens": num_tokens}).completion_ids

    def naive(num_tokens):
        return generate_rollouts_naive(model, batch, **{**common, "max_new_tokens": num_tokens})

    ours(4), naive(4)  # warm-up (lazy initialisation, first-call allocations), short to save time
    # Rounds alternate which sampler goes first, so a slow spell of the shared machine does not
    # always land on the same one. With breakdown, each round also times 1-token rollouts:
    # t(1) ~ vision + prefill (+ one sampling step), (t(T) - t(1)) / (T - 1) = one decode step.
    lengths = (max_new_tokens, 1) if breakdown else (max_new_tokens,)
    times = {(name, n): [] for name in ("ours", "naive") for n in lengths}
    for round_index in range(repeats):
        order = (("ours", ours), ("naive", naive)) if round_index % 2 == 0 else (("naive", naive), ("ours", ours))
        for n in lengths:
            for name, fn in order:
                seconds, completion_ids = time_call(lambda: fn(n))  # noqa: B023
                expected = (num_prompts * group_size, n)
                if tuple(completion_ids.shape) != expected:
                    raise AssertionError(f"{name}: completions {tuple(completion_ids.shape)}, expected {expected}")
                times[(name, n)].append(seconds)
    num_tokens = num_prompts * group_size * max_new_tokens
    result = {
        "preset": preset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab": model.config.get_text_config().vocab_size,
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "B": num_prompts, "G": group_size, "T": max_new_tokens,
        "sampling_method": sampling_method or default_sampling_method(batch["input_ids"].device),
        "seconds": {f"{name} T={n}": ts for (name, n), ts in times.items()},
        "ours_tokens_per_s": num_tokens / median(times[("ours", max_new_tokens)]),
        "naive_tokens_per_s": num_tokens / median(times[("naive", max_new_tokens)]),
    }
    result["speedup"] = median(times[("naive", max_new_tokens)]) / median(times[("ours", max_new_tokens)])
    # Per-round ratios (naive / ours in the same round) show how much noise the shared machine adds.
    result["per_round_speedups"] = [
        n / o for n, o in zip(times[("naive", max_new_tokens)], times[("ours", max_new_tokens)], strict=True)
    ]
    if breakdown:
        for name in ("ours", "naive"):
            first = median(times[(name, 1)])
            result[f"{name}_prefill_s"] = first
            result[f"{name}_decode_step_s"] = (median(times[(name, max_new_tokens)]) - first) / (max_new_tokens - 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,tiny-small")
    parser.add_argument("--num_prompts", type=int, default=4, help="B")
    parser.add_argument("--group_size", type=int, default=8, help="G")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="T (every completion has exactly T)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after a short warm-up")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, multi-threaded kernels wait on "
                             "each other's preempted threads and the noise swamps the ratio)")
    parser.add_argument("--no_breakdown", action="store_true",
                        help="skip the 1-token rollouts that split time into prefill and decode steps")
    parser.add_argument("--sampling_method", default=None, choices=SAMPLING_METHODS,
                        help="how ours draws tokens (default: by device, inverse_cdf on CPU)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(machine_info())
    results = []
    for preset in args.presets.split(","):
        result = bench_preset(preset, args.num_prompts, args.group_size, args.max_new_tokens, args.repeats,
                              breakdown=not args.no_breakdown, sampling_method=args.sampling_method)
        results.append(result)
        print(json.dumps(result), flush=True)
    print()
    print("| preset | params | prompt tokens | B x G x T | ours tok/s (median) | generate tok/s (median) "
          "| speedup (median ratio) | per-round speedups | prefill s ours / generate | decode step s ours / generate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rounds = ", ".join(f"{s:.2f}" for s in r["per_round_speedups"])
        split = ("| n/a | n/a |" if "ours_prefill_s" not in r else
                 f"| {r['ours_prefill_s']:.3f} / {r['naive_prefill_s']:.3f} "
                 f"| {r['ours_decode_step_s']:.4f} / {r['naive_decode_step_s']:.4f} |")
        print(f"| {r['preset']} | {r['parameters'] / 1e6:.2f} M | {r['prompt_tokens']} | {r['B']} x {r['G']} x {r['T']} "
              f"| {r['ours_tokens_per_s']:,.0f} | {r['naive_tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {rounds} {split}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
