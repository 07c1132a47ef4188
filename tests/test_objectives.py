"""Tests for the objectives beyond GRPO (grpo/objectives.py, through grpo_loss): GSPO's sequence ratio, CISPO, --loss_type, LossOptions.

The numbers reuse tests/test_loss.py's worked example: R = 2 completions, T = 3,

    advantages A    = [1.0, -0.5]
    completion_mask = [[1, 1, 0], [1, 1, 1]]
    ratio           = [[1.5, 0.9, -], [0.5, 1.1, 1.0]]      (token ratios pi_theta / pi_old)
    logprobs        = [[-1.0, -2.0, -], [-0.5, -1.5, -2.5]]
"""

from __future__ import annotations

import itertools
import math
from dataclasses import FrozenInstanceError

import pytest
import torch
from loss_reference import grpo_loss_reference
from test_loss import ADVANTAGES, MASK, random_batch, worked_example_logprobs
from tolerances import U32, sum_error

from grpo.config import LOSS_OPTION_FLAGS, ConfigError, GRPOArguments
from grpo.kl import KL_ESTIMATORS
from grpo.loss import grpo_loss, step_normaliser
from grpo.objectives import LossOptionError, LossOptions
from grpo.sampler_correction import SAMPLER_CORRECTIONS

# float32 values and gradients of size <= 1.2 from <= 16 roundings (exp, log, products, sums of
# <= 5 terms), each <= u = 2^-24 relative (worst case, any order), plus the 7-decimal rounding of
# the hand-worked numbers: 16 u * 1.2 + 5e-8 = 1.2e-6.
FLOAT32_TOL = 16 * U32 * 1.2 + 5e-8


# --- GSPO: one length-normalised ratio per completion ---


def test_gspo_worked_example_unclipped():
    # s_0 = exp((ln 1.5 + ln 0.9) / 2) = sqrt(1.35) = 1.1618950
    # s_1 = exp((ln 0.5 + ln 1.1 + ln 1.0) / 3) = 0.55^(1/3) = 0.8193213
    # eps = 0.2: 0.8 < s_0, s_1 < 1.2, nothing clipped.
    # sequence aggregation: -(1 * 1.1618950 + (-0.5) * 0.8193213) / 2 = -(1.1618950 - 0.4096607) / 2
    #                     = -0.3761172
    # d loss / d logp_0t = -A_0 * s_0 * (1 / |o_0| = 1/2) / 2 completions = -1.1618950 / 4 = -0.2904738
    # d loss / d logp_1t = -A_1 * s_1 * (1/3) / 2 = 0.5 * 0.8193213 / 6 = 0.0682768
    logprobs, old_logprobs = worked_example_logprobs()
    loss, metrics = grpo_loss(
        logprobs, old_logprobs, None, ADVANTAGES, MASK,
        LossOptions(beta=0.0, aggregation="sequence", importance_sampling_level="sequence"), normaliser=2.0,
    )  # fmt: skip
    assert loss.item() == pytest.approx(-0.3761172, abs=FLOAT32_TOL)
    loss.backward()
    expected = torch.tensor([[-0.2904738, -0.2904738, 0.0], [0.0682768, 0.0682768, 0.0682768]])
    torch.testing.assert_close(logprobs.grad, expected, atol=FLOAT32_TOL, rtol=0)
    assert metrics["clip_frac"] == 0.0
    # ratio_mean counts each completion's ratio once per token: (2 * 1.1618950 + 3 * 0.8193213) / 5
    assert metrics["ratio_mean"] == pytest.approx(0.9563508, abs=FLOAT32_TOL)


def test_gspo_clips_whole_completions():
    # eps = 0.1: s_0 = 1.162 > 1.1 with A > 0 -> clipped high to 1.1 (both its tokens);
    #            s_1 = 0.819 < 0.9 with A < 0 -> min(-0.5 * 0.819, -0.5 * 0.9) = -0.45, clipped low.
    # loss = -(1.1 - 0.45) / 2 = -0.325; every token clipped, so the gradient is exactly 0.
    logprobs, old_logprobs = worked_example_logprobs()
    loss, metrics = grpo_loss(
        logprobs, old_logprobs, None, ADVANTAGES, MASK,
        LossOptions(epsilon_low=0.1, epsilon_high=0.1, beta=0.0, aggregation="sequence", importance_sampling_level="sequence"),
        normaliser=2.0,
    )  # fmt: skip
    assert loss.item() == pytest.approx(-0.325, abs=FLOAT32_TOL)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.equal(grad, torch.zeros_like(grad))
    # Token-weighted: completion 1's 3 tokens clipped low, completion 0's 2 clipped high.
    assert metrics["clip_frac_low"] == pytest.approx(0.6) and metrics["clip_frac_high"] == pytest.approx(0.4)  # approx's rel 1e-6 is ~16 float32 ulps: a float32 mean/fraction of a few O(1) terms is within a few


def test_gspo_one_epoch_is_grpo_sequence():
    # old = logp.detach(): s_i = 1 and grad s_i = mean_t grad logp_it, so with sequence
    # aggregation the gradient is GRPO's -A_i / (|o_i| * completions) on every token.
    logprobs, _ = worked_example_logprobs()
    common = dict(beta=0.0, aggregation="sequence")
    gspo_options = LossOptions(importance_sampling_level="sequence", **common)
    gspo, _ = grpo_loss(logprobs, None, None, ADVANTAGES, MASK, gspo_options, normaliser=2.0)
    grpo, _ = grpo_loss(logprobs, None, None, ADVANTAGES, MASK, LossOptions(**common), normaliser=2.0)
    (gspo_grad,) = torch.autograd.grad(gspo, logprobs)
    (grpo_grad,) = torch.autograd.grad(grpo, logprobs)
    # s_i = exp(0) = 1 and ratio = exp(0) = 1 exactly: the same per-token values through the same
    # aggregation code, so equal to the last bit.
    assert gspo.item() == grpo.item()
    torch.testing.assert_close(gspo_grad, grpo_grad, atol=FLOAT32_TOL, rtol=0)


# --- CISPO: a detached, capped importance weight on a REINFORCE term ---


