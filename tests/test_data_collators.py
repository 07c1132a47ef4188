"""Tests for data/collators.py with the tiny preset's real Qwen2_5_VLProcessor.

Pins: GRPO prompts are left padded; pixel_values rows == sum of image_grid_thw.prod(-1); image
tokens per row match that row's images; SFT labels are exactly the target + <|im_end|>, never an
image/vision token, never the prompt or padding. Run: python -m pytest tests/test_data_collators.py -q
"""

from __future__ import annotations

import pytest
import torch

from data.collators import (
    IGNORE_INDEX,
    GRPOCollator,
    SFTCollator,
    filter_long_prompts,
    prompt_length,
    prompt_text,
)
from data.prompts import format_target
from data.synthetic import make_counting_dataset, make_example
from grpo.engine.inputs import count_images_per_prompt
from models.tiny import build_tiny_processor

MERGE = 2  # spatial merge: one image token per 2x2 patches


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture(scope="module")
def examples():
    rows = [make_example(0, i, question_kinds=("total", "complex")) for i in range(3)]
    rows[1]["images"] = rows[1]["images"] + [make_example(1, 0, image_size=56)["images"][0]]  # 2 images
    rows[2]["thinking"] = None
    return rows


def _image_token_id(processor):
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def test_grpo_collator_left_pads_and_keeps_answers(processor, examples):
    batch = GRPOCollator(processor)(examples)
    ids, mask = batch["input_ids"], batch["attention_mask"]                     # [B, P]
    assert ids.shape == mask.shape and ids.shape[0] == 3
    assert (mask[:, -1] == 1).all()                    # every prompt ends at the last column
    assert (mask[:, 1:] >= mask[:, :-1]).all()          # 0...0 1...1: pads first
    assert (mask == 0).any()                            # rows really differ in length
    assert (ids[mask == 0] == processor.tokenizer.pad_token_id).all()
    assert batch["answers"] == [e["answer"] for e in examples]
    assert batch["questions"] == [e["question"] for e in examples]
    # The image_pad tokens of each row add up to its images (the count the trainer reads them by).
    merge = processor.image_processor.merge_size
    assert count_images_per_prompt(ids, batch["image_grid_thw"], image_token_id=_image_token_id(processor), spatial_merge_size=merge) == [1, 2, 1]
    assert batch["prompt_texts"][0].endswith("<|im_start|>assistant\n")
    assert batch["examples"] is examples


def test_grpo_image_tensors_line_up_with_rows(processor, examples):
    batch = GRPOCollator(processor)(examples)
    grid = batch["image_grid_thw"]                                              # [num_images, 3]
    assert grid.shape == (4, 3)
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    # 112x112 -> 8x8 patches -> 16 tokens; 56x56 -> 4x4 patches -> 4 tokens.
    tokens_per_image = (grid.prod(-1) // MERGE**2).tolist()
    assert tokens_per_image == [16, 16, 4, 16]
    image_tokens = (batch["input_ids"] == _image_token_id(processor)).sum(dim=1).tolist()
    assert image_tokens == [16, 16 + 4, 16]
    # mm_token_type_ids marks exactly the image tokens (the forward needs it for 3-D positions).
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == _image_token_id(processor))


def test_max_prompt_length_raises_and_filter_drops_long_prompts(processor, examples):
    lengths = [prompt_length(processor, e) for e in examples]
    assert lengths[1] > lengths[0]  # the two-image prompt is longer
    limit = lengths[1] - 1
    with pytest.raises(ValueError, match="--max_prompt_length"):
        GRPOCollator(processor, max_prompt_length=limit)(examples)
    GRPOCollator(processor, max_prompt_length=lengths[1])(examples)  # fits exactly
    dataset = make_counting_dataset(4, seed=0)
    short = min(prompt_length(processor, row) for row in dataset)
    kept, skipped = filter_long_prompts(dataset, processor, short, batch_size=3)
    assert len(kept) + skipped == 4 and len(kept) >= 1
    assert all(prompt_length(processor, row) <= short for row in kept)


def test_sft_labels_are_the_target_and_im_end(processor, examples):
    batch = SFTCollator(processor)(examples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]  # [B, L]
    tokenizer = processor.tokenizer
    for row, example in enumerate(examples):
        labelled = labels[row][labels[row] != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == format_target(example) + "<|im_end|>"
        # The labelled tokens are one contiguous span that ends the sequence (then padding).
        positions = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        n_total = int(mask[row].sum())
        assert positions.tolist() == list(range(n_total - len(labelled), n_total))
        # Everything before it is the prompt exactly as the GRPO collator tokenizes it.
        prompt_ids = GRPOCollator(processor)([example])["input_ids"][0]
        assert torch.equal(ids[row, : len(prompt_ids)], prompt_ids)
        assert len(prompt_ids) == n_total - len(labelled)
    assert tokenizer.decode(labels[2][labels[2] != IGNORE_INDEX]) == "<answer>" + examples[2]["answer"] + "</answer><|im_end|>"


def test_sft_masks_images_padding_and_pads_right(processor, examples):
    batch = SFTCollator(processor)(examples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    vision = [processor.tokenizer.convert_tokens_to_ids(t) for t in
              ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")]
    assert not torch.isin(labels, torch.tensor(vision)).any()
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert (mask[:, :-1] >= mask[:, 1:]).all()         # 1...1 0...0: right padding
    assert (mask[:, 0] == 1).all()
    assert (ids[mask == 0] == processor.tokenizer.pad_token_id).all()
    grid = batch["image_grid_thw"]
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    types = batch["mm_token_type_ids"]
    assert types.shape == ids.shape
    assert torch.equal(types.bool(), ids == _image_token_id(processor))  # zeros over the target


def test_sft_target_is_the_chat_template_assistant_turn(processor, examples):
    collator = SFTCollator(processor)
    target = collator.target_text(examples[0])
    assert target == format_target(examples[0]) + "<|im_end|>"
    assert prompt_text(processor, examples[0]).endswith("<|im_start|>assistant\n")


def test_batches_run_through_the_tiny_model(examples):
    from models.tiny import build_tiny_policy

    model, processor = build_tiny_policy(seed=0)
    sft = SFTCollator(processor)(examples)
    with torch.no_grad():
        out = model(**sft)
    assert torch.isfinite(out.loss)
    grpo = GRPOCollator(processor)(examples)
    tensors = {k: v for k, v in grpo.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        logits = model(**tensors).logits                                          # [B, P, V]
    assert logits.shape[:2] == grpo["input_ids"].shape
