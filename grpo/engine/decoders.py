"""The rollout's decode step: R rows x 1 token through the model, on a KV cache of the prompt.

    dynamic     HF's growing KV cache, the attention mask sliced to P + step + 1 (the plain loop;
                the twin the tests compare the others with; the default off CUDA)
    static      fixed-shape buffers (`StaticKVCache`) updated in place, so every step has one shape
    cuda_graph  `static`, with the step captured once per rollout in a CUDA graph and replayed
                (the default on CUDA: it removes the kernel launches that dominate a decode step)

The rollout (grpo/engine/rollout.py) builds one decoder per batch after the prefill and calls
`step` once per generated token.

Run its tests: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_rollout.py -q
"""

from __future__ import annotations

import torch
from torch import Tensor

from grpo.engine.hf_compat import cache_kwarg_name, output_cache
from grpo.engine.inputs import build_inputs_embeds

DECODE_MODES = ("dynamic", "static", "cuda_graph")


def default_decode(device: torch.device) -> str:
    """`cuda_graph` on CUDA, `dynamic` elsewhere.

    A decode step runs R rows x 1 token through every layer: on a GPU that is hundreds of small
    kernels, and launching them from Python costs more than running them (docs/benchmarks.md,
    section 5: an eager step far above its memory-bandwidth bound). Replaying the step from a
    CUDA graph removes the launches. On CPU the kernels themselves dominate, and the plain loop
    stays (it is also the naive twin the tests use).
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
