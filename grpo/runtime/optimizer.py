"""AdamW and the learning-rate schedule (linear warm-up, then constant or cosine decay to 0)."""

from __future__ import annotations

import math

import torch

from grpo.config import TrainArguments


def build_optimizer(model: torch.nn.Module, args: TrainArguments) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter is trainable; check --freeze_policy")
    # Weight decay on matrices only; norms and biases are not decayed (the usual AdamW practice).
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CUDA and CPU, plain tensors and FSDP's DTensor shards alike) updates every
    # parameter in one pass and needs no temporary copies of the moments (CUDA's default foreach
    # path holds about one extra copy of them during the step); on CPU it is several times faster
    # than the default loop (docs/benchmarks.md, section 4). TRL's Trainer uses it too.
    fused = all(p.device.type in ("cuda", "cpu") for p in trainable)
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=True if fused else None,
    )


def lr_multiplier(step: int, args: TrainArguments) -> float:
    """Linear warm-up to the peak, then constant or cosine decay to 0 at max_steps."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.lr_scheduler == "constant":
        return 1.0
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArguments) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, args))
