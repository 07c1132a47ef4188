"""The one model forward: images encoded once, explicit 3-D positions, logits only where needed.

Every pass over the policy goes through this file: the sampler's prefill (grpo/engine/rollout.py), the
training forward, and the no-grad old-policy and reference passes. GRPO (DeepSeekMath, arXiv
2402.03300) needs log pi(o_t | q, o_<t) for each completion token o_t; this module computes it for
Qwen2.5-VL so that the sampler and the trainer see exactly the same numbers.

Letters (docs/architecture.md): B prompts, G completions per prompt, R rows (B*G or a micro-batch),
P prompt tokens (left padded), T completion tokens, V vocabulary, D hidden size, N image tokens
after the vision merger.

Where this departs from calling `model(**processor_outputs)` / `generate()`:
  1. The vision tower runs once per batch of prompts (`encode_images`); its merged tokens are
     scattered into the token embeddings ourselves (`build_inputs_embeds`) and copied to the G
     rows of each group (`image_inputs_for_rows`), instead of re-encoding G copies of each image.
  2. The 3-D rotary positions (mRoPE) are computed here (`mrope_position_ids`) and always passed
     explicitly. The HF forward would otherwise infer them from `mm_token_type_ids` and cached
     `rope_deltas`, state that goes wrong when a KV cache is copied G ways, when rows are a
     micro-batch, or when `mm_token_type_ids` is simply forgotten (image tokens then silently get
     text positions; tests/test_forward.py pins that).
  3. `logits_to_keep=T+1` so the [R, L, V] logits exist only for the completion positions.
  4. Temperature: the policy being optimised is softmax(logits / tau), the distribution the
     sampler drew from. Top-p / top-k truncation is ignored in the loss (as TRL does): the
     logprobs are those of the full tempered distribution, and the sampler records the same.
     tau = 0 (greedy) is scored with tau = 1.
  5. The G completions of a group share their prompt, so `completion_logprobs_shared_prompt`
     runs each prompt once (with gradients), copies its KV cache to the group's rows and runs
     only the completions on top: the same logprobs and gradients as `completion_logprobs`
     (its naive twin, kept for tests and for gradient checkpointing) on a fraction of the tokens.

The model is only touched through stable HF APIs: `get_input_embeddings()`, the vision tower
`model.model.visual` (through `get_image_features`), and `model(inputs_embeds=, position_ids=,
attention_mask=, logits_to_keep=)`, plus the KV cache (`use_cache=True`, `batch_select_indices`)
for the sampler and the shared-prompt forward.

Run its tests: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_forward.py -q
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

from grpo.logprobs import token_entropy, token_logprobs


def _config(model: torch.nn.Module):
    """The HF config, also through a DDP-style wrapper (`.module`)."""
    return getattr(model, "module", model).config


def image_token_id_of(model: torch.nn.Module) -> int:
    """Id of the `<|image_pad|>` placeholder token, from the model's config."""
    return int(_config(model).image_token_id)


