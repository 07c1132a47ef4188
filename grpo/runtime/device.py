"""Seeding and the device of a run: one definition each, for both loops (through
grpo/runtime/distributed.py) and eval.py. The dtype is resolved where the model is loaded
(models/loading.py `resolve_dtype`)."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """--device auto | cpu | cuda -> this rank's device (cuda:local_rank under torchrun)."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {preference!r}: use auto, cpu or cuda")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but only {count} GPU(s) are visible; start torchrun with "
            f"--nproc_per_node at most {count} (or check CUDA_VISIBLE_DEVICES)"
        )
    return torch.device("cuda", local_rank)
