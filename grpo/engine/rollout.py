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
    Same distribution; a given seed draws other tokens than multinomial would;
  - on CUDA each decode step is replayed from one CUDA graph captured per rollout, on fixed-shape
    buffers (`StaticDecoder`, `StaticKVCache`); the plain loop (`DynamicDecoder`) runs elsewhere
    and is the twin the tests compare it with (`decode`, `default_decode`);
  - positions are explicit (`grpo.engine.forward.mrope_position_ids`) instead of the model's cached
    `rope_deltas`, so nothing depends on hidden state of the model object;
  - it returns `sampler_logprobs`: log softmax(logits / tau) of each chosen token over the FULL
    tempered vocabulary, before top-k / top-p truncation. That is the distribution the loss
    optimises (grpo/engine/forward.py: truncation is ignored there too), so these numbers equal
    `completion_logprobs` on the same tokens and can serve as old-policy logprobs. Greedy
    (tau = 0) records logprobs at tau = 1.

`generate_rollouts_naive` keeps the `generate()` version for tests and benchmarks.

Run its tests: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_rollout.py -q
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import repeat
from torch import Tensor
from transformers import GenerationConfig

from grpo.engine.forward import (
    build_inputs_embeds,
    cache_kwarg_name,
    count_images_per_prompt,
    encode_images,
    image_token_id_of,
    output_cache,
    prefill_prompts,
    spatial_merge_size_of,
)
from grpo.masks import completion_mask


@dataclass
class Rollout:
    """What the sampler hands to the trainer for one batch of B prompts x G completions."""

    completion_ids: Tensor
    """[B*G, T] sampled tokens; pad_token_id after each row's first EOS; T = longest row."""
    sampler_logprobs: Tensor
    """[B*G, T] float32 log softmax(logits / tau) of each chosen token (tau = 1 when greedy); 0 after EOS."""
    is_eos_terminated: Tensor
    """[B*G] bool: the row emitted an EOS (False = cut at max_new_tokens)."""
    image_embeds: Tensor | None
    """[N, D] merged image tokens per prompt (not per row), detached: reusable by the trainer
    when the vision tower is frozen (expand with grpo.engine.forward.image_inputs_for_rows)."""
    images_per_prompt: list[int]
    """[B] how many images (image_grid_thw rows) each prompt has, for image_inputs_for_rows."""
    num_generated_tokens: int
    """Tokens generated over all rows, each row counted through its first EOS."""


SAMPLING_METHODS = ("inverse_cdf", "multinomial")


def default_sampling_method(device: torch.device) -> str:
    """`multinomial` on CUDA (one fast kernel there), `inverse_cdf` elsewhere.

    On CPU `torch.multinomial(probs, 1)` draws an exponential random number for EVERY vocabulary
    entry; inverse CDF draws one uniform per row, and the gap grows with V (bench/sampling_cost.py;
    the figures are in docs/benchmarks.md, section 2).
    """
    return "multinomial" if torch.device(device).type == "cuda" else "inverse_cdf"