def test_cispo_worked_example():
    # weight w = sg(min(ratio, 1 + eps_high = 1.2)) = [[1.2, 0.9], [0.5, 1.1, 1.0]]
    # per-token loss = -w * A * logp:
    #   completion 0 (A = 1):    -1.2 * (-1.0) = 1.2;  -0.9 * (-2.0) = 1.8
    #   completion 1 (A = -0.5): -0.5 * 0.5 * 0.5 = -0.125; -1.1 * 0.5 * 1.5 = -0.825; -1.0 * 0.5 * 2.5 = -1.25
    # token aggregation: (1.2 + 1.8 - 0.125 - 0.825 - 1.25) / 5 = 0.8 / 5 = 0.16
    # d loss / d logp = -w * A / 5 = [[-0.24, -0.18], [0.05, 0.11, 0.1]]
    # The ratio-1.5 token keeps a gradient (-0.24); PPO's clip gives it exactly 0.
    logprobs, old_logprobs = worked_example_logprobs()
    loss, metrics = grpo_loss(
        logprobs, old_logprobs, None, ADVANTAGES, MASK, LossOptions(beta=0.0, aggregation="token", objective="cispo"),
        normaliser=5.0,
    )  # fmt: skip
    assert loss.item() == pytest.approx(0.16, abs=FLOAT32_TOL)
    loss.backward()
    expected = torch.tensor([[-0.24, -0.18, 0.0], [0.05, 0.11, 0.1]])
    torch.testing.assert_close(logprobs.grad, expected, atol=FLOAT32_TOL, rtol=0)
    assert metrics["clip_frac_high"] == pytest.approx(0.2) and metrics["clip_frac_low"] == 0.0  # approx's rel 1e-6 is ~16 float32 ulps: a float32 mean/fraction of a few O(1) terms is within a few


def test_cispo_keeps_padding_finite():
    logprobs = torch.tensor([[-1.0, -float("inf")]], requires_grad=True)  # [1, 2] padding: -inf
    loss, _ = grpo_loss(
        logprobs, None, None, torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]),
        LossOptions(beta=0.0, aggregation="token", objective="cispo"), normaliser=1.0,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logprobs)
    # -1 * 1 * (-1) = 1 on the one token; the padded -inf is replaced by 0 before the product.
    assert loss.item() == 1.0 and torch.isfinite(grad).all() and grad[0, 1] == 0.0


# --- the loop twin and micro-batch invariance, every option ---

OPTIONS = list(
    itertools.product(("token", "sequence"), ("clip", "cispo"), KL_ESTIMATORS, SAMPLER_CORRECTIONS)
)


def _float64_batch(seed):
    logprobs, old_logprobs, ref_logprobs, advantages, mask = random_batch(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    sampler_logprobs = old_logprobs + 0.5 * torch.randn(old_logprobs.shape, generator=generator)  # [R, T]
    tensors = [logprobs.detach(), old_logprobs, ref_logprobs, advantages, mask, sampler_logprobs]
    logprobs, *rest = [t.double() for t in tensors]
    return logprobs.requires_grad_(True), *rest


def test_every_option_matches_the_loop_twin_and_splits_into_micro_batches():
    logprobs, old_logprobs, ref_logprobs, advantages, mask, sampler_logprobs = _float64_batch(0)
    # float64, each side a sum of <= 48 terms of size <= ~50 (weights up to the cap 3 times ratios
    # and log-probs of size ~3): within sum_error(48, 48 * 50) of the exact value, so twice apart.
    tol = 2 * sum_error(48, 48 * 50.0, torch.float64)
    # Each of the 100 option combinations once, the aggregations and epochs taken in turn (the twin
    # loops in python; every combination x every aggregation would take minutes on a busy CPU).
    settings = itertools.cycle([("sequence", False), ("token", True), ("constant", False), ("sequence", True)])
    for (level, objective, kl_estimator, correction), (aggregation, one_epoch) in zip(OPTIONS, settings, strict=False):
        old = None if one_epoch else old_logprobs
        kwargs = dict(
            epsilon_low=0.2, epsilon_high=0.28, beta=0.04, aggregation=aggregation,
            normaliser=max(step_normaliser(mask, aggregation, 6), 1.0), importance_sampling_level=level,
            objective=objective, kl_estimator=kl_estimator, sampler_logprobs=sampler_logprobs,
            sampler_correction=correction, sampler_correction_cap=2.0,
        )  # fmt: skip
        options = LossOptions(**{key: kwargs[key] for key in kwargs if key not in ("normaliser", "sampler_logprobs")})
        tensors = dict(normaliser=kwargs["normaliser"], sampler_logprobs=sampler_logprobs)
        loss, _ = grpo_loss(logprobs, old, ref_logprobs, advantages, mask, options, **tensors)
        reference = grpo_loss_reference(logprobs, old, ref_logprobs, advantages, mask, **kwargs)
        (grad,) = torch.autograd.grad(loss, logprobs)
        (reference_grad,) = torch.autograd.grad(reference, logprobs)
        label = f"{level} {objective} {kl_estimator} {correction} {aggregation} one_epoch={one_epoch}"
        assert loss.item() == pytest.approx(reference.item(), abs=tol), label
        torch.testing.assert_close(grad, reference_grad, atol=tol, rtol=0, msg=label)
        # Every option acts within a completion, so two micro-batches add up to the whole.
        split_loss = sum(
            grpo_loss(
                logprobs[rows], None if old is None else old[rows], ref_logprobs[rows], advantages[rows],
                mask[rows], options, **{**tensors, "sampler_logprobs": sampler_logprobs[rows]},
            )[0]
            for rows in (slice(0, 3), slice(3, 8))
        )  # fmt: skip
        assert split_loss.item() == pytest.approx(loss.item(), abs=tol), label


def test_the_loop_twin_clamps_the_kl_log_ratio_as_grpo_loss_does():
    # Token (0, 0) has x = log pi_ref - log pi_theta = -2 - (-25) = 23 > 20: grpo/kl.py clamps x
    # at 20 before exp (its point 2), so k3 there is e^20 - 20 - 1 = 485165195.4097903 - 21
    # = 485165174.4097903 with gradient 0 (unclamped, e^23 - 24 ~ 9.7e9: 20x larger). The other
    # tokens have |x| <= 0.5, where no guard acts. One epoch, so the ratio is 1 in value.
    logprobs = torch.tensor([[-25.0, -1.0], [-0.5, -1.5]], dtype=torch.float64, requires_grad=True)  # [R, T]
    ref_logprobs = torch.tensor([[-2.0, -1.2], [-0.7, -1.0]], dtype=torch.float64)  # [R, T]
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)  # [R]
    mask = torch.ones(2, 2, dtype=torch.float64)  # [R, T]
    beta = 0.04
    # Tolerance, as test_the_newer_options_bind_and_match_the_loop_twin derives it: each per-token
    # term and derivative is <= m = |A| * max(1, |log pi|) (ratio 1) + beta * (e^20 + 20^2 / 2 + 20 + 1)
    # = 25 + 0.04 * 485165416.4 = 19406641.7; float64 sums of 4 such terms: 4 sum_error(4, 4 m) ~ 5.5e-7,
    # against a gap of beta * (e^23 - e^20) / (2 tokens * 2 completions) ~ 9.3e7 if the twin did not clamp.
    m = 1.0 * 25.0 + beta * (math.exp(20.0) + 20.0**2 / 2 + 20.0 + 1)
    tol = 4 * sum_error(4, 4 * m, torch.float64)
    for kl_estimator in KL_ESTIMATORS:
        options = LossOptions(beta=beta, kl_estimator=kl_estimator)
        loss, _ = grpo_loss(logprobs, None, ref_logprobs, advantages, mask, options, normaliser=2.0)
        reference = grpo_loss_reference(
            logprobs, None, ref_logprobs, advantages, mask, beta=beta, kl_estimator=kl_estimator, normaliser=2.0
        )  # fmt: skip
        (grad,) = torch.autograd.grad(loss, logprobs)
        (reference_grad,) = torch.autograd.grad(reference, logprobs)
        assert loss.item() == pytest.approx(reference.item(), abs=tol), kl_estimator
        torch.testing.assert_close(grad, reference_grad, atol=tol, rtol=0, msg=kl_estimator)
        if kl_estimator == "k3":
            # Row 0: (-A (grad-only surrogate: ratio 1 in value) + beta k3) per token, averaged over its
            # 2 tokens; the clamped token alone is 0.04 * 485165174.4097903 / 2 / 2 (normaliser)
            # = 4851651.744097903; the other 7 terms add ~+-1, so the loss lies within 2 of it.
            assert abs(reference.item() - 4851651.744097903) < 2.0


