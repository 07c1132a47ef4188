"""Tests for grpo/engine/forward.py: image encoding and expansion, 3-D positions, the scoring forward.

A tiny random Qwen2_5_VLForConditionalGeneration (text 64 x 2 layers, vision 32 x 2 blocks,
vocab 300, ~0.2 M parameters) in float32 with SDPA attention, and hand-built batches: left
padded prompts of different lengths with 1 or 2 images each. `build_model` and `make_batch` are
also used by tests/test_rollout.py.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_forward.py -q
"""

from __future__ import annotations

import pytest
import torch
from tolerances import float64_throughout, network_error
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from grpo.engine.forward import completion_logprobs, completion_logprobs_shared_prompt
from grpo.engine.hf_compat import can_share_prompt
from grpo.engine.inputs import (
    build_inputs_embeds,
    count_images_per_prompt,
    encode_images,
    image_inputs_for_rows,
    mrope_position_ids,
)
from grpo.masks import completion_mask
from models.freeze import enable_gradient_checkpointing

VOCAB = 300
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, EOS, PAD = 290, 291, 292, 293, 294, 295
MERGE = 2
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch * patch * patch

# Two prompts of different lengths; the first has two images (4x4 and 2x4 patches -> 4 and 2
# merged tokens), the second one (4x6 -> 6 tokens). Ints are runs of random text tokens.
TWO_PROMPTS = [[3, (1, 4, 4), 5, (1, 2, 4), 2], [6, (1, 4, 6), 4]]

# Terms of the sums on this model's deepest path, for tolerances.network_error: per vision block
# norm 32 + qkv 32 + scores 16 + values <= 24 + proj 32 + norm 32 + MLP 32 + 64 (x 2 blocks), the
# merger 32 + 128 + 128, per text layer norm 64 + qkv 64 + scores 16 + values <= 64 + o 64 + norm
# 64 + gate/up 64 + down 128 (x 2 layers), final norm 64 + lm_head 64 + logsumexp 300: ~2,300,
# rounded up. The tests comparing two computation orders of the model run it in float64.
PATH_TERMS = 4096


def build_model(seed: int = 0, attn: str = "sdpa") -> Qwen2_5_VLForConditionalGeneration:
    """A random tiny Qwen2.5-VL in float32. mrope_section sums to head_dim / 2 = 16 / 2."""
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=14, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS, tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def make_batch(prompts: list[list], seed: int = 0) -> dict:
    """A collated GRPO batch: left padded input_ids [B, P], pixel_values without batch dim."""
    g = torch.Generator().manual_seed(seed)
    rows, grids = [], []
    for segments in prompts:
        ids = []
        for segment in segments:
            if isinstance(segment, int):  # a run of text tokens, ids below the special ones
                ids += torch.randint(0, 280, (segment,), generator=g).tolist()
            else:  # an image grid (t, h, w) in patches -> t*h*w / 4 image_pad tokens
                grids.append(segment)
                t, h, w = segment
                ids += [VISION_START] + [IMAGE_PAD] * (t * h * w // MERGE**2) + [VISION_END]
        rows.append(ids)
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), PAD)  # [B, P]
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)  # [B, P]
    for i, ids in enumerate(rows):
        input_ids[i, length - len(ids) :] = torch.tensor(ids)
        attention_mask[i, length - len(ids) :] = 1
    image_grid_thw = torch.tensor(grids)  # [num_images, 3]
    pixel_values = torch.randn(int(image_grid_thw.prod(-1).sum()), PATCH_DIM, generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,  # [sum t*h*w, PATCH_DIM]
        "image_grid_thw": image_grid_thw,
        "mm_token_type_ids": (input_ids == IMAGE_PAD).long(),  # [B, P]
    }


def completion_mask_of(completion_ids: torch.Tensor) -> torch.Tensor:
    """1 through the first EOS, 0 after, as the trainer builds it (grpo/grpo_loop.py, RolloutRounds)."""
    return completion_mask(completion_ids, [EOS])[0]  # [R, T]


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def batch():
    return make_batch(TWO_PROMPTS)


