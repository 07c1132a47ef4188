"""Peak memory (and time) of per-token logprobs, forward + backward, at Qwen's vocabulary V = 151,936.

Compares `grpo.logprobs.token_logprobs` (chunked over positions, hand-written backward) with
`token_logprobs_naive` (a full float32 log-softmax, then a gather) on random logits [R, T, V]
that require grad, like the lm_head output of a training forward. The pass measured is

    logprobs = fn(logits, token_ids)              # [R, T]
    (logprobs * weights).sum().backward()         # weights [R, T]: stand-in for A * mask / n

How peak memory is measured (CPU has no `torch.cuda.max_memory_allocated`):
  1. Allocator peak, exact. Each case runs in a FRESH subprocess under
     `torch.profiler.profile(profile_memory=True)`. The profiler records every allocation and free
     of torch's CPU allocator (size, timestamp); replaying them in time order gives the live
     tensor bytes at every moment, and its maximum is the peak. The logits and ids are allocated
     before profiling starts, so the number is the EXTRA memory of the pass on top of the logits
     (it includes `logits.grad`, [R, T, V] in the logits' dtype, which any method must produce).
  2. Peak RSS, cross-check. In the same subprocess the kernel's resident-set high-water mark is
     reset (`echo 5 > /proc/self/clear_refs`) right before an unprofiled pass and VmHWM is read
     after it; minus the RSS before the pass, that is what the OS saw. Big tensors are mmapped by
     glibc and returned on free, so the two agree to within a few MB when the machine is quiet.

Time is measured in the parent process (one torch thread by default), the variants interleaved
round by round (this 2-core machine is shared, so only same-run medians and ratios mean anything).

    OMP_NUM_THREADS=1 .venv/bin/python bench/logprob_memory.py            # ~4-6 min on 2 shared cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/logprob_memory.py --shapes 4x128 --dtypes bfloat16   # ~1 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo.logprobs import token_logprobs, token_logprobs_naive  # noqa: E402

QWEN_VOCAB = 151_936
MB = 2**20


def make_inputs(rows: int, tokens: int, dtype: torch.dtype, vocab: int = QWEN_VOCAB, seed: int = 0):
    """logits [R, T, V] (leaf, requires grad), token_ids [R, T], weights [R, T]."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.empty(rows, tokens, vocab, dtype=dtype)
    for r in range(rows):  # row by row: never a float32 [R, T, V] temporary for bf16
        logits[r] = (3 * torch.randn(tokens, vocab, generator=generator)).to(dtype)
    logits.requires_grad_(True)
    token_ids = torch.randint(0, vocab, (rows, tokens), generator=generator)  # [R, T]
    weights = torch.randn(rows, tokens, generator=generator)  # [R, T]
    return logits, token_ids, weights


class _InplaceChunkedLogprobs(torch.autograd.Function):
    """A PROPOSAL for grpo/logprobs.py, kept here only to measure it: the same math as
    `_ChunkedTokenLogprobs`, but the backward writes each chunk's gradient straight into its slice
    of grad_logits with in-place ops (one float32 [C, V] temporary for bf16 logits, none for
    float32), instead of allocating chunk - lse, exp(.), -probs and -probs * g as four [C, V]
    temporaries. Forward: logsumexp per chunk as before."""

    @staticmethod
    def forward(ctx, logits, flat_ids, chunk_size):
        num_rows, num_tokens, vocab = logits.shape
        flat = logits.view(-1, vocab)  # [R*T, V]
        chosen = flat.gather(-1, flat_ids[:, None]).squeeze(-1).float()  # [R*T]
        log_normalisers = torch.empty(flat.shape[0], dtype=torch.float32)  # [R*T]
        for start in range(0, flat.shape[0], chunk_size):
            log_normalisers[start:start + chunk_size] = torch.logsumexp(
                flat[start:start + chunk_size].float(), dim=-1)
        ctx.save_for_backward(logits, flat_ids, log_normalisers)
        ctx.chunk_size = chunk_size
        return chosen - log_normalisers

    @staticmethod
    def backward(ctx, grad_logprobs):
        logits, flat_ids, log_normalisers = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat = logits.view(-1, vocab)  # [R*T, V]
        grad_logits = torch.empty_like(logits)  # [R, T, V]
        flat_grad = grad_logits.view(-1, vocab)  # [R*T, V]
        for start in range(0, flat.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, flat.shape[0])
            g = grad_logprobs[start:stop, None]  # [C, 1]
            # float32 logits: compute in the output slice itself; bf16: one float32 temporary.
            work = flat_grad[start:stop] if logits.dtype == torch.float32 else None
            work = torch.sub(flat[start:stop], log_normalisers[start:stop, None], out=work)  # [C, V]
            work.exp_().mul_(-g)  # -softmax(z) * g
            work.scatter_add_(-1, flat_ids[start:stop, None], g)  # + 1[v == y] * g
            if work.data_ptr() != flat_grad[start:stop].data_ptr():
                flat_grad[start:stop] = work
        return grad_logits, None, None


