"""Tests for grpo/sampler_correction.py: the sampler/trainer logprob gap and the TIS / MIS weights.

Hand-worked on tests/test_loss.py's worked example (R = 2, T = 3, token aggregation, beta = 0):

    per-token loss without correction = [[-1.2, -0.9], [0.4, 0.55, 0.5]]
    pi_old / pi_sampler, per token     = [[2.0, 0.5], [4.0, 1.0, 1.0]]       cap C = 3
    per completion (product)           = [1.0, 4.0]
"""

from __future__ import annotations

import math

import pytest
import torch
from test_loss import ADVANTAGES, MASK, worked_example_logprobs
from tolerances import TINY_PATH_TERMS, U32, logsumexp_error, network_error

from grpo.loss import grpo_loss
from grpo.objectives import LossOptions
from grpo.sampler_correction import importance_weights, sampler_logprob_gap

SAMPLER_RATIOS = torch.tensor([[2.0, 0.5, 1.0], [4.0, 1.0, 1.0]])  # [R, T] pi_old / pi_sampler


@pytest.mark.parametrize(
    ("mode", "weights", "loss"),
    [
        # TIS: min(ratio, 3) = [[2, 0.5], [3, 1, 1]]
        # loss = (-1.2 * 2 - 0.9 * 0.5 + 0.4 * 3 + 0.55 + 0.5) / 5 = (-2.85 + 2.25) / 5 = -0.12
        ("token_truncate", [[2.0, 0.5, 1.0], [3.0, 1.0, 1.0]], -0.12),
        # MIS, tokens: 4 > 3 dropped -> [[2, 0.5], [0, 1, 1]]: (-2.85 + 0.55 + 0.5) / 5 = -0.36
        ("token_mask", [[2.0, 0.5, 1.0], [0.0, 1.0, 1.0]], -0.36),
        # per completion: min(1, 3) = 1, min(4, 3) = 3: (-2.1 * 1 + 1.45 * 3) / 5 = 2.25 / 5 = 0.45
        ("sequence_truncate", [[1.0], [3.0]], 0.45),
        # MIS, completions: 4 > 3 drops completion 1: -2.1 / 5 = -0.42
        ("sequence_mask", [[1.0], [0.0]], -0.42),
    ],
)
def test_weights_and_loss_by_hand(mode, weights, loss):
    logprobs, old_logprobs = worked_example_logprobs()
    sampler_logprobs = old_logprobs - SAMPLER_RATIOS.log()  # so that exp(old - sampler) = SAMPLER_RATIOS
    got, over_cap = importance_weights(old_logprobs, sampler_logprobs, MASK, mode, cap=3.0)
    # float32: d = old - (old - ln r) carries <= 8 roundings of size u * 4 (ln r, two subtractions of
    # values <= 4), exp(d) <= 4 turns them into 8 u * 4 absolute, plus its own rounding.
    weight_tol = 8 * U32 * 4 + 4 * U32
    torch.testing.assert_close(got, torch.tensor(weights), atol=weight_tol, rtol=0)
    assert over_cap.sum() == 1 and not got.requires_grad
    corrected, metrics = grpo_loss(
        logprobs, old_logprobs, None, ADVANTAGES, MASK,
        LossOptions(beta=0.0, aggregation="token", sampler_correction=mode, sampler_correction_cap=3.0),
        normaliser=5.0, sampler_logprobs=sampler_logprobs,
    )  # fmt: skip
    # Each weight's error times |A * ratio| <= 1.5, then a mean of 5 terms of size <= 1.2 (5 u * 1.2).
    assert corrected.item() == pytest.approx(loss, abs=1.5 * weight_tol + 5 * U32 * 1.2)
    # one token over the cap (token modes), or completion 1's 3 tokens (sequence modes), of 5
    assert metrics["sampler_over_cap_frac"] == pytest.approx(0.2 if mode.startswith("token") else 0.6)  # approx's rel 1e-6 is ~16 float32 ulps: a float32 mean/fraction of a few O(1) terms is within a few