@pytest.fixture(scope="module")
def model64():
    """The same model in float64 throughout, for the tests that compare two computation orders of it."""
    with float64_throughout():
        yield build_model().double()


@pytest.fixture(scope="module")
def batch64(batch):
    return {**batch, "pixel_values": batch["pixel_values"].double()}


# --- positions ---


def test_mrope_positions_equal_get_rope_index(model):
    # Three rows: two images, one image, one image at the very end of the prompt.
    batch = make_batch([[3, (1, 4, 4), 5, (1, 2, 4), 2], [6, (1, 4, 6), 4], [1, (1, 6, 2)]], seed=1)
    positions, next_position = mrope_position_ids(
        batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
        image_token_id=IMAGE_PAD, spatial_merge_size=MERGE,
    )
    expected, rope_deltas = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert torch.equal(positions, expected)
    # HF's rope_delta = (max position + 1) - real length; generate decodes at length + delta.
    assert torch.equal(next_position, rope_deltas.flatten() + batch["attention_mask"].sum(-1))
    # Row 0 by hand: 3 text (0,1,2), vision_start 3, a 2x2 image at 4 + (0..1, 0..1), the text
    # after it continues at 4 + max(2, 2) = 6.
    row = positions[:, 0, batch["attention_mask"][0].bool()]  # [3, n]
    assert row[:, :5].tolist() == [[0, 1, 2, 3, 4]] * 3
    assert row[:, 4:8].tolist() == [[4, 4, 4, 4], [4, 4, 5, 5], [4, 5, 4, 5]]
    assert row[:, 8].tolist() == [6, 6, 6]


def test_mrope_positions_text_only_skip_left_padding():
    input_ids = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10]])  # [2, 4]
    attention_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    positions, next_position = mrope_position_ids(
        input_ids, attention_mask, None, image_token_id=IMAGE_PAD, spatial_merge_size=MERGE
    )
    assert positions[0].tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert torch.equal(positions[0], positions[2])
    assert next_position.tolist() == [2, 4]


# --- images ---


def test_encode_images_once_equals_one_image_at_a_time(model64, batch64):
    model, batch = model64, batch64
    together = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])  # [N, D]
    patches = batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())
    one_by_one = torch.cat(
        [encode_images(model, p, g[None]) for p, g in zip(patches, batch["image_grid_thw"], strict=True)]
    )
    assert together.shape == (4 + 2 + 6, 64)
    # Other shapes, other summation orders: float64 network bound at the embeddings' size.
    atol = network_error(PATH_TERMS, one_by_one.abs().max().item())
    torch.testing.assert_close(together, one_by_one, atol=atol, rtol=0)


def test_every_row_of_a_group_gets_its_own_prompts_images():
    # Prompt 0: images of 4 and 2 tokens (6 rows), prompt 1: one image of 6 tokens; G = 2, so rows
    # 0, 1 are prompt 0 and rows 2, 3 prompt 1. Embedding value = its index, so the expected layout
    # can be written out.
    grid = torch.tensor([[1, 4, 4], [1, 2, 4], [1, 4, 6]])
    embeds = torch.arange(12.0)[:, None].expand(12, 3)  # [N=12, D=3]
    expanded, _ = image_inputs_for_rows(embeds, grid, [2, 1], 2, range(4), MERGE)  # [N*G, D]
    prompt0, prompt1 = list(range(0, 6)), list(range(6, 12))
    assert expanded[:, 0].tolist() == prompt0 + prompt0 + prompt1 + prompt1
    # The naive whole-tensor repeat interleaves prompts: row 1 would read prompt 1's image.
    assert embeds.repeat(2, 1)[:, 0].tolist() != expanded[:, 0].tolist()


