"""The k3 estimator of the KL divergence from the policy to the frozen reference model.

GRPO keeps the policy pi_theta near the reference pi_ref (the model before RL) with a KL penalty
inside the objective instead of in the reward (DeepSeekMath, arXiv 2402.03300, eq. 4):

    D_KL[pi_theta || pi_ref] ~= pi_ref(o_t) / pi_theta(o_t) - log(pi_ref(o_t) / pi_theta(o_t)) - 1

per token o_t sampled from the policy. With x = log pi_ref(o_t) - log pi_theta(o_t) that is

    k3(x) = exp(x) - x - 1

John Schulman, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html), compares
three estimators of KL[q || p] from samples of q, with r = p / q:
- k1 = -log r is unbiased but has high variance and is negative on many samples;
- k2 = (log r)^2 / 2 has low variance but is biased;
- k3 = (r - 1) - log r is unbiased, because E_q[r - 1] = 0 (so adding it changes nothing in
  expectation, it is a control variate that cancels much of k1's variance), and it is >= 0 for
  every sample, since log r <= r - 1.

Choices:

1. k3 is evaluated as expm1(x) - x: the same function as exp(x) - x - 1, but without rounding
   exp(x) to a float near 1 first, which makes the naive form slightly negative near x = 0.
2. x is clamped from above at 20 before exp (`LOG_RATIO_MAX`).
   Why: exp overflows float32 (and bf16, same exponent range) at x ~ 88.7. On real tokens that
   cannot happen in practice (the policy sampled the token, so log pi_theta is not near -88),
   but the caller passes whole [R, T] tensors whose padded positions hold log-probs of tokens
   the model never chose, and there inf * (mask 0) = NaN would poison the loss and the gradient.
   Cost: for x > 20 (the reference likes the token e^20 ~ 5e8 times more than the policy) the
   value is capped at k3(20) ~ 4.85e8 and its gradient is 0. Only the upper side is clamped:
   for x -> -inf, exp(x) -> 0 and k3 ~ -x - 1 stays finite, with a gradient of size < 1.

Run the tests: `python -m pytest tests/test_kl.py -q`.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG_RATIO_MAX = 20.0


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL[pi_theta || pi_ref]: exp(x) - x - 1, x = ref - logprobs.

    Args:
        logprobs: [R, T] log pi_theta of the sampled tokens (differentiable).
        ref_logprobs: [R, T] log pi_ref of the same tokens.

    Returns:
        [R, T] non-negative per-token KL estimates (padding included; the caller masks).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
            "must have the same shape"
        )
    # Guard: exp overflow on garbage padded positions (module docstring). Upper side only.
    log_ratio = (ref_logprobs - logprobs).clamp(max=LOG_RATIO_MAX)  # [R, T]
    # expm1(x) = exp(x) - 1 without rounding exp(x) to a float near 1 first. Written as
    # exp(x) - x - 1, k3 comes out slightly negative for small |x| (down to -6e-8 in float32,
    # -4e-3 in bf16), exactly where policy ~= reference; expm1(x) - x stays >= 0.
    return torch.expm1(log_ratio) - log_ratio  # [R, T]
