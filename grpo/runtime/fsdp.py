"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for a policy that does not fit on one device: --fsdp.

    torchrun --nproc_per_node 8 train.py --stage grpo --fsdp --model Qwen/Qwen2.5-VL-32B-Instruct ...

Without --fsdp every rank holds the whole model and `grpo.runtime.distributed.sync_gradients` averages the
gradients once per optimizer step (what DDP does). With --fsdp each rank holds 1/world_size of
every weight, gradient and Adam moment (DTensors sharded on dim 0); a unit's weights are
all-gathered just before it runs and freed after, and its gradients are reduce-scattered in the
backward pass. The units (`shard_model`), bottom-up as fully_shard wants them:

    each vision block, then the vision tower  <- grpo/engine/forward.py calls it outside model.forward
    each language decoder layer
    embed_tokens (+ lm_head when tied)        <- also called outside model.forward
    the whole model (what is left: final norm, an untied lm_head)

Why the tower and the embeddings are units of their own: FSDP2 all-gathers in each unit's forward
pre-hook, and our forward (grpo/engine/forward.py) runs `get_image_features` and `get_input_embeddings()`
before calling `model(inputs_embeds=...)`. As units they gather their own weights whenever they are
called; their inputs (pixels, token ids) need no gradient, so their gradients are reduced at the end
of the backward, after every contribution arrived. Tied weights (Qwen2.5-VL-3B ties lm_head to
embed_tokens) must live in one unit, so both modules form one group.

Same arithmetic as the replicated path: FSDP2 divides the reduced gradients by world_size (an
average, pinned below), as `sync_gradients` does, so the loss normalisers are unchanged. Gradients
are reduce-scattered after every micro-batch: skipping that (set_requires_gradient_sync) would keep
a full unsharded gradient on every rank, the memory FSDP is there to save. clip_grad_norm_ and
AdamW work on the DTensor shards as they are.

Checkpoints stay plain: `FullModel` gathers the full weights to rank 0's CPU for save_pretrained,
`FullStateOptimizer` gathers the Adam moments into the usual `optimizer.state_dict()` layout, so
--fsdp and replicated checkpoints resume each other. The frozen reference is sharded too.

Costs and limits: the sampler all-gathers every unit once per decoded token (communication-bound
for long completions); each rank loads the full model on its CPU before sharding (rank-0-only
loading onto the meta device would avoid that); no LoRA (grpo/config.py rejects it), no CPU
offload, no mixed-precision policy (weights train in --dtype, as without --fsdp).

