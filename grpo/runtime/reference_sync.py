"""--sync_ref_model in a run: which reference weights move, the move itself, and its checkpoint.

The formula is grpo/reference_sync.py's; this file pairs each weight the policy trains with the
reference's weight of the same name:

    plain policy    the trainable parameters, by name (the reference is a copy of the same model)
    LoRA            each adapted projection's merged W + (alpha / r) B A (models/lora.py) against
                    the reference's plain W, plus any other trainable parameter by name
    --fsdp          the same names; both models are sharded alike (grpo/runtime/fsdp.py), so each
                    rank mixes its own slices and no communication is needed

The moved reference is run state: a checkpoint keeps those weights (full tensors, gathered under
--fsdp) in its trainer state, and a resume puts them back over the starting point it rebuilt, so a
resumed run's KL is the uninterrupted run's (tests/test_resume.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from grpo.reference_sync import mix_toward
from grpo.runtime.fsdp import _shard_like
from grpo.runtime.policy import Policy
from models.lora import LoRALinear


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an FSDP DTensor (sharing its storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def trained_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """name in the reference -> the policy's current value of that weight, for each weight it trains."""
    weights = {}
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    for name in adapted:
        weights[f"{name}.weight"] = model.get_submodule(name).merged_weight().detach()  # [out, in]
    for name, param in model.named_parameters():
        if param.requires_grad and not any(name.startswith(f"{module}.") for module in adapted):
            weights[name] = param.detach()
    return weights


@torch.no_grad()
def sync_reference(policy: Policy, alpha: float) -> int:
    """Move the reference toward the policy (grpo/reference_sync.py); returns how many tensors moved."""
    reference = dict(policy.reference.named_parameters())
    moved = trained_weights(policy.model)
    for name, value in moved.items():
        mix_toward(_local(reference[name]), _local(value), alpha)
    return len(moved)


def reference_state(policy: Policy) -> dict[str, torch.Tensor]:
    """The moved reference weights as full CPU tensors, for the checkpoint's trainer state.

    Under --fsdp each weight is all-gathered: every rank must call this (rank 0 keeps the result)."""
    reference = dict(policy.reference.named_parameters())
    state = {}
    for name in trained_weights(policy.model):
        weight = reference[name]
        full = weight.full_tensor() if isinstance(weight, DTensor) else weight  # collective under --fsdp
        state[name] = full.detach().cpu().clone()
    return state


@torch.no_grad()
def restore_reference(policy: Policy, state: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's moved reference weights back (each rank takes its own slice under --fsdp)."""
    reference = dict(policy.reference.named_parameters())
    unknown = sorted(set(state) - set(reference))
    if unknown:
        raise ValueError(
            f"the checkpoint's synced reference does not fit this model (no weight {unknown[0]!r}); "
            "resume with the --model / --freeze_policy / --lora_targets the run started with"
        )
    for name, full in state.items():
        weight = reference[name]
        if isinstance(weight, DTensor):
            weight.to_local().copy_(_shard_like(full, weight).to_local())
        else:
            weight.copy_(full.to(weight.device))