def test_image_inputs_for_any_subset_of_rows():
    grid = torch.tensor([[1, 4, 4], [1, 2, 4], [1, 4, 6]])
    embeds = torch.arange(12.0)[:, None]  # [12, 1]
    rows_embeds, rows_grid = image_inputs_for_rows(embeds, grid, [2, 1], 3, [4, 1], MERGE)
    # Row 4 is prompt 1 (4 // 3), row 1 is prompt 0.
    assert rows_embeds[:, 0].tolist() == list(range(6, 12)) + list(range(0, 6))
    assert rows_grid.tolist() == [[1, 4, 6], [1, 4, 4], [1, 2, 4]]


def test_count_images_per_prompt(batch):
    counts = count_images_per_prompt(
        batch["input_ids"], batch["image_grid_thw"], image_token_id=IMAGE_PAD, spatial_merge_size=MERGE
    )
    assert counts == [2, 1]


def test_build_inputs_embeds_fills_image_slots_in_order(model, batch):
    image_embeds = torch.randn(12, 64)  # [N, D]
    embeds = build_inputs_embeds(model, batch["input_ids"], image_embeds)  # [B, P, D]
    slots = batch["input_ids"] == IMAGE_PAD  # [B, P]
    # Copies (masked_scatter, an embedding lookup): no arithmetic, so equal to the last bit.
    assert torch.equal(embeds[slots], image_embeds)
    text = model.get_input_embeddings()(batch["input_ids"])  # [B, P, D]
    assert torch.equal(embeds[~slots], text[~slots])


# --- the scoring forward ---


def _prompt_and_completion(batch, seed=0, length=7):
    g = torch.Generator().manual_seed(seed)
    completion_ids = torch.randint(0, 280, (batch["input_ids"].shape[0], length), generator=g)  # [B, T]
    completion_ids[0, 4] = EOS  # row 0 ends early: tokens 5 and 6 are padding
    completion_ids[0, 5:] = PAD
    return completion_ids


def _our_logprobs(model, batch, completion_ids, **kwargs):
    image_embeds = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])  # [N, D]
    return completion_logprobs(
        model, batch["input_ids"], batch["attention_mask"], completion_ids,
        completion_mask_of(completion_ids), image_embeds, batch["image_grid_thw"],
        image_token_id=IMAGE_PAD, spatial_merge_size=MERGE, **kwargs,
    )


def _hf_logprobs(model, batch, completion_ids, with_mm_token_type_ids):
    """The plain HF forward over prompt + completion, from input_ids and pixel_values."""
    input_ids = torch.cat([batch["input_ids"], completion_ids], 1)  # [B, P+T]
    attention_mask = torch.cat([batch["attention_mask"], completion_mask_of(completion_ids)], 1)
    kwargs = {}
    if with_mm_token_type_ids:  # extended with zeros over the (text) completion
        kwargs["mm_token_type_ids"] = torch.cat(
            [batch["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1
        )  # [B, P+T]
    model.model.rope_deltas = None  # the HF forward caches this between calls
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"], **kwargs,
    ).logits[:, batch["input_ids"].shape[1] - 1 : -1]  # [B, T, V]
    return torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)  # [B, T]


@torch.no_grad()
def test_completion_logprobs_match_hf_forward_only_with_mm_token_type_ids(model64, batch64):
    model, batch = model64, batch64
    completion_ids = _prompt_and_completion(batch)
    mask = completion_mask_of(completion_ids).bool()
    ours = _our_logprobs(model, batch, completion_ids)  # [B, T]
    with_mm = _hf_logprobs(model, batch, completion_ids, with_mm_token_type_ids=True)
    without_mm = _hf_logprobs(model, batch, completion_ids, with_mm_token_type_ids=False)
    # Embeddings built by hand vs by HF (other order of ops): float64 network bound at |logp|.
    assert (ours - with_mm)[mask].abs().max() < network_error(PATH_TERMS, with_mm[mask].abs().max().item())
    # Without mm_token_type_ids the image tokens get text positions, silently.
    assert (ours - without_mm)[mask].abs().max() > 1e-3


