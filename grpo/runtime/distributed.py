"""torch.distributed set-up for torchrun, and the few collectives the training loops use.

There is no launcher here: `torchrun --nproc_per_node N train.py ...` starts one process per
device and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init_distributed`
reads them. Without them (plain `python train.py`) it is one process and no process group, and
every collective below is a no-op that returns its input, so the loops need no `if` around them.

    torchrun --nproc_per_node 2 train.py --stage grpo              # 2 GPUs (NCCL) or 2 CPU procs (gloo)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint host:29500 train.py ...

Failure semantics (one rank's error must stop the job, not hang it):
1. torchrun's elastic agent watches its workers: when one exits non-zero it kills the others and
   reports the first failure (the failing rank's traceback is printed above torchrun's summary;
   decorate the entry point with `torch.distributed.elastic.multiprocessing.errors.record` to
   have it in the summary too). So a rank that raises just lets the exception propagate.
2. A rank that dies while the others wait inside a collective could leave them blocked. The
   process group therefore gets a timeout (`timeout_minutes`, default 30): gloo raises in the
   waiting collective, NCCL's watchdog aborts the communicator (TORCH_NCCL_ASYNC_ERROR_HANDLING
   defaults to tearing the process down), and torchrun then stops the job. Keep the timeout
   longer than the slowest thing rank 0 does alone (saving a checkpoint, evaluation).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import datasets
import torch
import torch.distributed as dist
import transformers

from grpo.runtime.device import resolve_device

T = TypeVar("T", float, torch.Tensor)


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank, 0..world_size-1; rank 0 logs, samples to the log file and saves checkpoints."""
    local_rank: int
    """Rank on this node; picks the GPU (cuda:local_rank)."""
    world_size: int
    """Number of processes in the job."""
    device: torch.device
    """The device this rank computes on."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def init_distributed(device_preference: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Read torchrun's environment, pick the device and, for world_size > 1, join the process group.

    Backend: NCCL when the device is CUDA, gloo on CPU. `timeout_minutes` bounds every collective
    (see the module docstring). Call once at start-up and `cleanup()` at the end.
    """
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} are inconsistent; launch with torchrun")
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set; launch multi-process "
                "runs with torchrun, which sets them"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main(info: DistInfo | None = None) -> bool:
    """True on global rank 0 (the rank that logs and saves)."""
    return (info.rank if info is not None else get_rank()) == 0


def quiet_other_ranks(rank: int) -> None:
    """On ranks other than 0, turn off the progress bars datasets and transformers draw themselves
    ("Casting the dataset", "Loading weights"): rank 0 reports for the job, and under torchrun
    every rank's copy would otherwise land in the same console or in each rank's own log."""
    if rank == 0:
        return
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def _communication_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: T) -> T:
    """Sum `value` over ranks. A float gives a float; a tensor gives a new tensor on its own device
    (the input is not modified). No-op in a single process."""
    if not is_initialized():
        return value
    if isinstance(value, torch.Tensor):
        buffer = value.detach().to(_communication_device(), copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.to(value.device)
    buffer = torch.tensor(float(value), dtype=torch.float64, device=_communication_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.item()


def all_reduce_max(value: float) -> float:
    """The largest `value` over ranks, as a float. No-op in a single process."""
    if not is_initialized():
        return float(value)
    buffer = torch.tensor(float(value), dtype=torch.float64, device=_communication_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
    return buffer.item()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (e.g. a resume decision made on rank 0)."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (e.g. per-rank RNG states for a checkpoint)."""
    if not is_initialized():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup() -> None:
    """Leave the process group together (no-op in a single process).

    The barrier first: a rank that finished early (e.g. rank 1 while rank 0 still writes the final
    checkpoint) must not tear its side of the connections down under a peer that is still in the
    group; doing so aborted rank 1 at exit ("terminate called without an active exception") in
    about 1 of 8 runs of tests/test_faults.py's SIGTERM test."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sync_gradients(parameters: list[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks: what DDP's reducer does, once per optimizer step.

    The gradients are flattened into one buffer so the step costs a single all-reduce.
    """
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for parameter, grad in zip(parameters, grads, strict=True):
        numel = grad.numel()
        parameter.grad = flat[offset : offset + numel].view_as(parameter).clone()
        offset += numel


def broadcast_parameters(model: torch.nn.Module, world_size: int) -> None:
    """Start every rank from rank 0's weights (they should already agree; this makes it certain)."""
    if world_size == 1:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)
