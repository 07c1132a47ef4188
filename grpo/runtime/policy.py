"""The policy a run trains: loading it (and its frozen reference), freezing, LoRA state, FSDP views.

- build_policy: the starting point (grpo/runtime/starting_point.py; or a checkpoint to resume), the reference copied before any
  LoRA adapter exists, the freezing policy (models/freeze.py);
- adapter_state / restore_adapters: the LoRA tensors a checkpoint's trainer state keeps;
- shard_policy, model_for_saving, optimizer_for_checkpoint: with --fsdp, the sharded policy and
  the full-state views a checkpoint is written from (grpo/runtime/fsdp.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo.config import Config, ConfigError, ModelArguments
from grpo.runtime.checkpoint import damaged_checkpoint_error
from grpo.runtime.distributed import is_main
from grpo.runtime.fsdp import FullModel, FullStateOptimizer, shard_model
from grpo.runtime.starting_point import (
    check_fingerprint,
    describe_starting_point,
    recorded_starting_point,
    starting_point_for_resume,
)
from models.freeze import apply_freeze_policy, describe_trainable, enable_gradient_checkpointing
from models.loading import load_policy, make_reference, resolve_dtype, special_token_ids
from models.lora import merge_lora


@dataclass
class Policy:
    model: torch.nn.Module
    processor: object
    tokens: object  # models.loading.SpecialTokens
    reference: torch.nn.Module | None
    vision_trainable: bool
    uses_lora: bool
    fsdp: bool = False  # set by shard_policy: weights are DTensor shards (grpo/runtime/fsdp.py)
    starting_point: dict | None = None  # which model the run started from (grpo/runtime/starting_point.py)


def build_policy(
    config: Config, device: torch.device, *, with_reference: bool, resume_dir: Path | None = None
) -> Policy:
    """Load the policy, make the frozen reference (before any adapter is added), apply freezing.

    resume_dir: a checkpoint to continue. Its model/ weights become the policy's; the reference
    stays the stage's starting point, the one the checkpoint recorded (grpo/runtime/starting_point.py),
    whatever --init_from says now. With LoRA the checkpoint's model/ holds merged weights, so the
    base comes from the starting point and the caller restores the adapters from the trainer state.
    """
    args: ModelArguments = config.model
    if resume_dir is None:
        starting_point = describe_starting_point(args.init_from, args.model)
    else:
        starting_point = starting_point_for_resume(recorded_starting_point(resume_dir), args.init_from, args.model)
    source = starting_point["path"]

    def load(path):
        return load_policy(
            path,
            dtype=resolve_dtype(args.dtype, device),
            # --fsdp: stay on the CPU; fully_shard moves one unit at a time to the device.
            device=torch.device("cpu") if config.train.fsdp else device,
            attn_implementation=args.attn_implementation,
            max_pixels=args.max_pixels,
            min_pixels=args.min_pixels,
            seed=config.train.seed,
        )

    resume_weights = resume_dir is not None and args.freeze_policy != "lora"
    try:
        model, processor = load(str(Path(resume_dir) / "model") if resume_weights else source)
    except Exception as error:
        if not resume_weights:
            raise
        raise damaged_checkpoint_error(resume_dir, Path(resume_dir) / "model", error) from error
    tokens = special_token_ids(model, processor)
    if not resume_weights:  # the model holds the starting point's weights: fingerprint (or check) them
        starting_point = check_fingerprint(starting_point, model)
    # The reference is the starting point of this stage, copied before LoRA adapters exist.
    reference = None
    if with_reference:
        start_model = model
        if resume_weights:
            start_model = load(source)[0]
            starting_point = check_fingerprint(starting_point, start_model)
        reference = make_reference(start_model)
    try:
        apply_freeze_policy(
            model,
            args.freeze_policy,
            num_trainable_layers=args.num_trainable_layers,
            lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
        )
    except ValueError as error:  # a flag the model's shape refuses (e.g. more trainable layers than it has)
        raise ConfigError(str(error)) from None
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    vision_trainable = any(p.requires_grad for p in model.model.visual.parameters())
    if is_main():  # rank 0 prints for the job (README: logs come from rank 0 only)
        print(f"[model] {source if not resume_weights else resume_dir}: {describe_trainable(model)}", flush=True)
    return Policy(
        model, processor, tokens, reference, vision_trainable, args.freeze_policy == "lora", starting_point=starting_point
    )


def adapter_state(policy: Policy) -> dict:
    """LoRA adapter tensors (what a LoRA checkpoint's trainer state keeps for an exact resume)."""
    if not policy.uses_lora:
        return {}
    return {name: tensor.detach().cpu() for name, tensor in policy.model.state_dict().items() if "lora_" in name}


def restore_adapters(policy: Policy, adapters: dict) -> None:
    if not adapters:
        return
    missing, unexpected = policy.model.load_state_dict(adapters, strict=False)
    if unexpected:
        raise ValueError(f"the checkpoint's LoRA adapters do not fit this model: {unexpected[:3]}; check --lora_targets/--lora_r")


def shard_policy(policy: Policy, device: torch.device) -> None:
    """--fsdp: shard the policy and the reference over the ranks, in place of broadcast_parameters
    (before the optimizer is built: the optimizer must see the sharded parameters)."""
    shard_model(policy.model, device)
    if policy.reference is not None:  # as large as the policy; never runs backward
        shard_model(policy.reference, device, reshard_root_after_forward=True)
    policy.fsdp = True


def model_for_saving(policy: Policy) -> torch.nn.Module:
    """The module whose save_pretrained output is the checkpoint: LoRA is merged into a copy.

    Under --fsdp the full weights are gathered to rank 0 first: every rank must call this.
    """
    if policy.fsdp:
        return FullModel(policy.model)
    if not policy.uses_lora:
        return policy.model

    return merge_lora(copy.deepcopy(policy.model))


def optimizer_for_checkpoint(policy: Policy, optimizer: torch.optim.Optimizer, *, gather: bool = False):
    """The optimizer as save_checkpoint / load_trainer_state see it.

    Under --fsdp: a view whose state_dict holds full tensors (the replicated layout); gather=True,
    for saving, collects them now and must run on every rank.
    """
    if not policy.fsdp:
        return optimizer

    view = FullStateOptimizer(optimizer)
    return view.gather() if gather else view