def inverse_cdf_draw(probs: Tensor, uniform: Tensor) -> Tensor:
    """Token per row of probs [R, V] (need not sum to 1) for uniforms [R, 1] in [0, 1): [R].

    Row i of probs covers [0, total) with one interval per token, [cdf[j-1], cdf[j]); the token is
    the one whose interval holds u * total, i.e. the FIRST j with cdf[j] > u * total
    (searchsorted with right=True). A token of probability 0 has an empty interval
    (cdf[j] == cdf[j-1] exactly: adding 0.0 is exact), so it is never chosen, even when u * total
    lands exactly on a boundary: with right=False, u = 0 would pick token 0 when p_0 = 0.
    The partial sums are float32, so each boundary carries float32 rounding; a zero stays a zero.
    """
    cdf = probs.cumsum(dim=-1)  # [R, V] non-decreasing: every term is >= 0
    total = cdf[:, -1:]  # [R, 1] > 0: softmax keeps at least the best token
    # u < 1, so u * total < total in exact arithmetic; keep it strictly below after rounding too,
    # so some cdf[j] > target always exists and the result can never be V (no clamp needed).
    target = torch.minimum(uniform.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))  # [R, 1]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [R]


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
    method: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One sampling step from last-position logits [R, V] -> (token [R], logprob [R] float32).

    The logprob is of the full tempered distribution, before top-k / top-p (see module docstring).
    `method` draws from the truncated distribution: "inverse_cdf" (one uniform per row) or
    "multinomial" (`torch.multinomial`, the naive twin; tests check they agree); None picks by
    device (`default_sampling_method`). Both use `generator`, which must live on the logits' device.
    """
    method = method or default_sampling_method(logits.device)
    if method not in SAMPLING_METHODS:  # checked before the greedy branch too, so a typo never hides
        raise ValueError(f"sampling method {method!r}: expected one of {SAMPLING_METHODS}")
    # A NaN or inf logit makes the draw meaningless (the inverse CDF then returns index V, which
    # fails later as an out-of-range token id): stop here and say why. One reduction and one sync
    # per decode step, next to the all-finished check the loop already syncs on.
    rows_bad = int((~torch.isfinite(logits).all(dim=-1)).sum())
    if rows_bad:
        raise FloatingPointError(
            f"the sampler got non-finite logits (NaN or inf) in {rows_bad} of {logits.shape[0]} rows: the "
            "policy's weights or activations are no longer finite (a learning rate too high, an fp16 "
            "overflow, a broken checkpoint); resume from an earlier checkpoint with a lower --learning_rate "
            "or use --dtype bfloat16 / float32"
        )
    if temperature == 0:  # greedy; scored at tau = 1
        token = logits.argmax(dim=-1)  # [R]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
        return token, logprobs.gather(-1, token[:, None]).squeeze(-1)
    # Divide in the logits' dtype, as completion_logprobs does, then go to float32.
    scaled = (logits / temperature).float()  # [R, V]
    logprobs = torch.log_softmax(scaled, dim=-1)  # [R, V] the policy the loss optimises
    filtered = scaled  # [R, V] truncated copy used only to draw the token
    if top_k > 0:
        kth_best = torch.topk(filtered, min(top_k, filtered.shape[-1]), dim=-1).values[:, -1:]  # [R, 1]
        filtered = filtered.masked_fill(filtered < kth_best, float("-inf"))  # [R, V]
    if top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)  # [R, V]
        sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [R, V]
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [R, V]
        # Keep the smallest prefix whose mass reaches top_p; the best token always survives
        # (its mass_before is 0), so a row can never be left with nothing to sample.
        drop_sorted = mass_before >= top_p  # [R, V]
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # [R, V] back in vocabulary order
        filtered = filtered.masked_fill(drop, float("-inf"))  # [R, V]
    probs = torch.softmax(filtered, dim=-1)  # [R, V] exactly 0 where truncated (exp(-inf))
    if method == "inverse_cdf":
        uniform = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)  # [R, 1] in [0, 1)
        token = inverse_cdf_draw(probs, uniform)  # [R]
    else:  # multinomial
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [R]
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)  # [R], [R]


DECODE_MODES = ("dynamic", "static", "cuda_graph")


def default_decode(device: torch.device) -> str:
    """`cuda_graph` on CUDA, `dynamic` elsewhere.

    A decode step runs R rows x 1 token through every layer: on a GPU that is hundreds of small
    kernels, and launching them from Python costs more than running them (docs/benchmarks.md,
    section 5: an eager step far above its memory-bandwidth bound). Replaying the step from a CUDA graph removes the launches. On CPU the kernels
    themselves dominate, and the plain loop stays (it is also the naive twin the tests use).
    """
    return "cuda_graph" if torch.device(device).type == "cuda" else "dynamic"


class DynamicDecoder:
    """The plain decode step: HF's growing KV cache, the attention mask sliced to P + step + 1."""

    def __init__(self, model, cache, row_mask: Tensor, next_position: Tensor, max_new_tokens: int):
        self.model, self.cache, self.next_position = model, cache, next_position  # next_position [R]
        self.cache_kwarg = cache_kwarg_name(model)
        num_rows, self.prompt_length = row_mask.shape  # R, P
        # The whole decode mask at once: the prompt's mask, then ones for every generated column.
        # Step s passes the first P+s+1 columns (a view), instead of concatenating a column per step.
        # Finished rows keep 1s: they still run (emitting pad) and are masked out of the loss later.
        self.attention_mask = row_mask.new_ones(num_rows, self.prompt_length + max_new_tokens)  # [R, P+T]
        self.attention_mask[:, : self.prompt_length] = row_mask  # [R, P]

    def step(self, token: Tensor, step: int) -> Tensor:
        """Run `token` [R] (generated token number `step`) through the model: next logits [R, V]."""
        num_rows = token.shape[0]
        # The new token is a text token: same position on the three axes, one past the last.
        position_ids = (self.next_position + step).view(1, num_rows, 1).expand(3, -1, -1)  # [3, R, 1]
        output = self.model(
            inputs_embeds=build_inputs_embeds(self.model, token[:, None], None),  # [R, 1, D]
            attention_mask=self.attention_mask[:, : self.prompt_length + step + 1],  # [R, P+step+1]
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: self.cache},
        )
        self.cache = output_cache(output)
        return output.logits[:, -1, :]  # [R, V]


