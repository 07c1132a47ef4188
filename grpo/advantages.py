"""Group-relative advantages: how much better each completion did than its siblings.

GRPO drops PPO's value network. For a prompt q it samples a group of G completions, scores them
r_1 .. r_G, and uses the group as its own baseline (DeepSeekMath, arXiv 2402.03300, sec. 4.1.2,
"outcome supervision"):

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)

Every token of completion i gets the same A_i. Choices where papers and code differ:

1. std is the *unbiased* sample std (divide by G - 1), as `torch.std` and the blog post's code compute
   it; the paper does not say. With G = 2 and rewards {1, 0} that gives A = +-0.707, not +-1.
   It needs G >= 2.
2. eps = 1e-4 (the blog post's value) keeps the division finite when the std is tiny.
3. A group whose rewards are all exactly equal carries no signal: all its advantages are set to
   exactly 0 (not (r - mean) / eps, which floating-point rounding of the mean can make
   nonzero), and it is counted in `frac_zero_std_groups` (DAPO's dynamic sampling,
   arXiv 2503.14476 sec. 3.2, exists because this fraction grows as training goes on).
4. `scale` chooses the denominator:
   - "group": the group's std (GRPO, the default);
   - "batch": the std of every reward of the generation batch, one number for the batch (TRL's
     `scale_rewards="batch"`). Under torchrun that is every rank's rewards: this module never
     communicates, so the loop gathers them and passes their std in as `batch_std` (without
     it, the std of the rewards passed in). Prompts that are easy or hard for everyone then
     weigh less than in "group";
   - "none": no division, only the group mean is subtracted (Dr. GRPO, arXiv 2503.20783
     sec. 3.1, which argues that the std division over-weights groups with little spread).
5. Unscored completions (reward NaN: every reward function returned None for it, e.g. an answer
   math-verify cannot parse) are left out of their group's statistics, as TRL does: the group
   mean and the unbiased std are over the n scored completions only (std divides by n - 1), the
   batch std over every scored reward; an unscored completion gets A = 0 exactly, and a group
   with fewer than 2 scored completions counts as zero-spread (all its A = 0). With every
   completion scored this is point 1-4 unchanged, bit for bit. This is a separate, earlier step
   (`fill_unscored`), so the z-score itself stays the one textbook line in `group_advantages`.

Run the tests: `python -m pytest tests/test_advantages.py -q`.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

ADVANTAGE_SCALES = ("group", "batch", "none")


def zero_spread_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[B] bool: groups that carry no signal, i.e. whose scored rewards all agree.

    rewards: [B*G], NaN = unscored. A group with fewer than 2 scored completions has no spread
    either. These are the groups `group_advantages` gives A = 0 and dynamic sampling drops.
    """
    grouped = rearrange(rewards.detach().float(), "(b g) -> b g", g=group_size)  # [B, G]: a group's G adjacent
    is_scored = ~torch.isnan(grouped)  # [B, G]
    highest = torch.where(is_scored, grouped, -math.inf).amax(dim=1)  # [B]
    lowest = torch.where(is_scored, grouped, math.inf).amin(dim=1)  # [B]
    return (highest == lowest) | (is_scored.sum(dim=1) < 2)  # [B]