# --- the loop twin, the options beyond GRPO's (objectives, delta, masks, floors, aggregations) ---

# Each row's drift log pi_theta - log pi_old and log pi_sampler - log pi_old (before noise) and
# the sign of A are chosen so that every bound binds, at both ratio levels and in both epochs:
# row 0 (A > 0, drift +0.6) is clipped high; row 1 (A < 0, drift -0.7) is clipped low, and its
# pi_old and pi_sampler lie ~0.5 above pi_theta (the off-policy mask drops it, not rows 2, 5, 7);
# rows 2 and 5 (A < 0, drift +0.5, +0.7) pass delta = 1.5 (log 0.41); the sampler drifts push
# weights past the cap 2 (row 7) and under the floor 0.5 (rows 3, 6); row 4 is empty (padding only).
_DRIFT = [0.6, -0.7, 0.5, -0.4, 0.0, 0.7, -0.6, 0.2]
_ADVANTAGES = [1.2, -0.8, -1.5, 0.6, 0.9, -0.7, 0.4, -1.1]
_LENGTHS = [6, 5, 3, 6, 0, 4, 2, 6]
_SAMPLER_DRIFT = [0.3, 0.3, 0.0, 0.3, 0.2, 0.0, 0.4, -0.5]


def _far_off_batch():
    generator = torch.Generator().manual_seed(7)
    R, T = len(_DRIFT), max(_LENGTHS)

    def noise(scale):
        return scale * torch.randn(R, T, generator=generator, dtype=torch.float64)  # [R, T]

    logprobs = -3 * torch.rand(R, T, generator=generator, dtype=torch.float64)  # [R, T]
    old_logprobs = logprobs - torch.tensor(_DRIFT, dtype=torch.float64)[:, None] + noise(0.3)  # [R, T]
    ref_logprobs = logprobs + noise(0.3)  # [R, T]
    sampler_logprobs = old_logprobs + torch.tensor(_SAMPLER_DRIFT, dtype=torch.float64)[:, None] + noise(0.4)  # [R, T]
    advantages = torch.tensor(_ADVANTAGES, dtype=torch.float64)  # [R]
    mask = (torch.arange(T) < torch.tensor(_LENGTHS)[:, None]).double()  # [R, T]
    return logprobs.requires_grad_(True), old_logprobs, ref_logprobs, advantages, mask, sampler_logprobs


# The objectives (SAPO's and VESPO's hyper-parameters away from the defaults and from each other's
# sign, so a swapped _pos/_neg shows), each with the ratio levels it allows. The hyper-parameters are
# exact in float32: grpo/objectives.py, as TRL, makes tau, k and lambda float32 tensors
# (torch.where of two python floats) whatever the loss's dtype, so 0.7 would differ from the twin's
# float64 0.7 by ~1e-8 relative, a rounding, not a wrong term.
_OBJECTIVES = [
    (dict(objective="clip", delta=1.5), ("token", "sequence")),
    (dict(objective="clip"), ("token", "sequence")),
    (dict(objective="cispo"), ("token", "sequence")),
    (dict(objective="sapo", sapo_temperature_pos=0.75, sapo_temperature_neg=1.625), ("token", "sequence")),
    (dict(objective="vespo", vespo_k_pos=1.25, vespo_lambda_pos=2.75, vespo_k_neg=2.5, vespo_lambda_neg=1.5), ("token",)),
]
_CAP, _FLOOR, _THRESHOLD = 2.0, 0.5, 0.3


