"""Tests for grpo/entropy_bonus.py: the bonus term, its entropy's gradient, adaptive control.

The worked example (also in docs/grpo.md): R = 2 completions, T = 3, c = 0.1.

    per-token entropy H = [[2.0, 1.0, 9.0],      row 0 has 2 tokens (9.0 sits on padding)
                           [0.5, 0.5, 2.0]]      row 1 has 3
    mask m              = [[1, 1, 0],
                           [1, 1, 1]]
    sum m * H = 2.0 + 1.0 + 0.5 + 0.5 + 2.0 = 6.0 over 5 tokens: H̄ = 1.2
    bonus c * H̄ = 0.1 * 1.2 = 0.12, subtracted from the loss.
    Split into two micro-batches (row 0: 3.0 over 2 tokens, row 1: 3.0 over 3 tokens), each divided
    by the step's count 5: 0.1 * 3.0 / 5 + 0.1 * 3.0 / 5 = 0.06 + 0.06 = 0.12, the same total.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import U32, sum_error

from grpo.entropy_bonus import EntropyCoefficient, adapted_coefficient, differentiable_token_entropy, entropy_bonus
from grpo.logprobs import token_entropy

ENTROPY = torch.tensor([[2.0, 1.0, 9.0], [0.5, 0.5, 2.0]])  # [R, T]
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # [R, T]


def test_bonus_is_c_times_the_mean_entropy_of_the_masked_tokens():
    bonus = entropy_bonus(ENTROPY, MASK, 0.1, normaliser=5.0)
    # 0.1 * 6.0 / 5 = 0.12 (the docstring); float32 rounds the sum of 5 terms <= 2 and the product.
    assert abs(float(bonus) - 0.12) <= sum_error(5, 6.0) + 4 * U32 * 0.12


def test_micro_batch_shares_add_up_to_the_step_bonus():
    # Row 0 alone: 0.1 * 3.0 / 5 = 0.06; row 1 alone: 0.1 * 3.0 / 5 = 0.06; together 0.12.
    shares = [entropy_bonus(ENTROPY[rows], MASK[rows], 0.1, normaliser=5.0) for rows in ([0], [1])]
    assert abs(float(shares[0]) - 0.06) <= sum_error(2, 3.0) + 4 * U32 * 0.06
    assert abs(float(shares[1]) - 0.06) <= sum_error(3, 3.0) + 4 * U32 * 0.06
    whole = entropy_bonus(ENTROPY, MASK, 0.1, normaliser=5.0)
    assert abs(float(sum(shares)) - float(whole)) <= sum_error(5, 6.0) + 8 * U32 * 0.12


def test_bonus_gradient_is_c_over_the_count_on_each_masked_token():
    entropy = ENTROPY.clone().requires_grad_(True)
    entropy_bonus(entropy, MASK, 0.1, normaliser=5.0).backward()
    # d(c * sum m H / 5) / dH = c * m / 5 = 0.02 on the 5 masked tokens, 0 on padding.
    # (Two float32 roundings either way: c / 5 then * m, or c * m then / 5.)
    assert (entropy.grad - 0.1 * MASK / 5.0).abs().max() <= 4 * U32 * 0.02
    assert float(entropy.grad[0, 2]) == 0.0


def test_differentiable_entropy_is_the_metrics_entropy_and_its_gradient_is_finite():
    # Uniform over 4 logits: H = log 4 = 1.3862944; one-hot-like [0, -200, -200, -200]: float32 rounds
    # exp(-200) to 0, so p log p's derivative -log p - 1 is infinite there; logsumexp(z) - E_p[z] is
    # 0 with a finite (zero) gradient.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -200.0, -200.0, -200.0]]], requires_grad=True)  # [1, 2, 4]
    entropy = differentiable_token_entropy(logits)  # [1, 2]
    assert abs(float(entropy.detach()[0, 0]) - math.log(4)) <= sum_error(4, 1.0) + 4 * U32 * math.log(4)
    assert float(entropy.detach()[0, 1]) == 0.0
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # Against the diagnostic on random logits (same formula in exact arithmetic, float32 here).
    g = torch.Generator().manual_seed(0)
    random_logits = 3 * torch.randn(3, 5, 50, generator=g)  # [R, T, V]
    ours, metric = differentiable_token_entropy(random_logits), token_entropy(random_logits)
    # Each is a 50-term float32 sum of magnitude <= |z| * p summed (<= max|z| = ~15) plus a logsumexp.
    bound = 2 * (sum_error(50, float(random_logits.abs().max())) + 4 * U32 * float(random_logits.abs().max()))
    assert (ours - metric).abs().max() <= bound


def test_entropy_gradient_matches_the_closed_form():
    # dH/dz_v = -p_v (z_v - sum_u p_u z_u). z = [0, log 2, log 3]: p = [1/6, 2/6, 3/6],
    # E_p[z] = (2 log 2 + 3 log 3) / 6 = 0.7803552; grads: -1/6 (0 - 0.7803552) = 0.1300592,
    # -2/6 (0.6931472 - 0.7803552) = 0.0290693, -3/6 (1.0986123 - 0.7803552) = -0.1591285 (sum 0).
    z = torch.tensor([[[0.0, math.log(2), math.log(3)]]], dtype=torch.float64, requires_grad=True)  # [1, 1, 3]
    differentiable_token_entropy(z).sum().backward()
    expected = torch.tensor([0.1300592, 0.0290693, -0.1591285], dtype=torch.float64)
    assert torch.allclose(z.grad[0, 0], expected, rtol=0, atol=5e-8)  # 7 printed decimals: 5e-8


@pytest.mark.parametrize(
    ("coef", "entropy", "expected"),
    [
        (0.10, 0.15, 0.105),  # 0.15 <= target 0.2: 0.10 + 0.005
        (0.10, 0.20, 0.105),  # at the target counts as below (<=)
        (0.10, 0.25, 0.095),  # above: 0.10 - 0.005
        (0.998, 0.1, 1.0),  # 0.998 + 0.005 = 1.003, capped at max 1.0
        (0.003, 3.0, 0.0),  # 0.003 - 0.005 = -0.002, floored at min 0.0
        (0.0, math.inf, 0.0),  # no measurement: above any target, stays at the floor
    ],
)
def test_adapted_coefficient_steps_by_delta_within_bounds(coef, entropy, expected):
    got = adapted_coefficient(coef, entropy, target=0.2, delta=0.005, low=0.0, high=1.0)
    assert got == pytest.approx(expected, rel=0, abs=4 * 2.0**-53)  # two float64 roundings of numbers <= 1


def test_the_bonus_applies_only_while_the_last_entropy_was_at_or_below_target():
    state = EntropyCoefficient(0.05)  # nothing measured: last_entropy = inf
    assert state.applied(adaptive=True, target=0.2) == 0.0  # step 1 applies no bonus (TRL's start)
    assert state.applied(adaptive=False, target=0.2) == 0.05  # a fixed coefficient applies always
    assert EntropyCoefficient(0.05, last_entropy=0.2).applied(adaptive=True, target=0.2) == 0.05
    assert EntropyCoefficient(0.05, last_entropy=0.3).applied(adaptive=True, target=0.2) == 0.0
    # The state a checkpoint keeps comes back the same (inf included).
    assert EntropyCoefficient.from_state_dict(state.state_dict()) == state


def test_adaptive_control_over_steps():
    # Entropies 0.1, 0.1, 0.5, 0.5 against target 0.2, delta 0.01, from c = 0.02:
    #   step 1 applies 0 (no measurement); H = 0.1 <= 0.2 -> c = 0.03
    #   step 2 applies 0.03 (0.1 <= 0.2);  H = 0.1       -> c = 0.04
    #   step 3 applies 0.04;               H = 0.5 > 0.2 -> c = 0.03
    #   step 4 applies 0 (0.5 > 0.2);      H = 0.5       -> c = 0.02
    state, applied, coefs = EntropyCoefficient(0.02), [], []
    for measured in (0.1, 0.1, 0.5, 0.5):
        applied.append(state.applied(adaptive=True, target=0.2))
        state = EntropyCoefficient(
            adapted_coefficient(state.coef, measured, target=0.2, delta=0.01, low=0.0, high=1.0), last_entropy=measured
        )
        coefs.append(state.coef)
    assert applied == pytest.approx([0.0, 0.03, 0.04, 0.0], rel=0, abs=1e-15)
    assert coefs == pytest.approx([0.03, 0.04, 0.03, 0.02], rel=0, abs=1e-15)  # a few float64 roundings of ~0.04
