"""Estimators of the KL divergence from the policy to the frozen reference model (k3 by default).

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

As a loss, an estimator's *gradient* matters, not only its value (arXiv 2506.09477). The loop
differentiates the sampled estimate with the samples held fixed, so the expected gradient is
E_{o~pi}[grad k(o)]. With x = log pi_ref - log pi_theta and grad = d/d theta:
- k1 = -x:             E[grad k1] = E[grad log pi] = 0: the gradient is biased (zero on average).
- k2 = x^2 / 2:         E[grad k2] = E[(log pi - log pi_ref) grad log pi] = grad KL[pi || pi_ref]:
                        unbiased gradient, biased value.
- k3:                   E[grad k3] = E[(1 - pi_ref/pi) grad log pi] = -sum_o pi_ref grad log pi
                        = grad KL[pi_ref || pi]: the gradient of the *other* KL, biased.
- k3_plus (verl's "k3+"): the k3 value with the k2 gradient (a straight-through sum): unbiased
                        value and unbiased gradient.
- k3_ratio (TRL's `use_bias_correction_kl`): k3 times the importance ratio pi_theta / pi_old. In
                        value the ratio is 1 on-policy; its gradient adds k3 * grad log pi, so
                        E[grad] = E[((1 - e^x) + (e^x - x - 1)) grad log pi] = E[-x grad log pi],
                        k2's unbiased gradient (DeepSeek-V3.2, arXiv 2512.02556).
tests/test_kl.py checks each statement exactly, by enumerating a small categorical.

Choices:

1. k3 is evaluated as expm1(x) - x: the same function as exp(x) - x - 1, but without rounding
   exp(x) to a float near 1 first, which makes the naive form slightly negative near x = 0.
2. x is clamped from above at 20 before exp (`LOG_RATIO_MAX`); grpo/loss.py clamps the log of
   the importance ratio pi_theta / pi_old the same way.
   Why: exp overflows float32 (and bf16, same exponent range) at x ~ 88.7. Padded positions hold
   log-probs of tokens the model never chose, where inf * (mask 0) = NaN would poison the loss
   and the gradient; and real tokens get there too (NeMo-RL #874): a policy that has drifted
   from the reference, or from pi_old over inner epochs, by ~89 nats on one token. Unclamped, the
   ratio's backward then multiplies the clip's 0 by exp's inf (NaN), or the unclipped branch of
   a negative advantage makes the loss inf.
   Cost: for x > 20 (e^20 ~ 5e8 times more likely under one policy than the other) the value
   is capped at its value at x = 20 (k3(20) ~ 4.85e8, a ratio of e^20) and its gradient is 0;
   for the ratio that only matters for A < 0, since for A > 0 a ratio above 1 + eps_high is
   clipped (gradient 0) anyway. Only the upper side is clamped: for x -> -inf, exp(x) -> 0,
   k3 ~ -x - 1 stays finite with a gradient of size < 1, and the ratio tends to 0.
   tests/test_vlm_pitfalls.py works both out at x = +-100.

Run the tests: `python -m pytest tests/test_kl.py -q`.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG_RATIO_MAX = 20.0
KL_ESTIMATORS = ("k3", "k1", "k2", "k3_plus", "k3_ratio")


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL[pi_theta || pi_ref]: exp(x) - x - 1, x = ref - logprobs.

    Args:
        logprobs: [R, T] log pi_theta of the sampled tokens (differentiable).
        ref_logprobs: [R, T] log pi_ref of the same tokens.

    Returns:
        [R, T] non-negative per-token KL estimates (padding included; the caller masks).
    """
    _check_shapes(logprobs, ref_logprobs)
    # Guard: exp overflow on garbage padded positions (module docstring). Upper side only.
    log_ratio = (ref_logprobs - logprobs).clamp(max=LOG_RATIO_MAX)  # [R, T]
    # expm1(x) = exp(x) - 1 without rounding exp(x) to a float near 1 first. Written as
    # exp(x) - x - 1, k3 comes out slightly negative for small |x| (down to -6e-8 in float32,
    # -4e-3 in bf16), exactly where policy ~= reference; expm1(x) - x stays >= 0.
    return torch.expm1(log_ratio) - log_ratio  # [R, T]


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k1 = log pi_theta - log pi_ref: unbiased value, zero expected gradient. [R, T]"""
    _check_shapes(logprobs, ref_logprobs)
    return logprobs - ref_logprobs  # [R, T]


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k2 = (log pi_theta - log pi_ref)^2 / 2: biased value, unbiased gradient. [R, T]"""
    _check_shapes(logprobs, ref_logprobs)
    return 0.5 * (logprobs - ref_logprobs).square()  # [R, T]


def kl_k3_plus(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 value with the k2 gradient (verl's "k3+"): k2 - sg(k2) + sg(k3). [R, T]"""
    k2 = kl_k2(logprobs, ref_logprobs)  # [R, T]
    k3 = kl_k3(logprobs, ref_logprobs)  # [R, T]
    return k2 - k2.detach() + k3.detach()  # [R, T] value k3, gradient k2


def kl_estimate(
    logprobs: Tensor, ref_logprobs: Tensor, estimator: str, ratio: Tensor | None = None
) -> Tensor:
    """The per-token KL estimate `estimator` (one of KL_ESTIMATORS), [R, T], unmasked.

    ratio: [R, T] (or [R, 1]) the importance ratio pi_theta / pi_old with its gradient, needed by
    "k3_ratio" only (the same ratio as the surrogate's, sequence-level under GSPO, as in TRL).
    """
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)  # [R, T]
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)  # [R, T]
    if estimator == "k2":
        return kl_k2(logprobs, ref_logprobs)  # [R, T]
    if estimator == "k3_plus":
        return kl_k3_plus(logprobs, ref_logprobs)  # [R, T]
    if estimator == "k3_ratio":
        if ratio is None:
            raise ValueError("kl estimator 'k3_ratio' needs the importance ratio pi_theta / pi_old")
        return kl_k3(logprobs, ref_logprobs) * ratio  # [R, T]
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def _check_shapes(logprobs: Tensor, ref_logprobs: Tensor) -> None:
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
            "must have the same shape"
        )
