"""Dynamic sampling (grpo/dynamic_sampling.py): which groups make the batch, and how many rounds.

The selection is pure and worked by hand; the rounds run here in one process with fake rounds
(no model), the merge on a real tiny rollout. The 2-rank run is in tests/test_torchrun.py, the
resume in tests/test_resume.py. Last, the completion mask of a generation batch is computed once
(RolloutRounds, or merge_groups for a merged batch), counted over a tiny training run.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_dynamic_sampling.py -q
"""

from __future__ import annotations

import torch

from grpo.dynamic_sampling import (
    draw_rounds,
    merge_groups,
    sample_generation_batch,
    select_groups,
)
from grpo.engine.rollout import SampledGroups
from grpo.masks import completion_mask

NAN = float("nan")


def test_select_groups_by_hand():
    # B = 3 needed. Round 0 groups: [zero, informative, zero]; round 1: [informative, informative, zero]
    flags = [torch.tensor([True, False, True]), torch.tensor([False, False, True])]
    chosen, info = select_groups(flags, needed=3)
    # informative in draw order: (0,1), (1,0), (1,1) -> exactly 3, nothing filled, nothing surplus
    assert chosen == [(0, 1), (1, 0), (1, 1)]
    assert info == {"groups_drawn": 6, "groups_dropped": 3, "groups_filled": 0, "groups_surplus": 0}
    # only round 0 drawn (the cap hit): 1 informative, filled with the first 2 dropped groups
    chosen, info = select_groups(flags[:1], needed=3)
    assert chosen == [(0, 1), (0, 0), (0, 2)]
    assert info == {"groups_drawn": 3, "groups_dropped": 2, "groups_filled": 2, "groups_surplus": 0}
    # B = 1: the first informative group; the two later ones are surplus
    chosen, info = select_groups(flags, needed=1)
    assert chosen == [(0, 1)] and info["groups_surplus"] == 2


def _fake_round(rewards: list[float]) -> SampledGroups:
    rewards = torch.tensor(rewards)
    # no rollout, so no completion mask: these rounds are only counted, never merged
    return SampledGroups([], {}, {}, None, None, None, [], rewards, rewards[:, None])


def test_rounds_stop_when_full_or_at_the_cap():
    G = 2
    # group rewards per round: [1, 1] is zero spread, [1, 0] informative, [NaN, 1] one scored = zero spread
    script = [[1, 1, 1, 0], [NAN, 1, 1, 1], [0, 1, 1, 1], [0, 1, 0, 1]]
    calls = []

    def draw():
        calls.append(len(calls))
        return _fake_round(script[len(calls) - 1])

    # need 2 informative: round 0 has 1, round 1 has 0, round 2 has 1 -> total 2 after 3 rounds
    rounds = draw_rounds(draw, needed=2, group_size=G, max_rounds=5)
    assert len(rounds) == 3 and len(calls) == 3
    calls.clear()
    assert len(draw_rounds(draw, needed=2, group_size=G, max_rounds=2)) == 2  # the cap
    calls.clear()
    assert len(draw_rounds(draw, needed=1, group_size=G, max_rounds=5)) == 1  # full after round 0


def test_disabled_is_one_plain_round():
    plain = _fake_round([1.0, 1.0])
    batch, metrics = sample_generation_batch(
        lambda: plain, enabled=False, needed=1, group_size=2, max_rounds=3, collate=None,
        device=torch.device("cpu"), pad_token_id=0, merge_size=2,
    )  # fmt: skip
    assert batch is plain and metrics == {}


