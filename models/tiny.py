"""The built-in tiny Qwen2.5-VL: a randomly initialised model, tokenizer and processor, all offline.

Why it exists: the whole pipeline (SFT, GRPO, eval, tests) must run on a laptop CPU with no
downloads. Everything here is the real Hugging Face stack at a toy size:

- model:     `Qwen2_5_VLForConditionalGeneration` from a small `Qwen2_5_VLConfig`
             ("tiny": 0.74 M parameters for tests and the demo; "small": 27 M for benchmarks);
- tokenizer: a byte-level BPE (same pre-tokenizer regex as Qwen2, so digits are split one by one)
             trained deterministically in memory on a fixed built-in corpus of counting questions
             and reasoning traces, wrapped as `PreTrainedTokenizerFast`. Any text encodes (bytes
             are the fallback alphabet); common text is short. Qwen's special tokens keep their
             names (`<|im_start|>`, `<|image_pad|>`, ...) but get small ids; `<think>`,
             `</think>`, `<answer>`, `</answer>` are single added (non-special) tokens so that
             `decode(..., skip_special_tokens=True)` keeps them for the format reward;
- processor: a real `Qwen2_5_VLProcessor` (Qwen2-VL image processor + video processor, patch 14,
             merge 2, temporal patch 2) with a small `max_pixels` (112*112: at most 16 image tokens
             per image after merging) and a Qwen2-VL chat template (no default system prompt).

Same seed -> identical weights (the global RNG is forked, so callers' RNG state is untouched).

Run: `python -m models.tiny` prints the parameter counts and a tokenised example prompt.
"""

from __future__ import annotations

import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from data.prompts import SYSTEM_PROMPT

# --- special tokens (the names Qwen2.5-VL uses; ids are assigned in this order from 0) ---
ENDOFTEXT = "<|endoftext|>"  # pad (and bos) as in Qwen
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of a chat turn: the EOS that ends a completion
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"  # one per merged image token; the processor expands it
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD)
# Tags the format reward looks for: added as single tokens but not special, so decode keeps them.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

TOKENIZER_VOCAB_SIZE = 1000

# Qwen2's pre-tokenizer split: contractions, words, single digits, punctuation runs, whitespace.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL's chat template, minus the default "You are a helpful assistant." system turn (it would
# only make the tiny model's prompts longer). Content items of type "image" (or carrying an
# "image" key) become <|vision_start|><|image_pad|><|vision_end|>, which the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Image budget of the tiny preset: 112*112 pixels -> at most (112/28)^2 = 16 merged tokens.
TINY_MAX_PIXELS = 112 * 112
# Small enough that 28x28 images are not upscaled (one merged token).
TINY_MIN_PIXELS = 28 * 28

# --- model sizes ---
# head_dim = hidden / heads; mRoPE splits head_dim/2 rotary frequencies into (temporal, height,
# width) sections, so mrope_section must sum to head_dim / 2.
SIZES: dict[str, dict] = {
    "tiny": dict(
        text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=344, mrope_section=[4, 6, 6]),  # head_dim 32 -> 16 = 4+6+6
        vision=dict(hidden_size=64, depth=2, num_heads=2, intermediate_size=128,
                    fullatt_block_indexes=[1]),  # block 0 windowed, block 1 full attention
    ),
    "small": dict(
        text=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1376, mrope_section=[8, 12, 12]),  # head_dim 64 -> 32
        vision=dict(hidden_size=256, depth=4, num_heads=4, intermediate_size=512,
                    fullatt_block_indexes=[1, 3]),
    ),
}


# Everyday and reasoning words, so that free text from a real dataset is not all single bytes.
COMMON_WORDS = (
    "the of and to in is it that for on with as was by at this be from or have an they which one "
    "you were all their been has when who will more no if out so said what up its about into than "
    "them can only new some could these two may then do first any my now such like our over even "
    "most made after also did many before must through back where much your way well down should "
    "because each just those people how too little good very make world still own see work long get "
    "here between both being under never same another know while last might great old off come "
    "since against go right used take three count counting total number numbers object item "
    "items picture scene shown visible behind front left next sum difference question therefore "
    "then add adding subtract remove removing removed remaining after before let me look carefully "
    "step check again wait yes correct wrong options option choose choice letter value compute "
    "calculate result find given shape shapes colour color colours size sizes material materials "
    "metallic objects thing things other same different bigger smaller largest smallest more less "
    "fewer equal total counted altogether together apart below above inside outside near far "
    "math problem solve solution equation angle triangle area length width height"
)


