"""The rollout sampler: G completions per prompt, with one prefill per prompt and a shared KV cache.

GRPO (DeepSeekMath, arXiv 2402.03300) scores each prompt's G sampled completions against each
other, so the G completions of a prompt share everything up to the first generated token. The
sampler exploits that (the nanochat engine does the same for text):

  1. encode all images of the batch once                       image_embeds [N, D]
  2. prefill each prompt once, with explicit 3-D positions       KV cache of B rows, logits [B, V]
  3. copy the KV cache and the last logits to the G rows          KV cache of B*G rows
  4. decode token by token at positions next_position + step, the attention mask allocated once
     for all P + max_new_tokens columns (each step passes a longer slice of it); temperature,
     top-k, top-p; greedy when temperature == 0; a row stops at its first EOS (later tokens forced
     to pad); the loop stops when every row stopped or after max_new_tokens.

Where it departs from `model.generate()` on G repeated prompts:
  - images are encoded B times instead of B*G and the prompt is prefilled B times, not B*G;
  - tokens are drawn by inverse CDF (one uniform per row: the first token whose cumulative
    probability exceeds u) instead of `torch.multinomial`, which on CPU draws a random number per
    vocabulary entry; on CUDA, where its kernel is fast, multinomial stays (`sampling_method`).
    Same distribution; a given seed draws other tokens than multinomial would (grpo/engine/sampling.py);
  - on CUDA each decode step is replayed from one CUDA graph captured per rollout, on fixed-shape
    buffers (`StaticDecoder`, `StaticKVCache`); the plain loop (`DynamicDecoder`) runs elsewhere
    and is the twin the tests compare it with (`decode`, `default_decode`; grpo/engine/decoders.py);
  - positions are explicit (`grpo.engine.inputs.mrope_position_ids`) instead of the model's cached
    `rope_deltas`, so nothing depends on hidden state of the model object;
  - it returns `sampler_logprobs`: log softmax(logits / tau) of each chosen token over the FULL
    tempered vocabulary, before top-k / top-p truncation. That is the distribution the loss
    optimises (grpo/engine/forward.py: truncation is ignored there too), so these numbers equal
    `completion_logprobs` on the same tokens and can serve as old-policy logprobs. Greedy
    (tau = 0) records logprobs at tau = 1.

Which completion tokens count is the math layer's (grpo/masks.py): the sampler returns what it
drew; the loop's round (grpo/grpo_loop.py, RolloutRounds) masks it through the first EOS with
`completion_mask`, once per generation batch, and the loop applies `mask_truncated`.

`grpo/engine/hf_generate.py` keeps the `generate()` version, the twin that tests and benchmarks
compare this sampler with.

Run its tests: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_rollout.py -q
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import repeat
from torch import Tensor

from grpo.engine.decoders import DECODE_MODES, DynamicDecoder, StaticDecoder, default_decode
from grpo.engine.forward import prefill_prompts
from grpo.engine.hf_compat import image_token_id_of, spatial_merge_size_of
from grpo.engine.inputs import count_images_per_prompt, encode_images
from grpo.engine.sampling import sample_next_token

# ---------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """What the sampler hands to the trainer for one batch of B prompts x G completions."""

    completion_ids: Tensor
    """[B*G, T] sampled tokens; pad_token_id after each row's first EOS; T = longest row."""
    sampler_logprobs: Tensor
    """[B*G, T] float32 log softmax(logits / tau) of each chosen token (tau = 1 when greedy); 0 after EOS."""
    image_embeds: Tensor | None
    """[N, D] merged image tokens per prompt (not per row), detached: reusable by the trainer
    when the vision tower is frozen (expand with grpo.engine.inputs.image_inputs_for_rows)."""
    images_per_prompt: list[int]
    """[B] how many images (image_grid_thw rows) each prompt has, for image_inputs_for_rows."""
    num_generated_tokens: int
    """Tokens generated over all rows, each row counted through its first EOS (all T when cut)."""


@dataclass
class SampledGroups:
    """One round's B prompts, their B*G completions and their rewards (or dynamic sampling's merged batch).

    The GRPO loop's rollout step returns one (grpo/grpo_loop.py, RolloutRounds): the Rollout above,
    with the prompts it was sampled from, its completion mask, the decoded completions and their
    scores. The mask is computed once per generation batch, here at the GRPO level (RolloutRounds,
    or grpo/dynamic_sampling.py's merge_groups for a merged batch), and used by the rewards, the
    loss and the metrics.
    """

    examples: list[dict]
    batch: dict  # the collator's output for `examples` (CPU)
    batch_on_device: dict  # its tensors on the device
    rollout: Rollout
    completion_mask: Tensor  # [B*G, T] float32, 1 through each row's first EOS (grpo.masks.completion_mask)
    is_truncated: Tensor  # [B*G] bool, the row has no EOS (cut at max_new_tokens)
    completions: list[str]  # [B*G] decoded
    rewards: Tensor  # [B*G] NaN = unscored
    per_function: Tensor  # [B*G, F]