def test_merged_batch_is_the_chosen_groups_of_a_real_rollout():
    """Two real rounds of the tiny model; the merged batch holds the chosen groups' rows, padded."""
    from data.collators import GRPOCollator
    from data.sources import load_examples
    from grpo.engine.rollout import sample_rollouts
    from models.loading import load_policy, special_token_ids

    model, processor = load_policy("tiny", dtype=torch.float32, device="cpu", seed=0)
    tokens = special_token_ids(model, processor)
    examples, _ = load_examples("synthetic", num_examples=4, seed=0)
    collator = GRPOCollator(processor)
    merge = model.config.vision_config.spatial_merge_size
    generator = torch.Generator().manual_seed(0)
    G = 2
    rounds = []
    for r in range(2):
        chunk = [examples[2 * r], examples[2 * r + 1]]
        batch = collator(chunk)
        rollout = sample_rollouts(
            model, batch, group_size=G, max_new_tokens=4 + 2 * r, eos_token_ids=tokens.eos_token_ids,
            pad_token_id=tokens.pad_token_id, generator=generator,
        )  # fmt: skip
        rewards = torch.arange(4, dtype=torch.float32) + 10 * r  # [B*G] tags the rows
        mask, is_truncated = completion_mask(rollout.completion_ids, tokens.eos_token_ids)  # as RolloutRounds builds them
        rounds.append(SampledGroups(
            chunk, batch, batch, rollout, mask, is_truncated, [f"{r}/{i}" for i in range(4)], rewards, rewards[:, None]
        ))  # fmt: skip
    merged = merge_groups(
        rounds, [(1, 0), (0, 1)], collate=collator, device=torch.device("cpu"), group_size=G,
        pad_token_id=tokens.pad_token_id, merge_size=merge,
    )  # fmt: skip
    # group (1, 0) is rows 0, 1 of round 1; group (0, 1) rows 2, 3 of round 0
    assert merged.rewards.tolist() == [10.0, 11.0, 2.0, 3.0]
    assert merged.completions == ["1/0", "1/1", "0/2", "0/3"]
    assert merged.examples == [examples[2], examples[1]]
    width = merged.rollout.completion_ids.shape[1]
    assert width == max(r.rollout.completion_ids.shape[1] for r in rounds)
    short = rounds[0].rollout.completion_ids[2:4]  # [2, T0], padded with pad to the merged width
    assert torch.equal(merged.rollout.completion_ids[2:4, : short.shape[1]], short)
    assert (merged.rollout.completion_ids[2:4, short.shape[1] :] == tokens.pad_token_id).all()
    assert torch.equal(merged.rollout.completion_ids[:2], rounds[1].rollout.completion_ids[:2, :width])
    # Each row keeps the mask its round computed, padded with 0 to the merged width (never
    # re-derived from the padded ids: the tiny tokenizer's pad is an EOS id, as Qwen's is, so a
    # row cut at round 0's 4 tokens would gain an "EOS" from its padding).
    short_mask = rounds[0].completion_mask[2:4]  # [2, T0]
    assert torch.equal(merged.completion_mask[2:4, : short_mask.shape[1]], short_mask)
    assert (merged.completion_mask[2:4, short_mask.shape[1] :] == 0).all()
    assert torch.equal(merged.completion_mask[:2], rounds[1].completion_mask[:2, :width])
    assert merged.is_truncated.tolist() == rounds[1].is_truncated[:2].tolist() + rounds[0].is_truncated[2:4].tolist()
    assert merged.rollout.num_generated_tokens == int(merged.completion_mask.sum())
    # image features: round 1's first prompt, then round 0's second, each as the round encoded it
    per_prompt_tokens = (rounds[0].batch["image_grid_thw"].prod(-1) // merge**2).tolist()
    n0 = per_prompt_tokens[0]
    assert torch.equal(merged.rollout.image_embeds[:n0], rounds[1].rollout.image_embeds[:n0])
    assert torch.equal(merged.rollout.image_embeds[n0:], rounds[0].rollout.image_embeds[n0:])
    # the prompts are collated again, in the merged order
    assert torch.equal(merged.batch["pixel_values"], collator([examples[2], examples[1]])["pixel_values"])


def test_the_completion_mask_is_computed_once_per_generation_batch(train_run, tmp_path, monkeypatch):
    """Two steps of the tiny run, one generation batch each: grpo.masks.completion_mask runs twice.

    It is wrapped in grpo.masks and in every loaded module that imported it (under any name), so a
    second computation anywhere (the sampler, the loop) is counted. The preflight builds its own
    mask for a made-up batch; it is skipped here.
    """
    import sys

    import grpo.masks
    import train  # noqa: F401  (loads the loop's modules, so their imported names can be wrapped)

    original, calls = grpo.masks.completion_mask, []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if value is original:
                monkeypatch.setattr(module, name, counted)
    train_run(tmp_path / "run", "--max_steps", "2", "--save_steps", "0", "--skip_preflight")
    assert len(calls) == 2  # steps_per_generation 1: one generation batch per step, one mask each
