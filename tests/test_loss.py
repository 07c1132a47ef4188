"""Tests for grpo/loss.py: the clipped surrogate, the KL term, the three aggregations.

The worked example (also in docs/grpo.md): R = 2 completions, T = 3, eps_low = eps_high = 0.2.

    advantages A      = [1.0, -0.5]
    completion_mask   = [[1, 1, 0],      completion 0 has 2 tokens (the third is padding)
                         [1, 1, 1]]      completion 1 has 3 tokens
    ratio             = [[1.5, 0.9, -],
                         [0.5, 1.1, 1.0]]

    completion 0 (A = +1):   t0: min(1.5 * 1, clip(1.5) = 1.2 * 1) = 1.2   (clipped high)
                             t1: min(0.9 * 1, 0.9 * 1)            = 0.9
    completion 1 (A = -0.5): t0: min(0.5 * -0.5 = -0.25, clip(0.5) = 0.8 * -0.5 = -0.4) = -0.4
                                                                             (clipped low)
                             t1: min(1.1 * -0.5, 1.1 * -0.5)      = -0.55
                             t2: min(1.0 * -0.5, 1.0 * -0.5)      = -0.5
    per-token loss = -surrogate (beta = 0): [[-1.2, -0.9], [0.4, 0.55, 0.5]]
    sums: completion 0 = -2.1, completion 1 = 1.45; all 5 tokens = -0.65
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_reference import grpo_loss_reference
from tolerances import U32, sum_error

from grpo.kl import kl_k3
from grpo.loss import grpo_loss, step_normaliser
from grpo.objectives import LossOptions


def _term_bound(logprobs, old_logprobs, ref_logprobs, advantages, beta) -> float:
    """An upper bound on |per-token loss|: |A| max(ratio, 1 + eps) + beta * k3."""
    logprobs = logprobs.detach()
    old = logprobs if old_logprobs is None else old_logprobs
    ratio = (logprobs - old).exp().max().clamp(min=1.3)
    return float(advantages.abs().max() * ratio + beta * kl_k3(logprobs, ref_logprobs).max())

ADVANTAGES = torch.tensor([1.0, -0.5])  # [R]
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # [R, T]
RATIOS = torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 1.0]])  # [R, T]


def worked_example_logprobs() -> tuple[torch.Tensor, torch.Tensor]:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)
    old_logprobs = logprobs.detach() - RATIOS.log()  # so that exp(logp - old) = RATIOS
    return logprobs, old_logprobs


@pytest.mark.parametrize(
    ("aggregation", "max_completion_length", "expected"),
    [
        # sequence: (-2.1 / 2 + 1.45 / 3) / 2 completions = (-1.05 + 0.4833333) / 2 = -0.2833333
        ("sequence", None, -0.2833333),
        # token: -0.65 / 5 tokens = -0.13
        ("token", None, -0.13),
        # constant: -0.65 / (2 completions * T_max 4) = -0.08125
        ("constant", 4, -0.08125),
    ],
)
def test_worked_example(aggregation, max_completion_length, expected):
    logprobs, old_logprobs = worked_example_logprobs()
    normaliser = step_normaliser(MASK, aggregation, max_completion_length)
    assert normaliser == {"sequence": 2.0, "token": 5.0, "constant": 8.0}[aggregation]
    loss, metrics = grpo_loss(
        logprobs,
        old_logprobs,
        None,
        ADVANTAGES,
        MASK,
        LossOptions(beta=0.0, aggregation=aggregation),
        normaliser=normaliser,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6
    # 1 of 5 tokens clipped low (ratio 0.5, A < 0), 1 of 5 clipped high (ratio 1.5, A > 0).
    assert metrics["clip_frac_low"] == pytest.approx(0.2)  # counts / 5 in float32: within an ulp; approx's rel 1e-6 is ~16 ulps
    assert metrics["clip_frac_high"] == pytest.approx(0.2)  # counts / 5 in float32: within an ulp
    assert metrics["clip_frac"] == pytest.approx(0.4)  # counts / 5 in float32: within an ulp
    # ratio_mean = (1.5 + 0.9 + 0.5 + 1.1 + 1.0) / 5 = 1.0 (the padded 1.0 is not counted)
    assert metrics["ratio_mean"] == pytest.approx(1.0)  # mean of 5 float32 ratios of O(1): a few ulps
    assert metrics["completion_length_mean"] == 2.5
    assert metrics["num_tokens"] == 5.0
    assert metrics["kl_mean"] == 0.0


def test_worked_example_with_kl():
    # Same example, beta = 0.04, the reference differs at one token: ref - logp = ln 2 at [0, 1].
    # kl there = 2 - ln 2 - 1 = 0.3068528; beta * kl = 0.0122741
    # per-token loss [0, 1] = -(0.9 - 0.0122741) = -0.8877259
    # token aggregation: (-0.65 + 0.0122741) / 5 = -0.6377259 / 5 = -0.1275452
    # kl_mean = 0.3068528 / 5 = 0.0613706
    logprobs, old_logprobs = worked_example_logprobs()
    ref_logprobs = logprobs.detach().clone()
    ref_logprobs[0, 1] += math.log(2)
    loss, metrics = grpo_loss(
        logprobs,
        old_logprobs,
        ref_logprobs,
        ADVANTAGES,
        MASK,
        LossOptions(beta=0.04, aggregation="token"),
        normaliser=5.0,
    )
    assert loss.item() == pytest.approx(-0.1275452, abs=1e-6)  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6
    assert metrics["kl_mean"] == pytest.approx(0.0613706, abs=1e-6)  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6


@pytest.mark.parametrize(
    ("advantage", "ratio", "surrogate", "grad"),
    [
        # A > 0, ratio 1.5 > 1.2: min(1.5, 1.2) = 1.2, a constant: clipped, gradient exactly 0.
        (1.0, 1.5, 1.2, 0.0),
        # A < 0, ratio 0.5 < 0.8: min(-0.5, -0.8) = -0.8, a constant: clipped, gradient 0.
        (-1.0, 0.5, -0.8, 0.0),
        # A > 0, ratio 0.5 < 0.8: min(0.5, 0.8) = 0.5, not clipped (the clip only stops the
        # ratio moving further in the direction the advantage favours).
        # d loss / d logp = -A * d ratio / d logp = -A * ratio = -0.5
        (1.0, 0.5, 0.5, -0.5),
        # A < 0, ratio 1.5 > 1.2: min(-1.5, -1.2) = -1.5, not clipped; grad = -(-1) * 1.5 = 1.5
        (-1.0, 1.5, -1.5, 1.5),
        # inside [0.8, 1.2]: min(1.1, 1.1) = 1.1; grad = -1 * 1.1 = -1.1
        (1.0, 1.1, 1.1, -1.1),
    ],
)
def test_clipping_single_token(advantage, ratio, surrogate, grad):
    logprobs = torch.tensor([[-1.0]], requires_grad=True)  # [1, 1]
    old_logprobs = logprobs.detach() - math.log(ratio)  # [1, 1]
    loss, metrics = grpo_loss(
        logprobs,
        old_logprobs,
        None,
        torch.tensor([advantage]),
        torch.ones(1, 1),
        LossOptions(beta=0.0, aggregation="token"),
        normaliser=1.0,
    )
    assert loss.item() == pytest.approx(-surrogate, abs=1e-6)  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6
    loss.backward()
    if grad == 0.0:
        assert logprobs.grad.item() == 0.0  # exactly, not approximately
        assert metrics["clip_frac"] == 1.0
    else:
        assert logprobs.grad.item() == pytest.approx(grad, abs=1e-6)  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6
        assert metrics["clip_frac"] == 0.0


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
def test_gradient_is_minus_advantage_times_weight_at_ratio_one(aggregation):
    # One inner epoch (old_logprobs=None), beta = 0: the loss is -sum A_i * ratio_it * weight_it with
    # ratio = exp(logp - logp.detach()) = 1, so d loss / d logp_it = -A_i * weight_it, where
    #   sequence: weight = 1 / (n_i * completions) -> completion 0: 1/(2*2) = 0.25, 1: 1/(3*2) = 1/6
    #   token:    weight = 1 / tokens = 1/5 = 0.2
    #   constant: weight = 1 / (completions * T_max) = 1 / (2 * 4) = 0.125
    # and 0 on padding.
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)
    normaliser = step_normaliser(MASK, aggregation, max_completion_length=4)
    loss, metrics = grpo_loss(
        logprobs,
        None,
        None,
        ADVANTAGES,
        MASK,
        LossOptions(beta=0.0, aggregation=aggregation),
        normaliser=normaliser,
    )
    loss.backward()
    weight = {
        "sequence": torch.tensor([[0.25, 0.25, 0.0], [1 / 6, 1 / 6, 1 / 6]]),
        "token": 0.2 * MASK,
        "constant": 0.125 * MASK,
    }[aggregation]
    expected = -ADVANTAGES.unsqueeze(1) * weight  # [R, T]
    torch.testing.assert_close(logprobs.grad, expected, atol=1e-7, rtol=0)  # products of O(1) float32 numbers divided by small integers: a couple of ulps (<1e-7 for |x| < 1)
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_frac"] == 0.0


def test_kl_at_policy_equal_to_reference():
    # ref = logp: kl = 0 and d kl / d logp = 1 - exp(0) = 0, so the KL term adds nothing.
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)
    args = (logprobs, None)
    with_kl, metrics = grpo_loss(
        *args, logprobs.detach().clone(), ADVANTAGES, MASK, LossOptions(beta=0.04), normaliser=2.0
    )
    (grad_with_kl,) = torch.autograd.grad(with_kl, logprobs)
    without_kl, _ = grpo_loss(*args, None, ADVANTAGES, MASK, LossOptions(beta=0.0), normaliser=2.0)
    (grad_without_kl,) = torch.autograd.grad(without_kl, logprobs)
    assert metrics["kl_mean"] == 0.0
    assert with_kl.item() == without_kl.item()
    torch.testing.assert_close(grad_with_kl, grad_without_kl, atol=1e-7, rtol=0)  # the beta = 0 branch never touches the KL: both grads come from the same ops


def test_beta_zero_with_reference_reports_kl_but_does_not_train_on_it():
    logprobs, old_logprobs = worked_example_logprobs()
    ref_logprobs = logprobs.detach() + 1.0  # x = 1 everywhere: k3 = e - 2 = 0.7182818
    loss_with_ref, metrics = grpo_loss(
        logprobs,
        old_logprobs,
        ref_logprobs,
        ADVANTAGES,
        MASK,
        LossOptions(beta=0.0, aggregation="token"),
        normaliser=5.0,
    )
    loss_without_ref, _ = grpo_loss(
        logprobs,
        old_logprobs,
        None,
        ADVANTAGES,
        MASK,
        LossOptions(beta=0.0, aggregation="token"),
        normaliser=5.0,
    )
    assert loss_with_ref.item() == loss_without_ref.item()
    assert metrics["kl_mean"] == pytest.approx(0.7182818, abs=1e-6)  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6


def test_garbage_on_padding_stays_out():
    # Padded positions may hold any log-prob; exp() of them must not turn into inf * 0 = NaN.
    logprobs = torch.tensor([[-1.0, -1000.0], [-2.0, -1.0]], requires_grad=True)  # [R, T]
    old_logprobs = torch.tensor([[-1.0, 0.0], [-2.0, -1.0]])  # pad: logp - old = -1000
    ref_logprobs = torch.tensor([[-1.0, 0.0], [-2.0, -1.0]])  # pad: ref - logp = +1000
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    advantages = torch.tensor([-1.0, 1.0])
    for aggregation in ("sequence", "token", "constant"):
        loss, metrics = grpo_loss(
            logprobs,
            old_logprobs,
            ref_logprobs,
            advantages,
            mask,
            LossOptions(aggregation=aggregation),
            normaliser=3.0,
        )
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[0, 1].item() == 0.0
        assert metrics["ratio_mean"] == 1.0 and metrics["kl_mean"] == 0.0


def test_fully_masked_completion_adds_nothing():
    # A truncated completion removed by mask_truncated has mask row 0: 0 / max(0, 1) = 0, no NaN.
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    loss, metrics = grpo_loss(
        logprobs,
        None,
        None,
        torch.tensor([5.0, 1.0]),
        mask,
        LossOptions(beta=0.0, aggregation="sequence"),
        normaliser=2.0,
    )
    # only completion 1: -(1 + 1) / 2 tokens / 2 completions = -0.5
    assert loss.item() == pytest.approx(-0.5)  # -(1 + 1) / 2 / 2 in float32 is exact; approx for the float64 conversion only
    assert metrics["completion_length_mean"] == 1.0


def random_batch(seed: int, num_rows: int = 8, num_tokens: int = 6):
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(num_rows, num_tokens, generator=generator) * 3  # [R, T]
    old_logprobs = logprobs + 0.3 * torch.randn(num_rows, num_tokens, generator=generator)
    ref_logprobs = logprobs + 0.3 * torch.randn(num_rows, num_tokens, generator=generator)
    advantages = torch.randn(num_rows, generator=generator)  # [R]
    lengths = torch.randint(0, num_tokens + 1, (num_rows,), generator=generator)  # [R], 0 allowed
    mask = (torch.arange(num_tokens) < lengths.unsqueeze(1)).float()  # [R, T]
    return logprobs.requires_grad_(True), old_logprobs, ref_logprobs, advantages, mask


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    aggregation=st.sampled_from(["sequence", "token", "constant"]),
    beta=st.sampled_from([0.0, 0.04]),
    one_epoch=st.booleans(),
    cuts=st.lists(st.integers(1, 7), min_size=0, max_size=3, unique=True),
)
def test_micro_batch_split_invariance(seed, aggregation, beta, one_epoch, cuts):
    # With the step's normaliser, the loss is a sum over completions, so summing micro-batch
    # losses (and their gradients, as backward() accumulates them) equals one big batch.
    logprobs, old_logprobs, ref_logprobs, advantages, mask = random_batch(seed)
    old = None if one_epoch else old_logprobs
    kwargs = dict(
        options=LossOptions(beta=beta, aggregation=aggregation),
        normaliser=max(step_normaliser(mask, aggregation, 6), 1.0),
    )
    full_loss, _ = grpo_loss(logprobs, old, ref_logprobs, advantages, mask, **kwargs)
    (full_grad,) = torch.autograd.grad(full_loss, logprobs)

    bounds = [0, *sorted(cuts), 8]
    split_loss = torch.zeros(())
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        rows = slice(start, stop)
        part, _ = grpo_loss(
            logprobs[rows],
            None if old is None else old[rows],
            ref_logprobs[rows],
            advantages[rows],
            mask[rows],
            **kwargs,
        )
        split_loss = split_loss + part
    (split_grad,) = torch.autograd.grad(split_loss, logprobs)
    # The same 48 per-token terms, each |l| <= m = _term_bound, summed in another order, then
    # / normaliser: sum_error(48, 48 m) / normaliser.
    m = _term_bound(logprobs, old, ref_logprobs, advantages, beta)
    atol = sum_error(mask.numel(), m * mask.numel()) / kwargs["normaliser"]
    assert split_loss.item() == pytest.approx(full_loss.item(), abs=atol)
    # Each grad entry is the same few products and quotients of values <= m on both sides: ~8 ulps.
    torch.testing.assert_close(split_grad, full_grad, atol=8 * U32 * m, rtol=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
@pytest.mark.parametrize(("beta", "one_epoch"), [(0.0, True), (0.04, False), (0.04, True)])
def test_vectorised_matches_reference(seed, aggregation, beta, one_epoch):
    logprobs, old_logprobs, ref_logprobs, advantages, mask = random_batch(seed)
    kwargs = dict(
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=beta,
        aggregation=aggregation,
        normaliser=max(step_normaliser(mask, aggregation, 6), 1.0),
    )
    old = None if one_epoch else old_logprobs
    options = LossOptions(**{key: value for key, value in kwargs.items() if key != "normaliser"})
    loss, _ = grpo_loss(logprobs, old, ref_logprobs, advantages, mask, options, normaliser=kwargs["normaliser"])
    reference = grpo_loss_reference(logprobs, old, ref_logprobs, advantages, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    (reference_grad,) = torch.autograd.grad(reference, logprobs)
    # 48 per-token terms |l| <= m summed in two orders, then / normaliser.
    m = _term_bound(logprobs, old, ref_logprobs, advantages, beta)
    atol = sum_error(mask.numel(), m * mask.numel()) / kwargs["normaliser"]
    assert loss.item() == pytest.approx(reference.item(), abs=atol)
    # Each grad entry: a few products and quotients of values <= m (k3 written out vs kl_k3): ~8 ulps.
    torch.testing.assert_close(grad, reference_grad, atol=8 * U32 * m, rtol=0)


def test_step_normaliser():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # 3 completions
    assert step_normaliser(mask, "sequence") == 3.0  # every completion, even an all-0 one
    assert step_normaliser(mask, "token") == 3.0  # 2 + 1 + 0 tokens
    assert step_normaliser(mask, "constant", max_completion_length=10) == 30.0  # 3 * 10
    with pytest.raises(ValueError, match="max_completion_length"):
        step_normaliser(mask, "constant")
    with pytest.raises(ValueError, match="T = 3 > max_completion_length = 2"):
        step_normaliser(mask, "constant", max_completion_length=2)
    with pytest.raises(ValueError, match="valid: sequence, token, constant"):
        step_normaliser(mask, "mean")


def test_errors():
    logprobs = torch.zeros(2, 3)
    advantages = torch.zeros(2)
    mask = torch.ones(2, 3)

    def call(**overrides):
        args = dict(
            logprobs=logprobs,
            old_logprobs=None,
            ref_logprobs=None,
            advantages=advantages,
            completion_mask=mask,
        )
        kwargs = dict(beta=0.0, normaliser=1.0)
        for key, value in overrides.items():
            (args if key in args else kwargs)[key] = value
        normaliser = kwargs.pop("normaliser")
        return grpo_loss(*args.values(), LossOptions(**kwargs), normaliser=normaliser)

    with pytest.raises(
        ValueError, match=r"completion_mask has shape \(2, 1\) but logprobs has shape \(2, 3\)"
    ):
        call(completion_mask=torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(3, 3\)"):
        call(old_logprobs=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"advantages must be \[R\]"):
        call(advantages=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        call(beta=0.04)
    with pytest.raises(ValueError, match="aggregation .tokens. is not one of: sequence, token, constant"):
        call(aggregation="tokens")
    with pytest.raises(ValueError, match="epsilon_low"):
        call(epsilon_low=1.0)
    with pytest.raises(ValueError, match="epsilon_high"):
        call(epsilon_high=-0.1)
    with pytest.raises(ValueError, match="beta"):
        call(beta=-1.0)
    with pytest.raises(ValueError, match="normaliser"):
        call(normaliser=0.0)


def test_package_import_stays_light():
    # `import grpo` exports the math and must not pull in transformers (slow, and not needed).
    code = "import sys, grpo; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
