"""Sampler / trainer mismatch: the logprob gap, and importance weights that correct for it.

The rollout's logprobs (`Rollout.sampler_logprobs`, log pi_sampler) come from the sampler's decode
loop; the loss's come from a separate training forward (log pi_old, log pi_theta). In exact
arithmetic they are the same numbers. On CUDA they are not: the sampler decodes in bf16 from a
CUDA graph with other kernels, so the tokens were drawn from a slightly different distribution
than the one the loss assumes. Two things follow (Yao et al., "Your efficient RL framework secretly
brings you off-policy RL training", 2025; TRL's `vllm_importance_sampling_*`, verl's rollout
correction):

1. Measure it: |log pi_trainer - log pi_sampler| per completion token, mean and max
   (`sampler_logprob_gap`). On CPU in float32 the two agree to ~1e-6.
2. Correct for it: multiply the policy-gradient term of each token by the importance weight
   w = pi_old / pi_sampler (the trainer's old policy over the sampler's), bounded by a cap C,
   so the expectation is over the distribution the trainer believes in (`importance_weights`):
   - "token_truncate" (TIS): w_it = min(pi_old(o_it) / pi_sampler(o_it), C);
   - "token_mask" (MIS, token level): w_it = ratio, or 0 where ratio > C (the token is dropped);
   - "sequence_truncate": one weight per completion, min(prod_t ratio_it, C);
   - "sequence_mask" (MIS, sequence level): prod_t ratio_it, or 0 for the whole completion
     where it exceeds C.
   The sequence ratio is the product of the token ratios (the likelihood ratio of the whole
   completion), not GSPO's length-normalised mean. The weights carry no gradient; a dropped token
   still counts in the loss normaliser (as in TRL). The KL term is not weighted (as in TRL).

An optional lower bound C_min (TRL's `vllm_importance_sampling_clip_min`, off by default there
too): the truncate modes raise a weight below C_min to C_min, the mask modes drop it (weight 0),
so a token or completion the sampler found much likelier than the trainer does not vanish from,
or is left out of, the update. Pure: tensors in, tensors and floats out.

Run the tests: `python -m pytest tests/test_loss.py tests/test_sampler_correction.py -q`.
"""

from __future__ import annotations

import torch
from torch import Tensor

SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_logprob_gap(
    trainer_logprobs: Tensor, sampler_logprobs: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Sum and max of |log pi_trainer - log pi_sampler| over completion tokens, no gradient.

    Args: [R, T] each; padding (mask 0) is left out. Returns two 0-d tensors (sum, max; 0 when
    the mask is empty), so the caller can add sums and take maxima over micro-batches and ranks.
    """
    is_completion = completion_mask > 0  # [R, T]
    gap = torch.where(is_completion, (trainer_logprobs.detach() - sampler_logprobs).abs(), 0.0)  # [R, T]
    return gap.sum(), gap.max() if gap.numel() else gap.new_zeros(())


def importance_weights(
    old_logprobs: Tensor, sampler_logprobs: Tensor, completion_mask: Tensor, mode: str, cap: float,
    floor: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The sampler-correction weight of every token, detached, and where the cap was hit.

    Args:
        old_logprobs: [R, T] log pi_old from the trainer (no gradient is taken through it).
        sampler_logprobs: [R, T] log pi_sampler recorded by the rollout.
        completion_mask: [R, T] 1.0 on completion tokens.
        mode: one of SAMPLER_CORRECTIONS other than "none" (module docstring).
        cap: C > 0.
        floor: C_min in [0, C), or None for no lower bound.

    Returns:
        weights: [R, T] (token modes) or [R, 1] (sequence modes), broadcastable onto [R, T].
        over_cap: bool tensor of the same shape, True where the ratio is outside [C_min, C]
            (truncated or dropped).
    """
    if mode not in SAMPLER_CORRECTIONS or mode == "none":
        raise ValueError(f"unknown sampler correction {mode!r}; valid: {', '.join(SAMPLER_CORRECTIONS[1:])}")
    if not cap > 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    if floor is not None and not 0 <= floor < cap:
        raise ValueError(f"the importance-weight floor must be in [0, cap = {cap}), got {floor}")
    is_completion = completion_mask > 0  # [R, T]
    # Guard: padding holds log-probs of tokens never drawn (the sampler records 0 there); a
    # log-ratio of 0 keeps it out of the sequence product and exp() finite.
    log_ratio = torch.where(is_completion, old_logprobs.detach() - sampler_logprobs, 0.0)  # [R, T]
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(dim=1, keepdim=True)  # [R, 1] log of the product over tokens
    # exp() may overflow to inf for a sequence far off; inf > C is truncated to C or dropped, so
    # no inf reaches the loss.
    ratio = torch.exp(log_ratio)  # [R, T] or [R, 1]
    over_cap = ratio > cap  # [R, T] or [R, 1]
    if floor is not None:
        over_cap = over_cap | (ratio < floor)  # [R, T] or [R, 1] outside [C_min, C]
    if mode.endswith("truncate"):
        weights = ratio.clamp(min=floor, max=cap)  # [R, T] or [R, 1]
    else:
        weights = torch.where(over_cap, 0.0, ratio)  # [R, T] or [R, 1]
    return weights, over_cap
