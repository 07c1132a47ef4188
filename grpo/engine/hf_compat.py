"""What differs between transformers versions and model wrappers, answered in one place.

The engine reads the model only through these helpers where an HF detail has changed or may
change: the config behind a DDP-style `.module` wrapper, the KV-cache keyword (`cache` from
transformers 5.2x, `past_key_values` before) and output field, and whether gradient checkpointing
forbids the prompt's KV cache. Everything else is stable HF API.
"""

from __future__ import annotations

import inspect

import torch


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
