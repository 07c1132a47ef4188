"""Tests for grpo/advantages.py: group z-scores with the unbiased std, worked by hand."""

from __future__ import annotations

import pytest
import torch

from grpo.advantages import group_advantages


def test_group_of_four():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])  # one prompt, G = 4
    # mean = 0.5; deviations = [+0.5, -0.5, -0.5, +0.5]
    # unbiased variance = (4 * 0.25) / (4 - 1) = 1/3; std = 0.5773503; + eps 1e-4 = 0.5774503
    # A = +-0.5 / 0.5774503 = +-0.8658757
    advantages, metrics = group_advantages(rewards, group_size=4)
    expected = torch.tensor([0.8658757, -0.8658757, -0.8658757, 0.8658757])
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6
    assert advantages.dtype == torch.float32
    assert metrics["frac_zero_std_groups"] == 0.0
    assert metrics["reward_mean"] == pytest.approx(0.5)  # approx: rel 1e-6 (~16 float32 ulps) on a float32 mean of 4 exact numbers
    assert metrics["reward_std"] == pytest.approx(0.5773503)  # approx: rel 1e-6 = ~16 float32 ulps; a float32 std of 4 numbers is good to a few
    assert metrics["advantage_mean"] == pytest.approx(0.0, abs=1e-7)  # mean of +-0.8658757: float32 cancellation leaves a few ulps of 0.87, ~1e-7


def test_group_of_two_uses_the_unbiased_std():
    rewards = torch.tensor([1.0, 0.0])  # G = 2
    # mean = 0.5; unbiased std = sqrt((0.25 + 0.25) / (2 - 1)) = 0.7071068 (the biased one is 0.5)
    # A = +-0.5 / (0.7071068 + 0.0001) = +-0.5 / 0.7072068 = +-0.7070068   (not +-1)
    advantages, _ = group_advantages(rewards, group_size=2)
    torch.testing.assert_close(advantages, torch.tensor([0.7070068, -0.7070068]), atol=1e-6, rtol=0)  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6


def test_zero_spread_group_is_exactly_zero_and_counted():
    # Group 1: [0.9, 0.9, 0.9]. In float32, mean(0.9, 0.9, 0.9) - 0.9 = 6e-8, and 6e-8 / (std + eps)
    # would give advantages of 6e-4: noise. They must come out exactly 0.
    # Group 2: [1, 0, 0]: mean 1/3, unbiased std = sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3) = 0.5773503
    #   A = [2/3, -1/3, -1/3] / 0.5774503 = [1.1545010, -0.5772505, -0.5772505]
    rewards = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 0.0])
    advantages, metrics = group_advantages(rewards, group_size=3)
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0]  # exact: torch.where writes 0, on every kernel path
    torch.testing.assert_close(
        advantages[3:], torch.tensor([1.1545010, -0.5772505, -0.5772505]), atol=1e-6, rtol=0  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6
    )
    assert metrics["frac_zero_std_groups"] == 0.5  # 1 of 2 groups


def test_batch_scale():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    # Numerators are still group-relative: group 1 -> [+0.5, -0.5, -0.5, +0.5]; group 2 -> 0.
    # Denominator is the batch's std: batch mean = 6/8 = 0.75,
    #   squared deviations: six 1s -> 6 * 0.0625 = 0.375; two 0s -> 2 * 0.5625 = 1.125; sum 1.5
    #   unbiased variance = 1.5 / 7 = 0.2142857; std = 0.4629100; + eps = 0.4630100
    #   A = +-0.5 / 0.4630100 = +-1.0798903
    advantages, metrics = group_advantages(rewards, group_size=4, scale="batch")
    a = 1.0798903
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)  # float32, O(1) values, ~10 roundings of <= 2^-24 each + 5e-8 from the 7-digit hand value: < 1e-6
    assert metrics["frac_zero_std_groups"] == 0.5


def test_batch_scale_divides_by_the_std_passed_in():
    # Under torchrun the loop passes the std of every rank's rewards (tests/test_torchrun.py).
    # Rewards of the whole batch [0,1,0,1, 5,7,5,7]: mean 26/8 = 3.25, squared deviations
    #   2 * (3.25^2 + 2.25^2 + 1.75^2 + 3.75^2) = 2 * 32.75 = 65.5; / 7 = 9.3571429; std = 3.0589447
    # This rank holds only [0,1,0,1]: A = +-0.5 / (3.0589447 + 0.0001) = +-0.1634497
    # (its own std, 0.5773503, would give +-0.8658757).
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0])
    advantages, _ = group_advantages(rewards, group_size=4, scale="batch", batch_std=3.0589447)
    a = 0.1634497
    # float32 z-score of O(1) numbers: a few ulps, ~4 * 2^-24 ~ 2.4e-7; 1e-6 leaves room.
    torch.testing.assert_close(advantages, torch.tensor([-a, a, -a, a]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="batch_std"):
        group_advantages(rewards, group_size=4, scale="batch", batch_std=float("nan"))


def test_none_scale_only_subtracts_the_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0])  # groups of 2: [1,0] [0,1] [3,1]
    # means 0.5, 0.5, 2.0 -> A = [0.5, -0.5, -0.5, 0.5, 1.0, -1.0]   (Dr. GRPO: no std division)
    advantages, _ = group_advantages(rewards, group_size=2, scale="none")
    assert advantages.tolist() == [0.5, -0.5, -0.5, 0.5, 1.0, -1.0]  # exact: differences of small binary fractions are exact in float32


def test_integer_rewards_and_layout_is_group_by_group():
    rewards = torch.tensor([2, 0, 5, 5])  # int64; groups [2, 0] and [5, 5]
    advantages, metrics = group_advantages(rewards, group_size=2, scale="none")
    assert advantages.dtype == torch.float32
    assert advantages.tolist() == [1.0, -1.0, 0.0, 0.0]  # exact: integer-valued float32 arithmetic
    assert metrics["frac_zero_std_groups"] == 0.5


def test_errors():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.tensor([1.0, 0.0]), group_size=1)
    with pytest.raises(ValueError, match="not a positive multiple"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), group_size=2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.ones(2, 2), group_size=2)
    with pytest.raises(ValueError, match="valid: group, batch, none"):
        group_advantages(torch.ones(4), group_size=2, scale="rank")
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([1.0, float("nan")]), group_size=2)
