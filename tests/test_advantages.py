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
    with pytest.raises(ValueError, match="inf"):
        group_advantages(torch.tensor([1.0, float("inf")]), group_size=2)


NAN = float("nan")


def test_unscored_completions_are_left_out_of_their_group():
    """NaN = unscored (every reward function returned None): out of the mean and std, A = 0."""
    rewards = torch.tensor([
        1.0, NAN, 0.0, 0.5,  # group 0: scored {1, 0, 0.5}
        NAN, NAN, 2.0, NAN,  # group 1: one scored completion, no spread
        NAN, NAN, NAN, NAN,  # group 2: nothing scored
    ])  # fmt: skip
    advantages, metrics = group_advantages(rewards, group_size=4)
    # group 0: mean (1 + 0 + 0.5) / 3 = 0.5; deviations +0.5, -0.5, 0;
    # unbiased std over the 3 scored = sqrt((0.25 + 0.25 + 0) / (3 - 1)) = 0.5 (not / (4 - 1));
    # A = +-0.5 / (0.5 + 1e-4) = +-0.99980004; the unscored row gets 0, not (0 - 0.5) / 0.5 = -1.
    expected = [0.99980004, 0.0, -0.99980004, 0.0] + [0.0] * 8
    torch.testing.assert_close(advantages, torch.tensor(expected), rtol=0, atol=5e-7)  # float32, ~4 roundings of values ~1: 4 * 2^-23
    assert metrics["frac_zero_std_groups"] == pytest.approx(2 / 3)  # groups 1 and 2; float32 count / 3: within an ulp; approx's rel 1e-6 is ~16 float32 ulps (also below)
    assert metrics["frac_unscored"] == pytest.approx(8 / 12)  # float32, as above
    assert metrics["reward_mean"] == pytest.approx(3.5 / 4)  # scored: 1, 0, 0.5, 2; float32, as above
    # batch scale: the std over the 4 scored rewards {1, 0, 0.5, 2}: mean 0.875,
    # squares 0.015625 + 0.765625 + 0.140625 + 1.265625 = 2.1875, / 3 -> std 0.8539126;
    # group 0's A = +-0.5 / (0.8539126 + 1e-4) = +-0.5854715
    batch, _ = group_advantages(rewards, group_size=4, scale="batch")
    torch.testing.assert_close(batch[:4], torch.tensor([0.5854715, 0.0, -0.5854715, 0.0]), rtol=0, atol=5e-7)
    assert batch[4:].abs().max() == 0.0


def test_unscored_rows_change_nothing_for_the_scored_ones():
    """A group with unscored rows gives its scored rows the advantages of a group of just those."""
    generator = torch.Generator().manual_seed(0)
    for scale in ("group", "none"):
        for _ in range(20):
            rewards = torch.rand(6, generator=generator)  # one group of G = 6
            is_scored = torch.rand(6, generator=generator) < 0.6
            if is_scored.sum() < 2:
                continue
            with_gaps, _ = group_advantages(torch.where(is_scored, rewards, NAN), 6, scale=scale)
            alone, _ = group_advantages(rewards[is_scored], int(is_scored.sum()), scale=scale)
            # float32 means/stds of <= 6 values in [0, 1]: a few ulp of 1, ~1e-6 after / std
            torch.testing.assert_close(with_gaps[is_scored], alone, rtol=1e-5, atol=1e-6)
            assert torch.all(with_gaps[~is_scored] == 0.0)