@torch.no_grad()
def test_completion_logprobs_of_a_micro_batch_equal_the_full_batch(model64, batch64):
    model, batch = model64, batch64
    group_size = 2
    image_embeds = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])  # [N, D]
    prompt_ids = batch["input_ids"].repeat_interleave(group_size, 0)  # [R=4, P]
    prompt_mask = batch["attention_mask"].repeat_interleave(group_size, 0)  # [4, P]
    completion_ids = torch.randint(0, 280, (4, 5), generator=torch.Generator().manual_seed(3))  # [4, T]

    def score(rows):
        embeds, grid = image_inputs_for_rows(
            image_embeds, batch["image_grid_thw"], [2, 1], group_size, rows, MERGE
        )
        return completion_logprobs(
            model, prompt_ids[rows], prompt_mask[rows], completion_ids[rows], None, embeds, grid
        )

    full = score([0, 1, 2, 3])  # [4, T]
    micro = score([3, 0])  # [2, T]
    # Other batch shapes (and trimmed padding): other kernels; float64 network bound at |logp|.
    atol = network_error(PATH_TERMS, full.abs().max().item())
    torch.testing.assert_close(micro, full[[3, 0]], atol=atol, rtol=0)
    # Rows of the shorter prompt only: their 2 shared columns of left padding get trimmed.
    torch.testing.assert_close(score([2, 3]), full[[2, 3]], atol=atol, rtol=0)


def test_completion_logprobs_are_differentiable_and_temperature_scaled(model, batch):
    completion_ids = _prompt_and_completion(batch)
    logprobs, entropy = _our_logprobs(model, batch, completion_ids, temperature=0.5, return_entropy=True)
    assert logprobs.shape == entropy.shape == completion_ids.shape
    assert logprobs.dtype == torch.float32 and not entropy.requires_grad
    assert (entropy >= 0).all()
    model.zero_grad()
    logprobs.sum().backward()
    # Gradient reaches the LM head and, through the image embeddings, the vision tower.
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.visual.merger.mlp[2].weight.grad.abs().sum() > 0
    model.zero_grad()
    with torch.no_grad():
        hot = _our_logprobs(model, batch, completion_ids, temperature=0.5)  # [B, T]
        cold = _our_logprobs(model, batch, completion_ids, temperature=1.0)  # [B, T]
    # The same forward on the same inputs and shapes (grad mode changes no CPU kernel choice, and
    # token_logprobs takes the same autograd Function either way): equal to the last bit.
    assert torch.equal(hot, logprobs.detach())
    assert not torch.allclose(hot, cold)


# --- the shared-prompt forward (each prompt once, its KV cache copied to its rows) ---


def _shared_vs_naive(model, batch, rows, row_prompt_of, completion_ids, *, temperature=1.0):
    """Both forwards on completion rows `rows`; row r continues prompt row_prompt_of[r]."""
    image_embeds = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])  # [N, D] per prompt
    mask = completion_mask_of(completion_ids)  # [R, T]
    prompt_of_row = torch.tensor([row_prompt_of[r] for r in rows])  # [R]
    embeds, grid = image_inputs_for_rows(image_embeds, batch["image_grid_thw"], [2, 1], 1, prompt_of_row, MERGE)
    naive = completion_logprobs(
        model, batch["input_ids"][prompt_of_row], batch["attention_mask"][prompt_of_row], completion_ids, mask,
        embeds, grid, temperature=temperature, return_entropy=True,
    )
    image_embeds = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])  # its own graph
    shared = completion_logprobs_shared_prompt(
        model, batch["input_ids"], batch["attention_mask"], prompt_of_row, completion_ids, mask,
        image_embeds, batch["image_grid_thw"], temperature=temperature, return_entropy=True,
    )
    return naive, shared


