"""Tests of models/loading.py: load_policy (presets and local dirs), special ids, the reference copy.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_models_loading.py -q
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import Qwen2Config

from data.prompts import SYSTEM_PROMPT
from models.loading import TINY_PRESETS, load_policy, make_reference, special_token_ids


def prompt_batch(processor, image_size=(84, 84)):
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many objects are there in the image?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[Image.new("RGB", image_size, "green")], return_tensors="pt")


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny")


def test_presets_are_reserved_names():
    assert set(TINY_PRESETS) == {"tiny", "tiny-small"}


def test_tiny_preset_defaults(tiny):
    model, processor = tiny
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert processor.tokenizer.padding_side == "left"
    assert not model.training


def test_save_and_load_roundtrip_offline(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded, loaded_processor = load_policy(str(tmp_path))
    batch = prompt_batch(processor)
    loaded_batch = prompt_batch(loaded_processor)
    for key in batch:
        assert torch.equal(batch[key], loaded_batch[key]), key
    with torch.no_grad():
        expected = model(**batch).logits  # [1, P, V]
        got = loaded(**loaded_batch).logits  # [1, P, V]
    # The same weights through the same kernels: equal to the last bit, on any CPU, because every
    # loaded weight sits in torch's own 64-byte-aligned memory, as the in-memory model's do (kernels
    # split their sums by alignment; the mmap'd file's offsets are not aligned: models/loading.py).
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    assert torch.equal(expected, got)
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    assert special_token_ids(loaded, loaded_processor) == special_token_ids(model, processor)
    assert loaded_processor.tokenizer.padding_side == "left"
    assert loaded.dtype == torch.float32


def test_dtype_and_pixel_overrides():
    model, processor = load_policy("tiny", dtype="bfloat16", max_pixels=56 * 56, min_pixels=28 * 28)
    assert model.dtype == torch.bfloat16
    batch = prompt_batch(processor)  # 84x84 shrunk to 56x56 -> 2x2 = 4 merged tokens
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    eager, _ = load_policy("tiny", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        load_policy("tiny", dtype="float7")
    with pytest.raises(ValueError, match="attn_implementation"):
        load_policy("tiny", attn_implementation="magic")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="flash-attn"):
            load_policy("tiny", attn_implementation="flash_attention_2")
    # A text-only Qwen2 checkpoint is refused with a pointer to models.graft.
    Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'qwen2'.*models\.graft"):
        load_policy(str(tmp_path))


def test_special_token_ids(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    ids = special_token_ids(model, processor)
    assert ids.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert ids.eos_token_ids == (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
    assert ids.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert ids.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert ids.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")


def test_special_token_ids_always_include_im_end(tiny):
    model, processor = tiny
    reference = make_reference(model)
    reference.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = special_token_ids(reference, processor)
    assert ids.eos_token_ids == (0, processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))


def test_reference_is_frozen_copy(tiny):
    model, processor = tiny
    policy = make_reference(model)  # a private trainable copy, so the fixture stays untouched
    for param in policy.parameters():
        param.requires_grad_(True)
    policy.train()
    reference = make_reference(policy)
    assert not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    assert reference.dtype == policy.dtype
    before = {name: t.clone() for name, t in reference.state_dict().items()}

    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    batch = prompt_batch(processor)
    loss = policy(**batch).logits.float().pow(2).mean()
    loss.backward()
    optimizer.step()

    changed = policy.model.language_model.embed_tokens.weight
    assert not torch.equal(changed, before["model.language_model.embed_tokens.weight"])
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None for p in reference.parameters())