def fill_unscored(grouped: Tensor) -> tuple[Tensor, Tensor]:
    """Each unscored reward (NaN) replaced by its group's mean of scored rewards (point 5).

    grouped: [B, G] rewards. Returns r [B, G] and is_scored [B, G] bool. A filled-in reward adds 0 to
    every deviation from the group mean, so the group's mean is that of its scored rewards, and its
    sum of squares too (the caller rescales the std from G - 1 to n - 1). With every reward scored,
    r is `grouped` itself. A group with no scored reward is filled with 0 (0 / max(n, 1)).
    """
    is_scored = ~torch.isnan(grouped)  # [B, G]
    num_scored = is_scored.sum(dim=1, keepdim=True)  # [B, 1]
    scored_mean = torch.where(is_scored, grouped, 0.0).sum(dim=1, keepdim=True) / num_scored.clamp(min=1)  # [B, 1]
    return torch.where(is_scored, grouped, scored_mean), is_scored  # [B, G], [B, G]


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    batch_std: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Advantages of B*G completions stored group by group (the G completions of a prompt adjacent).

    Args:
        rewards: [B*G] total reward of each completion; rows [g*G, (g+1)*G) are one prompt's group.
            NaN marks an unscored completion (point 5 of the module docstring).
        group_size: G, the completions per prompt (`num_generations`).
        scale: "group", "batch" or "none" (see the module docstring).
        eps: added to the std before dividing.
        batch_std: for scale="batch", the unbiased std of the whole generation batch's rewards
            (every rank's); None means the std of `rewards`, right in a single process.

    Returns:
        advantages: [B*G] float32.
        metrics: "frac_zero_std_groups", "advantage_mean", "advantage_std", "reward_mean",
            "reward_std" (over the scored rewards of the whole batch, unbiased), "frac_unscored"
            (completions with reward NaN), as python floats.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(
            f"group_size (num_generations) must be >= 2, got {group_size}: the advantage "
            "compares each completion with the other completions of its prompt, and the "
            "unbiased std needs at least 2 samples"
        )
    if rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a positive multiple of group_size "
            f"(num_generations) = {group_size}"
        )
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(ADVANTAGE_SCALES)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if batch_std is not None and not (math.isfinite(batch_std) and batch_std >= 0):
        raise ValueError(f"batch_std must be a finite std >= 0, got {batch_std}")
    rewards = rewards.detach().float()  # [B*G]
    num_infinite = int(torch.isinf(rewards).sum())
    if num_infinite:
        raise ValueError(f"rewards contain {num_infinite} inf values; fix the reward function")

    grouped = rearrange(rewards, "(b g) -> b g", g=group_size)  # [B, G]: a prompt's G completions adjacent
    r, is_scored = fill_unscored(grouped)  # [B, G], [B, G] unscored rewards out of the statistics first
    is_zero_spread = zero_spread_groups(rewards, group_size)[:, None]  # [B, 1]

    mean = r.mean(dim=1, keepdim=True)  # [B, 1]
    if scale == "group":
        # std over G values of which G - n are the mean: sum of squares / (G - 1); the factor makes
        # it / (n - 1), the unbiased std of the n scored rewards (exactly 1.0 when n = G).
        num_scored = is_scored.sum(dim=1, keepdim=True)  # [B, 1]
        to_scored = ((group_size - 1) / (num_scored - 1).clamp(min=1)).sqrt()  # [B, 1]
        std = r.std(dim=1, keepdim=True) * to_scored  # [B, 1] unbiased, over the scored rewards
    elif scale == "batch":
        # The std over every rank's scored rewards when the loop passes it in (unscored = NaN left out).
        scored = rewards[~torch.isnan(rewards)]  # [scored rows]
        batch = scored.std() if batch_std is None else torch.tensor(float(batch_std))  # [] unbiased
        std = batch.expand(grouped.shape[0], 1)  # [B, 1]
    else:  # "none" (Dr. GRPO): no division; x / (1 + 0) is x exactly
        std, eps = torch.ones_like(mean), 0.0  # [B, 1]
    A = (r - mean) / (std + eps)  # [B, G]

    # Zero-spread groups and unscored completions get exactly 0. torch.where also hides the
    # 0/0 = NaN a zero-spread group would give with eps = 0 (its deviation is ~0 and so is its std).
    advantages = rearrange(torch.where(is_zero_spread | ~is_scored, 0.0, A), "b g -> (b g)")  # [B*G]

    return advantages, advantage_metrics(rewards, advantages, group_size)


def advantage_metrics(rewards: Tensor, advantages: Tensor, group_size: int) -> dict[str, float]:
    """What group_advantages reports, for any batch of whole groups: one rank's, or every rank's
    gathered (the training loop logs these over the whole job, computed here and nowhere else).

    rewards [R] (NaN = unscored), advantages [R], R a multiple of group_size. Returns
    "frac_zero_std_groups", "advantage_mean", "advantage_std", "reward_mean", "reward_std" (over
    the scored rewards, unbiased), "frac_unscored", as python floats.
    """
    rewards, advantages = rewards.detach().float(), advantages.detach().float()  # [R], [R]
    scored = rewards[~torch.isnan(rewards)]  # [scored rows]; empty only when nothing is scored
    metrics = {
        "frac_zero_std_groups": zero_spread_groups(rewards, group_size).float().mean(),
        "advantage_mean": advantages.mean(),
        "advantage_std": advantages.std() if advantages.numel() > 1 else advantages.new_zeros(()),
        "reward_mean": scored.mean() if scored.numel() else rewards.new_zeros(()),
        "reward_std": scored.std() if scored.numel() > 1 else rewards.new_zeros(()),
        "frac_unscored": torch.isnan(rewards).float().mean(),
    }
    values = torch.stack(list(metrics.values())).tolist()  # one device sync for all six
    return dict(zip(metrics.keys(), values, strict=True))
