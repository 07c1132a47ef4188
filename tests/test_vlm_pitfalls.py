"""The silent VLM bugs users of the large GRPO trainers keep reporting: one test each.

Each test names the report it guards against. They are silent bugs: the run goes on, only its
numbers are wrong, so nothing but a test notices.

    1. an empty or blank <answer></answer> earns accuracy reward        (Visual-RFT #176)
    2. --max_prompt_length cuts a prompt inside its image tokens          (TRL #3847, #4488)
    3. log-ratios of +-100 overflow the ratio or the k3 KL into inf/NaN   (NeMo-RL #874)
    4. the G copies of a left-padded prompt get other 3-D positions       (verl #856, TRL #5785)
    5. a completion is scored with another prompt's image grid           (ms-swift #9287)
    6. reward functions get columns of other prompts, or none at all     (2 ranks, dynamic sampling)

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_vlm_pitfalls.py -q
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from conftest import read_metrics
from tolerances import U32

from grpo.kl import KL_ESTIMATORS, LOG_RATIO_MAX
from grpo.loss import grpo_loss
from grpo.objectives import IMPORTANCE_SAMPLING_LEVELS, OBJECTIVES, LossOptions
from grpo.rewards import compute_rewards, resolve_reward_functions

# --- 1. an empty answer never earns accuracy reward ---

BLANK_ANSWERS = [
    "<answer></answer>",
    "<answer> </answer>",
    "<answer>\n\t </answer>",
    "<think>count them</think><answer>  </answer>",
    "<think>3</think>\n<answer>\n</answer>",
    "<answer>3</answer> on second thought <answer> </answer>",  # the LAST answer is the blank one
]


def test_an_empty_or_blank_answer_never_earns_accuracy_reward(monkeypatch):
    """Visual-RFT #176: `<answer></answer>` scored as correct, because "" is a substring of every
    gold answer (and a blank string survives .strip() as ""), so a model learns to answer nothing.

    Every built-in reward that reads the answer gives 0 to an empty or whitespace-only answer,
    whatever the gold; math_accuracy even under a verifier that says yes to any substring of the
    gold (the comparison Visual-RFT's reward made), so it must never ask about an empty answer.
    """
    # A stand-in math-verify as lenient as the reported bug: anything parses, and an answer
    # "verifies" when it is a substring of the gold (so "" verifies against every gold).
    lenient = types.SimpleNamespace(parse=lambda text: [text.strip("$ ")], verify=lambda gold, answer: answer[0] in gold[0])
    monkeypatch.setitem(sys.modules, "math_verify", lenient)
    golds = {
        "count_accuracy": ["0", "3", "zero"],  # "0": a parser that read "" as 0 would pay here
        "choice_accuracy": ["A", "(B)", "E. five"],
        "math_accuracy": ["0", "1/2", "Paris", " "],  # " ": math-verify's string fallback, "" == ""
        "format": ["3"],
    }
    for name, gold_answers in golds.items():
        ((_, function),) = resolve_reward_functions([name])
        for gold in gold_answers:
            rewards = function(BLANK_ANSWERS, [gold] * len(BLANK_ANSWERS))
            assert rewards == [0.0] * len(BLANK_ANSWERS), (name, gold, rewards)
    # The same answers filled in do earn it (the check above is not a reward that is always 0).
    ((_, math_accuracy),) = resolve_reward_functions(["math_accuracy"])
    assert math_accuracy(["<answer>1/2</answer>"], ["1/2"]) == [1.0]
    ((_, count_accuracy),) = resolve_reward_functions(["count_accuracy"])
    assert count_accuracy(["<answer>0</answer>"], ["0"]) == [1.0]
    # And through compute_rewards, as the loop calls them: the total is 0, not NaN (scored, wrong).
    functions = resolve_reward_functions(["format", "count_accuracy"])
    total, per_function = compute_rewards(functions, None, BLANK_ANSWERS, ["0"] * len(BLANK_ANSWERS))
    assert total.tolist() == [0.0] * len(BLANK_ANSWERS)
    assert per_function.tolist() == [[0.0, 0.0]] * len(BLANK_ANSWERS)


# --- 2. a prompt --max_prompt_length would cut inside its image is skipped and counted ---


def _png(size: int, color: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_prompt_cut_inside_its_image_tokens_is_skipped_and_counted_never_fed(tmp_path, train_run, monkeypatch):
    """TRL #3847, #4488: max_prompt_length truncated the prompt's tokens but not its image, so the
    image features no longer matched the image tokens left (an error at best; at worst features
    shifted onto the wrong tokens). Here a prompt over --max_prompt_length is never cut: it is
    skipped before training and counted in `skipped_long_prompts` (--long_prompts error refuses
    the run instead: tests/test_faults.py).

    Images of two sizes (16 and 64 image tokens under --max_pixels 224*224) and a limit that ends
    inside the large images' tokens: every batch the trainer collates holds only the short
    prompts, whole, each row's image tokens equal to its own image's grid.
    """
    import datasets

    from data.collators import GRPOCollator
    from data.prompts import SYSTEM_PROMPT
    from data.sources import load_examples
    from grpo.engine.inputs import count_images_per_prompt, tokens_per_image
    from models.loading import load_policy, set_pixel_budget

    max_pixels, rows = 224 * 224, 8
    sizes = [112 if i % 2 == 0 else 224 for i in range(rows)]  # 8x8 and 16x16 patches
    columns = {
        "image": [{"bytes": _png(size, "red"), "path": None} for size in sizes],
        "problem": [f"How many objects are there in the image? ({i})" for i in range(rows)],
        "solution": [str(i % 5 + 1) for i in range(rows)],
    }
    features = {"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")}
    source = str(tmp_path / "data")
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(source)

    # Where the image tokens sit in each prompt, as the trainer's collator makes it.
    _, processor = load_policy("tiny")
    set_pixel_budget(processor, max_pixels=max_pixels)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    merge = processor.image_processor.merge_size
    examples, _ = load_examples(source, max_pixels=max_pixels)
    collator = GRPOCollator(processor, system_prompt=SYSTEM_PROMPT)
    spans = {}  # size -> (prompt length, first image token, last image token)
    for i, size in enumerate(sizes):
        ids = collator([examples[i]])["input_ids"][0]  # [P]
        image_positions = (ids == image_token_id).nonzero().flatten()
        spans[size] = (len(ids), int(image_positions[0]), int(image_positions[-1]))
    limit = spans[112][0]  # the short prompts fit exactly...
    assert spans[224][1] < limit < spans[224][2]  # ...and the long ones would be cut inside their image

    fed = []
    collate = GRPOCollator.__call__

    def spy(self, batch_examples):
        batch = collate(self, batch_examples)
        fed.append(batch)
        return batch

    monkeypatch.setattr(GRPOCollator, "__call__", spy)
    out = train_run(
        tmp_path / "run", "--dataset", source, "--val_fraction", "0.0", "--max_pixels", str(max_pixels),
        "--max_prompt_length", str(limit), "--max_steps", "1",
    )  # fmt: skip
    assert [record["skipped_long_prompts"] for record in read_metrics(out)] == [4]
    assert fed  # (one batch per step at least)
    for batch in fed:
        assert (batch["attention_mask"].sum(dim=1) <= limit).all()
        assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * len(batch["answers"])  # only small images
        grid = batch["image_grid_thw"]
        assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
        per_row = (batch["input_ids"] == image_token_id).sum(dim=1).tolist()  # image tokens of each row
        assert per_row == tokens_per_image(grid, merge)  # one image a row, its tokens all there
        assert count_images_per_prompt(batch["input_ids"], grid, image_token_id=image_token_id, spatial_merge_size=merge) == [1] * len(per_row)


# --- 3. log-ratios of +-100 stay finite, and their gradient is the clamped one ---


def test_log_ratios_of_plus_minus_100_give_a_finite_loss_and_the_clamped_gradient():
    """NeMo-RL #874: a token whose log-ratio reaches ~+89 overflows exp() in float32 (and bf16):
    the k3 KL and the ratio pi_theta / pi_old become inf, and the loss or its gradient NaN (with
    A > 0 the clip picks the finite branch, but the backward multiplies its 0 by exp's inf).

    grpo/kl.py, choice 2, says what happens instead: a log-ratio x is clamped above at 20 before
    exp() (the ratio's in grpo/loss.py too), so its value is capped at x = 20 and its gradient is
    0; below, nothing is clamped, and at x = -100 the ratio is ~0 and k3 ~ -x - 1 with gradient
    1 - e^x ~ 1. Real (unmasked) tokens here, not padding: after a few inner epochs or with a stale
    sampler, real tokens get there.
    """
    # One completion per sign of A, two tokens each; r = log pi_theta - log pi_old, x = log pi_ref
    # - log pi_theta, each +-100. eps = 0.2, beta = 0.04, "token" aggregation over N = 4 tokens.
    beta, N = 0.04, 4.0
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)  # [R, T]
    r = torch.tensor([[100.0, -100.0], [100.0, -100.0]])  # [R, T]
    x = torch.tensor([[100.0, -100.0], [-100.0, 100.0]])  # [R, T]
    advantages = torch.tensor([1.0, -1.0])  # [R]
    old_logprobs = logprobs.detach() - r  # [R, T]
    ref_logprobs = logprobs.detach() + x  # [R, T]
    loss, metrics = grpo_loss(
        logprobs, old_logprobs, ref_logprobs, advantages, torch.ones(2, 2),
        LossOptions(beta=beta, aggregation="token"), normaliser=N,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logprobs)
    # With e = e^20 (the clamp), k3(20) = e - 21, k3(-100) = e^-100 + 99 ~ 99 (e^-100 ~ 4e-44):
    #   A = +1, r = +100: ratio e, min(e, 1.2) = 1.2 (clipped, no grad); x = +100: k3(20), no grad
    #       loss -1.2 + beta (e - 21);                     gradient 0
    #   A = +1, r = -100: min(e^-100, 0.8) = e^-100 (its grad e^-100 ~ 0); x = -100: k3 = 99,
    #       grad 1 - e^-100 ~ 1:  loss beta 99 = 3.96;     gradient beta = 0.04
    #   A = -1, r = +100: min(-e, -1.2) = -e, its ratio clamped (no grad); x = -100: k3 = 99
    #       loss e + 3.96;                                 gradient beta = 0.04
    #   A = -1, r = -100: min(-e^-100, -0.8) = -0.8 (clipped, no grad); x = +100: k3(20), no grad
    #       loss 0.8 + beta (e - 21);                      gradient 0
    # sum = (1 + 2 beta) e + (-1.2 + 3.96 + 3.96 + 0.8) - 2 beta 21 = 1.08 e + 5.84;  / N = 4:
    e = math.exp(LOG_RATIO_MAX)  # 485165195.40979
    expected_loss = (1.08 * e + 5.84) / N  # 130994604.22
    # float32: e^20 itself is within an ulp (2u relative), then ~10 products and sums of terms
    # <= 1.08 e, each rounding by <= u of its result: 16 u relative covers them all.
    assert loss.item() == pytest.approx(expected_loss, rel=16 * U32, abs=0)
    expected_grad = torch.tensor([[0.0, beta / N], [beta / N, 0.0]])  # [R, T]
    # 0.04 / 4 = 0.01 through a few float32 products: a few u of 0.01; the zeros are exact.
    torch.testing.assert_close(grad, expected_grad, atol=4 * U32 * beta / N, rtol=0)
    assert grad[0, 0].item() == 0.0 and grad[1, 1].item() == 0.0
    assert math.isfinite(metrics["ratio_mean"]) and math.isfinite(metrics["kl_mean"])

    # Every objective, ratio level and KL estimator that LossOptions accepts together (VESPO builds
    # its own sequence weight, so it refuses the sequence level), in float32 and bfloat16: finite
    # loss, finite gradient, finite metrics, at +-100 on real tokens.
    checked = 0
    for dtype in (torch.float32, torch.bfloat16):
        for objective in OBJECTIVES:
            for level in IMPORTANCE_SAMPLING_LEVELS:
                for estimator in KL_ESTIMATORS:
                    try:
                        options = LossOptions(beta=beta, aggregation="sequence", objective=objective,
                                              importance_sampling_level=level, kl_estimator=estimator)
                    except ValueError:
                        continue  # a combination the config refuses (exit 2) never reaches the loss
                    checked += 1
                    logprobs_d = logprobs.detach().to(dtype).requires_grad_(True)  # [R, T]
                    loss, metrics = grpo_loss(
                        logprobs_d, old_logprobs.to(dtype), ref_logprobs.to(dtype), advantages, torch.ones(2, 2),
                        options, normaliser=2.0,
                    )  # fmt: skip
                    (grad,) = torch.autograd.grad(loss, logprobs_d)
                    case = (dtype, objective, level, estimator)
                    assert torch.isfinite(loss), case
                    assert torch.isfinite(grad).all(), case
                    assert all(math.isfinite(value) for value in metrics.values()), (case, metrics)
    # Every objective runs at the token level, and all but VESPO at the sequence level too.
    assert checked == 2 * len(KL_ESTIMATORS) * (2 * len(OBJECTIVES) - 1)


# --- 4. and 5.: the scoring and sampling forwards, on the tiny random Qwen2.5-VL of test_forward ---
#
# float64 throughout (tolerances.float64_throughout): the batched and the one-prompt forwards are
# two evaluation orders of one network, within tolerances.network_error (~1e-9 at |logp| ~ 10);
# a wrong 3-D position, image or grid row moves log-probs by > 1e-3.


@pytest.fixture(scope="module")
def model64():
    from test_forward import build_model
    from tolerances import float64_throughout

    with float64_throughout():
        yield build_model().double()


def _vision_batch(prompts, seed):
    from test_forward import make_batch

    batch = make_batch(prompts, seed=seed)
    return {**batch, "pixel_values": batch["pixel_values"].double()}


def _prompt_alone(batch, images_per_prompt, b):
    """Prompt b of a left-padded batch as a batch of its own: no padding, only its images."""
    from test_forward import MERGE

    from grpo.engine.inputs import image_ranges, tokens_per_image

    real = batch["attention_mask"][b].bool()  # [P]
    input_ids = batch["input_ids"][b][real][None]  # [1, n]
    images = list(image_ranges(images_per_prompt)[b])
    patches = batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())
    grid = batch["image_grid_thw"][images]  # [images of b, 3]
    assert sum(tokens_per_image(grid, MERGE)) == int((batch["mm_token_type_ids"][b] == 1).sum())
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.cat([patches[i] for i in images]),
        "image_grid_thw": grid,
        "mm_token_type_ids": batch["mm_token_type_ids"][b][real][None],
    }


def _generation_batch(model, batch, images_per_prompt, completion_ids, group_size, shared_prompt):
    from test_forward import EOS, MERGE

    from grpo.engine.forward import GenerationBatch
    from grpo.engine.inputs import encode_images
    from grpo.masks import completion_mask

    with torch.no_grad():
        rollout_embeds = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])  # [N, D]
    return GenerationBatch(
        prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"], images_per_prompt=images_per_prompt, completion_ids=completion_ids,
        completion_mask=completion_mask(completion_ids, [EOS])[0], rollout_image_embeds=rollout_embeds,
        group_size=group_size, temperature=1.0, spatial_merge_size=MERGE, shared_prompt=shared_prompt,
    )  # fmt: skip


# Four prompts of different lengths (so all but the longest are left padded), with images of
# different sizes: 4x4 and 2x4 patches (4 + 2 merged tokens), 4x6 (6), 6x2 (3), 2x2 (1).
MIXED_SIZES = [[3, (1, 4, 4), 5, (1, 2, 4), 2], [6, (1, 4, 6), 4], [1, (1, 6, 2), 9], [2, (1, 2, 2), 1]]
MIXED_IMAGES = [2, 1, 1, 1]


@torch.no_grad()
def test_the_g_copies_of_a_left_padded_prompt_get_the_positions_of_the_prompt_alone(model64):
    """verl #856, TRL #5785: the 3-D rotary positions (mRoPE) of a left-padded prompt were computed
    with its padding counted, or from another row's image grid, once the prompt was copied G
    times into a batch with images of other sizes; the copies then attend as if their image sat
    elsewhere, silently (the logits are only somewhat off).

    Each of the G copies of each prompt gets exactly the positions, next position, sampled tokens
    and log-probs of the prompt run alone (no padding, no other images): in mrope_position_ids, in
    the sampler (prefill + cached decoding) and in both training forwards.
    """
    from test_forward import EOS, IMAGE_PAD, MERGE, PAD, PATH_TERMS
    from tolerances import network_error

    from grpo.engine.inputs import image_inputs_for_rows, mrope_position_ids
    from grpo.engine.rollout import sample_rollouts

    G = 3
    batch = _vision_batch(MIXED_SIZES, seed=11)
    B = batch["input_ids"].shape[0]
    assert (batch["attention_mask"] == 0).any(dim=1).sum() == B - 1  # all but one row left padded
    rows = torch.arange(B * G)  # [R] row r continues prompt r // G
    image_tokens = torch.zeros(4 + 2 + 6 + 3 + 1, 1)  # [N, 1] stand-in features: only the grid rows matter here
    _, rows_grid = image_inputs_for_rows(image_tokens, batch["image_grid_thw"], MIXED_IMAGES, G, rows, MERGE)  # [I_R, 3]
    positions, next_position = mrope_position_ids(
        batch["input_ids"].repeat_interleave(G, 0), batch["attention_mask"].repeat_interleave(G, 0), rows_grid,
        image_token_id=IMAGE_PAD, spatial_merge_size=MERGE,
    )  # [3, R, P], [R]

    options = dict(max_new_tokens=5, eos_token_ids=[EOS], pad_token_id=PAD, temperature=0.0, decode="dynamic")
    together = sample_rollouts(model64, batch, group_size=G, **options)
    completion_ids = torch.randint(0, 280, (B * G, 6), generator=torch.Generator().manual_seed(12))  # [R, T]
    completion_ids[1, 3], completion_ids[1, 4:] = EOS, PAD  # one copy ends early
    scored = {
        shared: _generation_batch(model64, batch, MIXED_IMAGES, completion_ids, G, shared).logprobs(
            model64, rows, reuse_rollout_images=False
        )  # [R, T]
        for shared in (True, False)
    }
    for b in range(B):
        alone = _prompt_alone(batch, MIXED_IMAGES, b)
        alone_positions, alone_next = mrope_position_ids(
            alone["input_ids"], None, alone["image_grid_thw"], image_token_id=IMAGE_PAD, spatial_merge_size=MERGE
        )  # [3, 1, n], [1]
        alone_rollout = sample_rollouts(model64, alone, group_size=1, **options)
        alone_scored = _generation_batch(model64, alone, [MIXED_IMAGES[b]], completion_ids[b * G : (b + 1) * G], G, False)
        alone_logprobs = alone_scored.logprobs(model64, torch.arange(G), reuse_rollout_images=False)  # [G, T_b]
        atol = network_error(PATH_TERMS, alone_logprobs.abs().max().item())
        for r in range(b * G, (b + 1) * G):
            real = batch["attention_mask"][b].bool()  # [P]
            assert torch.equal(positions[:, r, real], alone_positions[:, 0]), (b, r)
            assert next_position[r] == alone_next[0]
            assert torch.equal(together.completion_ids[r], alone_rollout.completion_ids[0]), (b, r)
            torch.testing.assert_close(together.sampler_logprobs[r], alone_rollout.sampler_logprobs[0], atol=atol, rtol=0)
            for shared, logprobs in scored.items():
                width = alone_logprobs.shape[1]
                torch.testing.assert_close(logprobs[r, :width], alone_logprobs[r - b * G], atol=atol, rtol=0, msg=f"shared={shared} row {r}")


# Prompts whose images have the SAME number of tokens but other grids: 4x6 and 6x4 patches (2x3
# and 3x2 merged: 6 tokens each), 2x4 and 4x2 (2 each). A row given another prompt's grid raises
# nothing (the token counts agree); only its 3-D positions, and so its log-probs, go wrong.
TRANSPOSED_GRIDS = [[4, (1, 4, 6), 3], [2, (1, 6, 4), 6], [5, (1, 2, 4), 1, (1, 4, 2), 2], [1, (1, 4, 2), 4, (1, 2, 4), 1]]
TRANSPOSED_IMAGES = [1, 1, 2, 2]


@torch.no_grad()
def test_each_completion_is_scored_with_its_own_prompts_image_grid(model64):
    """ms-swift #9287: completions were scored with the image_grid_thw rows of other samples of the
    batch; with equal token counts nothing fails, the positions (and log-probs) are just wrong.

    Every completion's log-probs, in micro-batches that mix prompts in any order, under every
    path of GenerationBatch.logprobs (shared prompt or not, the rollout's image features or the
    vision tower re-run), equal the plain HF forward of that one prompt + completion with its own
    pixel_values and image_grid_thw (HF computes the positions itself: an independent oracle).
    """
    from test_forward import EOS, PAD, PATH_TERMS
    from tolerances import network_error

    from grpo.masks import completion_mask

    G = 2
    batch = _vision_batch(TRANSPOSED_GRIDS, seed=21)
    B = batch["input_ids"].shape[0]
    completion_ids = torch.randint(0, 280, (B * G, 5), generator=torch.Generator().manual_seed(22))  # [R, T]
    completion_ids[6, 2], completion_ids[6, 3:] = EOS, PAD  # one row ends early
    mask = completion_mask(completion_ids, [EOS])[0]  # [R, T]

    expected = torch.zeros(B * G, completion_ids.shape[1], dtype=torch.float64)  # [R, T]
    for r in range(B * G):
        alone = _prompt_alone(batch, TRANSPOSED_IMAGES, r // G)
        input_ids = torch.cat([alone["input_ids"], completion_ids[r : r + 1]], 1)  # [1, n+T]
        model64.model.rope_deltas = None  # the HF forward caches this between calls
        logits = model64(
            input_ids=input_ids, attention_mask=torch.cat([alone["attention_mask"], mask[r : r + 1].long()], 1),
            mm_token_type_ids=torch.cat([alone["mm_token_type_ids"], torch.zeros_like(completion_ids[r : r + 1])], 1),
            pixel_values=alone["pixel_values"], image_grid_thw=alone["image_grid_thw"],
        ).logits[:, alone["input_ids"].shape[1] - 1 : -1]  # [1, T, V]
        expected[r] = torch.log_softmax(logits, -1).gather(-1, completion_ids[r, None, :, None]).squeeze(-1)[0]
    atol = network_error(PATH_TERMS, expected.abs().max().item())

    micro_batches = [[7, 0, 5], [2, 6], [3, 1, 4]]  # prompts 3, 0, 2 / 1, 3 / 1, 0, 2: out of order
    for shared in (True, False):
        generation = _generation_batch(model64, batch, TRANSPOSED_IMAGES, completion_ids, G, shared)
        for reuse in (True, False):
            for rows in micro_batches:
                logprobs = generation.logprobs(model64, torch.tensor(rows), reuse_rollout_images=reuse)  # [R_m, T_m]
                width = logprobs.shape[1]
                got = logprobs * mask[rows, :width]  # [R_m, T_m] padding out
                want = expected[rows, :width] * mask[rows, :width]  # [R_m, T_m]
                torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=f"shared={shared} reuse={reuse} rows={rows}")


# --- 6. the reward functions get each prompt's own columns, on 2 ranks with dynamic sampling ---


@pytest.mark.slow
def test_reward_functions_get_each_prompts_own_columns_on_two_ranks_with_dynamic_sampling(tmp_path):
    """The reward functions must see, for each completion, the columns of the prompt it answers:
    its answer, its image's path, and every other column of the data (a reward that checks the
    answer against the image, or looks up a per-row tolerance, depends on it). Reported again and
    again for multi-rank runs and for filtered or re-drawn batches, where the columns of one
    prompt reach the completions of another. Here: `torchrun` with 2 ranks, --dynamic_sampling
    dropping the groups of half the prompts (so most steps draw extra rounds), a jsonl dataset
    with relative image paths, images of two sizes and two extra columns.

    Every call of the reward function, on both ranks, in every round: R = B*G rows, prompt i's G
    completions consecutive; each row's answer, question, image path, image size, source_row and
    extra columns all those of one and the same dataset row, the one the `uid` column names.
    (That row i of the completions continues prompt i is the sampler's layout: test 4 above.)
    """
    import json

    from conftest import TORCHRUN, run_command, subprocess_env, train_argv
    from PIL import Image

    rows, G = 12, 2
    (tmp_path / "img").mkdir()
    dataset = []
    for uid in range(rows):
        size = 56 if uid % 3 == 0 else 112
        Image.new("RGB", (size, size), ("red", "green", "blue")[uid % 3]).save(tmp_path / "img" / f"{uid}.png")
        dataset.append({
            "image": f"img/{uid}.png", "problem": f"How many objects are there? (row {uid})",
            "solution": f"<answer>{uid % 5 + 1}</answer>", "uid": uid, "level": f"level-{uid % 4}",
        })  # fmt: skip
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in dataset))
    records_dir = tmp_path / "records"
    records_dir.mkdir()

    out = tmp_path / "run"
    argv = train_argv(
        out, "--dataset", str(source), "--val_fraction", "0.0", "--max_steps", "2", "--device", "cpu",
        "--save_steps", "0", "--num_generations", str(G), "--dynamic_sampling", "--max_generation_rounds", "3",
        "--reward_functions", "reward_fns:record_columns",
    )  # fmt: skip
    command = [*TORCHRUN, "--nproc_per_node", "2", "--standalone", "train.py", *argv]
    # 900 s: a guard against a hang, not a speed check (alone this takes ~20 s)
    result = run_command(command, timeout=900, env=subprocess_env(REWARD_COLUMNS_DIR=str(records_dir)))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]

    calls = {rank: [json.loads(line) for line in (records_dir / f"rank{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)}
    assert len(calls[0]) == len(calls[1]) >= 2  # the ranks ran the same rounds
    for rank, rank_calls in calls.items():
        for call in rank_calls:
            R = len(call["completions"])
            assert R == 2 * G  # per_device_prompts 2
            for name in ("answers", "questions", "image_paths", "image_sizes", "source_row", "uid", "level", "completion_lengths"):
                assert len(call[name]) == R, (rank, name)
            for r in range(R):
                uid = call["uid"][r]
                assert call["uid"][r - r % G] == uid  # the G completions of a prompt are consecutive
                row = dataset[uid]
                got = (call["answers"][r], call["questions"][r], call["image_paths"][r], call["image_sizes"][r],
                       call["source_row"][r], call["level"][r])  # fmt: skip
                size = 56 if uid % 3 == 0 else 112
                assert got == (str(uid % 5 + 1), row["problem"], [row["image"]], [[size, size]], uid, row["level"]), (rank, r)
    # Each rank draws its own prompts: the ranks' first rounds share none.
    assert not set(calls[0][0]["uid"]) & set(calls[1][0]["uid"])
    assert all(r["dynamic/groups_dropped"] > 0 for r in records)  # dynamic sampling dropped the even uids' groups