def test_the_newer_options_bind_and_match_the_loop_twin():
    logprobs, old_logprobs, ref_logprobs, advantages, mask, sampler_logprobs = _far_off_batch()
    epsilon_low, epsilon_high, beta = 0.2, 0.28, 0.04
    lp, is_completion, A = logprobs.detach(), mask > 0, advantages[:, None]  # [R, T], [R, T], [R, 1]
    lengths = mask.sum(dim=1)  # [R]

    # --- the data makes every bound bind (counted from the tensors, not by the code under test) ---
    token_log_ratio = lp - old_logprobs  # [R, T] two epochs; one epoch: 0
    sequence_log_ratio = (token_log_ratio * mask).sum(dim=1, keepdim=True) / lengths.clamp(min=1)[:, None]  # [R, 1]
    for level_log_ratio in (token_log_ratio, sequence_log_ratio):
        ratio = level_log_ratio.exp().expand_as(lp)  # [R, T]
        assert ((ratio > 1 + epsilon_high) & (A > 0) & is_completion).sum() > 0  # clipped high
        assert ((ratio < 1 - epsilon_low) & (A < 0) & is_completion).sum() > 0  # clipped low
        assert ((ratio > 1.5) & (A < 0) & is_completion).sum() > 0  # delta bounds the ratio
    for old in (lp, old_logprobs):  # one epoch (pi_old = pi_theta), two epochs
        sampler_log_ratio = torch.where(is_completion, old - sampler_logprobs, 0.0)  # [R, T]
        for weight in (sampler_log_ratio.exp(), sampler_log_ratio.sum(dim=1, keepdim=True).exp()):  # token, sequence
            weight = weight.expand_as(lp)  # [R, T]
            assert ((weight > _CAP) & is_completion).sum() > 0 and ((weight < _FLOOR) & is_completion).sum() > 0
    for sampling in (sampler_logprobs, old_logprobs):  # pi_sampling: the sampler's, else pi_old's
        mean_gap = (torch.where(is_completion, sampling - lp, 0.0)).sum(dim=1) / lengths.clamp(min=1)  # [R]
        negative = (advantages < 0) & (lengths > 0)  # [R]
        assert (negative & (mean_gap > _THRESHOLD)).sum() > 0 and (negative & (mean_gap <= _THRESHOLD)).sum() > 0

    # --- the tolerance, from the magnitudes ---
    # |each per-token loss term and each of its derivatives| <= m: |A| times the largest of the
    # ratio, the clip's 1 + eps_high, SAPO's 4 / tau and VESPO's max phi = e^lam (k / lam)^k e^-k,
    # times max(1, |log pi|) (CISPO's and VESPO's REINFORCE term) and the cap; plus beta times a
    # bound on the KL estimators and their derivatives (e^x + x^2 / 2 + |x| + 1, times the ratio for k3_ratio).
    ratio_max = token_log_ratio[is_completion].abs().max().exp().item()
    phi_max = max(math.exp(lam) * (k / lam) ** k * math.exp(-k) for k, lam in ((1.25, 2.75), (2.5, 1.5)))
    x = (ref_logprobs - lp)[is_completion]  # [N]
    kl_max = (x.exp() + x**2 / 2 + x.abs() + 1).max().item() * ratio_max
    surrogate_max = max(ratio_max, 1 + epsilon_high, 4 / 0.75, phi_max) * max(1.0, lp.abs().max().item()) * _CAP
    m = advantages.abs().max().item() * surrogate_max + beta * kl_max
    assert m < 60  # ~48 in this batch
    # float64: each side is a sum of <= 48 terms of size <= m, off by <= sum_error(48, 48 m), each term
    # after <= 20 roundings (exp, sigmoid, products, the mean log-ratio), <= 48 * 20 u m < sum_error(48, 48 m):
    # each side within 2 sum_error(48, 48 m) of the exact value (~2.8e-11 at m = 48), so 4 apart. A
    # gradient entry adds fewer and smaller terms (at most one completion's), within the same bound.
    tol = 4 * sum_error(48, 48 * m, torch.float64)

    # --- every option against the twin: value and gradient, both epochs, and split into micro-batches ---
    corrections = [("none", None)] + [(mode, _FLOOR) for mode in SAMPLER_CORRECTIONS if mode != "none"]
    # The aggregations and KL estimators taken in turn (every combination of everything would take
    # minutes in the twin's python loops); the new aggregations first, so each objective meets both.
    settings = itertools.cycle(
        itertools.product(("sequence_sum", "micro_batch_token", "sequence", "token"), ("k3", "k3_ratio", "k2"))
    )
    cases = 0
    for (objective, levels), level, (correction, floor), threshold in itertools.product(
        _OBJECTIVES, ("token", "sequence"), corrections, (None, _THRESHOLD)
    ):
        if level not in levels or (objective["objective"] == "vespo" and correction != "none"):
            continue  # refused by LossOptions (its own tests check that)
        # Without a correction, the sampler's log-probs given and not: the off-policy mask then
        # measures pi_old instead.
        for samplers, one_epoch in itertools.product((sampler_logprobs, None) if correction == "none" else (sampler_logprobs,), (True, False)):
            aggregation, kl_estimator = next(settings)
            old = None if one_epoch else old_logprobs
            option_kwargs = dict(
                epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, aggregation=aggregation,
                importance_sampling_level=level, kl_estimator=kl_estimator, sampler_correction=correction,
                sampler_correction_cap=_CAP, sampler_correction_min=floor, off_policy_mask_threshold=threshold,
                **objective,
            )  # fmt: skip
            options = LossOptions(**option_kwargs)
            # The step's normaliser, counted by hand: 8 completions (sequence, sequence_sum), 32 tokens,
            # 1 micro-batch (micro_batch_token: the call's own token mean).
            normaliser = {"sequence": 8.0, "sequence_sum": 8.0, "token": 32.0, "micro_batch_token": 1.0}[aggregation]
            assert normaliser == step_normaliser(mask, aggregation)
            label = f"{option_kwargs} one_epoch={one_epoch} sampler={samplers is not None}"
            loss, _ = grpo_loss(logprobs, old, ref_logprobs, advantages, mask, options, normaliser=normaliser,
                                sampler_logprobs=samplers)  # fmt: skip
            reference = grpo_loss_reference(logprobs, old, ref_logprobs, advantages, mask, normaliser=normaliser,
                                            sampler_logprobs=samplers, **option_kwargs)  # fmt: skip
            (grad,) = torch.autograd.grad(loss, logprobs)
            (reference_grad,) = torch.autograd.grad(reference, logprobs)
            assert loss.item() == pytest.approx(reference.item(), abs=tol), label
            torch.testing.assert_close(grad, reference_grad, atol=tol, rtol=0, msg=label)
            # Two micro-batches (rows 0-2 and 3-7, 14 and 18 tokens): every option acts within a
            # completion, so they add up to the whole, except micro_batch_token, where each takes its
            # own token mean: there the twin, called per micro-batch, is the reference.
            halves = (slice(0, 3), slice(3, 8))
            split_normaliser = 2.0 if aggregation == "micro_batch_token" else normaliser
            split = [
                (logprobs[rows], None if old is None else old[rows], ref_logprobs[rows], advantages[rows], mask[rows])
                for rows in halves
            ]  # fmt: skip
            split_samplers = [None if samplers is None else samplers[rows] for rows in halves]
            split_loss = sum(
                grpo_loss(*tensors, options, normaliser=split_normaliser, sampler_logprobs=part)[0]
                for tensors, part in zip(split, split_samplers, strict=True)
            )  # fmt: skip
            if aggregation == "micro_batch_token":
                expected = sum(
                    grpo_loss_reference(*tensors, normaliser=split_normaliser, sampler_logprobs=part, **option_kwargs)
                    for tensors, part in zip(split, split_samplers, strict=True)
                ).item()  # fmt: skip
                assert expected != pytest.approx(reference.item(), abs=1e-3), label  # the split matters here
            else:
                expected = loss.item()
            assert split_loss.item() == pytest.approx(expected, abs=tol), label
            cases += 1
    # 4 objectives x 2 levels x (no correction: 2 thresholds x 2 samplers x 2 epochs, + 4 corrections x
    # 2 thresholds x 2 epochs), + VESPO at the token level without a correction.
    assert cases == 4 * 2 * (2 * 2 * 2 + 4 * 2 * 2) + 2 * 2 * 2