def test_gap_by_hand():
    # |trainer - sampler| on the 5 completion tokens: ln 2, ln 2, ln 4, 0, 0 (the padded slot's 7.0
    # is left out): mean = (0.6931472 * 2 + 1.3862944) / 5 = 0.5545177, max = ln 4 = 1.3862944
    trainer = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])  # [R, T]
    sampler = trainer - torch.tensor([[math.log(2), -math.log(2), 7.0], [math.log(4), 0.0, 0.0]])  # [R, T]
    gap_sum, gap_max = sampler_logprob_gap(trainer, sampler, MASK)
    # float32 ln of values <= 4 and two subtractions of values <= 3.4: <= 4 roundings of u * 4 per
    # gap (a mean keeps that), plus the 7-decimal rounding of the hand values.
    atol = 4 * U32 * 4 + 5e-8
    assert (gap_sum / 5).item() == pytest.approx(0.5545177, abs=atol)
    assert gap_max.item() == pytest.approx(1.3862944, abs=atol)


def test_errors():
    zeros = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="unknown sampler correction 'none'"):
        importance_weights(zeros, zeros, torch.ones(1, 1), "none", cap=2.0)
    with pytest.raises(ValueError, match="cap must be > 0"):
        importance_weights(zeros, zeros, torch.ones(1, 1), "token_mask", cap=0.0)


