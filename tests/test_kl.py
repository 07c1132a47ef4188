"""Tests for grpo/kl.py: the k3 KL estimator exp(x) - x - 1, x = ref - logp."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo.kl import LOG_RATIO_MAX, kl_k3


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