# --- --loss_type: TRL's names onto this project's options ---


@pytest.mark.parametrize(
    ("loss_type", "aggregation", "level", "objective"),
    [
        ("grpo", "sequence", "token", "clip"),
        ("dapo", "token", "token", "clip"),
        ("dr_grpo", "constant", "token", "clip"),
        ("gspo", "sequence", "sequence", "clip"),
        ("cispo", "token", "token", "cispo"),
        ("bnpo", "micro_batch_token", "token", "clip"),
        ("sapo", "sequence", "token", "sapo"),
        ("luspo", "sequence_sum", "sequence", "clip"),
        ("vespo", "token", "token", "vespo"),
    ],
)
def test_loss_type_sets_the_options(loss_type, aggregation, level, objective):
    args = GRPOArguments(loss_type=loss_type)
    assert (args.loss_aggregation, args.importance_sampling_level, args.objective) == (aggregation, level, objective)


def test_defaults_stay_grpo():
    args = GRPOArguments()
    assert args.loss_type is None
    assert (args.loss_aggregation, args.importance_sampling_level, args.objective) == ("sequence", "token", "clip")
    assert (args.beta, args.kl_estimator, args.sampler_correction) == (0.04, "k3", "none")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(loss_type="dapo", loss_aggregation="sequence"), "--loss_type dapo means --loss_aggregation token"),
        (dict(loss_type="gspo", importance_sampling_level="token"), "means --importance_sampling_level sequence"),
        (dict(loss_type="ppo"), "not implemented"),
        (dict(loss_type="vespo", importance_sampling_level="sequence"), "--loss_type vespo means --importance_sampling_level token"),
        (dict(objective="vespo", sampler_correction="token_mask"), "--objective vespo with --sampler_correction token_mask"),
        (dict(sapo_temperature_neg=0.0), "--sapo_temperature_neg 0.0: must be > 0"),
        (dict(vespo_k_pos=-1.0), "--vespo_k_pos -1.0"),
        (dict(vespo_lambda_neg=0.0), "--vespo_lambda_neg 0.0"),
        (dict(objective="ppo"), "--objective"),
        (dict(importance_sampling_level="step"), "--importance_sampling_level"),
        (dict(kl_estimator="k4"), "--kl_estimator"),
        (dict(sampler_correction="truncate"), "--sampler_correction"),
        (dict(sampler_correction_cap=0.0), "--sampler_correction_cap"),
        (dict(sampler_correction="token_truncate", old_logprobs_from_sampler=True), "exactly 1; drop one"),
        (dict(delta=1.0), "--delta 1.0: .* must be > 1"),
        (dict(sampler_correction_min=0.5), "--sampler_correction_min 0.5 bounds .* --sampler_correction is none"),
        (dict(sampler_correction="token_mask", sampler_correction_min=3.0), r"must be in \[0, --sampler_correction_cap 3.0\)"),
        (dict(off_policy_mask_threshold=-0.1), "--off_policy_mask_threshold -0.1"),
    ],
)
def test_bad_options_name_the_flag(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GRPOArguments(**kwargs)


def test_the_config_builds_the_loss_options_once():
    args = GRPOArguments(loss_type="gspo", epsilon=3e-4, epsilon_high=4e-4, beta=0.0, kl_estimator="k2")
    assert args.loss_options == LossOptions(
        epsilon_low=3e-4, epsilon_high=4e-4, beta=0.0, aggregation="sequence", importance_sampling_level="sequence",
        objective="clip", kl_estimator="k2",
    )  # fmt: skip
    assert GRPOArguments().loss_options == LossOptions()  # the flags' defaults are GRPO's
    with pytest.raises(FrozenInstanceError):
        args.loss_options.beta = 1.0  # one object, never changed after the config is read


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(aggregation="tokens"), "aggregation 'tokens' is not one of: sequence, token, constant"),
        (dict(importance_sampling_level="step"), "importance_sampling_level 'step' is not one of"),
        (dict(kl_estimator="k4"), "kl_estimator 'k4' is not one of"),
        (dict(epsilon_high=float("nan")), "epsilon_high nan: must be >= 0"),
        (dict(sampler_correction_cap=0.0), "sampler_correction_cap 0.0: the cap C must be > 0"),
        (dict(delta=0.9), "delta 0.9: the two-sided clip's bound on the ratio must be > 1"),
        (dict(sapo_temperature_pos=-1.0), "sapo_temperature_pos -1.0: must be > 0"),
        (dict(objective="vespo", importance_sampling_level="sequence"), "drop importance_sampling_level sequence"),
        (dict(off_policy_mask_threshold=float("nan")), "off_policy_mask_threshold nan: a KL threshold must be >= 0"),
        (dict(sampler_correction_min=0.5), "sampler_correction_min 0.5 bounds sampler_correction's weight"),
        (dict(epsilon_low=1.0), r"epsilon_low 1.0: must be in \[0, 1\) so that 1 - epsilon_low > 0"),
    ],
)
def test_loss_options_check_themselves_when_built(options, message):
    with pytest.raises(ValueError, match=message):
        LossOptions(**options)