Run its tests: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_fsdp.py -q
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def ensure_process_group(device: torch.device) -> None:
    """--fsdp in one process (plain `python train.py`): a one-rank group, so a device mesh exists."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_model(
    model: nn.Module, device: torch.device, *, reshard_root_after_forward: bool | None = None
) -> nn.Module:
    """Apply fully_shard to a Qwen2.5-VL in place (units in the module docstring); returns it.

    The model may sit on the CPU: each unit is moved to `device` as it is sharded, so the device
    never holds more than the shards plus one unit. Each rank keeps its slice of rank 0's weights
    (broadcast once, as broadcast_parameters does for replicas).
    reshard_root_after_forward: None is FSDP's default (the root keeps its weights gathered
    between forward and backward); True suits a model that never runs backward (the reference).
    """
    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Rank 0's full weights, by reference (no copy), to broadcast into the shards afterwards.
    rank0_weights = model.state_dict() if dist.get_rank() == 0 else {}
    visual, language = model.model.visual, model.model.language_model
    for block in visual.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(visual, mesh=mesh)
    for layer in language.layers:
        fully_shard(layer, mesh=mesh)
    embed, head = language.embed_tokens, model.lm_head
    fully_shard([embed, head] if head.weight is embed.weight else embed, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_root_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Average over ranks, as sync_gradients does (FSDP2's default today; pinned here
            # because the loss normalisers depend on it).
            module.set_gradient_divide_factor(float(dist.get_world_size()))
    # FSDP2 takes the first unit to run forward as the root of the tree. Our first forward enters
    # through the vision tower or embed_tokens, not model.forward, so initialise from the real
    # root now (a private call; without it the next root forward raises "FSDP requires running
    # forward through the root module first").
    fully_shard.state(model)._lazy_init()
    broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, rank0_weights, options=broadcast)
    # model(input_ids=..., pixel_values=...) (the SFT forward) returns image_hidden_states, a split
    # of the tower's output, i.e. a view; FSDP warns that an in-place op on it would skip a hook.
    # Nothing modifies it, so the warning is noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on rank 0's CPU, an empty dict on the others. Collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


class FullModel:
    """What rank 0 calls save_pretrained on for a sharded model: a plain model of the same class
    holding the gathered full weights, so the folder is exactly what a replicated run writes
    (transformers picks the on-disk key names by model class, which fully_shard renames)."""

    def __init__(self, model: nn.Module):
        state = full_state_dict(model)  # collective: every rank takes part; rank 0 gets tensors
        self.plain = _plain_copy(model, state) if dist.get_rank() == 0 else None

    def save_pretrained(self, path, **kwargs) -> None:
        self.plain.save_pretrained(path, **kwargs)


def _plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded twin of `model` built on the meta device (no memory, no random init), whose
    weights are then the gathered CPU tensors themselves (assign=True: no copy)."""
    plain_class = next(c for c in type(model).__bases__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = plain_class._from_config(model.config)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()  # assign=True replaced the tied parameter by two tensors; tie them again
    plain.generation_config = model.generation_config
    if hasattr(model, "_weight_conversions"):  # how from_pretrained renamed keys, to undo on save
        plain._weight_conversions = model._weight_conversions
    return plain


class FullStateOptimizer:
    """An optimizer over DTensor shards, seen by a checkpoint in full tensors.

    `state_dict()` is `optimizer.state_dict()` with each sharded moment replaced by the full tensor
    (on rank 0's CPU), so it is what a replicated run would save; `gather()` builds it and is
    collective (every rank calls it, then rank 0 saves). `load_state_dict(full)` keeps this rank's
    slice of each full tensor; every rank reads the file, so it needs no communication.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.full_state: dict | None = None

    def gather(self) -> FullStateOptimizer:
        is_main = dist.get_rank() == 0
        # Parameter ids are positions in param_groups: the same on every rank (and without --fsdp).
        state = self.optimizer.state_dict()

        def full(value):
            if not isinstance(value, DTensor):
                return value
            gathered = value.full_tensor()  # an all-gather: every rank takes part, in the same order
            return gathered.cpu() if is_main else None

        # New dicts: state_dict() shares the per-parameter dicts with the live optimizer.
        per_param = {
            index: {key: full(value) for key, value in values.items()}
            for index, values in state["state"].items()
        }
        self.full_state = {"state": per_param, "param_groups": state["param_groups"]}
        return self

    def state_dict(self) -> dict:
        if self.full_state is None:
            raise RuntimeError("FullStateOptimizer.state_dict(): call gather() on every rank first")
        return self.full_state

    def load_state_dict(self, state: dict) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        sharded = {}
        for index, per_param in state["state"].items():
            param = params[int(index)]
            # Moments have the parameter's shape and are sliced like it; `step` is a scalar.
            sharded[index] = {
                key: _shard_like(value, param) if _is_full_moment(value, param) else value
                for key, value in per_param.items()
            }
        self.optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


def _is_full_moment(value, param) -> bool:
    return isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape


def _shard_like(full: torch.Tensor, param: DTensor) -> DTensor:
    """This rank's slice of `full`, laid out as `param` (src_data_rank=None: no communication)."""
    local_device = param.to_local().device
    return distribute_tensor(
        full.to(local_device), param.device_mesh, param.placements, src_data_rank=None
    )
