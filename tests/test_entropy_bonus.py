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

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import read_metrics, without_timings
from tolerances import U32, sum_error

from grpo.entropy_bonus import (
    EntropyCoefficient,
    adapted_coefficient,
    differentiable_token_entropy,
    entropy_bonus,
)
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


# --- against TRL 1.16's _compute_loss (the oracle), float64 ---

R, T = 8, 7  # completions, max completion length


def _trl_compute_loss(logprobs, old_logprobs, ref_logprobs, entropies, advantages, mask, *, loss_type, beta,
                      coef, adaptive, last_entropy, target, accumulation=1):  # fmt: skip
    """TRL's _compute_loss with its entropy bonus on (a stand-in `self`: one process; `entropies`
    are what its forward returns). Returns the loss and the stand-in (its coefficient after the call)."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is the oracle here (pip install -e '.[dev]')")
    from collections import defaultdict

    accelerator = SimpleNamespace(
        num_processes=1, sync_gradients=True, reduce=lambda x, reduction="sum": x, gather=lambda x: x,
        gather_for_metrics=lambda x: x,
    )  # fmt: skip
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, entropies, None), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1, entropy_target=target,
                             entropy_coef_delta=0.005, entropy_coef_min=0.0, entropy_coef_max=1.0),
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation, accelerator=accelerator,
        _entropy_bonus_enabled=coef != 0.0 or adaptive, entropy_coef=coef, use_adaptive_entropy=adaptive,
        _last_world_entropy=last_entropy, _entropy_window_stats=None,
        _metrics=defaultdict(lambda: defaultdict(list)), max_completion_length=T,
    )  # fmt: skip
    rows = logprobs.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.zeros(rows, T, dtype=torch.long), "completion_mask": mask, "advantages": advantages,
        "old_per_token_logps": old_logprobs, "ref_per_token_logps": ref_logprobs, "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs), trainer


def _random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(R, T, generator=g, dtype=torch.float64)  # [R, T]
    old_logprobs = logprobs + 0.2 * torch.randn(R, T, generator=g, dtype=torch.float64)  # ratios away from 1
    ref_logprobs = logprobs + 0.3 * torch.randn(R, T, generator=g, dtype=torch.float64)
    entropies = 4 * torch.rand(R, T, generator=g, dtype=torch.float64)  # [R, T] nats
    advantages = torch.randn(R, generator=g, dtype=torch.float64)  # [R]
    lengths = torch.randint(1, T + 1, (R,), generator=g)  # [R] EOS inside the window
    mask = (torch.arange(T) < lengths[:, None]).double()  # [R, T]
    return logprobs, old_logprobs, ref_logprobs, entropies, advantages, mask


TRL_GRID = list(itertools.product(
    range(3), ("grpo", "dapo", "dr_grpo"), (0.0, 0.04), (False, True),
    ((False, math.inf), (True, math.inf), (True, 0.1), (True, 0.5)),  # adaptive off; on: none yet, below, above
))  # fmt: skip


def test_bonus_and_adaptive_update_equal_trls():
    """The bonus TRL adds (its loss with the bonus minus its loss without), its gradient in the
    entropies, the coefficient TRL applies and the one it leaves for the next step, against ours."""
    worst = 0.0
    for seed, loss_type, beta, one_epoch, (adaptive, last_entropy) in TRL_GRID:
        logprobs, old_logprobs, ref_logprobs, entropies, advantages, mask = _random_inputs(seed)
        old = logprobs.detach() if one_epoch else old_logprobs
        coef, target = 0.03, 0.2 if last_entropy != 0.5 else 0.3

        trl_entropies = entropies.clone().requires_grad_(True)
        with_bonus, trainer = _trl_compute_loss(
            logprobs, old, ref_logprobs, trl_entropies, advantages, mask, loss_type=loss_type, beta=beta,
            coef=coef, adaptive=adaptive, last_entropy=last_entropy, target=target,
        )  # fmt: skip
        (trl_grad,) = torch.autograd.grad(with_bonus, trl_entropies)
        without, _ = _trl_compute_loss(
            logprobs, old, ref_logprobs, entropies, advantages, mask, loss_type=loss_type, beta=beta,
            coef=0.0, adaptive=False, last_entropy=math.inf, target=target,
        )  # fmt: skip
        trl_bonus = float((without - with_bonus).detach())  # TRL: loss - c_applied * H̄

        state = EntropyCoefficient(coef, last_entropy=last_entropy)
        applied = state.applied(adaptive=adaptive, target=target)
        ours_entropies = entropies.clone().requires_grad_(True)
        ours = entropy_bonus(ours_entropies, mask, applied, normaliser=float(mask.sum()))  # one micro-batch, one rank
        (ours_grad,) = torch.autograd.grad(ours, ours_entropies)
        worst = max(worst, abs(float(ours.detach()) - trl_bonus), float((ours_grad + trl_grad).abs().max()))  # loss - bonus
        if adaptive:  # the coefficient TRL leaves for the next step, from this window's measured H̄
            measured = float((entropies * mask).sum() / mask.sum())
            assert trainer.entropy_coef == pytest.approx(
                adapted_coefficient(coef, measured, target=target, delta=0.005, low=0.0, high=1.0), rel=0, abs=4 * 2.0**-53
            )
            assert trainer._last_world_entropy == pytest.approx(measured, rel=0, abs=sum_error(R * T, 4.0 * R * T, torch.float64))
        else:
            assert trainer.entropy_coef == coef
    # float64: H̄ is a sum of <= 56 terms <= 4, and TRL's difference of two losses (each a sum of
    # <= 56 terms of size <= ~10) carries both losses' rounding: within 2 * sum_error(56, 560) + the bonus's.
    print(f"\nworst |ours - TRL| over {len(TRL_GRID)} configurations (bonus and gradient): {worst:.1e}")
    assert worst < 2 * sum_error(56, 56 * 10.0, torch.float64) + sum_error(56, 56 * 4.0, torch.float64)


def test_unequal_micro_batches_depart_from_trl_on_purpose():
    """TRL adds each micro-batch's own mean / (number of micro-batches); ours divides every
    micro-batch by the step's count. Equal when the token counts are equal; here they are not
    (rows 0-3 and 4-7 hold different numbers of tokens), and TRL's is the mean of the two means."""
    logprobs, old, ref, entropies, advantages, mask = _random_inputs(0)
    halves = (slice(0, 4), slice(4, 8))
    counts = [float(mask[h].sum()) for h in halves]
    assert counts[0] != counts[1]
    trl_total = 0.0
    for h in halves:
        with_bonus, _ = _trl_compute_loss(logprobs[h], logprobs[h].detach(), ref[h], entropies[h], advantages[h], mask[h],
                                          loss_type="dapo", beta=0.0, coef=0.1, adaptive=False, last_entropy=math.inf,
                                          target=0.2, accumulation=2)  # fmt: skip
        without, _ = _trl_compute_loss(logprobs[h], logprobs[h].detach(), ref[h], entropies[h], advantages[h], mask[h],
                                       loss_type="dapo", beta=0.0, coef=0.0, adaptive=False, last_entropy=math.inf,
                                       target=0.2, accumulation=2)  # fmt: skip
        trl_total += float(without - with_bonus)
    means = [float((entropies[h] * mask[h]).sum()) / c for h, c in zip(halves, counts, strict=True)]
    ours = sum(float(entropy_bonus(entropies[h], mask[h], 0.1, normaliser=sum(counts))) for h in halves)
    global_mean = float((entropies * mask).sum() / mask.sum())
    bound = 2 * sum_error(56, 56 * 10.0, torch.float64) + sum_error(56, 56 * 4.0, torch.float64)
    assert abs(trl_total - 0.1 * (means[0] + means[1]) / 2) < bound  # TRL: the mean of the micro-batch means
    assert abs(ours - 0.1 * global_mean) < bound  # ours: one mean over the step's tokens
    assert abs(ours - trl_total) > 1e3 * bound  # and here those differ