@pytest.mark.parametrize(
    ("field", "flag", "value"),
    [("epsilon_low", "epsilon", 1.5), ("aggregation", "loss_aggregation", "tokens"), ("beta", "beta", -1.0),
     ("delta", "delta", 0.5), ("kl_estimator", "kl_estimator", "k9")],
)  # fmt: skip
def test_the_options_are_checked_in_one_place_and_named_as_flags_by_the_config(field, flag, value):
    # One check, two namings: LossOptions' own message (its field names) and the config's (the
    # flags, --epsilon for epsilon_low, --loss_aggregation for aggregation) are the same sentence.
    with pytest.raises(LossOptionError) as raised:
        LossOptions(**{field: value})
    with pytest.raises(ConfigError) as named:
        GRPOArguments(**{flag: value})
    as_flags = str(named.value)
    assert as_flags.startswith(f"--{flag} ")
    assert as_flags == raised.value.naming(lambda name: "--" + LOSS_OPTION_FLAGS.get(name, name))
    assert str(raised.value).startswith(f"{field} ")


def test_agreeing_flags_are_accepted():
    args = GRPOArguments(loss_type="dapo", loss_aggregation="token")
    assert args.loss_aggregation == "token"


def test_loss_options_errors():
    logprobs, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="objective 'ppo' is not one of"):
        grpo_loss(logprobs, None, None, torch.zeros(2), mask, LossOptions(beta=0.0, objective="ppo"), normaliser=1.0)
    with pytest.raises(ValueError, match="needs sampler_logprobs"):
        options = LossOptions(beta=0.0, sampler_correction="token_mask")
        grpo_loss(logprobs, None, None, torch.zeros(2), mask, options, normaliser=1.0)
    with pytest.raises(ValueError, match=r"sampler_logprobs has shape \(2, 1\)"):
        grpo_loss(
            logprobs, None, None, torch.zeros(2), mask, LossOptions(beta=0.0), normaliser=1.0,
            sampler_logprobs=torch.zeros(2, 1),
        )  # fmt: skip


# --- delta: INTELLECT-2's two-sided clip, and verl's dual-clip ---


def test_delta_bounds_the_ratio_of_negative_advantages_by_hand():
    # One completion, A = -1, token ratios [3.0, 1.5, 0.5], eps = 0.2, token aggregation (/ 3).
    # PPO:      -max(r, clip(r)) per token = -3.0, -1.5, -max(0.5, 0.8) = -0.8; loss = 5.3 / 3 = 1.7666667
    # delta 2:  -max(min(r, 2), clip(r))  = -2.0, -1.5, -0.8;                  loss = 4.3 / 3 = 1.4333333
    # gradient of the loss in logp = -A * d(bounded ratio)/d logp / 3:
    #   PPO      [3.0 / 3, 1.5 / 3, 0 (clipped low)] = [1.0, 0.5, 0.0]
    #   delta 2  [0 (bounded: a constant), 0.5, 0.0]
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)  # [1, 3]
    old_logprobs = logprobs.detach() - torch.tensor([[3.0, 1.5, 0.5]]).log()  # [1, 3]
    mask, A = torch.ones(1, 3), torch.tensor([-1.0])
    expected = {None: (1.7666667, [1.0, 0.5, 0.0]), 2.0: (1.4333333, [0.0, 0.5, 0.0])}
    for delta, (value, gradient) in expected.items():
        options = LossOptions(beta=0.0, aggregation="token", delta=delta)
        loss, _ = grpo_loss(logprobs, old_logprobs, None, A, mask, options, normaliser=3.0)
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert loss.item() == pytest.approx(value, abs=FLOAT32_TOL)
        torch.testing.assert_close(grad, torch.tensor([gradient]), atol=FLOAT32_TOL, rtol=0)


def test_delta_leaves_positive_advantages_alone():
    # A = +1, ratios [3.0, 1.5, 0.5], eps 0.2, delta 2 >= 1 + eps_high: min(min(r, 2), clip(r)) = min(r, clip(r)),
    # PPO's: 1.2 + 1.2 + 0.5 = 2.9, loss -2.9 / 3 = -0.9666667 both ways.
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])  # [1, 3]
    old_logprobs = logprobs - torch.tensor([[3.0, 1.5, 0.5]]).log()  # [1, 3]
    for delta in (None, 2.0):
        options = LossOptions(beta=0.0, aggregation="token", delta=delta)
        loss, _ = grpo_loss(logprobs, old_logprobs, None, torch.tensor([1.0]), torch.ones(1, 3), options, normaliser=3.0)
        assert loss.item() == pytest.approx(-0.9666667, abs=FLOAT32_TOL)


