"""Helpers shared by the benchmarks: machine description, batches of synthetic prompts, peak memory.

Not a benchmark itself. Every benchmark in bench/ runs as one command from the repository root
(see docs/benchmarks.md); this module only keeps them from repeating each other.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def machine_info() -> str:
    """One line: CPU model, cores, torch / transformers versions, date (UTC)."""
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, {date}")


def never_sampled_eos(model) -> int:
    """An EOS id no sampler can ever emit: one past the vocabulary (logits have V columns).

    Passing it as the only EOS id forces every completion to run to max_new_tokens in both our
    sampler (`torch.isin(token, eos)` is never true) and `model.generate` (its EOS stopping
    criterion never fires), while both still sample from the model's full, unmodified
    distribution. Real EOS tokens are then ordinary tokens.
    """
    config = getattr(model, "module", model).config
    return int(config.get_text_config().vocab_size) + 1


def counting_batch(processor, num_prompts: int, seed: int = 0, offset: int = 0, image_size: int = 112) -> dict:
    """A collated GRPO batch of `num_prompts` synthetic counting prompts (examples offset.. offset+B)."""
    from data.collators import GRPOCollator
    from data.synthetic import make_counting_dataset

    dataset = make_counting_dataset(offset + num_prompts, seed=seed, image_size=image_size)
    examples = [dataset[i] for i in range(offset, offset + num_prompts)]
    return GRPOCollator(processor)(examples)


def tensors_only(batch: dict) -> dict:
    import torch

    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def median(values) -> float:
    return float(statistics.median(values))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_preset(preset: str, directory: str | os.PathLike) -> str:
    """Write a tiny preset ("tiny" | "tiny-small") with save_pretrained, so TRL can load it by path."""
    from models.loading import TINY_PRESETS
    from models.tiny import build_tiny_policy

    model, processor = build_tiny_policy(seed=0, size=TINY_PRESETS[preset])
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


QWEN_3B_CONFIG = REPO_ROOT / "tests/fixtures/qwen2_5_vl_3b_config.json"
MODEL_CONFIGS = ("tiny", "tiny-small", "qwen2.5-vl-3b")


def parse_overrides(text: str | None) -> dict:
    """"num_hidden_layers=2,vision.depth=1,vision.fullatt_block_indexes=[0]" -> a dict.

    Values are read as JSON where they parse (numbers, lists, true/false), else kept as strings;
    commas inside [...] do not split. Keys under "vision." go to the vision config."""
    import json
    import re

    overrides = {}
    for item in re.split(r",(?![^\[]*\])", text or ""):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config override {item!r} is not KEY=VALUE")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return overrides


def qwen_3b_config_for(tokenizer, overrides: dict | None = None):
    """The published Qwen2.5-VL-3B architecture (tests/fixtures/qwen2_5_vl_3b_config.json) whose
    special-token ids are those of `tokenizer` (the tiny one), with optional size overrides.

    The vocabulary stays 151,936 rows (unless overridden), so the embedding, the LM head and the
    log-softmax cost what they cost in the real model; ids past the tiny tokenizer's 927 are
    sampled like any other and decode to nothing (the fast tokenizer skips unknown ids)."""
    import json

    from transformers import Qwen2_5_VLConfig

    from models.tiny import (
        ENDOFTEXT,
        IM_END,
        IMAGE_PAD,
        VIDEO_PAD,
        VISION_END,
        VISION_PAD,
        VISION_START,
    )

    values = json.loads(QWEN_3B_CONFIG.read_text())
    ids = {token: tokenizer.convert_tokens_to_ids(token)
           for token in (ENDOFTEXT, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD)}
    values.update(bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
                  vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
                  vision_token_id=ids[VISION_PAD], image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD])
    for key, value in (overrides or {}).items():
        if key.startswith("vision."):
            values["vision_config"][key.removeprefix("vision.")] = value
        else:
            values[key] = value
    if values["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {values['vocab_size']} is below the tokenizer's {len(tokenizer)} tokens")
    return Qwen2_5_VLConfig.from_dict(values)


def save_model(config_name: str, directory: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32",
               overrides: str | None = None) -> str:
    """Write a model + processor folder that both trainers load by path (save_pretrained).

    "tiny" / "tiny-small": the offline presets in float32 (save_preset, what the CPU numbers used).
    "qwen2.5-vl-3b": the published 3B architecture with RANDOM weights, built directly on `device`
    in `dtype` (no float32 copy of 3.75 B parameters in host memory), saved with the tiny
    processor. The tokenizer stays the tiny one; the model config's special-token ids are set to
    the tiny tokenizer's ids (qwen_3b_config_for), so one folder is self-consistent for both
    trainers without a token-id translation layer; the 151,936-row vocabulary keeps the LM-head
    cost real. `overrides` (parse_overrides) shrink it for a CPU test of this path."""
    if config_name in ("tiny", "tiny-small"):
        if overrides:
            raise ValueError("--config_overrides applies to qwen2.5-vl-3b only")
        return save_preset(config_name, directory)
    if config_name != "qwen2.5-vl-3b":
        raise ValueError(f"unknown model config {config_name!r}; choose one of {MODEL_CONFIGS}")
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from models.tiny import ENDOFTEXT, IM_END, build_tiny_processor

    processor = build_tiny_processor()
    tokenizer = processor.tokenizer
    config = qwen_3b_config_for(tokenizer, parse_overrides(overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(
                config, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    endoftext, im_end = tokenizer.convert_tokens_to_ids(ENDOFTEXT), tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config = GenerationConfig(bos_token_id=endoftext, eos_token_id=[im_end, endoftext],
                                               pad_token_id=tokenizer.pad_token_id)  # as build_tiny_policy
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return str(directory)