# --- end to end (tiny preset) and flags ---


def test_adaptive_run_logs_and_applies_its_coefficient(train_run, tmp_path):
    """Target 100 nats (above any tiny-model entropy, at most log V ~ 7): the coefficient climbs by
    delta every step and is applied from step 2 on, and step 2's loss is the plain run's minus c * H̄."""
    flags = ["--max_steps", "3", "--save_steps", "0", "--beta", "0"]
    plain = read_metrics(train_run(tmp_path / "plain", *flags))
    adaptive = read_metrics(train_run(tmp_path / "adaptive", *flags, "--use_adaptive_entropy", "true",
                                      "--entropy_coef", "0.01", "--entropy_coef_delta", "0.02", "--entropy_target", "100"))  # fmt: skip
    # c: 0.01 -> 0.03 -> 0.05 -> 0.07; applied: 0 (nothing measured), 0.03, 0.05
    assert [r["entropy_coef"] for r in adaptive] == pytest.approx([0.03, 0.05, 0.07], rel=0, abs=1e-15)
    assert [r["entropy_coef_applied"] for r in adaptive] == pytest.approx([0.0, 0.03, 0.05], rel=0, abs=1e-15)
    assert "entropy_coef" not in plain[0]
    # Step 1 applies no bonus: the same floats as the plain run, save the new metrics.
    new = ("entropy_coef", "entropy_coef_applied", "entropy_bonus_mean_entropy")
    assert {k: v for k, v in without_timings(adaptive[0]).items() if k not in new} == without_timings(plain[0])
    assert adaptive[0]["entropy_bonus_mean_entropy"] == adaptive[0]["entropy"]  # no top-entropy selection
    # Step 2 has the same weights and batch as the plain run's step 2 (step 1 was the same), so
    # its loss is the plain loss minus 0.03 * H̄: float32 sums over the step's <= 4 x 8 tokens of
    # terms <= ~10 (the policy term's |A| ratio, and H <= log V ~ 7), each side.
    expected = plain[1]["loss"] - 0.03 * adaptive[1]["entropy_bonus_mean_entropy"]
    assert adaptive[1]["loss"] == pytest.approx(expected, rel=0, abs=2 * sum_error(4 * 8, 4 * 8 * 10.0))


