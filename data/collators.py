"""Collators: example-schema rows -> model inputs, for GRPO (prompts only) and SFT (prompt + target).

Both render `data.prompts.build_messages` with `processor.apply_chat_template(..., tokenize=False)`
and give the text and the images to the processor, which expands each <|image_pad|> into as many
tokens as the image has merged patches. Shapes (letters as in docs/architecture.md):

    input_ids, attention_mask, mm_token_type_ids   [B, P] (GRPO) or [B, L] (SFT, L = prompt + target)
    pixel_values      [sum over images of t*h*w patches, patch_dim]   (no batch dimension)
    image_grid_thw    [number of images, 3], in row order (grpo.engine.inputs.count_images_per_prompt
                      reads which rows are whose from the image_pad tokens)

GRPOCollator pads on the LEFT: every prompt then ends at column P, so the G completions sampled
for it start at the same column and one completion mask fits the whole batch.

SFTCollator pads on the RIGHT and labels only the assistant's target: labels are -100 on the
prompt (up to and including "<|im_start|>assistant\\n"), on image/vision tokens and on padding.
The target's closing <|im_end|> stays labelled so the model learns to stop. The sequence is the
prompt's tokens (processor on the prompt-only text) followed by the target's tokens (tokenizer on
the target text): exactly the token boundary the model sees when it generates after the prompt.

Run the tests:  python -m pytest tests/test_data_collators.py -q
"""

from __future__ import annotations

import io

import datasets
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from data.prompts import SYSTEM_PROMPT, build_messages
from data.sources import describe_row

IGNORE_INDEX = -100  # label value the cross-entropy ignores
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def _images(example: dict) -> list:
    return list(example.get("images") or [])


def prompt_text(processor, example: dict, system_prompt: str | None = SYSTEM_PROMPT) -> str:
    """The chat-template text of the prompt, ending with the generation prompt."""
    messages = build_messages(example, system_prompt=system_prompt)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _process(processor, texts: list[str], examples: list[dict], padding_side: str) -> dict:
    """Processor call on a batch; images flattened in row order (the order of their tokens).

    When the processor refuses the batch, the error names the dataset row it refuses (each example
    is tried alone, on this error path only), so a bad row can be found in the file."""
    flat_images = [image for example in examples for image in _images(example)]
    try:
        return processor(text=texts, images=flat_images or None, padding=True,
                         padding_side=padding_side, return_tensors="pt")
    except Exception as error:
        for text, example in zip(texts, examples, strict=True):
            try:
                processor(text=[text], images=_images(example) or None, return_tensors="pt")
            except Exception:
                sizes = [getattr(image, "size", None) for image in _images(example)]
                raise ValueError(f"the processor refuses {describe_row(example)} (image sizes {sizes}): "
                                 f"{type(error).__name__}: {error}") from error
        raise


def _check_prompt_lengths(lengths: torch.Tensor, max_prompt_length: int | None) -> None:
    if max_prompt_length is None:
        return
    too_long = (lengths > max_prompt_length).nonzero().flatten().tolist()
    if too_long:
        # Cutting a prompt could split an image's tokens from its pixels: refuse instead.
        raise ValueError(
            f"prompt(s) at batch rows {too_long} have {lengths[too_long].tolist()} tokens, more than "
            f"--max_prompt_length {max_prompt_length}. Raise --max_prompt_length, lower the image "
            f"budget (max_pixels), or drop long prompts with data.collators.filter_long_prompts.")


def prompt_lengths(processor, examples: list[dict], system_prompt: str | None = SYSTEM_PROMPT
                   ) -> list[int]:
    """Prompt tokens (image tokens expanded) of each example, as the GRPO collator makes them."""
    texts = [prompt_text(processor, example, system_prompt) for example in examples]
    batch = _process(processor, texts, examples, padding_side="left")
    return batch["attention_mask"].sum(dim=1).tolist()


def prompt_length(processor, example: dict, system_prompt: str | None = SYSTEM_PROMPT) -> int:
    """Prompt tokens of one example (image tokens expanded)."""
    return prompt_lengths(processor, [example], system_prompt)[0]


def filter_long_prompts(dataset, processor, max_prompt_length: int,
                        system_prompt: str | None = SYSTEM_PROMPT, batch_size: int = 64):
    """(dataset without the rows whose prompt exceeds max_prompt_length, number of rows dropped)."""
    keep = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
        lengths = prompt_lengths(processor, list(rows), system_prompt)
        keep += [start + i for i, n in enumerate(lengths) if n <= max_prompt_length]
    return dataset.select(keep), len(dataset) - len(keep)


def _image_size(value) -> tuple[int, int]:
    """(width, height) of a stored image, from its header only (no pixel decoding)."""
    if isinstance(value, Image.Image):
        return value.size
    data, path = value.get("bytes"), value.get("path")
    with Image.open(io.BytesIO(data) if data is not None else path) as image:
        return image.size


