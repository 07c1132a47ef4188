"""AdamW and the learning-rate schedule (linear warm-up, then constant or cosine decay to 0).

A resumed run with a longer --max_steps than the run it continues (the demo's continued SFT) does
not rebuild the cosine over the new length at the restored step: that would raise the lr at the
resume point (a cosine stretched to twice the length is back near its peak at the old end). It
continues from the lr the first run had reached and decays that to 0 over the remaining steps
(extended_lr_multiplier).
"""

from __future__ import annotations

import math
from dataclasses import replace

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


def extended_lr_multiplier(step: int, args: TrainArguments, resume_step: int, first_args: TrainArguments) -> float:
    """The schedule of a run resumed at `resume_step` with a longer --max_steps than `first_args`'s.

    m0 = lr_multiplier(resume_step, first_args), where the first run left it; then
    m0 * 0.5 * (1 + cos(pi * (step - resume_step) / (max_steps - resume_step))) for a cosine, m0 for
    a constant schedule. It never exceeds m0, so the resume never raises the lr.
    """
    m0 = lr_multiplier(resume_step, first_args)
    if step <= resume_step or args.lr_scheduler == "constant":
        return lr_multiplier(step, first_args) if step < resume_step else m0
    progress = (step - resume_step) / max(1, args.max_steps - resume_step)
    return m0 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def extend_schedule(scheduler, optimizer, args: TrainArguments, resume_step: int, first_args: TrainArguments) -> None:
    """Rebind a restored LambdaLR to extended_lr_multiplier and set the optimizer's lr for the next step."""
    scheduler.lr_lambdas = [lambda step: extended_lr_multiplier(step, args, resume_step, first_args)] * len(
        optimizer.param_groups
    )
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * extended_lr_multiplier(resume_step, args, resume_step, first_args)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def extend_schedule_on_resume(scheduler, optimizer, args: TrainArguments, state: dict, is_main: bool) -> dict | None:
    """After a checkpoint's scheduler state is loaded: when this run's --max_steps differs from the
    one the checkpoint's run had, continue the lr from where that run left it (extend_schedule).
    Returns the schedule's origin (resume step and the first run's schedule), which later
    checkpoints carry so that a second resume of the extended run keeps the same schedule; None
    when nothing changed."""
    origin = state["extra"].get("lr_schedule_origin")
    if origin is None:
        recorded = state["run_config"].get("train", {})
        if recorded.get("max_steps", args.max_steps) == args.max_steps:
            return None
        origin = {"resume_step": state["step"],
                  **{k: recorded.get(k, getattr(args, k)) for k in ("max_steps", "warmup_steps", "lr_scheduler")}}
    first = replace(args, **{k: origin[k] for k in ("max_steps", "warmup_steps", "lr_scheduler")})
    extend_schedule(scheduler, optimizer, args, origin["resume_step"], first)
    if is_main:
        print(f"[resume] --max_steps {first.max_steps} -> {args.max_steps}: the lr continues from "
              f"{optimizer.param_groups[0]['lr']:.3g} (where step {origin['resume_step']} left it) "
              "and decays over the remaining steps, never above it", flush=True)
    return origin


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArguments) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, args))