def _gradients(model, logprobs, weights):
    model.zero_grad()
    (logprobs * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def test_shared_prompt_logprobs_and_gradients_equal_the_naive_twin(model64, batch64):
    model, batch = model64, batch64
    # Rows out of order, two prompts of different lengths (one with 2 images), a partial group of
    # each, and row 1 ends early (EOS at step 2, then padding).
    rows = [4, 0, 1, 5, 3]
    row_prompt_of = {0: 0, 1: 0, 3: 1, 4: 1, 5: 1}
    completion_ids = torch.randint(0, 280, (len(rows), 6), generator=torch.Generator().manual_seed(5))  # [R, T]
    completion_ids[1, 2], completion_ids[1, 3:] = EOS, PAD
    (naive, naive_entropy), (shared, shared_entropy) = _shared_vs_naive(
        model, batch, rows, row_prompt_of, completion_ids, temperature=0.7
    )
    # A cached prompt KV vs one full forward: float64 network bound at |logp| (entropy <= log V).
    atol = network_error(PATH_TERMS, naive.abs().max().item())
    torch.testing.assert_close(shared, naive, atol=atol, rtol=0)
    torch.testing.assert_close(shared_entropy, naive_entropy, atol=network_error(PATH_TERMS, 6.0), rtol=0)

    weights = torch.randn(naive.shape, generator=torch.Generator().manual_seed(6))  # [R, T]
    naive_grads, shared_grads = _gradients(model, naive, weights), _gradients(model, shared, weights)
    assert naive_grads.keys() == shared_grads.keys()
    assert any("visual" in name for name in shared_grads)  # through the image embeddings too
    for name, grad in naive_grads.items():
        # The backward doubles the path (2 x PATH_TERMS); bound at this parameter's gradient size.
        atol = network_error(2 * PATH_TERMS, grad.abs().max().item())
        torch.testing.assert_close(shared_grads[name], grad, atol=atol, rtol=0, msg=name)


def test_shared_prompt_rows_must_follow_their_own_prompt(model64, batch64):
    """The agreement above can fail: pointing rows at the wrong prompt changes every logprob."""
    model, batch = model64, batch64
    completion_ids = torch.randint(0, 280, (2, 4), generator=torch.Generator().manual_seed(7))  # [2, T]
    (naive, _), _ = _shared_vs_naive(model, batch, [0, 3], {0: 0, 3: 1}, completion_ids)
    with torch.no_grad():
        swapped = completion_logprobs_shared_prompt(
            model, batch["input_ids"], batch["attention_mask"], torch.tensor([1, 0]), completion_ids, None,
            encode_images(model, batch["pixel_values"], batch["image_grid_thw"]), batch["image_grid_thw"],
        )
    assert (swapped - naive.detach()).abs().max() > 1e-3


def test_shared_prompt_single_token_completions(model64, batch64):
    """T = 1: the prompt's last logits are the whole answer, no completion forward runs."""
    model, batch = model64, batch64
    completion_ids = torch.tensor([[7], [9], [11]])  # [R, 1]
    (naive, _), (shared, _) = _shared_vs_naive(model, batch, [0, 1, 2], {0: 0, 1: 0, 2: 1}, completion_ids)
    # Batched prompts vs one row each: float64 network bound at |logp|.
    torch.testing.assert_close(shared, naive, atol=network_error(PATH_TERMS, naive.abs().max().item()), rtol=0)


def test_shared_prompt_refuses_without_a_kv_cache():
    """Gradient checkpointing in train mode turns HF's KV cache off: a clear error, and
    can_share_prompt tells GenerationBatch to use the naive twin instead."""
    checkpointed = build_model(seed=1)
    enable_gradient_checkpointing(checkpointed)
    checkpointed.train()
    assert not can_share_prompt(checkpointed)
    batch = make_batch(TWO_PROMPTS)
    image_embeds = encode_images(checkpointed, batch["pixel_values"], batch["image_grid_thw"])
    with pytest.raises(RuntimeError, match="can_share_prompt"):
        completion_logprobs_shared_prompt(
            checkpointed, batch["input_ids"], batch["attention_mask"], torch.tensor([0, 1]),
            torch.tensor([[1, 2, 3], [4, 5, 6]]), None, image_embeds, batch["image_grid_thw"],
        )
    checkpointed.eval()
    assert can_share_prompt(checkpointed)  # no-grad reference-style forwards still share