class StaticKVCache:
    """Every layer's K and V in one preallocated buffer [R, H_kv, P+T, d]; the slot the next token
    is written to is a device tensor (`position`), so a step has fixed shapes and no host values:
    what a CUDA graph needs. Only `update` is called by the model (the attention mask is passed
    ready-made, so HF's mask builder, which would query the cache, never runs)."""

    def __init__(self, prefill_cache, max_length: int):
        self.keys, self.values = [], []  # per layer [R, H_kv, P+T, d]
        for layer in prefill_cache.layers:  # transformers 5.x DynamicLayer: .keys / .values [R, H_kv, P, d]
            prompt_length = layer.keys.shape[2]
            for store, prefill in ((self.keys, layer.keys), (self.values, layer.values)):
                buffer = prefill.new_zeros(*prefill.shape[:2], max_length, prefill.shape[3])
                buffer[:, :, :prompt_length] = prefill
                store.append(buffer)
        self.position = torch.zeros(1, dtype=torch.long, device=self.keys[0].device)  # [1] next slot

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        """Write this step's K, V [R, H_kv, 1, d] at `position`; return the whole buffers."""
        self.keys[layer_idx].index_copy_(2, self.position, key_states)
        self.values[layer_idx].index_copy_(2, self.position, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class StaticDecoder:
    """The decode step on fixed-shape buffers, optionally replayed from one CUDA graph.

    Buffers: the token [R], the 3-D positions [3, R, 1], a boolean attention mask [R, 1, 1, P+T]
    (True = attend: the prompt's real tokens, then one more column per step) and the
    `StaticKVCache`. A step writes its inputs into them, then runs (or replays) the same forward;
    every slot after the current one is masked, so the zeros or stale values there are never read.
    With cuda_graph, the forward is captured once per rollout after two warm-up runs (which write
    into slots P and P+1: the real steps overwrite those before any query may attend to them).
    """

    def __init__(self, model, prefill_cache, row_mask: Tensor, next_position: Tensor, max_new_tokens: int,
                 *, cuda_graph: bool):
        text_config = getattr(model, "module", model).config.get_text_config()
        if any(kind != "full_attention" for kind in getattr(text_config, "layer_types", None) or ["full_attention"]):
            raise ValueError("static decoding supports full-attention layers only; use decode='dynamic'")
        num_rows, self.prompt_length = row_mask.shape  # R, P
        max_length = self.prompt_length + max_new_tokens
        self.model, self.next_position = model, next_position  # [R]
        self.cache = StaticKVCache(prefill_cache, max_length)
        self.cache_kwarg = cache_kwarg_name(model)
        self.token = torch.zeros(num_rows, dtype=torch.long, device=row_mask.device)  # [R]
        self.position_ids = torch.zeros(3, num_rows, 1, dtype=torch.long, device=row_mask.device)  # [3, R, 1]
        self.mask = torch.zeros(num_rows, 1, 1, max_length, dtype=torch.bool, device=row_mask.device)  # [R, 1, 1, P+T]
        self.mask[:, 0, 0, : self.prompt_length] = row_mask.bool()
        self.graph = None
        if cuda_graph:
            if row_mask.device.type != "cuda":
                raise ValueError("decode='cuda_graph' needs the model on a CUDA device; use 'static' or 'dynamic'")
            self._set_inputs(self.token, 0)
            side = torch.cuda.Stream(device=row_mask.device)
            side.wait_stream(torch.cuda.current_stream(row_mask.device))
            with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs asks
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream(row_mask.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()  # [R, V] lives in the graph's memory pool

    def _set_inputs(self, token: Tensor, step: int) -> None:
        self.token.copy_(token)
        self.position_ids.copy_((self.next_position + step).view(1, -1, 1).expand(3, -1, -1))
        self.cache.position.fill_(self.prompt_length + step)
        self.mask[:, 0, 0, self.prompt_length + step] = True

    def _forward(self) -> Tensor:
        output = self.model(
            inputs_embeds=build_inputs_embeds(self.model, self.token[:, None], None),  # [R, 1, D]
            attention_mask={"full_attention": self.mask},  # ready-made: HF builds no mask
            position_ids=self.position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: self.cache},
        )
        return output.logits[:, -1, :]  # [R, V]

    def step(self, token: Tensor, step: int) -> Tensor:
        """Run `token` [R] (generated token number `step`) through the model: next logits [R, V]."""
        self._set_inputs(token, step)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the graph's output buffer


@torch.no_grad()
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
    """
    # Sampling runs in eval mode: no dropout (so sampler_logprobs are the policy's), and HF turns
    # the KV cache off when gradient checkpointing is on in train mode. The mode is restored after.
    was_training = model.training
    model.eval()
    try:
        return _sample_rollouts(
            model, batch, group_size=group_size, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
            sampling_method=sampling_method, decode=decode,
        )
    finally:
        model.train(was_training)


def _sample_rollouts(
    model: torch.nn.Module,
    batch: dict,
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
    sampling_method: str | None,
    decode: str | None,
) -> Rollout:
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
        finished = finished | torch.isin(token, eos)  # [R]
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = decoder.step(token, step)  # [R, V] predicts the token after `token`

    completion_ids = torch.stack(tokens, dim=1)  # [R, T]; T = longest row (loop stops when all end)
    sampler_logprobs = torch.stack(logprobs, dim=1)  # [R, T]
    mask, _ = completion_mask(completion_ids, list(eos_token_ids))  # [R, T] 1 through the first EOS
    return Rollout(
        completion_ids=completion_ids,
        sampler_logprobs=sampler_logprobs,
        is_eos_terminated=finished,
        image_embeds=None if image_embeds is None else image_embeds.detach(),
        images_per_prompt=count_images_per_prompt(
            input_ids, image_grid_thw, image_token_id=image_token_id, spatial_merge_size=merge
        ),
        num_generated_tokens=int(mask.sum()),
    )


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
    pixel_rows, grid_rows, first = [], [], 0
    for n in images_per_prompt:
        for _ in range(group_size):
            pixel_rows += patches[first : first + n]
            grid_rows += grids[first : first + n]
        first += n
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