def test_entropy_flags_are_checked():
    from grpo.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"--entropy_coef_min 0.5 is above --entropy_coef_max 0.1"):
        parse_config(["--entropy_coef_min", "0.5", "--entropy_coef_max", "0.1"])
    with pytest.raises(ConfigError, match=r"--entropy_coef 2.0 is the adaptive coefficient's start"):
        parse_config(["--use_adaptive_entropy", "true", "--entropy_coef", "2"])
    with pytest.raises(ConfigError, match=r"--entropy_target -1.0: an entropy in nats is >= 0"):
        parse_config(["--entropy_target", "-1"])
    with pytest.raises(ConfigError, match=r"--entropy_coef_delta -0.1"):
        parse_config(["--entropy_coef_delta", "-0.1"])
    defaults = parse_config([]).grpo  # TRL's defaults
    assert (defaults.entropy_coef, defaults.use_adaptive_entropy, defaults.entropy_target) == (0.0, False, 0.2)
    assert (defaults.entropy_coef_min, defaults.entropy_coef_max, defaults.entropy_coef_delta) == (0.0, 1.0, 0.005)
    assert not defaults.entropy_bonus_enabled


# --- two ranks give the one-process gradient (the bonus's step normaliser spans the ranks) ---

BONUS_CASES = [("token", 1.0), ("sequence", 0.4)]  # (aggregation, top_entropy_quantile)


def _bonus_gradients(problem, generation, rows, aggregation, quantile, micro, world_size, coef=0.5):
    """.grad of every trainable parameter after accumulate_step_gradients with the bonus and the
    ranks' average (tests/test_torchrun.py's problem: 10 tokens on rank 0, 23 on rank 1)."""
    from test_torchrun import _grpo_args

    from grpo.grpo_loop import accumulate_step_gradients
    from grpo.runtime.distributed import sync_gradients

    model = problem["model"]
    gargs = _grpo_args(aggregation, micro, quantile, entropy_coef=coef)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    model.train()
    sums = accumulate_step_gradients(
        model, generation, torch.arange(len(rows)), advantages=problem["advantages"][rows], loss_mask=problem["mask"][rows],
        old_logprobs=problem["old_logprobs"][rows], ref_logprobs=problem["ref_logprobs"][rows], gargs=gargs,
        reuse_images=False, world_size=world_size,
    )  # fmt: skip
    sync_gradients(trainable, world_size)
    return [p.grad.clone() for p in trainable], sums


