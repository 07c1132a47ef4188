"""The cost of drawing one token per row on CPU: torch.multinomial vs inverse CDF (adopted).

`model.generate` draws each decode step's tokens with `torch.multinomial(probs, 1)` on [R, V]
probabilities, and so did our sampler until inverse CDF replaced it on CPU (grpo/engine/rollout.py
`sample_next_token`, `default_sampling_method`). On CPU that kernel draws an exponential random
number for EVERY vocabulary entry (it samples by argmax(p / Exp(1)) internally), so its cost grows
with V: at Qwen's V = 151,936 and R = 32 rows it is by far the most expensive op of a decode step
for small models. Inverse CDF (`grpo.engine.sampling.inverse_cdf_draw`) draws ONE uniform per row:

    cdf = probs.cumsum(-1)                                  # [R, V]
    target = torch.rand(R, 1) * cdf[:, -1:]                 # [R, 1] u times the row's total
    token = torch.searchsorted(cdf, target, right=True)     # [R] first index with cdf > target

an exact sampler of the same distribution up to float32 rounding of the partial sums (a token of
probability 0 is never drawn: tests/test_sampling.py). This script times, per decode step on
[R, V]: the multinomial draw, the inverse-CDF draw (uniforms included), and for scale the
log_softmax the sampler already computes (its `sampler_logprobs`). It also checks that both give
the same token frequencies on a small vocabulary (total-variation distance over many draws).

    OMP_NUM_THREADS=1 .venv/bin/python bench/sampling_cost.py        # ~20 s
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import machine_info, median

from grpo.engine.sampling import inverse_cdf_draw


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [R, V], as `sample_next_token` draws it: [R]."""
    uniform = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)  # [R, 1]
    return inverse_cdf_draw(probs, uniform)  # [R]


def time_it(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32, help="R = B*G")
    parser.add_argument("--vocabs", default="927,151936", help="tiny preset's V, Qwen's V")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_info())
    generator = torch.Generator().manual_seed(0)

    # Same distribution: empirical frequencies of both samplers on one row of a small vocabulary.
    probs = torch.softmax(torch.randn(1, 50, generator=generator) * 2, dim=-1).expand(200_000, -1).contiguous()
    freq_multinomial = torch.bincount(torch.multinomial(probs, 1, generator=generator).flatten(), minlength=50) / 200_000
    freq_inverse = torch.bincount(inverse_cdf_sample(probs, generator), minlength=50) / 200_000
    tv_between = 0.5 * float((freq_multinomial - freq_inverse).abs().sum())
    tv_inverse_to_true = 0.5 * float((freq_inverse - probs[0]).abs().sum())

    results = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        logits = torch.randn(args.rows, vocab, generator=generator)  # [R, V]
        probs = torch.softmax(logits, dim=-1)  # [R, V]
        result = {
            "R": args.rows, "V": vocab,
            "multinomial_ms": 1e3 * time_it(lambda p=probs: torch.multinomial(p, 1, generator=generator), args.repeats),
            "inverse_cdf_ms": 1e3 * time_it(lambda p=probs: inverse_cdf_sample(p, generator), args.repeats),
            "log_softmax_ms": 1e3 * time_it(lambda x=logits: torch.log_softmax(x, dim=-1), args.repeats),
        }
        result["speedup"] = result["multinomial_ms"] / result["inverse_cdf_ms"]
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"\nsame distribution check (V=50, 200k draws): TV(multinomial, inverse CDF) = {tv_between:.4f}, "
          f"TV(inverse CDF, true p) = {tv_inverse_to_true:.4f} (sampling noise at 200k draws: a few 1e-3)\n")
    print("| R x V | torch.multinomial ms/step | inverse CDF ms/step | speedup | log_softmax ms/step (for scale) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['R']} x {r['V']:,} | {r['multinomial_ms']:.2f} | {r['inverse_cdf_ms']:.2f} | {r['speedup']:.0f}x "
              f"| {r['log_softmax_ms']:.2f} |")


if __name__ == "__main__":
    main()
