"""Tests for grpo/kl.py: the k3 KL estimator exp(x) - x - 1, x = ref - logp, and its alternatives.

Which estimators are biased, as a loss (checked exactly below by enumerating a categorical):
    estimator   E[value]              E[gradient]
    k1          KL(pi || ref)         0                       biased gradient
    k2          not KL                grad KL(pi || ref)      biased value
    k3          KL(pi || ref)         grad KL(ref || pi)      biased gradient (the other KL)
    k3_plus     KL(pi || ref)         grad KL(pi || ref)      unbiased
    k3_ratio    KL(pi || ref)         grad KL(pi || ref)      unbiased (on-policy: ratio 1)
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo.kl import KL_ESTIMATORS, LOG_RATIO_MAX, kl_estimate, kl_k3


def test_hand_values():
    logprobs = torch.tensor([[-1.0, -2.0, -1.0]])  # [1, 3]
    ref_logprobs = torch.tensor([[-2.0, -1.0, -1.0 + math.log(2)]])  # [1, 3]
    # x = ref - logp = [-1, 1, ln 2]
    # k3(-1)   = e^-1 + 1 - 1     = 0.3678794
    # k3(1)    = e - 1 - 1        = 0.7182818
    # k3(ln 2) = 2 - 0.6931472 - 1 = 0.3068528
    expected = torch.tensor([[0.3678794, 0.7182818, 0.3068528]])
    torch.testing.assert_close(kl_k3(logprobs, ref_logprobs), expected, atol=1e-6, rtol=0)  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6


def test_zero_when_policy_equals_reference():
    logprobs = torch.randn(3, 5)  # [R, T]
    assert torch.equal(kl_k3(logprobs, logprobs.clone()), torch.zeros(3, 5))  # exact on any kernel: x - x = 0 exactly, and exp(0) - 0 - 1 = 0


def test_gradient_by_hand():
    # d k3 / d logp = d/d logp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    # logp = -1, ref = -2: 1 - e^-1 = 0.6321206;  logp = ref: 1 - 1 = 0 (the minimum).
    logprobs = torch.tensor([[-1.0, -3.0]], requires_grad=True)  # [1, 2]
    ref_logprobs = torch.tensor([[-2.0, -3.0]])  # [1, 2]
    kl_k3(logprobs, ref_logprobs).sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.6321206, 0.0]]), atol=1e-6, rtol=0)  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6


@settings(max_examples=200, deadline=None)
@given(
    logp=st.floats(min_value=-1e4, max_value=0.0, width=32),
    ref=st.floats(min_value=-1e4, max_value=0.0, width=32),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_non_negative_and_finite(logp, ref, dtype):
    # log r <= r - 1 for every r > 0, so k3 >= 0 sample by sample; the code must keep that in
    # floating point too (the naive exp(x) - x - 1 dips below 0 near x = 0) and never overflow.
    kl = kl_k3(torch.tensor([[logp]], dtype=dtype), torch.tensor([[ref]], dtype=dtype))
    assert torch.isfinite(kl).all()
    assert (kl >= 0).all()


def test_tiny_log_ratios_are_not_negative():
    x = torch.logspace(-12, -5, 1000)  # [1000] where exp(x) - x - 1 rounds below 0 in float32
    logprobs = torch.zeros(2, 1000)  # [2, 1000]
    ref_logprobs = torch.stack([x, -x])  # [2, 1000]
    assert (kl_k3(logprobs, ref_logprobs) >= 0).all()


def test_unbiased_estimate_of_kl():
    # E_{o ~ pi}[k3] = KL[pi || ref]. pi = [0.5, 0.3, 0.2], ref = [0.2, 0.3, 0.5]:
    # KL = 0.5 ln(0.5/0.2) + 0.3 ln(1) + 0.2 ln(0.2/0.5) = 0.5 * 0.9162907 - 0.2 * 0.9162907
    #    = 0.2748872
    pi = torch.tensor([0.5, 0.3, 0.2])
    ref = torch.tensor([0.2, 0.3, 0.5])
    samples = torch.multinomial(
        pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    estimate = kl_k3(pi.log()[samples].unsqueeze(0), ref.log()[samples].unsqueeze(0)).mean()
    # k3's std per sample here is ~0.5, so the Monte Carlo error is ~0.5 / sqrt(2e5) = 0.0011.
    assert estimate.item() == pytest.approx(0.2748872, abs=0.005)  # Monte Carlo: 4.5 standard errors (0.0011), not rounding


def test_clamp_keeps_garbage_padding_finite():
    # A padded position can hold any log-prob: x = 0 - (-1000) = 1000 would overflow exp().
    logprobs = torch.tensor([[-1000.0]], requires_grad=True)  # [1, 1]
    kl = kl_k3(logprobs, torch.zeros(1, 1))
    # clamped at x = 20: k3(20) = e^20 - 20 - 1 = 485165195.4 - 21 = 485165174.4
    assert kl.item() == pytest.approx(math.exp(LOG_RATIO_MAX) - LOG_RATIO_MAX - 1, rel=1e-6)  # e^20 ~ 4.9e8 in float32: its relative rounding is a few u (~2e-7), under rel 1e-6
    (kl * 0.0).sum().backward()  # what a mask does to it
    assert logprobs.grad.item() == 0.0  # not NaN


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        kl_k3(torch.zeros(2, 3), torch.zeros(2, 1))


# --- the other estimators ---


@pytest.mark.parametrize(
    ("estimator", "value", "grad"),
    [
        # One token: logp = -1, ref = -1 + ln 2, so x = ref - logp = ln 2 = 0.6931472, e^x = 2.
        # k1 = -x = -0.6931472;                d/d logp (logp - ref) = 1
        ("k1", -0.6931472, 1.0),
        # k2 = x^2 / 2 = 0.2402265;             d/d logp (logp - ref)^2 / 2 = logp - ref = -0.6931472
        ("k2", 0.2402265, -0.6931472),
        # k3 = e^x - x - 1 = 2 - 0.6931472 - 1 = 0.3068528;   d/d logp = 1 - e^x = -1
        ("k3", 0.3068528, -1.0),
        # k3_plus: the k3 value, the k2 gradient
        ("k3_plus", 0.3068528, -0.6931472),
        # k3_ratio, ratio = pi / pi_old = 1.5: value 1.5 * 0.3068528 = 0.4602792;
        # d/d logp [k3 * ratio] = (1 - e^x) * ratio + k3 * ratio = -1.5 + 0.4602792 = -1.0397208
        ("k3_ratio", 0.4602792, -1.0397208),
    ],
)
def test_estimators_by_hand(estimator, value, grad):
    logprobs = torch.tensor([[-1.0]], requires_grad=True)  # [1, 1]
    ref_logprobs = torch.tensor([[-1.0 + math.log(2)]])  # [1, 1]
    old_logprobs = logprobs.detach() - math.log(1.5)  # [1, 1]
    ratio = torch.exp(logprobs - old_logprobs)  # [1, 1] 1.5, with its gradient
    kl = kl_estimate(logprobs, ref_logprobs, estimator, ratio=ratio)
    kl.sum().backward()
    # float32 values of size ~1: a few ulps (2^-24 ~ 6e-8) each, 1e-6 leaves margin.
    assert kl.item() == pytest.approx(value, abs=1e-6)
    assert logprobs.grad.item() == pytest.approx(grad, abs=1e-6)


def _categorical(seed: int, num_outcomes: int = 5):
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(num_outcomes, generator=generator, dtype=torch.float64).requires_grad_(True)
    ref_logprobs = torch.log_softmax(torch.randn(num_outcomes, generator=generator, dtype=torch.float64), dim=0)
    return theta, ref_logprobs


def _expected_value_and_gradient(theta, ref_logprobs, estimator):
    """E_{o~pi}[k(o)] and E_{o~pi}[grad_theta k(o)], exactly: a sum over every outcome o weighted by
    pi(o), the weights held fixed (the loop differentiates the sampled estimate, not the sampling)."""
    logprobs = torch.log_softmax(theta, dim=0)  # [K]
    ratio = torch.exp(logprobs - logprobs.detach())  # [K] on-policy: 1, with its gradient
    kl = kl_estimate(logprobs[None], ref_logprobs[None], estimator, ratio=ratio[None])[0]  # [K]
    pi = logprobs.detach().exp()  # [K]
    expected = (pi * kl).sum()
    (gradient,) = torch.autograd.grad(expected, theta)
    return expected.item(), gradient


@pytest.mark.parametrize("seed", range(3))
def test_expected_gradients_by_enumeration(seed):
    theta, ref_logprobs = _categorical(seed)
    logprobs = torch.log_softmax(theta, dim=0)  # [K]
    pi, ref = logprobs.exp(), ref_logprobs.exp()
    kl_forward = (pi * (logprobs - ref_logprobs)).sum()  # KL(pi || ref), the penalty GRPO means
    kl_reverse = (ref * (ref_logprobs - logprobs)).sum()  # KL(ref || pi)
    (grad_kl,) = torch.autograd.grad(kl_forward, theta, retain_graph=True)
    (grad_kl_reverse,) = torch.autograd.grad(kl_reverse, theta)
    # float64 sums of K = 5 terms of size <= ~10 (log-ratios of random logits): ~5 * 2^-52 * 10
    # ~ 1e-14 per entry; 1e-12 leaves margin and is still 10^10 below the biases found here.
    tol = 1e-12
    assert grad_kl.abs().max() > 0.05 and (grad_kl - grad_kl_reverse).abs().max() > 0.01  # not trivial

    values = {}
    for estimator in KL_ESTIMATORS:
        values[estimator], gradient = _expected_value_and_gradient(theta, ref_logprobs, estimator)
        if estimator in ("k2", "k3_plus", "k3_ratio"):  # unbiased gradient of KL(pi || ref)
            torch.testing.assert_close(gradient, grad_kl, atol=tol, rtol=0)
        elif estimator == "k3":  # the gradient of the other KL: biased
            torch.testing.assert_close(gradient, grad_kl_reverse, atol=tol, rtol=0)
        else:  # k1: E[grad log pi] = sum_o grad pi(o) = grad 1 = 0: biased
            torch.testing.assert_close(gradient, torch.zeros_like(gradient), atol=tol, rtol=0)
    for estimator in ("k1", "k3", "k3_plus", "k3_ratio"):  # unbiased values
        assert values[estimator] == pytest.approx(kl_forward.item(), abs=tol)
    assert abs(values["k2"] - kl_forward.item()) > 1e-3  # k2's value is biased


def test_unknown_estimator_and_missing_ratio():
    with pytest.raises(ValueError, match="valid: k3, k1, k2, k3_plus, k3_ratio"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    with pytest.raises(ValueError, match="needs the importance ratio"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k3_ratio")
