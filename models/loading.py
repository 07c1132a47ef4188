"""Loading a Qwen2.5-VL policy: the tiny offline presets or any local / Hub Qwen2.5-VL checkpoint.

- `load_policy(name_or_path)` returns `(model, processor)`. Reserved names ("tiny", "tiny-small")
  build the offline preset of `models/tiny.py`; anything else goes through `from_pretrained`
  (a local directory written by `save_pretrained` works with `HF_HUB_OFFLINE=1`).
- `special_token_ids(model, processor)` reads pad / EOS / image ids from what was loaded, never
  from hard-coded Qwen numbers (the tiny preset has a 927-token vocabulary).
- `make_reference(model)` is the frozen copy the KL term is measured against.

Choices: float32 on CPU and bfloat16 on CUDA by default; SDPA attention by default; prompts are
padded on the left, so that every completion starts in the same column of the batch.

Run: `python -m models.loading tiny` prints what was loaded and its special token ids.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.image_utils import SizeDict

from models.tiny import build_tiny_policy

# Reserved names -> the size argument of models.tiny.build_tiny_policy.
TINY_PRESETS: dict[str, str] = {"tiny": "tiny", "tiny-small": "small"}

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the trainer needs, read from the loaded tokenizer and generation config."""

    pad_token_id: int
    """Id used to pad prompts (left) and completions (right). May equal an EOS id."""
    eos_token_ids: tuple[int, ...]
    """Any of these ends a completion (Qwen: <|im_end|> and <|endoftext|>)."""
    image_token_id: int
    """<|image_pad|>: one per merged image token in input_ids."""
    video_token_id: int
    """<|video_pad|>: one per merged video token."""
    vision_start_token_id: int
    """<|vision_start|>: opens each image/video span."""


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """--dtype (a name, "auto" or None, or a torch.dtype) -> the torch.dtype to load the model in."""
    if dtype is None or dtype == "auto":
        # bf16 halves memory on GPUs; CPUs are slow and inexact in bf16, so stay in float32 there.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    resolved = getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:  # torch.int8 is a dtype too
        raise ValueError(f"--dtype {dtype!r} is not a float dtype; use one of float32, bfloat16, float16, float64")
    return resolved


def _resolve_attn(attn_implementation: str | None) -> str:
    attn = attn_implementation or "sdpa"
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"--attn_implementation {attn!r} is not supported; choose one of {ATTN_IMPLEMENTATIONS}")
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "--attn_implementation flash_attention_2 needs the flash-attn package, which is not "
            "installed (pip install flash-attn --no-build-isolation, CUDA only); or use sdpa"
        )
    return attn


def set_pixel_budget(processor, max_pixels: int | None = None, min_pixels: int | None = None) -> None:
    """Set the image and video processors' pixel range (Qwen's min_pixels / max_pixels) in place.

    Images are resized to keep their aspect ratio with H*W in [min_pixels, max_pixels] (multiples
    of 28); each 28x28 block becomes one language-model token.
    """
    if max_pixels is None and min_pixels is None:
        return
    for sub in (processor.image_processor, getattr(processor, "video_processor", None)):
        if sub is None:
            continue
        size = dict(longest_edge=sub.size.longest_edge, shortest_edge=sub.size.shortest_edge)
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"--min_pixels {size['shortest_edge']} exceeds --max_pixels {size['longest_edge']}")
        sub.size = SizeDict(**size)


def _own_memory(model: torch.nn.Module) -> None:
    """Copy CPU parameters that still live in the memory-mapped safetensors file into torch's memory.

    from_pretrained maps the file and leaves each CPU weight at its offset there, which need not be
    64-byte aligned (torch's own allocations are). Vector kernels split their sums into head, body
    and tail by alignment, so the same weights could round differently from a model built in memory,
    and a resumed run would not repeat the uninterrupted one bit for bit. Tied weights stay tied
    (one Parameter object, copied once).
    """
    for parameter in model.parameters():
        if parameter.device.type == "cpu" and parameter.data_ptr() % 64:
            parameter.data = parameter.data.clone()


DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16", "float64")  # what --dtype accepts