def test_dual_clip_ppo_is_delta():
    # Dual-clip PPO (Ye et al., arXiv 1912.09729, eq. 6; verl's compute_policy_loss with clip_ratio_c,
    # OpenRLHF's dual_clip), written here from the paper: for A < 0 the loss is
    # min(-A c, max(-A r, -A clip(r))), for A >= 0 PPO's max(-A r, -A clip(r)). With c = delta >= 1 + eps_high
    # it is our --delta term exactly: the same products of the same numbers, value and gradient. The
    # ratios step over every kink (0.8, 1.2, 1.28, 3.0) without landing on one: at a kink the two
    # formulas' min/max pick different one-sided derivatives (both subgradients).
    ratios = torch.tensor([0.1, 0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 1.27, 1.29, 2.0, 2.99, 3.01, 10.0], dtype=torch.float64)
    for A_value, (epsilon_low, epsilon_high, c) in itertools.product((-2.0, -0.5, 0.5, 2.0), ((0.2, 0.28, 3.0), (0.2, 0.2, 1.2))):
        ratio = ratios.clone().requires_grad_(True)  # [13]
        A = torch.tensor(A_value, dtype=torch.float64)
        clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)  # [13]
        ppo = torch.max(-A * ratio, -A * clipped)  # [13]
        dual = torch.min(-A * c, ppo) if A_value < 0 else ppo  # [13]
        options = LossOptions(epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=c)
        ours = -options.surrogate(ratio[None], A.reshape(1, 1), ratio[None], torch.ones(1, 13, dtype=torch.float64))[0]
        (dual_grad,) = torch.autograd.grad(dual.sum(), ratio)
        (ours_grad,) = torch.autograd.grad(ours.sum(), ratio)
        assert torch.equal(ours, dual) and torch.equal(ours_grad, dual_grad), (A_value, c)


# --- the off-policy sequence mask (DeepSeek-V3.2, eq. 9) ---


def test_off_policy_mask_by_hand():
    # The worked example's log-probs, one inner epoch (ratio 1), token aggregation (/ 5 tokens).
    # log pi_sampler - log pi_theta: completion 0 [1.0, 1.0] (mean 1.0, but A = +1: kept),
    #                                completion 1 [0.3, 0.1, 0.2] (mean 0.2, A = -0.5).
    # threshold 0.1:  0.2 > 0.1, completion 1 dropped: loss = -(1 + 1) / 5 = -0.4,
    #                 gradient -A / 5 = [[-0.2, -0.2, 0], [0, 0, 0]] (the normaliser still counts its 3 tokens)
    # threshold 0.25: 0.2 <= 0.25, kept: loss = -(1 + 1 - 0.5 * 3) / 5 = -0.1,
    #                 gradient [[-0.2, -0.2, 0], [0.1, 0.1, 0.1]]
    logprobs, _ = worked_example_logprobs()
    sampler_logprobs = logprobs.detach() + torch.tensor([[1.0, 1.0, 0.0], [0.3, 0.1, 0.2]])  # [2, 3]
    expected = {
        0.1: (-0.4, [[-0.2, -0.2, 0.0], [0.0, 0.0, 0.0]]),
        0.25: (-0.1, [[-0.2, -0.2, 0.0], [0.1, 0.1, 0.1]]),
    }
    for threshold, (value, gradient) in expected.items():
        options = LossOptions(beta=0.0, aggregation="token", off_policy_mask_threshold=threshold)
        loss, metrics = grpo_loss(logprobs, None, None, ADVANTAGES, MASK, options, normaliser=5.0, sampler_logprobs=sampler_logprobs)
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert loss.item() == pytest.approx(value, abs=FLOAT32_TOL), threshold
        # completion 1's 3 of the 5 tokens dropped, or none
        assert metrics["off_policy_masked_frac"] == pytest.approx(0.6 if threshold == 0.1 else 0.0)  # approx's rel 1e-6: a fraction of 5 float32 counts
        torch.testing.assert_close(grad, torch.tensor(gradient), atol=FLOAT32_TOL, rtol=0)
        # Without the sampler's log-probs the mask measures the KL to pi_old instead (as TRL): with
        # pi_old = those same numbers the same completion is dropped (the ratio moves, not the mask).
        keep = LossOptions(off_policy_mask_threshold=threshold).token_weights(
            logprobs, sampler_logprobs, ADVANTAGES[:, None], MASK, None, None
        )  # fmt: skip
        assert keep.flatten().tolist() == ([1.0, 0.0] if threshold == 0.1 else [1.0, 1.0])


# --- --loss_type bnpo: each micro-batch's own token mean ---


def test_bnpo_averages_the_micro_batches_token_means_by_hand():
    # The worked example's per-token loss (beta 0, eps 0.2): [[-1.2, -0.9], [0.4, 0.55, 0.5]].
    # Two micro-batches, completion 0 (2 tokens) and completion 1 (3 tokens); step_normaliser
    # counts 2 micro-batches:  (-2.1 / 2 + 1.45 / 3) / 2 = (-1.05 + 0.4833333) / 2 = -0.2833333.
    # One micro-batch of both (TRL's "local batch" = all 5 tokens): -0.65 / 5 = -0.13 (= dapo's).
    # Gradient with two micro-batches: -A * ratio / (tokens of its micro-batch * 2), 0 where clipped:
    #   [[0, -0.9 / 4 = -0.225], [0, 0.55 / 6 = 0.0916667, 0.5 / 6 = 0.0833333]]
    logprobs, old_logprobs = worked_example_logprobs()
    options = LossOptions(beta=0.0, aggregation="micro_batch_token")
    normaliser = sum(step_normaliser(MASK[rows], "micro_batch_token") for rows in (slice(0, 1), slice(1, 2)))
    assert normaliser == 2.0 and step_normaliser(torch.ones(8, 4), "micro_batch_token", micro_batch_size=3) == 3.0
    loss = sum(
        grpo_loss(logprobs[rows], old_logprobs[rows], None, ADVANTAGES[rows], MASK[rows], options, normaliser=normaliser)[0]
        for rows in (slice(0, 1), slice(1, 2))
    )  # fmt: skip
    assert loss.item() == pytest.approx(-0.2833333, abs=FLOAT32_TOL)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.225, 0.0], [0.0, 0.0916667, 0.0833333]]), atol=FLOAT32_TOL, rtol=0)
    whole, _ = grpo_loss(logprobs, old_logprobs, None, ADVANTAGES, MASK, options, normaliser=step_normaliser(MASK, "micro_batch_token"))
    assert whole.item() == pytest.approx(-0.13, abs=FLOAT32_TOL)


# --- --loss_type luspo: GSPO with each completion's loss summed over its tokens ---


