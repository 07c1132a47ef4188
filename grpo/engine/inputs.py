"""Qwen2.5-VL inputs built by hand: image features, which images belong to which row, 3-D positions.

    encode_images            the vision tower once over a batch's images          [N, D]
    count_images_per_prompt  how many images (image_grid_thw rows) each prompt has
    image_ranges             which image_grid_thw rows are prompt p's (the one place that says so)
    image_inputs_for_rows    the features and grid rows that completion rows need  (row r: prompt r // G)
    mrope_position_ids       the 3-D rotary positions (text, then t/h/w over image tokens)  [3, R, L]
    build_inputs_embeds      token embeddings with the image features scattered in  [R, L, D]

`pixel_values` has no batch dimension ([sum of patches, patch_dim], one `image_grid_thw` row per
image), so nothing here repeats it: images are encoded once and their merged tokens are copied to
the rows that need them. Positions are always computed here and passed explicitly (the forward in
grpo/engine/forward.py says why).

Run its tests: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_forward.py -q
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grpo.engine.hf_compat import image_token_id_of


def encode_images(model: torch.nn.Module, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
    """Run the vision tower once over all images of a batch; returns merged tokens [N, D].

    `pixel_values` is [sum of t*h*w over images, patch_dim] (no batch dim), one `image_grid_thw`
    row per image. Image k contributes t*h*w / merge**2 consecutive rows of the result.
    """
    hf_model = getattr(model, "module", model)
    out = hf_model.model.get_image_features(pixel_values, image_grid_thw)
    # transformers 5.x returns an output object whose pooler_output is a per-image tuple; 4.x
    # returned the tuple itself. Accept both.
    embeds = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(embeds, (tuple, list)):
        embeds = torch.cat(list(embeds), dim=0)  # [N, D]
    return embeds  # [N, D]


def tokens_per_image(image_grid_thw: Tensor, spatial_merge_size: int) -> list[int]:
    """Merged tokens of each image: t*h*w / merge**2 (one image_pad token each in the prompt)."""
    return (image_grid_thw.prod(-1) // spatial_merge_size**2).tolist()


def count_images_per_prompt(
    input_ids: Tensor, image_grid_thw: Tensor | None, *, image_token_id: int, spatial_merge_size: int
) -> list[int]:
    """How many `image_grid_thw` rows belong to each prompt row of `input_ids` [B, P].

    Images are in row order, so walk the grid rows, consuming each prompt's image_pad tokens.
    """
    if image_grid_thw is None:
        return [0] * input_ids.shape[0]
    sizes = tokens_per_image(image_grid_thw, spatial_merge_size)
    counts, k = [], 0
    for pad_tokens in (input_ids == image_token_id).sum(-1).tolist():  # image tokens per row
        n_images = 0
        while pad_tokens > 0:
            pad_tokens -= sizes[k]
            k += 1
            n_images += 1
        if pad_tokens != 0:
            raise ValueError("image_pad tokens of a prompt do not add up to whole images")
        counts.append(n_images)
    if k != len(sizes):
        raise ValueError(f"{len(sizes)} images in image_grid_thw but {k} in input_ids")
    return counts


def image_ranges(images_per_prompt: Sequence[int]) -> list[range]:
    """The image_grid_thw rows of each prompt: images are stored in prompt order, so prompt p owns
    rows sum(images_per_prompt[:p]) .. + images_per_prompt[p]."""
    ranges, first = [], 0
    for count in images_per_prompt:
        ranges.append(range(first, first + count))
        first += count
    return ranges


def image_inputs_for_rows(
    image_embeds: Tensor,
    image_grid_thw: Tensor,
    images_per_prompt: Sequence[int],
    group_size: int,
    rows: Sequence[int] | Tensor,
    spatial_merge_size: int,
) -> tuple[Tensor, Tensor]:
    """Image embeddings and grid rows for completion rows `rows` (row r belongs to prompt r // G).

    `image_embeds` [N, D] is per prompt (as encoded once); the result is [N_R, D] with the
    embeddings of row r's prompt, in row order, plus its `image_grid_thw` rows [I_R, 3]. Any
    subset of rows works, so a micro-batch takes exactly what its rows need.
    """
    if isinstance(rows, Tensor):
        rows = rows.tolist()
    sizes = tokens_per_image(image_grid_thw, spatial_merge_size)
    image_chunks = list(image_embeds.split(sizes))  # per image: [tokens_k, D]
    grid_chunks = list(image_grid_thw.split(1))  # per image: [1, 3]
    images_of = image_ranges(images_per_prompt)
    embeds, grids = [], []
    for r in rows:
        images = images_of[r // group_size]  # row r continues prompt r // G
        embeds += [image_chunks[k] for k in images]
        grids += [grid_chunks[k] for k in images]
    if not embeds:  # rows whose prompts carry no image
        return image_embeds[:0], image_grid_thw[:0]
    return torch.cat(embeds), torch.cat(grids)  # [N_R, D], [I_R, 3]


def mrope_position_ids(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    image_grid_thw: Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[Tensor, Tensor]:
    """3-D rotary positions (temporal, height, width) of a left-padded batch (Qwen2-VL mRoPE).

    Text tokens count 0, 1, 2, ... on all three axes. An image of g_t x g_h x g_w merged tokens
    starting at text position s gets (s + t, s + h, s + w) for its grid cells, and the text after it
    continues at s + max(g_h, g_w). Padding (attention_mask 0) is skipped: positions start at 0 at
    each row's first real token, and padded slots hold 0 (they are never attended to).

    Returns position_ids [3, B, L] and next_position [B] = max position + 1: the position of the
    first generated token, the same on all three axes (generated tokens are text).
    """
    batch_size, seq_len = input_ids.shape  # B, L
    position_ids = torch.zeros(3, batch_size, seq_len, dtype=torch.long, device=input_ids.device)
    next_position = torch.zeros(batch_size, dtype=torch.long, device=input_ids.device)  # [B]
    sizes = [] if image_grid_thw is None else image_grid_thw.tolist()
    image_index = 0  # images are numbered across the whole batch, in row order
    for b in range(batch_size):
        real = (
            torch.ones(seq_len, dtype=torch.bool, device=input_ids.device)
            if attention_mask is None
            else attention_mask[b].bool()
        )  # [L]
        ids = input_ids[b][real]  # [n] the row without its padding
        image_starts = (ids == image_token_id).nonzero().flatten().tolist()
        chunks: list[Tensor] = []  # each [3, len]
        cursor, current = 0, 0  # next token index in `ids`, next text position
        while image_starts and image_starts[0] >= cursor:
            start = image_starts[0]
            text = torch.arange(start - cursor, device=ids.device) + current  # [len]
            chunks.append(text.expand(3, -1))
            current += start - cursor
            grid_t, grid_h, grid_w = sizes[image_index]
            image_index += 1
            grid_h, grid_w = grid_h // spatial_merge_size, grid_w // spatial_merge_size
            t, h, w = torch.meshgrid(
                torch.arange(grid_t, device=ids.device),
                torch.arange(grid_h, device=ids.device),
                torch.arange(grid_w, device=ids.device),
                indexing="ij",
            )  # each [g_t, g_h, g_w]
            chunks.append(torch.stack([t, h, w]).reshape(3, -1) + current)  # [3, g_t*g_h*g_w]
            cursor = start + grid_t * grid_h * grid_w
            current += max(grid_h, grid_w)  # as HF's get_rope_index (transformers 5.x)
            image_starts = [i for i in image_starts if i >= cursor]
        chunks.append((torch.arange(len(ids) - cursor, device=ids.device) + current).expand(3, -1))
        row_positions = torch.cat(chunks, dim=1)  # [3, n]
        position_ids[:, b, real] = row_positions
        next_position[b] = row_positions.max() + 1 if row_positions.numel() else 0
    return position_ids, next_position  # [3, B, L], [B]


def build_inputs_embeds(model: torch.nn.Module, input_ids: Tensor, image_embeds: Tensor | None) -> Tensor:
    """Token embeddings [R, L, D] with the image_pad slots filled by image embeddings, in order."""
    hf_model = getattr(model, "module", model)
    embeds = hf_model.get_input_embeddings()(input_ids)  # [R, L, D]
    if image_embeds is None:
        return embeds
    image_mask = input_ids == image_token_id_of(model)  # [R, L]
    if int(image_mask.sum()) != image_embeds.shape[0]:
        raise ValueError(
            f"{int(image_mask.sum())} image_pad tokens but {image_embeds.shape[0]} image embeddings"
        )
    # masked_scatter fills the True slots in row-major order, i.e. row by row, left to right:
    # the order in which images appear. It is differentiable w.r.t. both inputs.
    return embeds.masked_scatter(image_mask.unsqueeze(-1), image_embeds.to(embeds.dtype))  # [R, L, D]
