"""The rollouts the slow, obvious way: `model.generate` on G copies of each prompt.

The twin that tests/test_rollout.py and the benchmarks (bench/rollout_throughput.py,
bench/gpu_decode.py) compare the hand-written sampler of grpo/engine/rollout.py with: every
prompt repeated G times, images included, the KV cache and the vision tower run B*G times.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import repeat
from torch import Tensor
from transformers import GenerationConfig

from grpo.engine.hf_compat import image_token_id_of, spatial_merge_size_of
from grpo.engine.inputs import count_images_per_prompt, image_ranges
from grpo.masks import completion_mask


def repeat_batch_per_group(batch: dict, group_size: int, *, image_token_id: int, spatial_merge_size: int) -> dict:
    """The naive way: every prompt repeated G times, images included, for `model.generate`.

    pixel_values has no batch dim, so it is cut per image (t*h*w patch rows each) and each
    prompt's images are repeated G times in row order; a plain `.repeat` would scramble them.
    """
    input_ids = batch["input_ids"]  # [B, P]
    out = {
        "input_ids": repeat(input_ids, "b p -> (b g) p", g=group_size),  # [B*G, P]
        "attention_mask": repeat(batch["attention_mask"], "b p -> (b g) p", g=group_size),  # [B*G, P]
    }
    if batch.get("mm_token_type_ids") is not None:
        out["mm_token_type_ids"] = repeat(batch["mm_token_type_ids"], "b p -> (b g) p", g=group_size)  # [B*G, P]
    grid = batch.get("image_grid_thw")  # [num_images, 3]
    if grid is None:
        return out
    images_per_prompt = count_images_per_prompt(
        input_ids, grid, image_token_id=image_token_id, spatial_merge_size=spatial_merge_size
    )
    patches = list(batch["pixel_values"].split(grid.prod(-1).tolist()))  # per image: [t*h*w, patch_dim]
    grids = list(grid.split(1))  # per image: [1, 3]
    pixel_rows, grid_rows = [], []
    for images in image_ranges(images_per_prompt):
        for _ in range(group_size):
            pixel_rows += [patches[i] for i in images]
            grid_rows += [grids[i] for i in images]
    out["pixel_values"] = torch.cat(pixel_rows)  # [G * sum t*h*w, patch_dim]
    out["image_grid_thw"] = torch.cat(grid_rows)  # [G * num_images, 3]
    return out


@torch.no_grad()
def generate_rollouts_naive(
    model: torch.nn.Module,
    batch: dict,
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
) -> Tensor:
    """The same rollouts through `model.generate` on G copies of each prompt: completion_ids [B*G, T].

    Needs `mm_token_type_ids` in the batch (transformers 5.x builds image positions from it).
    """
    hf_model = getattr(model, "module", model)
    repeated = repeat_batch_per_group(
        batch, group_size, image_token_id=image_token_id_of(model), spatial_merge_size=spatial_merge_size_of(model)
    )
    # A full config so the checkpoint's own defaults (Qwen ships top_k=1, repetition_penalty=1.05)
    # cannot sneak in.
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=top_k if do_sample else None,
        repetition_penalty=1.0,
        eos_token_id=list(eos_token_ids),
        pad_token_id=pad_token_id,
    )
    sequences = hf_model.generate(**repeated, generation_config=generation_config)  # [B*G, P+T]
    completion_ids = sequences[:, repeated["input_ids"].shape[1] :]  # [B*G, T]
    # generate already pads finished rows; force it anyway so both samplers share one convention.
    mask, _ = completion_mask(completion_ids, list(eos_token_ids))  # [B*G, T]
    return completion_ids.masked_fill(mask == 0, pad_token_id)  # [B*G, T]