def _image_tokens(image_processor, width: int, height: int) -> int:
    """Merged image tokens the Qwen2.5-VL processor makes of a width x height image."""
    patch, merge = image_processor.patch_size, image_processor.merge_size
    resized_height, resized_width = smart_resize(
        height, width, factor=patch * merge,
        min_pixels=image_processor.size.shortest_edge, max_pixels=image_processor.size.longest_edge)
    return (resized_height // patch) * (resized_width // patch) // (merge * merge)


def longest_example(dataset, processor, system_prompt: str | None = SYSTEM_PROMPT,
                    target_text=None) -> tuple[int, int]:
    """(index, tokens) of the dataset's longest prompt (with `target_text(example)`, of the longest
    prompt + target), as the collators would make it, without running the image processor on
    every row: text tokens from the tokenizer, image tokens from each image's header size."""
    tokenizer = processor.tokenizer
    images = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))["images"]
    rows = dataset.remove_columns(["images"]).to_list()
    lengths = []
    for row, stored in zip(rows, images, strict=True):
        example = {**row, "images": [None] * len(stored)}  # the template only counts the images
        text = prompt_text(processor, example, system_prompt)
        image_tokens = sum(_image_tokens(processor.image_processor, *_image_size(value)) for value in stored)
        # Each image is one <|image_pad|> in the text; the processor expands it to its tokens.
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - len(stored) + image_tokens
        if target_text is not None:
            length += len(tokenizer(target_text(example), add_special_tokens=False)["input_ids"])
        lengths.append(length)
    index = max(range(len(lengths)), key=lengths.__getitem__)
    return index, lengths[index]


def _vision_token_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in VISION_TOKENS if token in vocab]


class GRPOCollator:
    """Prompts for rollouts: left padded input ids + image tensors + the gold answers."""

    def __init__(self, processor, system_prompt: str | None = SYSTEM_PROMPT,
                 max_prompt_length: int | None = None):
        self.processor = processor
        self.system_prompt = system_prompt
        self.max_prompt_length = max_prompt_length

    def prompt_length(self, example: dict) -> int:
        """Prompt tokens of one example under this collator's processor and system prompt."""
        return prompt_length(self.processor, example, self.system_prompt)

    def __call__(self, examples: list[dict]) -> dict:
        texts = [prompt_text(self.processor, example, self.system_prompt) for example in examples]
        batch = _process(self.processor, texts, examples, padding_side="left")
        _check_prompt_lengths(batch["attention_mask"].sum(dim=1), self.max_prompt_length)
        out = {
            "input_ids": batch["input_ids"],            # [B, P], pads first
            "attention_mask": batch["attention_mask"],  # [B, P]
        }
        for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
            if key in batch:
                out[key] = batch[key]
        out["answers"] = [str(example["answer"]) for example in examples]
        out["questions"] = [example["question"] for example in examples]
        out["prompt_texts"] = texts
        out["examples"] = examples
        return out


class SFTCollator:
    """Prompt + target, right padded, labels on the target tokens and the closing <|im_end|> only."""

    def __init__(self, processor, system_prompt: str | None = SYSTEM_PROMPT):
        self.processor = processor
        self.system_prompt = system_prompt
        self.tokenizer = processor.tokenizer
        self.vision_token_ids = torch.tensor(_vision_token_ids(self.tokenizer))

    def target_text(self, example: dict) -> str:
        """The assistant turn as the chat template renders it, without the text after <|im_end|>."""
        prompt = prompt_text(self.processor, example, self.system_prompt)
        messages = build_messages(example, system_prompt=self.system_prompt, with_target=True)
        full = self.processor.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently with and without the "
                             "assistant turn; cannot separate the SFT target from the prompt")
        # Qwen's template ends the turn with "<|im_end|>\n"; generation stops at <|im_end|>, so the
        # newline after it is never produced and is not trained on.
        return full[len(prompt):].rstrip("\n")

    def __call__(self, examples: list[dict]) -> dict:
        texts = [prompt_text(self.processor, example, self.system_prompt) for example in examples]
        prompts = _process(self.processor, texts, examples, padding_side="right")
        prompt_lens = prompts["attention_mask"].sum(dim=1).tolist()
        targets = [self.tokenizer(self.target_text(example), add_special_tokens=False)["input_ids"]
                   for example in examples]
        length = max(p + len(t) for p, t in zip(prompt_lens, targets, strict=True))
        batch_size = len(examples)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)      # [B, L]
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)         # [B, L]
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)    # [B, L]
        has_types = "mm_token_type_ids" in prompts
        mm_token_type_ids = torch.zeros((batch_size, length), dtype=torch.long)      # [B, L]
        for row, (n_prompt, target) in enumerate(zip(prompt_lens, targets, strict=True)):
            n_total = n_prompt + len(target)
            target_ids = torch.tensor(target, dtype=torch.long)                      # [len(target)]
            input_ids[row, :n_prompt] = prompts["input_ids"][row, :n_prompt]
            input_ids[row, n_prompt:n_total] = target_ids
            attention_mask[row, :n_total] = 1
            labels[row, n_prompt:n_total] = target_ids
            if has_types:  # target tokens are text: type 0
                mm_token_type_ids[row, :n_prompt] = prompts["mm_token_type_ids"][row, :n_prompt]
        # Defensive: a vision token inside a target is never a prediction target.
        labels[torch.isin(labels, self.vision_token_ids)] = IGNORE_INDEX
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in ("pixel_values", "image_grid_thw"):
            if key in prompts:
                out[key] = prompts[key]
        if has_types:
            out["mm_token_type_ids"] = mm_token_type_ids
        return out
