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

from grpo.loss import grpo_loss
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
    # float32 exp/log round trips of values of size <= 4: a few ulps of 4 (2^-22); 1e-6 leaves margin.
    torch.testing.assert_close(got, torch.tensor(weights), atol=1e-6, rtol=0)
    assert over_cap.sum() == 1 and not got.requires_grad
    corrected, metrics = grpo_loss(
        logprobs, old_logprobs, None, ADVANTAGES, MASK, beta=0.0, aggregation="token", normaliser=5.0,
        sampler_logprobs=sampler_logprobs, sampler_correction=mode, sampler_correction_cap=3.0,
    )  # fmt: skip
    assert corrected.item() == pytest.approx(loss, abs=1e-6)
    # one token over the cap (token modes), or completion 1's 3 tokens (sequence modes), of 5
    assert metrics["sampler_over_cap_frac"] == pytest.approx(0.2 if mode.startswith("token") else 0.6)


def test_gap_by_hand():
    # |trainer - sampler| on the 5 completion tokens: ln 2, ln 2, ln 4, 0, 0 (the padded slot's 7.0
    # is left out): mean = (0.6931472 * 2 + 1.3862944) / 5 = 0.5545177, max = ln 4 = 1.3862944
    trainer = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])  # [R, T]
    sampler = trainer - torch.tensor([[math.log(2), -math.log(2), 7.0], [math.log(4), 0.0, 0.0]])  # [R, T]
    gap_sum, gap_max = sampler_logprob_gap(trainer, sampler, MASK)
    assert (gap_sum / 5).item() == pytest.approx(0.5545177, abs=1e-6)
    assert gap_max.item() == pytest.approx(1.3862944, abs=1e-6)


def test_errors():
    zeros = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="unknown sampler correction 'none'"):
        importance_weights(zeros, zeros, torch.ones(1, 1), "none", cap=2.0)
    with pytest.raises(ValueError, match="cap must be > 0"):
        importance_weights(zeros, zeros, torch.ones(1, 1), "token_mask", cap=0.0)


def test_on_cpu_the_sampler_and_the_trainer_agree():
    """A real rollout of the tiny model in float32 on CPU: pi_sampler equals the training forward's
    pi to float32 rounding, so every correction weight is 1 and the corrected loss is the plain one."""
    from data.collators import GRPOCollator
    from data.sources import load_examples
    from grpo.engine.generation_batch import GenerationBatch
    from grpo.engine.rollout import sample_rollouts
    from grpo.masks import completion_mask
    from models.loading import load_policy, special_token_ids

    torch.manual_seed(0)
    model, processor = load_policy("tiny", dtype=torch.float32, device="cpu", seed=0)
    tokens = special_token_ids(model, processor)
    examples, _ = load_examples("synthetic", num_examples=2, seed=0)
    batch = GRPOCollator(processor)([examples[0], examples[1]])
    G = 3
    rollout = sample_rollouts(
        model, batch, group_size=G, max_new_tokens=12, eos_token_ids=tokens.eos_token_ids,
        pad_token_id=tokens.pad_token_id, temperature=1.0, top_p=1.0, top_k=0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    mask, _ = completion_mask(rollout.completion_ids, tokens.eos_token_ids)  # [B*G, T]
    generation = GenerationBatch(
        prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"], images_per_prompt=batch["images_per_prompt"],
        completion_ids=rollout.completion_ids, completion_mask=mask, rollout_image_embeds=rollout.image_embeds,
        group_size=G, temperature=1.0, spatial_merge_size=model.config.vision_config.spatial_merge_size,
    )  # fmt: skip
    logprobs = generation.logprobs(model, torch.arange(2 * G), reuse_rollout_images=False)  # [B*G, T]
    sampler_logprobs = rollout.sampler_logprobs[:, : logprobs.shape[1]]  # [B*G, T]
    mask = mask[:, : logprobs.shape[1]].float()  # [B*G, T]
    assert mask.sum() > 2 * G  # not only one-token completions

    # The two paths (one decode step on a KV cache vs one full forward) round differently: a
    # log-prob of size m = max |logp| carries ~32 roundings of size 2^-24 * m between them (2 layers
    # of attention, MLP and norms, then the log-softmax), so the gap is below 32 * 2^-24 * m.
    m = float((logprobs.detach().abs() * mask).max())
    tol = 32 * 2**-24 * max(m, 1.0)
    gap_sum, gap_max = sampler_logprob_gap(logprobs, sampler_logprobs, mask)
    assert gap_max.item() < tol, f"max gap {gap_max.item():.2e} >= {tol:.2e}"

    advantages = torch.linspace(-1.0, 1.0, 2 * G)  # [B*G]
    common = dict(beta=0.0, aggregation="token", normaliser=float(mask.sum()))
    plain, _ = grpo_loss(logprobs, None, None, advantages, mask, **common)
    (plain_grad,) = torch.autograd.grad(plain, logprobs, retain_graph=True)
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        corrected, metrics = grpo_loss(
            logprobs, None, None, advantages, mask, sampler_logprobs=sampler_logprobs, sampler_correction=mode,
            sampler_correction_cap=2.0, **common,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(corrected, logprobs, retain_graph=True)
        # A weight exp(d) with |d| < tol per token, or |d| < T * tol per completion (the sum over
        # <= 12 tokens): weight - 1 ~ d; the loss and gradient move by that fraction of their size.
        weight_tol = (12 if mode.startswith("sequence") else 1) * tol
        assert abs(metrics["sampler_weight_mean"] - 1.0) < weight_tol, mode
        assert metrics["sampler_over_cap_frac"] == 0.0
        assert corrected.item() == pytest.approx(plain.item(), abs=weight_tol * max(abs(plain.item()), 1.0))
        torch.testing.assert_close(grad, plain_grad, atol=weight_tol * float(plain_grad.abs().max()), rtol=0)
