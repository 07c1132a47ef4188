"""Tests for grpo/engine/rollout.py: the hand-written sampler against generate() and the scoring forward.

Uses the tiny random Qwen2.5-VL and the hand-built batches of tests/test_forward.py: two left
padded prompts of different lengths, the first with two images.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_rollout.py -q
"""

from __future__ import annotations

import pytest
import torch

# tests/ has no __init__.py: pytest puts it on sys.path, so the sibling module imports by name.
from test_forward import (
    EOS,
    IMAGE_PAD,
    MERGE,
    PAD,
    PATH_TERMS,
    TWO_PROMPTS,
    VOCAB,
    build_model,
    make_batch,
)
from tolerances import U32, float64_throughout, logsumexp_error, network_error

from grpo.engine.decoders import StaticKVCache, default_decode
from grpo.engine.forward import completion_logprobs
from grpo.engine.hf_generate import generate_rollouts_naive, repeat_batch_per_group
from grpo.engine.inputs import image_inputs_for_rows
from grpo.engine.rollout import sample_rollouts
from grpo.engine.sampling import sample_next_token
from grpo.masks import completion_mask as grpo_completion_mask


# The sampler is compared with generate(), the training forward and its own static twin: other
# computation orders of the model. In float64 throughout, two orders' logits differ by at most
# network_error (~1e-9), so a greedy token can differ only at a near tie (guarded below), and a
# sampled one only if a float32 cast of a logit flips (chance ~1e-9 / 2^-24 a logit) and the draw
# then lands within that ulp of a CDF boundary (chance ~2^-24): far below 1e-6 for these tests.
@pytest.fixture(scope="module")
def float64_model():
    with float64_throughout():
        yield build_model


@pytest.fixture(scope="module")
def model(float64_model):
    return float64_model().double()


@pytest.fixture(scope="module")
def batch():
    batch = make_batch(TWO_PROMPTS)
    return {**batch, "pixel_values": batch["pixel_values"].double()}


