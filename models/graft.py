"""Grafting: the vision tower of a Qwen2.5-VL onto a Qwen2.5 text LM -> a Qwen2.5-VL checkpoint.

The blog post ("Can an LLM Learn to See?") builds its "custom VLM" this way: Qwen2.5-VL-3B's vision encoder + Qwen2.5-0.5B.
What moves where:

    text LM (Qwen2ForCausalLM)          grafted Qwen2_5_VLForConditionalGeneration
    model.embed_tokens / layers / norm  -> model.language_model.embed_tokens / layers / norm
    lm_head                             -> lm_head (tied to embed_tokens when the LM ties them)
    Qwen2.5-VL visual.*                 -> model.visual.*  (copied as is) ...
    visual.merger.mlp.2 [D_vl, 4*Dv]    ... except this one: the merger's output projection into
                                        the LM's hidden size, resized to [D_text, 4*Dv] and newly
                                        initialised (normal, std = initializer_range; bias 0).

The config takes the LM's text fields and the VL model's vision fields with out_hidden_size =
the LM's hidden size. mRoPE needs `mrope_section` (temporal, height, width) summing to
head_dim / 2; we keep Qwen2.5-VL's 1/4 : 3/8 : 3/8 split ([16, 24, 24] at head_dim 128,
[8, 12, 12] at head_dim 64). The tokenizer is the LM's (its ids are what the LM was trained on);
the image/video processors and the chat template are the VL model's. Vision special tokens
missing from the tokenizer are added, and the embeddings grow if a new id is out of range.
The grafted model has never seen images: it needs the SFT stage before GRPO makes sense.

Run: python -m models.graft --vision Qwen/Qwen2.5-VL-3B-Instruct --text Qwen/Qwen2.5-0.5B-Instruct --out DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os

import torch
from huggingface_hub import snapshot_download  # honours HF_HUB_OFFLINE and the local cache
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)

logger = logging.getLogger(__name__)

# The merger's last Linear maps into the LM's hidden size, so it cannot be reused.
REINITIALISED_KEYS = ("model.visual.merger.mlp.2.weight", "model.visual.merger.mlp.2.bias")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# Text-config fields copied verbatim from a Qwen2Config.
TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
)


# --- key mapping (pure functions on names, testable on meta state dicts) ---


def text_key_to_vl_key(key: str) -> str:
    """Qwen2ForCausalLM state-dict key -> Qwen2_5_VLForConditionalGeneration key."""
    if key == "lm_head.weight":
        return key
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    raise KeyError(f"unexpected Qwen2ForCausalLM key {key!r}")


def vision_key_to_vl_key(key: str) -> str:
    """A key of `model.model.visual.state_dict()` -> the full Qwen2.5-VL key."""
    return "model.visual." + key


def mrope_section_for(head_dim: int) -> list[int]:
    """Qwen2.5-VL's (temporal, height, width) split of the head_dim/2 rotary frequencies."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def build_graft_config(vl_config: Qwen2_5_VLConfig, text_config, token_ids: dict[str, int]) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL config = the LM's text fields + the VL model's vision fields (out_hidden -> LM hidden)."""
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    if getattr(text_config, "head_dim", None) not in (None, head_dim):
        raise ValueError(f"the text LM's head_dim {text_config.head_dim} != hidden/heads {head_dim}; Qwen2.5-VL cannot express that")
    rope = dict(getattr(text_config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"the text LM uses rope_type {rope['rope_type']!r}; grafting supports only default RoPE")
    text = {field: getattr(text_config, field) for field in TEXT_FIELDS}
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": rope.get("rope_theta", getattr(text_config, "rope_theta", 1_000_000.0)),
        "mrope_section": mrope_section_for(head_dim),
    }
    text.update(
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"],
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    vision = copy.deepcopy(vl_config.vision_config)
    vision.out_hidden_size = text_config.hidden_size
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision.to_dict(),
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=text_config.tie_word_embeddings,
    )


# --- loading the two sources ---


def _local_dir(name_or_path: str) -> str:
    if os.path.isdir(name_or_path):
        return name_or_path

    return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])


def _read_vision_state(directory: str) -> dict[str, torch.Tensor]:
    """Only the vision tensors of a saved Qwen2.5-VL (the LM half is never read into memory).

    Saved checkpoints name them `visual.*` (the Hub layout, which transformers 5 still writes)
    or `model.visual.*`; both map to keys of `model.model.visual.state_dict()`.
    """
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"--vision {directory!r} has no model.safetensors(.index.json)")
    state = {}
    for filename in files:
        with safe_open(os.path.join(directory, filename), framework="pt") as f:
            for key in f.keys():
                for prefix in ("model.visual.", "visual."):
                    if key.startswith(prefix):
                        state[key.removeprefix(prefix)] = f.get_tensor(key)
                        break
    if not state:
        raise ValueError(f"--vision {directory!r} holds no visual.* tensors: is it a Qwen2.5-VL checkpoint?")
    return state


def _load_vision_source(vision):
    """-> (vl_config, vision_state, processor) from a path / id or a (model, processor) pair."""
    if isinstance(vision, (tuple, list)):
        model, processor = vision
        return model.config, model.model.visual.state_dict(), processor
    directory = _local_dir(vision)
    config = AutoConfig.from_pretrained(directory)
    if config.model_type != "qwen2_5_vl":
        raise ValueError(f"--vision {vision!r} has model_type {config.model_type!r}; expected a Qwen2.5-VL ('qwen2_5_vl')")
    return config, _read_vision_state(directory), AutoProcessor.from_pretrained(directory)