def test_luspo_scales_each_completion_by_its_length_by_hand():
    # GSPO's ratios of the worked example (test_gspo_worked_example_unclipped): s_0 = 1.1618950,
    # s_1 = 0.8193213, none clipped at eps 0.2. LUSPO sums each completion's per-token loss
    # (|o_i| copies of -A_i s_i) and averages over the 2 completions:
    #   (2 * (-1.1618950) + 3 * 0.5 * 0.8193213) / 2 = (-2.3237900 + 1.2289820) / 2 = -0.5474040
    # (GSPO: -0.3761172). d loss / d logp_it = -A_i s_i |o_i| (1 / |o_i|) / 2 = -A_i s_i / 2, the
    # same for every token whatever the completion's length:
    #   completion 0: -1.1618950 / 2 = -0.5809475;  completion 1: 0.5 * 0.8193213 / 2 = 0.2048303
    logprobs, old_logprobs = worked_example_logprobs()
    args = GRPOArguments(loss_type="luspo", beta=0.0)
    loss, _ = grpo_loss(
        logprobs, old_logprobs, None, ADVANTAGES, MASK, args.loss_options,
        normaliser=step_normaliser(MASK, args.loss_aggregation),
    )  # fmt: skip
    assert loss.item() == pytest.approx(-0.5474040, abs=FLOAT32_TOL)
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = torch.tensor([[-0.5809475, -0.5809475, 0.0], [0.2048303, 0.2048303, 0.2048303]])
    torch.testing.assert_close(grad, expected, atol=FLOAT32_TOL, rtol=0)


# --- --loss_type sapo: a soft gate instead of the clip ---


def test_sapo_worked_example():
    # gate(r) = (4 / tau) sigmoid(tau (r - 1)); tau = 1.0 for A > 0, 1.05 for A <= 0 (TRL's defaults).
    # completion 0 (A = 1):    r 1.5: 4 sigmoid(0.5) = 4 * 0.6224593 = 2.4898373
    #                          r 0.9: 4 sigmoid(-0.1) = 4 * 0.4750208 = 1.9000833;  mean 2.1949603
    # completion 1 (A = -0.5): r 0.5: 3.8095238 sigmoid(-0.525) = 3.8095238 * 0.3716838 = 1.4159383
    #                          r 1.1: 3.8095238 sigmoid(0.105) = 3.8095238 * 0.5262259 = 2.0046701
    #                          r 1.0: 3.8095238 / 2 = 1.9047619;  mean * A = -0.5 * 5.3253703 / 3 = -0.8875617
    # sequence aggregation: -(2.1949603 - 0.8875617) / 2 = -0.6536993
    # d loss / d logp_it = -A_i gate'(r) r / (|o_i| * 2), gate'(r) = 4 s (1 - s) at s = sigmoid(tau (r - 1)):
    #   t = (0, 0): -4 * 0.6224593 * 0.3775407 * 1.5 / 4 = -1.4100223 / 4 = -0.3525056
    #   the others likewise: [[-0.3525056, -0.2244384], [0.0389225, 0.0914145, 0.0833333]]
    #   (r = 1: 4 * 1/4 * 1 = 1, PPO's own gradient there: 0.5 / 6 = 0.0833333). Nothing is ever cut.
    logprobs, old_logprobs = worked_example_logprobs()
    options = GRPOArguments(loss_type="sapo", beta=0.0).loss_options
    loss, metrics = grpo_loss(logprobs, old_logprobs, None, ADVANTAGES, MASK, options, normaliser=2.0)
    assert loss.item() == pytest.approx(-0.6536993, abs=FLOAT32_TOL)
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = torch.tensor([[-0.3525056, -0.2244384, 0.0], [0.0389225, 0.0914145, 0.0833333]])
    torch.testing.assert_close(grad, expected, atol=FLOAT32_TOL, rtol=0)
    assert metrics["clip_frac"] == 0.0


# --- --loss_type vespo: a Gamma weight of the completion's ratio ---


def test_vespo_worked_example():
    # w_i = prod_t r_it: w_0 = 1.5 * 0.9 = 1.35, w_1 = 0.5 * 1.1 * 1.0 = 0.55.
    # phi = exp(lambda + k ln w - lambda w), TRL's defaults (k, lambda) = (2, 3) for A >= 0, (3, 2) for A < 0:
    #   phi_0 = exp(3 + 2 * 0.3001046 - 3 * 1.35) = exp(-0.4497908) = 0.6377615
    #   phi_1 = exp(2 + 3 * (-0.5978370) - 2 * 0.55) = exp(-0.8935110) = 0.4092165
    # per-token loss -phi A logp: [[0.6377615, 1.2755231], [-0.1023041, -0.3069124, -0.5115206]]
    # token aggregation: sum / 5 = 0.9925476 / 5 = 0.1985095
    # gradient -phi_i A_i / 5 (phi detached): completion 0 -0.1275523, completion 1 0.0409216
    logprobs, old_logprobs = worked_example_logprobs()
    options = GRPOArguments(loss_type="vespo", beta=0.0).loss_options
    loss, _ = grpo_loss(logprobs, old_logprobs, None, ADVANTAGES, MASK, options, normaliser=5.0)
    assert loss.item() == pytest.approx(0.1985095, abs=FLOAT32_TOL)
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = torch.tensor([[-0.1275523, -0.1275523, 0.0], [0.0409216, 0.0409216, 0.0409216]])
    torch.testing.assert_close(grad, expected, atol=FLOAT32_TOL, rtol=0)


def test_vespo_weight_is_one_on_policy_and_finite_far_off():
    # One inner epoch: w = 1, phi(1) = e^lambda e^-lambda = 1: VESPO is then REINFORCE, -A logp / 5.
    logprobs, _ = worked_example_logprobs()
    options = LossOptions(beta=0.0, aggregation="token", objective="vespo")
    loss, _ = grpo_loss(logprobs, None, None, ADVANTAGES, MASK, options, normaliser=5.0)
    # -(1 * (-1 - 2) + (-0.5) * (-0.5 - 1.5 - 2.5)) / 5 = -(-3 + 2.25) / 5 = 0.15
    assert loss.item() == pytest.approx(0.15, abs=FLOAT32_TOL)
    # Log-ratios of +-100 per token: w is held in [1e-8, e^20], phi underflows to 0, nothing is NaN.
    far = logprobs.detach() + torch.tensor([[100.0, 100.0, 0.0], [-100.0, -100.0, -100.0]])  # old log-probs
    loss, _ = grpo_loss(logprobs, far, None, ADVANTAGES, MASK, options, normaliser=5.0)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