def _training_corpus() -> list[str]:
    """The fixed text the tiny BPE is trained on: what counting prompts and traces look like."""
    colours = "red blue green yellow purple cyan gray brown orange pink white black".split()
    shapes = "cube sphere cylinder cone square circle triangle".split()
    sizes = ["small", "large"]
    materials = ["rubber", "metal", "matte", "shiny"]
    number_words = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                    "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
    corpus = [SYSTEM_PROMPT] * 4 + [COMMON_WORDS]
    corpus += [
        "How many items are there in the image?",
        "How many objects are there in the image?",
        "How many objects are left after removing all red cubes?",
        "How many objects are there? Output the thinking process in <think> </think> and the final "
        "answer in <answer> </answer> tags.",
        "I see", "There are", "so the answer is", "plus", "minus", "equals",
        "<think>", "</think>", "<answer>", "</answer>",
    ] * 3
    corpus += [" ".join(str(i) for i in range(21)), " ".join(number_words)]
    for i, colour in enumerate(colours):
        for j, shape in enumerate(shapes):
            n = (i + j) % 7 + 1
            size, material = sizes[(i + j) % 2], materials[(i * 3 + j) % 4]
            plural = shape + ("s" if n != 1 else "")
            corpus.append(
                f"How many {colour} {plural} are there in the image? How many objects are left after "
                f"removing all {colour} {shape}s?"
            )
            corpus.append(
                f"<think> I see {n} {size} {colour} {material} {plural}. There are {n + 2} objects, "
                f"{n + 2} minus {n} equals 2, so the answer is 2. </think><answer>{n}</answer>"
            )
            corpus.append(f"There is a {size} {material} {colour} {shape}. {n} plus {j} equals {n + j}.")
    return corpus


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE (~1000 tokens) with Qwen's special tokens, left padding."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - len(TAG_TOKENS),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..7 in SPECIAL_TOKENS order
        show_progress=False,
    )
    backend.train_from_iterator(_training_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,  # Qwen adds no BOS
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        padding_side="left",  # prompts are left padded so every completion starts at the same column
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD},
    )
    tokenizer.add_tokens(list(TAG_TOKENS), special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_processor(
    tokenizer: PreTrainedTokenizerFast | None = None,
    max_pixels: int = TINY_MAX_PIXELS,
    min_pixels: int = TINY_MIN_PIXELS,
) -> Qwen2_5_VLProcessor:
    """A real `Qwen2_5_VLProcessor` around the tiny tokenizer, with a small pixel budget."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    shared = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels)
    image_processor = Qwen2VLImageProcessor(**shared)
    video_processor = Qwen2VLVideoProcessor(**shared)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_config(tokenizer: PreTrainedTokenizerFast, size: str = "tiny") -> Qwen2_5_VLConfig:
    """A `Qwen2_5_VLConfig` of the given size whose token ids match `tokenizer`."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny size {size!r}; valid sizes: {sorted(SIZES)}")
    text, vision = dict(SIZES[size]["text"]), SIZES[size]["vision"]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    mrope_section = text.pop("mrope_section")
    text_config = dict(
        **text,
        vocab_size=len(tokenizer),
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        tie_word_embeddings=True,
    )
    vision_config = dict(
        **vision,
        hidden_act="silu",
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,  # 112 px = 8 patches = 4 merged tokens per window side
        out_hidden_size=text["hidden_size"],  # the merger projects into the LM's hidden size
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True,
    )


def build_tiny_policy(
    seed: int = 0,
    size: str = "tiny",
    max_pixels: int = TINY_MAX_PIXELS,
    min_pixels: int = TINY_MIN_PIXELS,
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A randomly initialised float32 Qwen2.5-VL of `size` ("tiny" or "small") and its processor.

    Deterministic: the same seed gives identical weights, and the caller's RNG state is untouched.
    """
    processor = build_tiny_processor(max_pixels=max_pixels, min_pixels=min_pixels)
    tokenizer = processor.tokenizer
    config = build_tiny_config(tokenizer, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=torch.float32, attn_implementation="sdpa"
        )
    eos_ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=eos_ids,  # [<|im_end|>, <|endoftext|>] as in Qwen2.5-VL's generation_config
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    return model, processor


if __name__ == "__main__":
    for name in SIZES:
        m, _ = build_tiny_policy(size=name)
        print(f"{name}: {sum(p.numel() for p in m.parameters()):,} parameters")
    model, processor = build_tiny_policy()
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many objects are there in the image?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text], images=[Image.new("RGB", (84, 84))], return_tensors="pt")
    print(f"vocab {len(processor.tokenizer)}; prompt tokens with an 84x84 image: {batch['input_ids'].shape[1]}")
