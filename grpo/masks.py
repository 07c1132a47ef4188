"""The completion mask: which of the T slots of a completion the loss counts (through the first EOS).

The GRPO objective (DeepSeekMath, arXiv 2402.03300, eq. 3) averages over the tokens o_1 .. o_|o_i|
of each completion. A batch stores completions as an [R, T] tensor padded on the right, so the
mask says which of the T slots are real tokens:

    mask[r, t] = 1  if no EOS appears in completion_ids[r, :t]   (t is at or before the first EOS)
                 0  otherwise                                     (padding after the first EOS)

Choices of the mask:

1. The first EOS is inside the mask. Emitting EOS is an action the policy took ("stop here"),
   so it gets the completion's advantage like any other token; leave it out and the model is
   never rewarded for stopping.
2. The mask is built from the position of the first EOS, never from `ids != pad_id`: for Qwen
   the pad token can be the same id as an EOS token (`<|endoftext|>`), and then a != pad mask
   would drop the EOS and hide nothing else correctly either.
3. A completion with no EOS was cut at `max_completion_length`: all its T tokens count and it is
   flagged truncated. `mask_truncated` can zero such rows out of the loss (DAPO's overlong
   filtering, arXiv 2503.14476 sec. 3.4): a truncated answer is not wrong, only unfinished,
   and a reward that punishes it is noise.

Pure tensor functions; the loop's rounds call `completion_mask` once per generation batch
(grpo/grpo_loop.py, RolloutRounds; grpo/dynamic_sampling.py for a merged batch), the loop
`mask_truncated`.

Run the tests: `python -m pytest tests/test_masks.py -q`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def completion_mask(
    completion_ids: Tensor, eos_token_ids: int | Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Mask of the tokens up to and including the first EOS, and which rows have no EOS.

    Args:
        completion_ids: [R, T] sampled token ids, right padded after EOS (any padding id).
        eos_token_ids: one id or several (Qwen chat models stop on `<|im_end|>` and
            `<|endoftext|>`); the first occurrence of any of them ends a completion.

    Returns:
        mask: [R, T] float32, 1.0 on completion tokens (EOS included), 0.0 on padding.
        is_truncated: [R] bool, True for rows that contain no EOS at all.
    """
    if completion_ids.ndim != 2:
        raise ValueError(f"completion_ids must be [R, T], got shape {tuple(completion_ids.shape)}")
    if completion_ids.is_floating_point() or completion_ids.dtype == torch.bool:
        raise ValueError(f"completion_ids must hold integer token ids, got {completion_ids.dtype}")
    if isinstance(eos_token_ids, Tensor):
        eos_list = eos_token_ids.flatten().tolist()
    elif isinstance(eos_token_ids, int):
        eos_list = [eos_token_ids]
    else:
        eos_list = list(eos_token_ids)
    if not eos_list:
        raise ValueError("eos_token_ids is empty: give at least one end-of-sequence token id")

    eos_ids = torch.tensor(eos_list, dtype=completion_ids.dtype, device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos_ids)  # [R, T] bool
    eos_seen_before = is_eos.long().cumsum(dim=1) - is_eos.long()  # [R, T] EOS count in [0, t)
    mask = (eos_seen_before == 0).float()  # [R, T] 1 through the first EOS, 0 after
    is_truncated = ~is_eos.any(dim=1)  # [R] no EOS anywhere
    return mask, is_truncated


def mask_truncated(mask: Tensor, is_truncated: Tensor) -> Tensor:
    """Zero the rows of truncated completions, so they drop out of the loss (overlong filtering).

    Args:
        mask: [R, T] completion mask.
        is_truncated: [R] bool, from `completion_mask`.

    Returns:
        [R, T] the mask with the truncated rows set to 0.
    """
    if mask.ndim != 2 or tuple(is_truncated.shape) != (mask.shape[0],):
        raise ValueError(
            f"expected mask [R, T] and is_truncated [R], got mask {tuple(mask.shape)} and "
            f"is_truncated {tuple(is_truncated.shape)}"
        )
    keep = (~is_truncated.bool()).to(mask.dtype).unsqueeze(1)  # [R, 1]
    return mask * keep  # [R, T]