def in_eval_mode(function):
    """Run `function(model, ...)` with the model in eval mode, and put its mode back after.

    Every no-grad forward of a step runs in eval mode: the sampler (here), the old policy and the
    reference (grpo_loop.frozen_logprobs), the entropy of --top_entropy_quantile. Eval means no
    dropout: sampler_logprobs and pi_old are the policy itself, not one dropout draw of it, and
    the same on every generation batch, whatever mode the model was left in (a process's first
    batch finds it in eval mode after loading, later ones in train mode after the update), so a
    resumed run repeats the uninterrupted one. Also HF turns the KV cache off when gradient
    checkpointing is on in train mode.
    """

    @functools.wraps(function)
    def run_in_eval_mode(model: torch.nn.Module, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return function(model, *args, **kwargs)
        finally:
            model.train(was_training)

    return run_in_eval_mode


@torch.no_grad()
@in_eval_mode
def sample_rollouts(
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
    generator: torch.Generator | None = None,
    sampling_method: str | None = None,
    decode: str | None = None,
) -> Rollout:
    """Sample G completions for each of the B prompts of a collated batch (see module docstring).

    `generator` must live on the model's device (tokens are drawn on the logits' device).
    `sampling_method`: "inverse_cdf" | "multinomial" | None (by device), see `sample_next_token`.
    `decode`: "dynamic" | "static" | "cuda_graph" | None (by device), see `default_decode`.
    The model runs in eval mode and gets its mode back after (`in_eval_mode`).
    """
    input_ids = batch["input_ids"]  # [B, P] left padded
    prompt_mask = batch["attention_mask"]  # [B, P]
    pixel_values = batch.get("pixel_values")  # [sum t*h*w, patch_dim] or None
    image_grid_thw = batch.get("image_grid_thw")  # [num_images, 3] or None
    image_token_id = image_token_id_of(model)
    merge = spatial_merge_size_of(model)
    device = input_ids.device
    eos = torch.tensor(list(eos_token_ids), device=device)  # [E]

    # --- images: the vision tower runs once for the whole batch ---
    image_embeds = None
    if pixel_values is not None and pixel_values.numel() > 0:  # a text-only batch has no images
        image_embeds = encode_images(model, pixel_values, image_grid_thw)  # [N, D]

    # --- prefill: once per prompt (explicit positions; see grpo.engine.forward.prefill_prompts) ---
    last_logits, cache, next_position = prefill_prompts(
        model, input_ids, prompt_mask, image_embeds, image_grid_thw, image_token_id=image_token_id, spatial_merge_size=merge
    )  # [B, V], KV of B rows, [B]

    # --- copy to the G rows of each group: rows are [p0 x G, p1 x G, ...] ---
    cache.batch_repeat_interleave(group_size)  # KV of B rows -> B*G rows, in place
    logits = repeat(last_logits, "b v -> (b g) v", g=group_size)  # [B*G, V]
    next_position = repeat(next_position, "b -> (b g)", g=group_size)  # [B*G]
    row_mask = repeat(prompt_mask, "b p -> (b g) p", g=group_size)  # [R, P]
    num_rows = logits.shape[0]  # R = B*G
    decode = decode or default_decode(device)
    if decode == "dynamic":
        decoder = DynamicDecoder(model, cache, row_mask, next_position, max_new_tokens)
    elif decode in ("static", "cuda_graph"):
        decoder = StaticDecoder(model, cache, row_mask, next_position, max_new_tokens, cuda_graph=decode == "cuda_graph")
    else:
        raise ValueError(f"decode {decode!r}: expected one of {DECODE_MODES}")

    # --- decode ---
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)  # [R]
    num_generated = torch.zeros((), dtype=torch.long, device=device)  # [] tokens drawn by unfinished rows
    tokens, logprobs = [], []  # each step: [R]
    for step in range(max_new_tokens):
        token, logprob = sample_next_token(
            logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator, method=sampling_method
        )  # [R], [R]
        # A finished row keeps emitting pad (its logprob 0); it still runs through the model so
        # the batch stays rectangular, and its later tokens are masked out of the loss.
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)  # [R]
        logprob = torch.where(finished, torch.zeros_like(logprob), logprob)  # [R]
        tokens.append(token)
        logprobs.append(logprob)
        num_generated += (~finished).sum()  # a row counts this token (its EOS included) if it had not ended before
        finished = finished | torch.isin(token, eos)  # [R]
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = decoder.step(token, step)  # [R, V] predicts the token after `token`

    completion_ids = torch.stack(tokens, dim=1)  # [R, T]; T = longest row (loop stops when all end)
    sampler_logprobs = torch.stack(logprobs, dim=1)  # [R, T]
    return Rollout(
        completion_ids=completion_ids,
        sampler_logprobs=sampler_logprobs,
        image_embeds=None if image_embeds is None else image_embeds.detach(),
        images_per_prompt=count_images_per_prompt(
            input_ids, image_grid_thw, image_token_id=image_token_id, spatial_merge_size=merge
        ),
        num_generated_tokens=int(num_generated),
    )