@torch.no_grad()
def _teacher_forced_logits(model, batch, completion_ids, group_size):
    """The plain HF forward over prompt + completion: logits [R, T, V] that predict completion_ids."""
    rows = repeat_batch_per_group(batch, group_size, image_token_id=IMAGE_PAD, spatial_merge_size=MERGE)
    model.model.rope_deltas = None  # the HF forward caches this between calls
    logits = model(
        input_ids=torch.cat([rows["input_ids"], completion_ids], 1),  # [R, P+T]
        attention_mask=torch.cat([rows["attention_mask"], torch.ones_like(completion_ids)], 1),
        mm_token_type_ids=torch.cat([rows["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1),
        pixel_values=rows["pixel_values"], image_grid_thw=rows["image_grid_thw"],
    ).logits  # [R, P+T, V]
    return logits[:, rows["input_ids"].shape[1] - 1 : -1]  # [R, T, V]


def _greedy_margin(model, batch, completion_ids, group_size, eos_ids=(EOS,)):
    """Smallest gap between the best and second-best logit over the real steps of greedy rows."""
    logits = _teacher_forced_logits(model, batch, completion_ids, group_size)  # [R, T, V]
    top2 = logits.topk(2, dim=-1).values  # [R, T, 2]
    mask = grpo_completion_mask(completion_ids, list(eos_ids))[0].bool()  # [R, T]
    return (top2[..., 0] - top2[..., 1])[mask].min().item(), logits.abs().max().item()


def _sample(model, batch, seed=0, **kwargs):
    options = dict(group_size=3, max_new_tokens=12, eos_token_ids=[EOS], pad_token_id=PAD)
    options.update(kwargs)
    generator = torch.Generator().manual_seed(seed)
    return sample_rollouts(model, batch, generator=generator, **options)


# --- agreement with generate() and with the training forward ---


def test_greedy_tokens_identical_to_generate(model, batch):
    rollout = _sample(model, batch, temperature=0.0, group_size=2)
    naive = generate_rollouts_naive(
        model, batch, group_size=2, max_new_tokens=12, eos_token_ids=[EOS], pad_token_id=PAD,
        do_sample=False,
    )  # [B*G, T]
    # Equal tokens need every step's best logit to lead by more than the two orders can move it.
    margin, largest = _greedy_margin(model, batch, rollout.completion_ids, group_size=2)
    assert margin > 2 * network_error(PATH_TERMS, largest), f"a near tie (margin {margin:.1e})"
    assert torch.equal(rollout.completion_ids, naive)
    # The G copies of a greedy prompt are the same; the two prompts differ.
    assert torch.equal(rollout.completion_ids[0], rollout.completion_ids[1])
    assert not torch.equal(rollout.completion_ids[0], rollout.completion_ids[2])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "temperature, top_p, top_k",
    [(1.0, 1.0, 0), (0.7, 1.0, 0), (0.7, 0.9, 20), (0.0, 1.0, 0)],
)
@torch.no_grad()
def test_sampler_logprobs_equal_completion_logprobs(float64_model, batch, attn, temperature, top_p, top_k):
    # A one-token decode step with a KV cache vs one full-sequence forward; a larger gap than the
    # bound below means a position or mask bug, not noise.
    model = float64_model(attn=attn).double()
    group_size = 4
    # Every 10th id ends a row, so rows stop at different steps (or run to max_new_tokens) and
    # the padding after EOS is exercised.
    eos_ids = list(range(0, 300, 10))
    rollout = _sample(model, batch, temperature=temperature, top_p=top_p, top_k=top_k, group_size=group_size,
                      eos_token_ids=eos_ids, max_new_tokens=24)
    rows = list(range(2 * group_size))
    assert rollout.images_per_prompt == [2, 1]
    image_embeds, grid = image_inputs_for_rows(
        rollout.image_embeds, batch["image_grid_thw"], rollout.images_per_prompt, group_size, rows, MERGE
    )
    completion_mask, _ = grpo_completion_mask(rollout.completion_ids, eos_ids)  # [R, T]
    logprobs = completion_logprobs(
        model, batch["input_ids"].repeat_interleave(group_size, 0),
        batch["attention_mask"].repeat_interleave(group_size, 0), rollout.completion_ids, completion_mask,
        image_embeds, grid, temperature=temperature,
    )  # [R, T]
    gap = ((logprobs - rollout.sampler_logprobs) * completion_mask).abs().max()
    # The float64 orders (network_error), then the sampler's float32 cast of each logit (moves
    # log p by <= 2 u |z|) and float32 log-softmax over V (logsumexp_error).
    largest_logit = _teacher_forced_logits(model, batch, rollout.completion_ids, group_size).abs().max().item()
    tau = temperature if temperature > 0 else 1.0
    m = logprobs.abs().max().item()
    bound = network_error(PATH_TERMS, m) + 2 * U32 * largest_logit / tau + logsumexp_error(VOCAB, m)
    assert gap < bound, f"max |sampler - training| logprob gap {gap:.2e} (bound {bound:.2e})"
    assert (rollout.sampler_logprobs[completion_mask == 0] == 0).all()
    assert completion_mask.sum() > 2 * group_size  # not only one-token completions


# --- determinism, cost, stopping ---


def test_same_seed_same_rollouts(model, batch):
    first = _sample(model, batch, seed=7)
    second = _sample(model, batch, seed=7)
    other = _sample(model, batch, seed=8)
    # Same inputs, shapes and seed: the same kernels in the same order, equal to the last bit.
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert torch.equal(first.sampler_logprobs, second.sampler_logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)


def test_vision_tower_runs_once_per_batch(model, batch):
    calls = []
    handle = model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        rollout = _sample(model, batch, group_size=4)
    finally:
        handle.remove()
    assert len(calls) == 1  # once for all B = 2 prompts, not B*G = 8 times
    assert rollout.image_embeds.shape == (4 + 2 + 6, 64)  # per prompt, not per row
    assert not rollout.image_embeds.requires_grad


def test_rows_stop_at_eos_and_pad_afterwards(model, batch):
    # Make the greedy third token of row 0 the EOS: row 0 stops there, the others go on.
    free_run = _sample(model, batch, temperature=0.0, group_size=1, eos_token_ids=[299])
    eos = int(free_run.completion_ids[0, 2])
    stopped = _sample(model, batch, temperature=0.0, group_size=1, eos_token_ids=[eos], pad_token_id=PAD)
    first_eos = int((stopped.completion_ids[0] == eos).nonzero()[0])
    assert first_eos <= 2
    assert (stopped.completion_ids[0, first_eos + 1 :] == PAD).all()
    assert (stopped.sampler_logprobs[0, first_eos + 1 :] == 0).all()
    assert not grpo_completion_mask(stopped.completion_ids, [eos])[1][0]  # row 0 ended, not cut
    # Before the EOS, the rows are those of the free run: until a row ends the two runs compute
    # the same ops on the same shapes, so they agree to the last bit.
    assert torch.equal(stopped.completion_ids[0, : first_eos + 1], free_run.completion_ids[0, : first_eos + 1])
    # num_generated_tokens counts each row through its EOS (or to the end when cut).
    ends = stopped.completion_ids == eos  # [R, T]
    lengths = [int(row.nonzero()[0]) + 1 if row.any() else row.numel() for row in ends]
    assert stopped.num_generated_tokens == sum(lengths)


def test_loop_stops_when_every_row_ended(model, batch):
    # Every token but the pad id ends a row: all rows end at their first token.
    rollout = _sample(model, batch, eos_token_ids=[i for i in range(300) if i != PAD], max_new_tokens=10)
    assert rollout.completion_ids.shape == (6, 1)
    assert not grpo_completion_mask(rollout.completion_ids, [i for i in range(300) if i != PAD])[1].any()  # none cut
    assert rollout.num_generated_tokens == 6
    # And no row ends: trimmed to max_new_tokens, none terminated.
    rollout = _sample(model, batch, eos_token_ids=[299], max_new_tokens=5, top_k=50)
    assert rollout.completion_ids.shape[1] == 5 and grpo_completion_mask(rollout.completion_ids, [299])[1].any()


@pytest.mark.parametrize("sampling_method", ["inverse_cdf", "multinomial"])
def test_top_k_1_and_tiny_top_p_equal_greedy(model, batch, sampling_method):
    greedy = _sample(model, batch, temperature=0.0)
    top_k_1 = _sample(model, batch, temperature=0.7, top_k=1, seed=3, sampling_method=sampling_method)
    top_p_0 = _sample(model, batch, temperature=1.0, top_p=1e-6, seed=4, sampling_method=sampling_method)
    # Same decode, same logits to the last bit; top-k 1 and top-p 1e-6 keep only the best of the
    # float32-cast z / tau unless two logits land within a float32 ulp of each other: guarded.
    margin, largest = _greedy_margin(model, batch, greedy.completion_ids, group_size=3)
    assert margin > 4 * U32 * largest / 0.7, f"a near tie (margin {margin:.1e})"
    assert torch.equal(top_k_1.completion_ids, greedy.completion_ids)
    assert torch.equal(top_p_0.completion_ids, greedy.completion_ids)


# --- the sampling step by hand ---


def test_top_p_and_top_k_keep_the_right_tokens():
    # probs [0.4, 0.3, 0.2, 0.1]; mass before each token: [0, 0.4, 0.7, 0.9].
    # top_p = 0.5 keeps tokens whose mass-before is < 0.5: {0, 1} (together 0.7 >= 0.5).
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(2000, 4)  # [R, V]
    generator = torch.Generator().manual_seed(0)
    token, logprob = sample_next_token(logits, temperature=1.0, top_p=0.5, top_k=0, generator=generator)
    assert set(token.tolist()) == {0, 1}
    # Reported logprobs are those of the untruncated distribution: log 0.4, log 0.3.
    torch.testing.assert_close(logprob, torch.tensor([0.4, 0.3, 0.2, 0.1]).log()[token])
    token, _ = sample_next_token(logits, temperature=1.0, top_p=1.0, top_k=3, generator=generator)
    assert set(token.tolist()) == {0, 1, 2}
    # top_k = 3 then top_p = 0.5 of the renormalised [4/9, 3/9, 2/9]: mass before [0, .44, .78].
    token, _ = sample_next_token(logits, temperature=1.0, top_p=0.5, top_k=3, generator=generator)
    assert set(token.tolist()) == {0, 1}


def test_repeat_batch_per_group_keeps_each_prompts_images(batch):
    repeated = repeat_batch_per_group(batch, 2, image_token_id=IMAGE_PAD, spatial_merge_size=MERGE)
    patches = batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())  # 16, 8, 24 rows
    expected = torch.cat([patches[0], patches[1]] * 2 + [patches[2]] * 2)
    assert torch.equal(repeated["pixel_values"], expected)
    assert repeated["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 4]] * 2 + [[1, 4, 6]] * 2
    assert torch.equal(repeated["input_ids"][1], batch["input_ids"][0])


def test_sampling_runs_in_eval_mode_and_restores_the_mode(model, batch):
    model.train()
    try:
        # The sampler switches to eval itself: the same computation both times, bit-equal.
        assert torch.equal(_sample(model, batch, temperature=0.0).completion_ids,
                           _sample(model.eval(), batch, temperature=0.0).completion_ids)
        model.train()
        _sample(model, batch)
        assert model.training
    finally:
        model.eval()


# --- static decoding (fixed-shape buffers; replayed from a CUDA graph on a GPU) ---


def test_static_kv_cache_writes_each_step_at_its_slot():
    """Hand-worked: a prompt of 2 slots, room for 2 more; writes go to `position`, nowhere else."""

    class Layer:  # what StaticKVCache reads from a prefill cache
        keys = torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)  # [R=1, H=1, P=2, d=1]
        values = torch.tensor([10.0, 20.0]).view(1, 1, 2, 1)

    class Prefill:
        layers = [Layer()]

    cache = StaticKVCache(Prefill(), max_length=4)
    assert cache.keys[0].flatten().tolist() == [1.0, 2.0, 0.0, 0.0]
    cache.position.fill_(2)
    keys, values = cache.update(torch.full((1, 1, 1, 1), 3.0), torch.full((1, 1, 1, 1), 30.0), 0)
    assert keys.flatten().tolist() == [1.0, 2.0, 3.0, 0.0]
    assert values.flatten().tolist() == [10.0, 20.0, 30.0, 0.0]
    cache.position.fill_(3)
    keys, _ = cache.update(torch.full((1, 1, 1, 1), 4.0), torch.full((1, 1, 1, 1), 40.0), 0)
    assert keys.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.7, top_k=20)])
