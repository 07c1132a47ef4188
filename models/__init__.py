"""Building and loading Qwen2.5-VL: the tiny offline preset, from_pretrained, freezing, LoRA, grafting.

    from models import load_policy, special_token_ids, make_reference
    model, processor = load_policy("tiny")            # offline, ~0.7 M parameters
    model, processor = load_policy("/path/to/Qwen2.5-VL-3B-Instruct", dtype="bfloat16", device="cuda")

Files: tiny.py (preset), loading.py (load_policy, make_reference, special ids), freeze.py
(freezing policies, gradient checkpointing), lora.py (hand-written LoRA, merged at save time),
graft.py (Qwen2.5-VL vision tower + Qwen2.5 text LM -> Qwen2.5-VL checkpoint).
"""

import importlib

# Imported lazily, so that `python -m models.loading` (etc.) does not import its own module twice.
_EXPORTS = {
    "TINY_PRESETS": "models.loading",
    "SpecialTokens": "models.loading",
    "load_policy": "models.loading",
    "make_reference": "models.loading",
    "special_token_ids": "models.loading",
    "build_tiny_policy": "models.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
