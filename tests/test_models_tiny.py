"""Tests of the built-in tiny Qwen2.5-VL preset (models/tiny.py): tokenizer, processor, model.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_models_tiny.py -q
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tolerances import sum_error
from transformers import Qwen2_5_VLForConditionalGeneration

from data.prompts import SYSTEM_PROMPT
from models.freeze import count_parameters
from models.tiny import (
    SPECIAL_TOKENS,
    TAG_TOKENS,
    build_tiny_config,
    build_tiny_policy,
    build_tiny_tokenizer,
)

QUESTION = "How many objects are there in the image?"


def counting_messages(question: str = QUESTION) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
    ]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_policy(seed=0)


@pytest.fixture(scope="module")
def batch(tiny):
    _, processor = tiny
    text = processor.apply_chat_template(counting_messages(), add_generation_prompt=True, tokenize=False)
    short = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    images = [Image.new("RGB", (84, 84), "red"), Image.new("RGB", (56, 56), "blue")]
    return processor(text=[text, short], images=images, return_tensors="pt", padding=True)


# --- tokenizer ---


def test_tokenizer_special_tokens_and_tags():
    tokenizer = build_tiny_tokenizer()
    # Qwen's special tokens exist, each one id, in the order of SPECIAL_TOKENS.
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "left"
    for tag in TAG_TOKENS:
        assert len(tokenizer(tag)["input_ids"]) == 1, tag
    # Tags survive skip_special_tokens (the format reward needs them); chat tokens do not.
    text = "<|im_start|>assistant\n<think> I see 3 red cubes. </think><answer>3</answer><|im_end|>"
    decoded = tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)
    assert decoded == "assistant\n<think> I see 3 red cubes. </think><answer>3</answer>"


def test_tokenizer_is_deterministic_and_covers_any_text():
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert 900 <= len(first) <= 1100
    for text in ["Hello wörld 123 😀\n\t", "x^2 + \\frac{1}{2} = ?", SYSTEM_PROMPT]:
        assert first.decode(first(text)["input_ids"]) == text
    # Common text is short: one token per word of the system prompt, roughly.
    assert len(first(SYSTEM_PROMPT)["input_ids"]) < 90
    assert len(first(QUESTION)["input_ids"]) == 9


def test_chat_template(tiny):
    _, processor = tiny
    text = processor.apply_chat_template(counting_messages(), add_generation_prompt=True, tokenize=False)
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # An assistant turn (SFT target) closes with <|im_end|>.
    messages = counting_messages() + [{"role": "assistant", "content": "<answer>3</answer>"}]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n<answer>3</answer><|im_end|>\n")


# --- processor ---


def test_processor_outputs(tiny, batch):
    model, processor = tiny
    assert set(batch) >= {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    # 84x84 -> 6x6 patches of 14 px -> 3x3 = 9 merged tokens; 56x56 -> 4x4 patches -> 4 tokens.
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6], [1, 4, 4]]
    assert batch["pixel_values"].shape == (36 + 16, 3 * 2 * 14 * 14)  # [N_patches, C*t*p*p]
    image_id = model.config.image_token_id
    assert (batch["input_ids"] == image_id).sum(-1).tolist() == [9, 4]
    # mm_token_type_ids marks exactly the image tokens.
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == image_id)
    # Left padding: the shorter prompt starts with pad / attention 0, both end with "assistant\n".
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert batch["input_ids"][1, 0] == processor.tokenizer.pad_token_id


def test_processor_pixel_budget(tiny):
    _, processor = tiny
    # A large image is shrunk to at most 112*112 pixels: <= 16 merged tokens.
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (640, 480))], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert t * h * w // 4 <= 16


# --- model ---


def test_config_ids_match_tokenizer(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    config = model.config
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.vocab_size == len(tok)
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    assert model.generation_config.eos_token_id == eos
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.dtype == torch.float32


def test_parameter_counts(tiny):
    model, processor = tiny
    assert 500_000 <= count_parameters(model)["total"] <= 1_000_000
    with torch.device("meta"):
        small = Qwen2_5_VLForConditionalGeneration(build_tiny_config(processor.tokenizer, "small"))
    assert 10_000_000 <= count_parameters(small)["total"] <= 100_000_000
    with pytest.raises(ValueError, match="valid sizes"):
        build_tiny_config(processor.tokenizer, "huge")


def test_same_seed_same_weights_and_rng_untouched(tiny):
    model, _ = tiny
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    again, _ = build_tiny_policy(seed=0)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is not consumed
    other, _ = build_tiny_policy(seed=1)
    ref_state, other_state = model.state_dict(), other.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    assert not torch.equal(other_state["lm_head.weight"], ref_state["lm_head.weight"])


def test_forward_and_generate(tiny, batch):
    model, processor = tiny
    head_inputs = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: head_inputs.append(args[0]))
    with torch.no_grad():
        out = model(**batch)
        assert out.logits.shape == (*batch["input_ids"].shape, len(processor.tokenizer))  # [B, P, V]
        last = model(**batch, logits_to_keep=1).logits  # [B, 1, V]
    hook.remove()
    # The same forward up to lm_head; only its matmul runs on another shape ([B, 1, D] vs
    # [B, P, D]): a float32 sum of D terms, sum_error(D, sum |h_d W_vd|).
    hidden = head_inputs[0][:, -1]  # [B, D]
    assert torch.equal(hidden, head_inputs[1][:, -1])
    abs_sum = (hidden.abs() @ model.lm_head.weight.abs().t()).max().item()
    atol = sum_error(hidden.shape[-1], abs_sum)
    torch.testing.assert_close(last[:, -1], out.logits[:, -1], rtol=0, atol=atol)
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    prompt_len = batch["input_ids"].shape[1]
    assert generated.shape[0] == 2 and prompt_len < generated.shape[1] <= prompt_len + 4
    assert torch.equal(generated[:, :prompt_len], batch["input_ids"])
