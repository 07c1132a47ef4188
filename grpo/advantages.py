"""Group-relative advantages: how much better each completion did than its siblings.

GRPO drops PPO's value network. For a prompt q it samples a group of G completions, scores them
r_1 .. r_G, and uses the group as its own baseline (DeepSeekMath, arXiv 2402.03300, sec. 4.1.2,
"outcome supervision"):

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)

Every token of completion i gets the same A_i. Choices where papers and code differ:

1. std is the *unbiased* sample std (divide by G - 1), as `torch.std` and the seed code compute
   it; the paper does not say. With G = 2 and rewards {1, 0} that gives A = +-0.707, not +-1.
   It needs G >= 2.
2. eps = 1e-4 (the seed's value) keeps the division finite when the std is tiny.
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

Run the tests: `python -m pytest tests/test_advantages.py -q`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ADVANTAGE_SCALES = ("group", "batch", "none")


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
        group_size: G, the completions per prompt (`num_generations`).
        scale: "group", "batch" or "none" (see the module docstring).
        eps: added to the std before dividing.
        batch_std: for scale="batch", the unbiased std of the whole generation batch's rewards
            (every rank's); None means the std of `rewards`, right in a single process.

    Returns:
        advantages: [B*G] float32.
        metrics: "frac_zero_std_groups", "advantage_mean", "advantage_std", "reward_mean",
            "reward_std" (std over the whole batch, unbiased), as python floats.
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
    num_non_finite = int((~torch.isfinite(rewards)).sum())
    if num_non_finite:
        raise ValueError(
            f"rewards contain {num_non_finite} NaN or inf values; fix the reward function"
        )

    grouped = rewards.view(-1, group_size)  # [B, G]
    group_mean = grouped.mean(dim=1, keepdim=True)  # [B, 1]
    deviation = grouped - group_mean  # [B, G]
    is_zero_spread = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [B, 1]

    if scale == "group":
        denominator = grouped.std(dim=1, keepdim=True) + eps  # [B, 1] unbiased std
    elif scale == "batch":
        std = rewards.std() if batch_std is None else torch.tensor(float(batch_std))  # [] unbiased
        denominator = std.expand(grouped.shape[0], 1) + eps  # [B, 1]
    else:  # "none"
        denominator = torch.ones_like(group_mean)  # [B, 1]

    # Zero-spread groups get exactly 0. torch.where also hides the 0/0 = NaN a zero-spread group
    # would give with eps = 0 (its deviation is ~0 and so is its std).
    advantages = torch.where(
        is_zero_spread, torch.zeros_like(deviation), deviation / denominator
    ).view(-1)  # [B*G]

    metrics = {
        "frac_zero_std_groups": is_zero_spread.float().mean(),
        "advantage_mean": advantages.mean(),
        "advantage_std": advantages.std(),
        "reward_mean": rewards.mean(),
        "reward_std": rewards.std(),
    }
    values = torch.stack(list(metrics.values())).tolist()  # one device sync for all five
    return advantages, dict(zip(metrics.keys(), values, strict=True))
