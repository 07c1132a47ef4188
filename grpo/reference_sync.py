"""The reference that follows the policy: TR-DPO's soft update (Gorbatovski et al., arXiv 2404.09656, eq. 5).

GRPO's KL term pulls the policy toward a reference pi_ref, by default the stage's frozen starting
point. With --sync_ref_model (TRL's name) the reference moves toward the policy every tau
optimizer steps (--ref_model_sync_steps), by the fraction alpha (--ref_model_mixup_alpha):

    theta_ref <- alpha * theta + (1 - alpha) * theta_ref        after optimizer step k, when k % tau == 0

alpha = 1 is the paper's hard update (the reference becomes the policy); TRL's defaults are
alpha = 0.6, tau = 512. The KL then measures how far the policy went since the last updates, not
since the start, so a long run can leave its starting point while each step stays a trust region.

This file is the arithmetic on one tensor pair; grpo/runtime/reference_sync.py finds the pairs
(plain, LoRA and FSDP-sharded policies), and the checkpoint keeps the moved reference.

Departures from TRL 1.16, and why:
    1. The mix is computed in at least float32 and rounded once into the reference's dtype; TRL
       mixes in place in the weights' dtype (in bfloat16 a mix of alpha = 0.6 would round twice).
    2. Only the weights the policy trains are mixed (under LoRA: the merged W + (alpha/r) B A of each
       adapted projection). Every other weight is equal in the two models (the reference is a copy
       of the starting point, and frozen weights never move), so mixing it changes nothing but
       rounding. TRL mixes every parameter, and refuses a PEFT policy.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_sync_step(step: int, every: int) -> bool:
    """Whether optimizer step `step` (1-based, counted after it is taken) moves the reference."""
    return step % every == 0


@torch.no_grad()
def mix_toward(reference: Tensor, policy: Tensor, alpha: float) -> None:
    """reference <- alpha * policy + (1 - alpha) * reference, in place (same shape; any float dtype)."""
    dtype = torch.promote_types(reference.dtype, torch.float32)  # one rounding into the reference's dtype
    mixed = alpha * policy.to(dtype) + (1.0 - alpha) * reference.to(dtype)  # same shape as the weight
    reference.copy_(mixed)