def check_model_type(flag: str, where: str, model_type: str | None) -> None:
    """A ValueError unless `model_type` (read from a checkpoint's config.json) is Qwen2.5-VL's.
    where: how the message names the checkpoint, e.g. "runs/x: runs/x/config.json"."""
    if model_type == "qwen2_5_vl":
        return
    hint = " (a text-only LM: give it a vision tower with python -m models.graft first)" if model_type == "qwen2" else ""
    raise ValueError(
        f"{flag} {where} has model_type {model_type!r}, but this trainer expects a Qwen2.5-VL checkpoint "
        f"(model_type 'qwen2_5_vl'){hint}; pass a Qwen2.5-VL folder, a Hub id such as "
        f"Qwen/Qwen2.5-VL-3B-Instruct, or a preset ({', '.join(sorted(TINY_PRESETS))})"
    )


def load_policy(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    seed: int = 0,
) -> tuple[Qwen2_5_VLForConditionalGeneration, object]:
    """Load `(model, processor)` from a reserved tiny preset name, a local directory or a Hub id.

    `seed` only matters for the tiny presets (their random initialisation). The model is
    returned in eval mode; call `.train()` before training.
    """
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    attn = _resolve_attn(attn_implementation)

    if name_or_path in TINY_PRESETS:
        model, processor = build_tiny_policy(seed=seed, size=TINY_PRESETS[name_or_path])
        if attn != "sdpa":
            model.set_attn_implementation(attn)
    else:
        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except OSError as error:  # no such folder, no such repo, or the Hub cannot be reached
            raise OSError(
                f"--model {name_or_path!r}: not a local model folder, and it could not be fetched from the "
                f"Hugging Face Hub ({type(error).__name__}: {str(error).splitlines()[0]}). Check the path, or "
                "the repo id and the network; offline, pass a local folder written by save_pretrained"
            ) from error
        check_model_type("--model", repr(name_or_path), config.model_type)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            name_or_path, dtype=torch_dtype, attn_implementation=attn
        )
        processor = AutoProcessor.from_pretrained(name_or_path)
        model.eval()

    model = model.to(device=device, dtype=torch_dtype)
    _own_memory(model)
    set_pixel_budget(processor, max_pixels=max_pixels, min_pixels=min_pixels)
    # Left padding: every prompt ends in the same column, so completions are aligned.
    processor.tokenizer.padding_side = "left"
    return model, processor


def special_token_ids(model, processor) -> SpecialTokens:
    """Pad / EOS / vision ids from the loaded tokenizer, generation config and model config."""
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab()

    eos: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        eos += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
    elif tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    if "<|im_end|>" in vocab:  # the end of an assistant turn always ends a chat completion
        eos.append(vocab["<|im_end|>"])
    eos_token_ids = tuple(dict.fromkeys(eos))  # de-duplicated, order kept
    if not eos_token_ids:
        raise ValueError("no EOS token: neither generation_config.eos_token_id nor tokenizer.eos_token is set")

    pad = tokenizer.pad_token_id
    if pad is None:
        pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = eos_token_ids[0]  # padding is always masked out, so any id works

    config = model.config
    return SpecialTokens(
        pad_token_id=int(pad),
        eos_token_ids=tuple(int(i) for i in eos_token_ids),
        image_token_id=int(config.image_token_id),
        video_token_id=int(config.video_token_id),
        vision_start_token_id=int(config.vision_start_token_id),
    )


def make_reference(model: torch.nn.Module, device: str | torch.device | None = None) -> torch.nn.Module:
    """A frozen deep copy of `model` (eval mode, no gradients, same dtype) for the KL term."""
    reference = copy.deepcopy(model)
    reference.eval()  # no dropout: reference logprobs must be deterministic
    for param in reference.parameters():
        param.requires_grad_(False)
    if device is not None:
        reference.to(device)
    return reference


if __name__ == "__main__":
    loaded_model, loaded_processor = load_policy(sys.argv[1] if len(sys.argv) > 1 else "tiny")
    n_params = sum(p.numel() for p in loaded_model.parameters())
    print(f"{type(loaded_model).__name__}: {n_params:,} parameters, dtype {loaded_model.dtype}")
    print(special_token_ids(loaded_model, loaded_processor))