def _load_text_source(text, dtype):
    """-> (Qwen2ForCausalLM, tokenizer) from a path / id or a (model, tokenizer) pair."""
    if isinstance(text, (tuple, list)):
        model, tokenizer = text
    else:
        config = AutoConfig.from_pretrained(text)
        if config.model_type != "qwen2":
            raise ValueError(f"--text {text!r} has model_type {config.model_type!r}; expected a Qwen2/Qwen2.5 text LM ('qwen2')")
        model = AutoModelForCausalLM.from_pretrained(text, dtype=dtype or "auto")
        tokenizer = AutoTokenizer.from_pretrained(text)
    if model.config.model_type != "qwen2":
        raise ValueError(f"the text model is {model.config.model_type!r}; expected a Qwen2ForCausalLM")
    return model, tokenizer


# --- the graft ---


@torch.no_grad()
def graft(vision, text, *, dtype: torch.dtype | str | None = None, seed: int = 0):
    """Build a Qwen2.5-VL from a Qwen2.5-VL's vision tower and a Qwen2.5 text LM.

    vision: Hub id / directory of a Qwen2.5-VL, or a (Qwen2_5_VLForConditionalGeneration, processor) pair.
    text:   Hub id / directory of a Qwen2ForCausalLM, or a (Qwen2ForCausalLM, tokenizer) pair.
    dtype:  of the result; default the text model's dtype. seed: for the new merger.mlp.2.
    Returns (model, processor), the model in eval mode.
    """
    vl_config, vision_state, vl_processor = _load_vision_source(vision)
    text_model, text_tokenizer = _load_text_source(text, dtype)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or text_model.dtype

    # --- tokenizer: the LM's, with the vision (and chat) special tokens guaranteed ---
    tokenizer = copy.deepcopy(text_tokenizer)
    missing = [t for t in CHAT_TOKENS + VISION_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        logger.warning("graft: added %s to the text tokenizer", missing)
    if "<|endoftext|>" not in tokenizer.get_vocab():
        raise ValueError("the text tokenizer has no <|endoftext|>: is it a Qwen2/Qwen2.5 tokenizer?")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    tokenizer.padding_side = "left"
    vocab = tokenizer.get_vocab()
    token_ids = {t: vocab[t] for t in ("<|endoftext|>",) + CHAT_TOKENS + VISION_TOKENS}

    # --- config and an empty (randomly initialised) model of the right shape ---
    config = build_graft_config(vl_config, text_model.config, token_ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # fixes the new merger.mlp.2
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    target = model.state_dict()

    # --- copy: every LM tensor, every vision tensor but the merger's output projection ---
    new_state: dict[str, torch.Tensor] = {}
    for key, tensor in text_model.state_dict().items():
        new_state[text_key_to_vl_key(key)] = tensor
    for key, tensor in vision_state.items():
        vl_key = vision_key_to_vl_key(key)
        if vl_key in REINITIALISED_KEYS:
            continue
        new_state[vl_key] = tensor
    for key in REINITIALISED_KEYS:
        new_state[key] = target[key]
    unknown = sorted(set(new_state) - set(target))
    uncovered = sorted(set(target) - set(new_state))
    if unknown or uncovered:
        raise RuntimeError(f"graft key mapping mismatch: unexpected {unknown[:5]}, not covered {uncovered[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in new_state.items()}, strict=True)
    old_shape = tuple(vision_state["merger.mlp.2.weight"].shape)
    new_shape = tuple(target["model.visual.merger.mlp.2.weight"].shape)
    logger.warning(
        "graft: visual.merger.mlp.2 NEWLY INITIALISED %s -> %s (normal std=%g, bias 0); "
        "the grafted model has never seen images: train it (SFT) before GRPO",
        old_shape, new_shape, config.vision_config.initializer_range,
    )
    if config.tie_word_embeddings:
        model.tie_weights()

    # --- embeddings grow only if an added token id falls outside the LM's table ---
    if len(tokenizer) > config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
        logger.warning("graft: embeddings resized %d -> %d rows", text_model.config.vocab_size, len(tokenizer))

    eos = [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]]
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["<|endoftext|>"], eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=vl_processor.image_processor,
        tokenizer=tokenizer,
        video_processor=vl_processor.video_processor,
        chat_template=vl_processor.chat_template,
    )
    model.eval()
    return model, processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.graft", description=__doc__.split("\n")[0])
    parser.add_argument("--vision", required=True, help="Qwen2.5-VL Hub id or directory (vision tower + processor)")
    parser.add_argument("--text", required=True, help="Qwen2.5 text LM Hub id or directory (Qwen2ForCausalLM)")
    parser.add_argument("--out", required=True, help="output directory (save_pretrained)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: the text LM's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new merger.mlp.2")
    args = parser.parse_args(argv)
    # --out before the (slow) graft: a file there, or a model save_pretrained would overwrite.
    for flag, source in (("--vision", args.vision), ("--text", args.text)):
        if not os.path.isdir(source) and (source.startswith((".", "/", "~")) or source.count("/") != 1):
            parser.error(f"{flag} {source}: no such directory, and not a Hub id (owner/name)")
    if not args.out.strip():
        parser.error("--out is empty (an unset shell variable?); give the folder to write the grafted model to")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file, not a folder; choose another --out")
    if os.path.exists(os.path.join(args.out, "config.json")):
        parser.error(f"--out {args.out} already holds a model (config.json); choose another --out, or delete it first")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model, processor = graft(args.vision, args.text, dtype=args.dtype, seed=args.seed)
    except (ValueError, OSError) as error:  # a missing folder, a non-Qwen checkpoint, the Hub unreachable offline
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"grafted Qwen2.5-VL with {n_params:,} parameters saved to {args.out}")


if __name__ == "__main__":
    main()