def test_static_decoding_equals_the_dynamic_loop(model, batch, options):
    """Same prompts (left padded, 1-2 images), same seed: same tokens, EOS stops and logprobs.
    Free-running rows plus an EOS that the sampler does hit, so finished rows are exercised."""
    free = _sample(model, batch, decode="dynamic", eos_token_ids=[299], **options)
    eos = int(free.completion_ids[1, 3])
    dynamic = _sample(model, batch, decode="dynamic", eos_token_ids=[eos], **options)
    static = _sample(model, batch, decode="static", eos_token_ids=[eos], **options)
    assert not grpo_completion_mask(dynamic.completion_ids, [eos])[1].all()  # some row ended at the EOS
    # Fixed-size KV buffers vs growing ones: other shapes, other orders (see the float64 note at
    # the top); greedy needs a margin over the bound.
    logits = _teacher_forced_logits(model, batch, dynamic.completion_ids, group_size=3)  # [R, T, V]
    largest, tau = logits.abs().max().item(), options["temperature"] or 1.0
    if options["temperature"] == 0.0:
        margin, _ = _greedy_margin(model, batch, dynamic.completion_ids, group_size=3, eos_ids=[eos])
        assert margin > 2 * network_error(PATH_TERMS, largest), f"a near tie (margin {margin:.1e})"
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    # float64 orders, then each side's float32 cast of z / tau (2 u |z| / tau) and log-softmax.
    m = dynamic.sampler_logprobs.abs().max().item()
    atol = network_error(PATH_TERMS, m) + 4 * U32 * largest / tau + 2 * logsumexp_error(VOCAB, m)
    torch.testing.assert_close(static.sampler_logprobs, dynamic.sampler_logprobs, atol=atol, rtol=0)


