"""data/: examples in the schema {images, question, answer, thinking}, prompts and collators.

    synthetic.py   CLEVR-like counting scenes drawn with pillow (offline default), + a shifted set
    sources.py     load_examples(source, ...) for synthetic, Hub names, save_to_disk dirs,
                   parquet and jsonl files -> (datasets.Dataset, LoadReport); train_val_split
    prompts.py     SYSTEM_PROMPT, build_messages, format_target
    collators.py   GRPOCollator (left padded prompts), SFTCollator (labels on the target only)

Run:  python -m data.synthetic --preview docs/images/synthetic_scenes.png
"""

import importlib

# Names re-exported lazily (PEP 562), so `import data.prompts` (used by models/tiny.py) does not
# pull in datasets, torch and pillow.
_EXPORTS = {
    "GRPOCollator": "data.collators", "SFTCollator": "data.collators",
    "filter_long_prompts": "data.collators", "prompt_length": "data.collators",
    "SYSTEM_PROMPT": "data.prompts", "build_messages": "data.prompts", "format_target": "data.prompts",
    "LoadReport": "data.sources", "load_examples": "data.sources",
    "resize_to_max_pixels": "data.sources", "train_val_split": "data.sources",
    "make_counting_dataset": "data.synthetic",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