def spatial_merge_size_of(model: torch.nn.Module) -> int:
    """How many patches per side the vision merger folds into one token (2 for Qwen2.5-VL)."""
    return int(_config(model).vision_config.spatial_merge_size)


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    params = inspect.signature(getattr(model, "module", model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output):
    """The KV cache of a forward's output, under either name (None when the model made none)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def can_share_prompt(model: torch.nn.Module) -> bool:
    """Whether `completion_logprobs_shared_prompt` can run: it needs the prompt's KV cache, which HF
    refuses to build while gradient checkpointing is on in train mode (use_cache is forced off)."""
    hf_model = getattr(model, "module", model)
    checkpointing = getattr(hf_model, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if checkpointing is None:
        checkpointing = getattr(hf_model, "is_gradient_checkpointing", False)
    return not (hf_model.training and checkpointing)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


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
    first_image = [0]  # first image index of each prompt
    for n in images_per_prompt:
        first_image.append(first_image[-1] + n)
    embeds, grids = [], []
    for r in rows:
        prompt = r // group_size
        images = range(first_image[prompt], first_image[prompt + 1])
        embeds += [image_chunks[k] for k in images]
        grids += [grid_chunks[k] for k in images]
    if not embeds:  # rows whose prompts carry no image
        return image_embeds[:0], image_grid_thw[:0]
    return torch.cat(embeds), torch.cat(grids)  # [N_R, D], [I_R, 3]


def expand_image_embeds(
    image_embeds: Tensor,
    image_grid_thw: Tensor,
    images_per_prompt: Sequence[int],
    group_size: int,
    spatial_merge_size: int,
) -> Tensor:
    """Per-prompt image embeddings [N, D] -> the G rows of every group [N*G, D].

    Not `image_embeds.repeat(G, 1)`: that would lay out [prompt0, prompt1, prompt0, prompt1, ...],
    while rows are grouped [p0 x G, p1 x G]; with prompts of different image counts, row 1 would
    then read prompt 1's image. Each prompt's block of images is repeated on its own G rows.
    """
    num_rows = len(images_per_prompt) * group_size
    embeds, _ = image_inputs_for_rows(
        image_embeds, image_grid_thw, images_per_prompt, group_size, range(num_rows), spatial_merge_size
    )
    return embeds  # [N*G, D]


# ---------------------------------------------------------------------------------------------
# positions and embeddings
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# the scoring forward
# ---------------------------------------------------------------------------------------------


def prefill_prompts(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    image_embeds: Tensor | None,
    image_grid_thw: Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
):
    """Forward left-padded prompts [U, P] once with the KV cache on.

    Returns (last-position logits [U, V], the KV cache of the U rows (None if the model made
    none), next_position [U]: where each row's first generated token sits). Left padding puts every
    prompt's last token in column P-1, so `logits_to_keep=1` gives each row's next-token logits.
    Positions are explicit: a padded row starts at 0 at its first real token, and the HF forward
    would otherwise rebuild them from mm_token_type_ids and a cached rope_deltas. The sampler's
    prefill and the shared-prompt training forward are both this call.
    """
    prompt_positions, next_position = mrope_position_ids(
        prompt_ids, prompt_mask, image_grid_thw, image_token_id=image_token_id, spatial_merge_size=spatial_merge_size
    )  # [3, U, P], [U]
    output = model(
        inputs_embeds=build_inputs_embeds(model, prompt_ids, image_embeds),  # [U, P, D]
        attention_mask=prompt_mask,
        position_ids=prompt_positions,
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits[:, -1, :], output_cache(output), next_position  # [U, V], cache, [U]


def _trim_prompt_padding(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the columns that are padding in every row: [R, P] -> [R, P'].

    A micro-batch that lacks the batch's longest prompt has such columns; positions and masks are
    per real token, so nothing else changes."""
    first_column = int(prompt_mask.any(dim=0).long().argmax())
    return prompt_ids[:, first_column:], prompt_mask[:, first_column:]


def _score(
    logits: Tensor, completion_ids: Tensor, temperature: float, chunk_size: int | None, return_entropy: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """logits [R, T, V] predicting completion_ids [R, T] -> logprobs [R, T] (and entropy)."""
    # tau = 0 means greedy sampling; its tokens are scored under the untempered policy.
    tau = temperature if temperature > 0 else 1.0
    # Divided in the logits' dtype, exactly as the sampler does, so both see the same numbers
    # (x / 1.0 == x exactly, so tau = 1 skips the [R, T, V] copy).
    if tau != 1.0:
        logits = logits / tau  # [R, T, V]
    logprobs = token_logprobs(logits, completion_ids, chunk_size=chunk_size)  # [R, T]
    if return_entropy:
        # A diagnostic, never differentiated: no_grad keeps its float32 chunks out of the graph.
        with torch.no_grad():
            entropy = token_entropy(logits.detach(), chunk_size=chunk_size)  # [R, T]
        return logprobs, entropy
    return logprobs


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor | None,
    image_embeds: Tensor | None,
    image_grid_thw_rows: Tensor | None,
    *,
    image_token_id: int | None = None,
    spatial_merge_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(o_t | q, o_<t) of each completion token under softmax(logits / tau): [R, T] float32.

    prompt_ids / prompt_mask [R, P] left padded; completion_ids [R, T]; completion_mask [R, T] (1
    through the first EOS; None = all ones); image_embeds [N_R, D] and image_grid_thw_rows [I_R, 3]
    for these R rows (see `image_inputs_for_rows`). Differentiable w.r.t. the model (and the image
    embeddings) unless called under torch.no_grad. With return_entropy, also the entropy [R, T] of
    the same tempered distribution (detached: a metric, not a loss term).

    Every row runs as [prompt ; completion]: the plain way, and the naive twin of
    `completion_logprobs_shared_prompt`.
    """
    if image_token_id is None:
        image_token_id = image_token_id_of(model)
    if spatial_merge_size is None:
        spatial_merge_size = spatial_merge_size_of(model)
    num_completion = completion_ids.shape[1]  # T
    if completion_mask is None:
        completion_mask = torch.ones_like(completion_ids)  # [R, T]
    prompt_ids, prompt_mask = _trim_prompt_padding(prompt_ids, prompt_mask)  # [R, P']

    # Positions: the prompt's mRoPE positions, then one text position per completion token on all
    # three axes, continuing from the prompt's max + 1 (what the sampler's decode steps used).
    prompt_positions, next_position = mrope_position_ids(
        prompt_ids, prompt_mask, image_grid_thw_rows,
        image_token_id=image_token_id, spatial_merge_size=spatial_merge_size,
    )  # [3, R, P], [R]
    steps = torch.arange(num_completion, device=prompt_ids.device)  # [T]
    completion_positions = (next_position[:, None] + steps).expand(3, -1, -1)  # [3, R, T]
    position_ids = torch.cat([prompt_positions, completion_positions], dim=-1)  # [3, R, P+T]

    # Embeddings: images go only into the prompt part; a completion may (rarely) sample the
    # image_pad id, and that token is plain text there, as it was for the sampler.
    prompt_embeds = build_inputs_embeds(model, prompt_ids, image_embeds)  # [R, P, D]
    completion_embeds = build_inputs_embeds(model, completion_ids, None)  # [R, T, D]
    inputs_embeds = torch.cat([prompt_embeds, completion_embeds], dim=1)  # [R, P+T, D]

    # Left padding of the prompt is masked out. Completion slots after the first EOS are masked
    # too; by causality that changes nothing for the tokens up to EOS, the only ones scored.
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)  # [R, P+T]

    output = model(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=num_completion + 1,
    )
    # Logits at positions P-1 .. P+T-2 predict completion tokens 0 .. T-1; the last one is unused.
    logits = output.logits[:, :-1, :]  # [R, T, V]
    return _score(logits, completion_ids, temperature, chunk_size, return_entropy)


def completion_logprobs_shared_prompt(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    row_prompt: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor | None,
    image_embeds: Tensor | None,
    image_grid_thw: Tensor | None,
    *,
    image_token_id: int | None = None,
    spatial_merge_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`completion_logprobs` with each prompt computed once for all its rows: [R, T] float32.

    prompt_ids / prompt_mask [U, P] are the U distinct prompts (left padded); row_prompt [R] says
    which of them row r continues (e.g. [0]*G + [1]*G); completion_ids / completion_mask [R, T];
    image_embeds [N_U, D] and image_grid_thw [I_U, 3] are the U prompts' images, once each.

    The G completions of a GRPO group differ only after the prompt, and a causal model's prompt
    activations do not depend on what follows. So:

      1. forward the U prompts once (use_cache=True): every layer's K, V of the prompt tokens and
         the last position's logits, which predict completion token 0;
      2. copy each prompt's K, V to its rows (`batch_select_indices(row_prompt)`: an index_select,
         whose backward sums the copies' gradients, exactly what R separate prompt copies get);
      3. forward completion tokens 0 .. T-2 of the R rows on top of that cache, at positions
         next_position + t; their logits predict tokens 1 .. T-1 (token T-1 is only a target);
      4. score [step-1 logits ; step-3 logits] like `completion_logprobs`.

    The language model then sees U*P + R*(T-1) tokens instead of R*(P+T): with P = 122, T = 32
    and G = 8 that is 370 instead of 1,232 per group. Logprobs and parameter gradients equal the
    naive twin's up to float rounding (tests/test_forward.py). Needs the KV cache, so not under
    gradient checkpointing in train mode (see `can_share_prompt`).
    """
    if image_token_id is None:
        image_token_id = image_token_id_of(model)
    if spatial_merge_size is None:
        spatial_merge_size = spatial_merge_size_of(model)
    num_completion = completion_ids.shape[1]  # T
    if completion_mask is None:
        completion_mask = torch.ones_like(completion_ids)  # [R, T]
    prompt_ids, prompt_mask = _trim_prompt_padding(prompt_ids, prompt_mask)  # [U, P']
    row_prompt = row_prompt.to(prompt_ids.device)  # [R]

    # 1. the prompts, once each
    last_logits, cache, next_position = prefill_prompts(
        model, prompt_ids, prompt_mask, image_embeds, image_grid_thw,
        image_token_id=image_token_id, spatial_merge_size=spatial_merge_size,
    )  # [U, V], KV of U rows, [U]
    if cache is None:
        raise RuntimeError(
            "the model returned no KV cache for the prompt forward (gradient checkpointing in train "
            "mode turns it off); use completion_logprobs there (see can_share_prompt)"
        )
    first_logits = last_logits.index_select(0, row_prompt)  # [R, V] predict token 0
    if num_completion == 1:
        return _score(first_logits[:, None, :], completion_ids, temperature, chunk_size, return_entropy)

    # 2. each prompt's K, V copied to its rows
    cache.batch_select_indices(row_prompt)  # U rows -> R rows (differentiable index_select)

    # 3. the completions on top; positions continue from the prompt's max + 1 on all three axes
    inputs = completion_ids[:, :-1]  # [R, T-1] token T-1 is never an input
    steps = torch.arange(num_completion - 1, device=prompt_ids.device)  # [T-1]
    positions = (next_position.index_select(0, row_prompt)[:, None] + steps).expand(3, -1, -1)  # [3, R, T-1]
    attention_mask = torch.cat(
        [prompt_mask.index_select(0, row_prompt), completion_mask[:, :-1].to(prompt_mask.dtype)], dim=1
    )  # [R, P+T-1]
    completion_output = model(
        inputs_embeds=build_inputs_embeds(model, inputs, None),  # [R, T-1, D]
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=num_completion - 1,
        **{cache_kwarg_name(model): cache},
    )

    # 4. first-token logits from the prompt, the rest from the completion forward
    logits = torch.cat([first_logits[:, None, :], completion_output.logits], dim=1)  # [R, T, V]
    return _score(logits, completion_ids, temperature, chunk_size, return_entropy)
