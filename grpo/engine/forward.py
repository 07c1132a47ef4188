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
     rows of each group (`image_inputs_for_rows`), instead of re-encoding G copies of each image
     (those input builders are in grpo/engine/inputs.py, the HF-version shims in hf_compat.py).
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

  6. `GenerationBatch` (the end of this file) is one generation batch as the policy update sees
     it: after the rollout, every forward of the step (old policy, reference, each micro-batch of
     each inner epoch) needs the same B prompts, B*G completions and image features.
     `GenerationBatch.logprobs(model, rows)` gives per-token logprobs of any subset of the B*G
     rows (row r belongs to prompt r // G): images encoded once per prompt per forward, never
     once per completion (and, with the vision tower frozen, the rollout's features reused);
     completion padding trimmed to the longest of the rows asked for; each prompt run once and
     its KV cache copied to its completions (`shared_prompt`, `--shared_prompt_forward`), or,
     under gradient checkpointing (which turns the KV cache off), the naive twin.

The model is only touched through stable HF APIs: `get_input_embeddings()`, the vision tower
`model.model.visual` (through `get_image_features`), and `model(inputs_embeds=, position_ids=,
attention_mask=, logits_to_keep=)`, plus the KV cache (`use_cache=True`, `batch_select_indices`)
for the sampler and the shared-prompt forward.

Run its tests: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_forward.py -q
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grpo.engine.hf_compat import (
    cache_kwarg_name,
    can_share_prompt,
    image_token_id_of,
    output_cache,
    spatial_merge_size_of,
)
from grpo.engine.inputs import (
    build_inputs_embeds,
    encode_images,
    image_inputs_for_rows,
    image_ranges,
    mrope_position_ids,
)
from grpo.entropy_bonus import differentiable_token_entropy
from grpo.logprobs import token_entropy, token_logprobs

# ---------------------------------------------------------------------------------------------
# prefill and the scoring forwards (inputs: grpo/engine/inputs.py; HF shims: grpo/engine/hf_compat.py)
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


def _vision_ids(model, image_token_id: int | None, spatial_merge_size: int | None) -> tuple[int, int]:
    """The image_pad id and the merger's size: as given, or read from the model."""
    image_token_id = image_token_id_of(model) if image_token_id is None else image_token_id
    return image_token_id, spatial_merge_size_of(model) if spatial_merge_size is None else spatial_merge_size


def _trim_prompt_padding(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the columns that are padding in every row: [R, P] -> [R, P'].

    A micro-batch that lacks the batch's longest prompt has such columns; positions and masks are
    per real token, so nothing else changes."""
    first_column = int(prompt_mask.any(dim=0).long().argmax())
    return prompt_ids[:, first_column:], prompt_mask[:, first_column:]


def _score(
    logits: Tensor, completion_ids: Tensor, temperature: float, chunk_size: int | None, return_entropy: bool,
    entropy_grad: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """logits [R, T, V] predicting completion_ids [R, T] -> logprobs [R, T] (and entropy;
    differentiable with entropy_grad, for the entropy bonus, grpo/entropy_bonus.py)."""
    # tau = 0 means greedy sampling; its tokens are scored under the untempered policy.
    tau = temperature if temperature > 0 else 1.0
    # Divided in the logits' dtype, exactly as the sampler does, so both see the same numbers
    # (x / 1.0 == x exactly, so tau = 1 skips the [R, T, V] copy).
    if tau != 1.0:
        logits = logits / tau  # [R, T, V]
    logprobs = token_logprobs(logits, completion_ids, chunk_size=chunk_size)  # [R, T]
    if return_entropy and entropy_grad:  # a loss term (--entropy_coef): its gradient is needed
        return logprobs, differentiable_token_entropy(logits)  # [R, T]
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
    entropy_grad: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(o_t | q, o_<t) of each completion token under softmax(logits / tau): [R, T] float32.

    prompt_ids / prompt_mask [R, P] left padded; completion_ids [R, T]; completion_mask [R, T] (1
    through the first EOS; None = all ones); image_embeds [N_R, D] and image_grid_thw_rows [I_R, 3]
    for these R rows (see `image_inputs_for_rows`). Differentiable w.r.t. the model (and the image
    embeddings) unless called under torch.no_grad. With return_entropy, also the entropy [R, T] of
    the same tempered distribution (detached: a metric, not a loss term; with entropy_grad
    differentiable, for the entropy bonus).

    Every row runs as [prompt ; completion]: the plain way, and the naive twin of
    `completion_logprobs_shared_prompt`.
    """
    image_token_id, spatial_merge_size = _vision_ids(model, image_token_id, spatial_merge_size)
    num_completion = completion_ids.shape[1]  # T
    completion_mask = torch.ones_like(completion_ids) if completion_mask is None else completion_mask  # [R, T]
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
    return _score(logits, completion_ids, temperature, chunk_size, return_entropy, entropy_grad)


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
    entropy_grad: bool = False,
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
    image_token_id, spatial_merge_size = _vision_ids(model, image_token_id, spatial_merge_size)
    num_completion = completion_ids.shape[1]  # T
    completion_mask = torch.ones_like(completion_ids) if completion_mask is None else completion_mask  # [R, T]
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
        return _score(first_logits[:, None, :], completion_ids, temperature, chunk_size, return_entropy, entropy_grad)

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
    return _score(logits, completion_ids, temperature, chunk_size, return_entropy, entropy_grad)


# ---------------------------------------------------------------------------------------------
# one generation batch, as every forward of the policy update sees it (module docstring, 6)
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationBatch:
    prompt_ids: Tensor  # [B, P] left padded
    prompt_mask: Tensor  # [B, P]
    pixel_values: Tensor  # [patches of all images, patch_dim]
    image_grid_thw: Tensor  # [images, 3]
    images_per_prompt: list[int]
    completion_ids: Tensor  # [B*G, T]
    completion_mask: Tensor  # [B*G, T] 1 through the first EOS
    rollout_image_embeds: Tensor  # [N, D] per prompt, as the sampler encoded them
    group_size: int
    temperature: float  # the sampling temperature; the loss scores softmax(logits / temperature)
    spatial_merge_size: int
    shared_prompt: bool = True  # each prompt computed once per forward, its KV cache copied to its rows

    def _encode_images(self, model, images: list[int]) -> Tensor:
        """The vision tower on just these images (image_grid_thw rows), once each: [N_images, D]."""
        patches = list(self.pixel_values.split(self.image_grid_thw.prod(-1).tolist()))  # per image: [t*h*w, patch_dim]
        return encode_images(model, torch.cat([patches[i] for i in images]), self.image_grid_thw[images])

    def logprobs(
        self, model, rows: Tensor, *, reuse_rollout_images: bool, return_entropy: bool = False, entropy_grad: bool = False
    ):
        """Per-token logprobs [R, T_rows] of completion rows `rows` under `model` (and entropy if asked;
        with entropy_grad the entropy is differentiable too).

        T_rows is the longest completion among the rows; grad follows the caller's grad mode.
        """
        G = self.group_size
        rows_list = rows.tolist()
        length = int(self.completion_mask[rows].sum(1).max().clamp(min=1))
        prompts = sorted({r // G for r in rows_list})  # the distinct prompts these rows continue
        if reuse_rollout_images:
            image_embeds, grid, per_prompt = self.rollout_image_embeds, self.image_grid_thw, self.images_per_prompt
            prompt_index = prompts  # index of each of `prompts` among those embeddings
        else:
            images_of = image_ranges(self.images_per_prompt)
            images = [i for p in prompts for i in images_of[p]]  # these prompts' images, in order
            image_embeds = self._encode_images(model, images)  # [N_prompts, D]
            grid = self.image_grid_thw[images]  # [images, 3]
            per_prompt = [self.images_per_prompt[p] for p in prompts]
            prompt_index = list(range(len(prompts)))
        completion_ids = self.completion_ids[rows, :length]  # [R, T_rows]
        completion_mask = self.completion_mask[rows, :length]  # [R, T_rows]
        temperature = self.temperature  # 0 (greedy) is scored at tau = 1 (`_score`)

        if self.shared_prompt and can_share_prompt(model):
            # Images per distinct prompt (group size 1: "row" i is prompt i), prompts once each.
            embeds, grids = image_inputs_for_rows(image_embeds, grid, per_prompt, 1, prompt_index, self.spatial_merge_size)
            row_prompt = torch.tensor([prompts.index(r // G) for r in rows_list])  # [R] into `prompts`
            prompt_rows = torch.tensor(prompts)  # [U]
            return completion_logprobs_shared_prompt(
                model, self.prompt_ids[prompt_rows], self.prompt_mask[prompt_rows], row_prompt,
                completion_ids, completion_mask, embeds, grids,
                temperature=temperature, return_entropy=return_entropy, entropy_grad=entropy_grad,
            )

        # Naive twin: every row runs as [prompt ; completion], images copied to each row.
        local_rows = [prompt_index[prompts.index(r // G)] * G + r % G for r in rows_list]
        embeds, grids = image_inputs_for_rows(image_embeds, grid, per_prompt, G, local_rows, self.spatial_merge_size)
        prompt_rows = rows // G
        return completion_logprobs(
            model,
            self.prompt_ids[prompt_rows],  # [R, P]
            self.prompt_mask[prompt_rows],  # [R, P]
            completion_ids,
            completion_mask,
            embeds,
            grids,
            temperature=temperature,
            return_entropy=return_entropy,
            entropy_grad=entropy_grad,
        )
