"""GPU decode throughput of the rollout at Qwen2.5-VL-3B size (random bf16 weights) vs the bandwidth bound.

Decoding one token for R rows reads every language-model weight once (and each row's KV cache),
so a decode step cannot be faster than

    bound_step_s = (LM weight bytes + KV-cache bytes read) / HBM bandwidth

and decode throughput cannot exceed R / bound_step_s tokens/s. This script builds the published
Qwen2.5-VL-3B architecture (tests/fixtures/qwen2_5_vl_3b_config.json: text 2048 x 36 layers,
vocab 151,936; vision 1280 x 32 blocks) with RANDOM weights in bfloat16 on the GPU (no download),
takes B synthetic counting prompts (the tiny tokenizer's ids, with the special tokens mapped to
Qwen's ids; images at --image_size px), and times, for our sampler with the device's default
decode ("ours": one CUDA graph per rollout on a GPU), our sampler's eager loop ("ours_eager",
decode="dynamic") and `model.generate` on G copies of each prompt:

    t(T) for T = --max_new_tokens, and t(1)  ->  prefill ~ t(1), decode step = (t(T) - t(1)) / (T - 1)

with every completion forced to exactly T tokens (EOS one past the vocabulary, as in
bench/rollout_throughput.py). The HBM bandwidth is measured here with a large device-to-device
copy (bytes read + written / time) and also looked up from the GPU's name (nominal spec).

    python bench/gpu_decode.py                                    # on a GPU; ~2-3 min on an H100
    python bench/gpu_decode.py --device cpu --config tiny-small --max_new_tokens 8   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import REPO_ROOT, counting_batch, machine_info, median, never_sampled_eos, tensors_only

from grpo.engine.hf_generate import generate_rollouts_naive
from grpo.engine.rollout import sample_rollouts

NOMINAL_HBM_GB_S = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
                    "H200": 4800, "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100-PCIE": 1555}
QWEN_SPECIAL_IDS = {  # Qwen2.5 tokenizer ids of the special tokens the tiny tokenizer also has
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
    "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}


def build_model(config_name: str, device: torch.device, dtype: torch.dtype):
    """(model, processor, map_ids): a random Qwen2.5-VL of the named size and a function that maps
    the tiny tokenizer's ids to the model's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from models.loading import TINY_PRESETS, load_policy
    from models.tiny import build_tiny_processor

    if config_name in TINY_PRESETS:
        model, processor = load_policy(config_name, dtype=dtype, device=device)
        return model, processor, (lambda ids: ids)
    config = Qwen2_5_VLConfig.from_dict(json.loads((REPO_ROOT / "tests/fixtures/qwen2_5_vl_3b_config.json").read_text()))
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    processor = build_tiny_processor()
    tokenizer = processor.tokenizer
    table = torch.arange(len(tokenizer), device=device)
    for token, qwen_id in QWEN_SPECIAL_IDS.items():
        table[tokenizer.convert_tokens_to_ids(token)] = qwen_id
    return model, processor, (lambda ids: table[ids])


def hbm_bandwidth_gb_s(device: torch.device, gigabytes: float = 2.0, repeats: int = 10) -> float:
    """Device-to-device copy of `gigabytes`: (read + write bytes) / time, median of `repeats`."""
    src = torch.empty(int(gigabytes * 2**30) // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / median(times[1:]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="qwen2.5-vl-3b", help="qwen2.5-vl-3b | tiny | tiny-small")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num_prompts", type=int, default=4, help="B")
    parser.add_argument("--group_size", type=int, default=8, help="G")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="T")
    parser.add_argument("--image_size", type=int, default=448, help="synthetic scene side in px")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(machine_info())
    model, processor, map_ids = build_model(args.config, device, dtype)
    from models.loading import set_pixel_budget

    set_pixel_budget(processor, max_pixels=args.image_size * args.image_size)
    batch = tensors_only(counting_batch(processor, args.num_prompts, image_size=args.image_size))
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["input_ids"] = map_ids(batch["input_ids"])
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    pad_id = int(map_ids(torch.tensor(processor.tokenizer.pad_token_id, device=device)))
    common = dict(group_size=args.group_size, eos_token_ids=[never_sampled_eos(model)], pad_token_id=pad_id)
    generator = torch.Generator(device=device).manual_seed(0)
    samplers = {  # ours = the default decode for the device (a CUDA graph per rollout on a GPU)
        "ours": lambda n: sample_rollouts(model, batch, max_new_tokens=n, generator=generator, **common).completion_ids,
        "ours_eager": lambda n: sample_rollouts(model, batch, max_new_tokens=n, generator=generator, decode="dynamic",
                                                **common).completion_ids,
        "generate": lambda n: generate_rollouts_naive(model, batch, max_new_tokens=n, **common),
    }

    def timed(fn, n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn(n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        assert out.shape == (args.num_prompts * args.group_size, n), out.shape
        return time.perf_counter() - start

    for fn in samplers.values():
        timed(fn, 4)  # warm-up
    T = args.max_new_tokens
    times = {(name, n): [] for name in samplers for n in (T, 1)}
    for round_index in range(args.repeats):
        names = list(samplers) if round_index % 2 == 0 else list(samplers)[::-1]
        for n in (T, 1):
            for name in names:
                times[(name, n)].append(timed(samplers[name], n))

    rows = args.num_prompts * args.group_size
    text = model.model.language_model
    lm_bytes = sum(p.numel() * p.element_size() for p in text.parameters())
    if not model.config.tie_word_embeddings:
        lm_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    text_config = model.config.get_text_config()
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    prompt_len = batch["input_ids"].shape[1]
    mean_context = prompt_len + T / 2
    kv_bytes = (2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim
                * mean_context * rows * torch.finfo(dtype).bits // 8)  # K and V, read once per step
    result = {"config": args.config, "device": str(device), "rows": rows, "T": T, "prompt_tokens": prompt_len,
              "lm_weight_gb": lm_bytes / 1e9, "kv_read_gb_per_step_mean": kv_bytes / 1e9}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        measured = hbm_bandwidth_gb_s(device)
        nominal = next((v for k, v in NOMINAL_HBM_GB_S.items() if k.lower() in name.lower()), None)
        result.update(gpu=name, hbm_measured_gb_s=measured, hbm_nominal_gb_s=nominal)
        for label, bandwidth in (("measured", measured), ("nominal", nominal)):
            if bandwidth:
                bound_step = (lm_bytes + kv_bytes) / (bandwidth * 1e9)
                result[f"bound_step_ms_{label}_bw"] = bound_step * 1e3
                result[f"bound_tokens_per_s_{label}_bw"] = rows / bound_step
    for name in samplers:
        full, first = median(times[(name, T)]), median(times[(name, 1)])
        step = (full - first) / (T - 1)
        result[f"{name}_total_s"] = full
        result[f"{name}_prefill_s"] = first
        result[f"{name}_decode_step_ms"] = step * 1e3
        result[f"{name}_decode_tokens_per_s"] = rows / step
        result[f"{name}_tokens_per_s_overall"] = rows * T / full
        if "bound_step_ms_measured_bw" in result:
            result[f"{name}_fraction_of_bound"] = result["bound_step_ms_measured_bw"] / (step * 1e3)
    result["speedup_overall"] = result["generate_total_s"] / result["ours_total_s"]
    result["speedup_overall_eager"] = result["generate_total_s"] / result["ours_eager_total_s"]
    result["decode_step_speedup_graph_vs_eager"] = result["ours_eager_decode_step_ms"] / result["ours_decode_step_ms"]
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