def test_decode_mode_by_device_and_its_errors(model, batch):
    assert default_decode(torch.device("cpu")) == "dynamic"
    assert default_decode(torch.device("cuda")) == "cuda_graph"
    with pytest.raises(ValueError, match="decode 'fast'"):
        _sample(model, batch, decode="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs the model on a CUDA device"):
            _sample(model, batch, decode="cuda_graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the lent GPU machine)")
def test_cuda_graph_decoding_equals_the_dynamic_loop_on_a_gpu(float64_model, batch):
    gpu_model = float64_model().double().cuda()
    gpu_batch = {k: v.cuda() for k, v in batch.items()}
    for options in (dict(temperature=0.0), dict(temperature=1.0)):
        runs = {
            decode: sample_rollouts(
                gpu_model, gpu_batch, group_size=3, max_new_tokens=12, eos_token_ids=[EOS], pad_token_id=PAD,
                generator=torch.Generator(device="cuda").manual_seed(0), decode=decode, **options,
            )
            for decode in ("dynamic", "cuda_graph")
        }
        # float64 on the GPU too (see the note at the top): the same bound as the static decode's.
        logits = _teacher_forced_logits(gpu_model, gpu_batch, runs["dynamic"].completion_ids, group_size=3)
        largest, m = logits.abs().max().item(), runs["dynamic"].sampler_logprobs.abs().max().item()
        if options["temperature"] == 0.0:
            margin, _ = _greedy_margin(gpu_model, gpu_batch, runs["dynamic"].completion_ids, group_size=3)
            assert margin > 2 * network_error(PATH_TERMS, largest), f"a near tie (margin {margin:.1e})"
        assert torch.equal(runs["cuda_graph"].completion_ids, runs["dynamic"].completion_ids)
        atol = network_error(PATH_TERMS, m) + 4 * U32 * largest + 2 * logsumexp_error(VOCAB, m)
        torch.testing.assert_close(runs["cuda_graph"].sampler_logprobs, runs["dynamic"].sampler_logprobs, atol=atol, rtol=0)
