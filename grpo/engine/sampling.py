"""Drawing one token per row from the logits: temperature, top-k, top-p, greedy; the sampler's logprob.

The rollout (grpo/engine/rollout.py) calls `sample_next_token` once per decode step. Tokens are
drawn by inverse CDF on CPU (one uniform per row: the first token whose cumulative probability
exceeds it) and by `torch.multinomial` on CUDA, where its kernel is fast: the same distribution,
other tokens for a given seed. The recorded logprob is log softmax(logits / tau) of the chosen
token over the FULL tempered vocabulary, before top-k / top-p truncation: the distribution the
loss optimises (tau = 1 when greedy).

Run its tests: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_sampling.py -q
"""

from __future__ import annotations

import torch
from torch import Tensor

SAMPLING_METHODS = ("inverse_cdf", "multinomial")
# The smallest sampling temperature but 0 (greedy). The logits are divided by tau in their own dtype:
# an LM's logits reach a few hundred, so tau = 1e-2 keeps them below ~1e5 (finite even in float16's
# 65504 for logits under 650), while tau = 1e-40 turns them into inf and the draw into an
# out-of-range index. Below 1e-2 sampling is greedy in all but name anyway: use 0.
MIN_TEMPERATURE = 1e-2


def default_sampling_method(device: torch.device) -> str:
    """`multinomial` on CUDA (one fast kernel there), `inverse_cdf` elsewhere.

    On CPU `torch.multinomial(probs, 1)` draws an exponential random number for EVERY vocabulary
    entry; inverse CDF draws one uniform per row, and the gap grows with V (bench/sampling_cost.py;
    the figures are in docs/benchmarks.md, section 2).
    """
    return "multinomial" if torch.device(device).type == "cuda" else "inverse_cdf"


def inverse_cdf_draw(probs: Tensor, uniform: Tensor) -> Tensor:
    """Token per row of probs [R, V] (need not sum to 1) for uniforms [R, 1] in [0, 1): [R].

    Row i of probs covers [0, total) with one interval per token, [cdf[j-1], cdf[j]); the token is
    the one whose interval holds u * total, i.e. the FIRST j with cdf[j] > u * total
    (searchsorted with right=True). A token of probability 0 has an empty interval
    (cdf[j] == cdf[j-1] exactly: adding 0.0 is exact), so it is never chosen, even when u * total
    lands exactly on a boundary: with right=False, u = 0 would pick token 0 when p_0 = 0.
    The partial sums are float32, so each boundary carries float32 rounding; a zero stays a zero.
    """
    cdf = probs.cumsum(dim=-1)  # [R, V] non-decreasing: every term is >= 0
    total = cdf[:, -1:]  # [R, 1] > 0: softmax keeps at least the best token
    # u < 1, so u * total < total in exact arithmetic; keep it strictly below after rounding too,
    # so some cdf[j] > target always exists and the result can never be V (no clamp needed).
    target = torch.minimum(uniform.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))  # [R, 1]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [R]


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
    method: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One sampling step from last-position logits [R, V] -> (token [R], logprob [R] float32).

    The logprob is of the full tempered distribution, before top-k / top-p (see module docstring).
    `method` draws from the truncated distribution: "inverse_cdf" (one uniform per row) or
    "multinomial" (`torch.multinomial`, the naive twin; tests check they agree); None picks by
    device (`default_sampling_method`). Both use `generator`, which must live on the logits' device.
    """
    method = method or default_sampling_method(logits.device)
    if method not in SAMPLING_METHODS:  # checked before the greedy branch too, so a typo never hides
        raise ValueError(f"sampling method {method!r}: expected one of {SAMPLING_METHODS}")
    # A NaN or inf logit makes the draw meaningless (the inverse CDF then returns index V, which
    # fails later as an out-of-range token id): stop here and say why. One reduction and one sync
    # per decode step, next to the all-finished check the loop already syncs on.
    rows_bad = int((~torch.isfinite(logits).all(dim=-1)).sum())
    if rows_bad:
        raise FloatingPointError(
            f"the sampler got non-finite logits (NaN or inf) in {rows_bad} of {logits.shape[0]} rows: the "
            "policy's weights or activations are no longer finite (a learning rate too high, an fp16 "
            "overflow, a broken checkpoint); resume from an earlier checkpoint with a lower --learning_rate "
            "or use --dtype bfloat16 / float32"
        )
    if temperature == 0:  # greedy; scored at tau = 1, as the trainer scores it (forward.py, _score)
        token = logits.argmax(dim=-1)  # [R]
        logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # [R, V]
        return token, logprobs.gather(-1, token[:, None]).squeeze(-1)
    # Divide in the logits' dtype, as completion_logprobs does, then go to float32 (float64 stays).
    scaled = (logits / temperature).to(torch.promote_types(logits.dtype, torch.float32))  # [R, V]
    logprobs = torch.log_softmax(scaled, dim=-1)  # [R, V] the policy the loss optimises
    filtered = scaled  # [R, V] truncated copy used only to draw the token
    if top_k > 0:
        kth_best = torch.topk(filtered, min(top_k, filtered.shape[-1]), dim=-1).values[:, -1:]  # [R, 1]
        filtered = filtered.masked_fill(filtered < kth_best, float("-inf"))  # [R, V]
    if top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)  # [R, V]
        sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [R, V]
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [R, V]
        # Keep the smallest prefix whose mass reaches top_p; the best token always survives
        # (its mass_before is 0), so a row can never be left with nothing to sample.
        drop_sorted = mass_before >= top_p  # [R, V]
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # [R, V] back in vocabulary order
        filtered = filtered.masked_fill(drop, float("-inf"))  # [R, V]
    probs = torch.softmax(filtered, dim=-1)  # [R, V] exactly 0 where truncated (exp(-inf))
    if method == "inverse_cdf":
        uniform = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)  # [R, 1] in [0, 1)
        token = inverse_cdf_draw(probs, uniform)  # [R]
    else:  # multinomial
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [R]
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)  # [R], [R]