def run_pass(variant: str, chunk_size: int, logits, token_ids, weights):
    """One forward + backward; leaves the gradient in logits.grad; returns the logprobs."""
    if variant == "naive":
        logprobs = token_logprobs_naive(logits, token_ids)  # [R, T]
    elif variant == "inplace":
        flat_ids = token_ids.reshape(-1)
        logprobs = _InplaceChunkedLogprobs.apply(logits, flat_ids, chunk_size).view(token_ids.shape)
    else:
        logprobs = token_logprobs(logits, token_ids, chunk_size=chunk_size)  # [R, T]
    (logprobs * weights).sum().backward()
    return logprobs.detach()


def allocator_peak_bytes(fn) -> int:
    """Peak live bytes of torch's CPU allocator while fn() runs (replay of profiler alloc events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))  # size < 0: a free
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_peak_delta_bytes(fn) -> int | None:
    """VmHWM after fn() minus VmRSS before it, with the high-water mark reset first (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _proc_kb("VmRSS")
    fn()
    return (_proc_kb("VmHWM") - before) * 1024


def worker(args) -> None:
    """Runs in a fresh process: one case, prints a JSON line with both peak measurements."""
    torch.set_num_threads(1)  # memory does not depend on threads; keep the worker light
    dtype = getattr(torch, args.dtype)
    rows, tokens = args.rows, args.tokens
    logits, token_ids, weights = make_inputs(rows, tokens, dtype)

    def once():
        logits.grad = None
        run_pass(args.variant, args.chunk_size, logits, token_ids, weights)
        logits.grad = None  # freed after the pass; the peak already counted it

    # No separate warm-up: the profiled pass warms up the RSS pass, and the allocator peak does
    # not depend on warm-up (the first call allocates the same tensors).
    alloc_peak = allocator_peak_bytes(once)
    rss_peak = rss_peak_delta_bytes(once)
    print(json.dumps({"alloc_peak": alloc_peak, "rss_peak": rss_peak,
                      "logits_bytes": logits.numel() * logits.element_size()}))


def measure_memory(variant: str, chunk_size: int, dtype: str, rows: int, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--chunk_size", str(chunk_size),
           "--dtype", dtype, "--rows", str(rows), "--tokens", str(tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    line = [line for line in out.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(line)


def measure_time(variants, dtype: str, rows: int, tokens: int, repeats: int) -> dict:
    """Median seconds per pass of each variant, interleaved round by round in this process."""
    logits, token_ids, weights = make_inputs(rows, tokens, getattr(torch, dtype))
    times = {name: [] for name, _ in variants}
    reference = {}
    for round_index in range(repeats):  # all rounds timed (passes take seconds: no warm-up needed)
        for name, (variant, chunk_size) in variants:
            logits.grad = None
            start = time.perf_counter()
            logprobs = run_pass(variant, chunk_size, logits, token_ids, weights)
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            if round_index == 0:
                reference[name] = (logprobs, logits.grad.float().clone())
    logits.grad = None
    # Sanity: every variant gives the naive numbers (values and gradients).
    base_lp, base_grad = reference["naive"]
    agreement = {name: (float((lp - base_lp).abs().max()), float((g - base_grad).abs().max()))
                 for name, (lp, g) in reference.items()}
    return {name: statistics.median(ts) for name, ts in times.items()}, agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="chunked", help=argparse.SUPPRESS)
    parser.add_argument("--chunk_size", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="8x256", help="comma-separated RxT")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--chunk_sizes", default="4096,256",
                        help="chunk sizes of token_logprobs to try (4096 is the library default)")
    parser.add_argument("--inplace_chunk_sizes", default="256",
                        help="chunk sizes of the in-place backward proposal ('' to skip)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timed passes")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)

    variants = [("naive", ("naive", 0))] + [
        (f"chunked c={c}", ("chunked", c)) for c in (int(c) for c in args.chunk_sizes.split(","))
    ] + [
        (f"proposal: in-place bwd c={c}", ("inplace", c))
        for c in (int(c) for c in args.inplace_chunk_sizes.split(",") if c)
    ]
    results = []
    from common import machine_info

    print(machine_info())
    for shape in args.shapes.split(","):
        rows, tokens = (int(x) for x in shape.split("x"))
        for dtype in args.dtypes.split(","):
            medians, agreement = measure_time(variants, dtype, rows, tokens, args.repeats)
            for name, (variant, chunk_size) in variants:
                memory = measure_memory(variant, chunk_size, dtype, rows, tokens)
                results.append(dict(shape=shape, dtype=dtype, variant=name, **memory,
                                    seconds=medians[name], max_abs_diff_logprob=agreement[name][0],
                                    max_abs_diff_grad=agreement[name][1]))
                print(json.dumps(results[-1]), flush=True)

    print()
    print("| R x T | dtype | variant | logits MB | extra peak MB (allocator) | extra peak MB (RSS) "
          "| peak / naive | s per fwd+bwd (median) | time / naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results:
        naive = next(r for r in results if r["shape"] == row["shape"] and r["dtype"] == row["dtype"]
                     and r["variant"] == "naive")
        rss = "n/a" if row["rss_peak"] is None else f"{row['rss_peak'] / MB:,.0f}"
        print(f"| {row['shape']} | {row['dtype']} | {row['variant']} | {row['logits_bytes'] / MB:,.0f} "
              f"| {row['alloc_peak'] / MB:,.0f} | {rss} | {row['alloc_peak'] / naive['alloc_peak']:.2f} "
              f"| {row['seconds']:.2f} | {row['seconds'] / naive['seconds']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