def _bonus_rank_worker(rank: int, world_size: int, port: int, out_dir: str, problem: dict) -> None:
    import os

    from test_torchrun import _join_as_rank

    distributed = _join_as_rank(rank, world_size, port)
    try:
        rows = list(range(4 * rank, 4 * rank + 4))
        results = {}
        for aggregation, quantile in BONUS_CASES:
            synced, sums = _bonus_gradients(problem, problem["per_rank"][rank], rows, aggregation, quantile, 2, world_size)
            results[f"{aggregation}-{quantile}"] = {
                "synced": synced, "bonus_entropy": distributed.all_reduce_sum(sums.bonus_entropy),
                "bonus_tokens": distributed.all_reduce_sum(sums.bonus_tokens),
            }  # fmt: skip
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def test_two_gloo_ranks_give_the_single_process_bonus_gradient(tmp_path, monkeypatch, float64_hf, rendezvous_port):
    from test_torchrun import _build_problem, run_two_gloo_ranks
    from tolerances import TINY_PATH_TERMS, network_error

    problem = _build_problem()
    ranks = run_two_gloo_ranks(_bonus_rank_worker, problem, tmp_path, monkeypatch, rendezvous_port)
    for aggregation, quantile in BONUS_CASES:
        whole_rows = list(range(8))
        single, sums = _bonus_gradients(problem, problem["whole"], whole_rows, aggregation, quantile, 3, 1)
        without, _ = _bonus_gradients(problem, problem["whole"], whole_rows, aggregation, quantile, 3, 1, coef=0.0)
        scale = max(g.abs().max() for g in single)
        # The bonus moves the gradient (so the comparison below is about it too).
        assert max((a - b).abs().max() for a, b in zip(single, without, strict=True)) > 1e-2 * scale
        got = ranks[0][f"{aggregation}-{quantile}"]
        # The bonus's tokens: all 33 loss tokens, or the 13 highest-entropy ones (test_torchrun.py).
        assert got["bonus_tokens"] == sums.bonus_tokens == (33.0 if quantile == 1.0 else 13.0)
        atol = network_error(2 * TINY_PATH_TERMS, scale)  # as tests/test_torchrun.py: the backward doubles the path
        for rank in range(2):
            for expected, value in zip(single, ranks[rank][f"{aggregation}-{quantile}"]["synced"], strict=True):
                torch.testing.assert_close(value, expected, rtol=0, atol=atol)


def test_scoring_forward_returns_the_metric_entropy_with_a_gradient(float64_hf):
    """GenerationBatch.logprobs(entropy_grad=True), shared-prompt and naive paths: the same numbers
    as the detached metric, and a gradient that reaches the model's weights."""
    from test_torchrun import _build_problem
    from tolerances import TINY_PATH_TERMS, network_error

    problem = _build_problem()
    model, generation, mask = problem["model"], problem["whole"], problem["mask"]
    rows = torch.arange(8)
    for shared in (True, False):
        generation.shared_prompt = shared
        with torch.no_grad():
            _, metric = generation.logprobs(model, rows, reuse_rollout_images=False, return_entropy=True)  # [8, T]
        model.zero_grad(set_to_none=True)
        _, entropy = generation.logprobs(model, rows, reuse_rollout_images=False, return_entropy=True, entropy_grad=True)
        assert entropy.requires_grad and not metric.requires_grad
        # Two formulas for H on float64 logits (<= log V ~ 7): apart by the network's rounding at most.
        assert (entropy.detach() - metric).abs().max() <= network_error(TINY_PATH_TERMS, 10.0)
        (entropy * mask[:, : entropy.shape[1]]).sum().backward()
        assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().max() > 0