def test_on_cpu_the_sampler_and_the_trainer_agree(float64_hf):
    """A real rollout of the tiny model on CPU: pi_sampler equals the training forward's pi to the
    sampler's float32 rounding, so every correction weight is 1 and the corrected loss is the plain one.

    The model runs in float64 throughout, so the two paths' orders (one decode step on a KV cache vs
    one full forward) leave only network_error between them; the sampler's float32 log-softmax is
    then the whole gap, a bound derived below instead of a count of float32 roundings per layer."""
    from data.collators import GRPOCollator
    from data.sources import load_examples
    from grpo.engine.forward import GenerationBatch
    from grpo.engine.rollout import sample_rollouts
    from grpo.masks import completion_mask
    from models.loading import load_policy, special_token_ids

    torch.manual_seed(0)
    model, processor = load_policy("tiny", dtype=torch.float64, device="cpu", seed=0)
    tokens = special_token_ids(model, processor)
    examples, _ = load_examples("synthetic", num_examples=2, seed=0)
    batch = GRPOCollator(processor)([examples[0], examples[1]])
    G = 3
    head_outputs = []  # |z| of the training forward's logits, for the float32 cast below
    hook = model.lm_head.register_forward_hook(lambda module, args, output: head_outputs.append(output.abs().max()))
    rollout = sample_rollouts(
        model, batch, group_size=G, max_new_tokens=12, eos_token_ids=tokens.eos_token_ids,
        pad_token_id=tokens.pad_token_id, temperature=1.0, top_p=1.0, top_k=0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    mask, _ = completion_mask(rollout.completion_ids, tokens.eos_token_ids)  # [B*G, T]
    generation = GenerationBatch(
        prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"], images_per_prompt=rollout.images_per_prompt,
        completion_ids=rollout.completion_ids, completion_mask=mask, rollout_image_embeds=rollout.image_embeds,
        group_size=G, temperature=1.0, spatial_merge_size=model.config.vision_config.spatial_merge_size,
    )  # fmt: skip
    logprobs = generation.logprobs(model, torch.arange(2 * G), reuse_rollout_images=False)  # [B*G, T]
    hook.remove()
    sampler_logprobs = rollout.sampler_logprobs[:, : logprobs.shape[1]]  # [B*G, T]
    mask = mask[:, : logprobs.shape[1]].float()  # [B*G, T]
    assert mask.sum() > 2 * G  # not only one-token completions

    # The float64 orders (network_error), then the sampler's float32 cast of each logit (moves
    # log p by <= 2 u |z|) and float32 log-softmax over V (logsumexp_error).
    m = float((logprobs.detach().abs() * mask).max())
    largest_logit = float(max(head_outputs))
    vocab = model.config.get_text_config().vocab_size
    tol = network_error(TINY_PATH_TERMS, m) + 2 * U32 * largest_logit + logsumexp_error(vocab, m)
    gap_sum, gap_max = sampler_logprob_gap(logprobs, sampler_logprobs, mask)
    assert gap_max.item() < tol, f"max gap {gap_max.item():.2e} >= {tol:.2e}"

    advantages = torch.linspace(-1.0, 1.0, 2 * G)  # [B*G]
    common = dict(beta=0.0, aggregation="token")
    normaliser = float(mask.sum())
    plain, _ = grpo_loss(logprobs, None, None, advantages, mask, LossOptions(**common), normaliser=normaliser)
    (plain_grad,) = torch.autograd.grad(plain, logprobs, retain_graph=True)
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        corrected, metrics = grpo_loss(
            logprobs, None, None, advantages, mask,
            LossOptions(sampler_correction=mode, sampler_correction_cap=2.0, **common), normaliser=normaliser,
            sampler_logprobs=sampler_logprobs,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(corrected, logprobs, retain_graph=True)
        # A weight exp(d) with |d| < tol per token, or |d| < T * tol per completion (the sum over
        # <= 12 tokens): weight - 1 ~ d; the loss and gradient move by that fraction of their size.
        weight_tol = (12 if mode.startswith("sequence") else 1) * tol
        assert abs(metrics["sampler_weight_mean"] - 1.0) < weight_tol, mode
        assert metrics["sampler_over_cap_frac"] == 0.0
        assert corrected.item() == pytest.approx(plain.item(), abs=weight_tol * max(abs(plain.item()), 1.0))
        torch.testing.assert_close(grad, plain_grad, atol=weight_tol * float(plain_grad.abs().max()), rtol=0)


@pytest.mark.parametrize(
    ("mode", "floor", "weights", "loss", "outside"),
    [
        # TIS with C_min 0.75: clamp(ratio, 0.75, 3) = [[2, 0.75], [3, 1, 1]]
        # loss = (-1.2 * 2 - 0.9 * 0.75 + 0.4 * 3 + 0.55 + 0.5) / 5 = (-3.075 + 2.25) / 5 = -0.165
        ("token_truncate", 0.75, [[2.0, 0.75, 1.0], [3.0, 1.0, 1.0]], -0.165, 0.4),
        # MIS with C_min 0.75: 0.5 < 0.75 and 4 > 3 dropped -> [[2, 0], [0, 1, 1]]: (-2.4 + 1.05) / 5 = -0.27
        ("token_mask", 0.75, [[2.0, 0.0, 1.0], [0.0, 1.0, 1.0]], -0.27, 0.4),
        # products [1, 4], C_min 1.5: clamp -> [1.5, 3]: (-2.1 * 1.5 + 1.45 * 3) / 5 = 1.2 / 5 = 0.24
        ("sequence_truncate", 1.5, [[1.5], [3.0]], 0.24, 1.0),
        # products [1, 4], C_min 1.5: 1 < 1.5 and 4 > 3, both completions dropped: loss 0
        ("sequence_mask", 1.5, [[0.0], [0.0]], 0.0, 1.0),
    ],
)
def test_lower_bound_by_hand(mode, floor, weights, loss, outside):
    # TRL's vllm_importance_sampling_clip_min (--sampler_correction_min): truncate raises to C_min,
    # mask drops below it, as TRL's generation step does (its code is inline there, not callable).
    logprobs, old_logprobs = worked_example_logprobs()
    sampler_logprobs = old_logprobs - SAMPLER_RATIOS.log()  # so that exp(old - sampler) = SAMPLER_RATIOS
    got, _ = importance_weights(old_logprobs, sampler_logprobs, MASK, mode, cap=3.0, floor=floor)
    weight_tol = 8 * U32 * 4 + 4 * U32  # as in test_weights_and_loss_by_hand
    torch.testing.assert_close(got, torch.tensor(weights), atol=weight_tol, rtol=0)
    options = LossOptions(
        beta=0.0, aggregation="token", sampler_correction=mode, sampler_correction_cap=3.0, sampler_correction_min=floor
    )
    corrected, metrics = grpo_loss(
        logprobs, old_logprobs, None, ADVANTAGES, MASK, options, normaliser=5.0, sampler_logprobs=sampler_logprobs
    )
    assert corrected.item() == pytest.approx(loss, abs=1.5 * weight_tol + 5 * U32 * 1.2)
    # the tokens whose weight was truncated or dropped, above or below (token modes 2 of 5; sequence: all 5)
    assert metrics["sampler_over_cap_frac"] == pytest.approx(outside)  # approx's rel 1e-6: a fraction of 5 float32 counts


def test_lower_bound_errors():
    zeros = torch.zeros(1, 1)
    with pytest.raises(ValueError, match=r"floor must be in \[0, cap = 2.0\), got 2.0"):
        importance_weights(zeros, zeros, torch.ones(1, 1), "token_mask", cap=2.0, floor=2.0)
