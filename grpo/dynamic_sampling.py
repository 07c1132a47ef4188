"""Dynamic sampling: keep drawing prompts until the generation batch holds groups that teach something.

DAPO (arXiv 2503.14476, sec. 3.2): a group whose G rewards all agree has advantage 0 for every
completion, so it adds no policy gradient (only KL) and dilutes the batch. Dynamic sampling drops
such groups and samples more prompts until the batch holds B = per_device_prompts informative
groups. Here, per rank:

    round 1: draw B prompts, sample G completions each, score them
    while some rank holds fewer than B informative groups and rounds < max_generation_rounds:
        every rank draws B more prompts, samples and scores them (another round)
    batch = the first B informative groups in draw order, filled up with dropped groups if short

Choices, and where this departs from DAPO:

1. Ranks stay in step: after each round one all-reduce counts the ranks still short, so every
   rank runs the same number of rounds (a rank that is already full samples too, and keeps only
   what it needs: under --fsdp every forward is a collective, and the count stays one number).
   No rank waits on another forever: the cap bounds the rounds.
2. Every rank trains on exactly B groups, so the loss normaliser, micro-batches and optimizer
   steps are those of a run without dynamic sampling. A batch still short after the cap is filled
   with groups that were dropped (all their advantages are 0: the same groups a run without
   dynamic sampling would have trained on), not with copies of informative groups (which would
   count their gradient twice). DAPO's recipe instead trains on a smaller batch; here the fill is
   counted in `dynamic/groups_filled` ("train on what there is, and say so").
3. Informative groups beyond B in the last round are discarded (as DAPO does), counted in
   `dynamic/groups_surplus`.
4. "All agree" is `grpo.advantages.zero_spread_groups`: equal scored rewards, or fewer than 2
   scored completions (unscored completions do not count).
5. The data stream only moves forward, and a checkpoint is written between generation batches,
   after all rounds: a resumed run draws exactly the prompts the uninterrupted one would have.

Metrics (summed over ranks): dynamic/groups_drawn, dynamic/groups_dropped (zero spread),
dynamic/groups_filled, dynamic/groups_surplus, dynamic/extra_rounds.
Run the tests: `python -m pytest tests/test_dynamic_sampling.py -q`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from grpo.advantages import zero_spread_groups
from grpo.engine.inputs import image_ranges, tokens_per_image
from grpo.engine.rollout import Rollout, SampledGroups
from grpo.runtime.distributed import all_reduce_sum


def select_groups(is_zero_spread: list[Tensor], needed: int) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Which (round, group) pairs make the batch: the first `needed` informative ones in draw
    order, then, if there are fewer, dropped ones in draw order. Pure; [B] bool per round in."""
    drawn = [(r, g) for r, flags in enumerate(is_zero_spread) for g in range(len(flags))]
    informative = [(r, g) for r, g in drawn if not bool(is_zero_spread[r][g])]
    dropped = [(r, g) for r, g in drawn if bool(is_zero_spread[r][g])]
    kept = informative[:needed]
    filled = dropped[: needed - len(kept)]
    info = {
        "groups_drawn": len(drawn),
        "groups_dropped": len(dropped),
        "groups_filled": len(filled),
        "groups_surplus": len(informative) - len(kept),
    }
    return kept + filled, info


def draw_rounds(
    draw_round: Callable[[], SampledGroups], *, needed: int, group_size: int, max_rounds: int
) -> list[SampledGroups]:
    """Run rounds until no rank is short of informative groups or `max_rounds` is reached.

    Every rank calls this with the same arguments; the one all-reduce per round makes every rank
    take the same decision, so all run the same number of rounds.
    """
    rounds = [draw_round()]
    while len(rounds) < max_rounds:
        informative = sum(int((~zero_spread_groups(r.rewards, group_size)).sum()) for r in rounds)
        if all_reduce_sum(float(informative < needed)) == 0:
            break  # no rank is short
        rounds.append(draw_round())
    return rounds


def _pad_columns(tensor: Tensor, width: int, value) -> Tensor:
    """[R, T] -> [R, width], padded on the right with `value`."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def _image_embeds_per_prompt(sampled: SampledGroups, merge_size: int) -> list[Tensor]:
    """The rollout's [N, D] image features split into one [N_p, D] block per prompt."""
    embeds = sampled.rollout.image_embeds  # [N, D]
    per_image = embeds.split(tokens_per_image(sampled.batch["image_grid_thw"], merge_size))
    return [torch.cat([embeds[:0], *(per_image[i] for i in images)]) for images in image_ranges(sampled.rollout.images_per_prompt)]


def merge_groups(
    rounds: list[SampledGroups],
    chosen: list[tuple[int, int]],
    *,
    collate: Callable[[list[dict]], dict],
    device: torch.device,
    group_size: int,
    pad_token_id: int,
    merge_size: int,
) -> SampledGroups:
    """One generation batch of the chosen (round, group) pairs, as if it had been sampled at once.

    The prompts are collated again (left padded to the longest chosen prompt), the completions
    padded with pad_token_id to the longest, each with its round's completion mask (padded with 0,
    so padding never counts), and the rollout's image features kept per prompt.
    """
    G = group_size
    if chosen == [(0, g) for g in range(len(rounds[0].examples))]:
        return rounds[0]  # round 0 was full (other ranks may have drawn more): the batch, untouched
    rows = [(r, g * G + k) for r, g in chosen for k in range(G)]
    width = max(rounds[r].rollout.completion_ids.shape[1] for r, _ in chosen)
    completion_ids = torch.stack(
        [_pad_columns(rounds[r].rollout.completion_ids[i : i + 1], width, pad_token_id)[0] for r, i in rows]
    )  # [B*G, T]
    sampler_logprobs = torch.stack(
        [_pad_columns(rounds[r].rollout.sampler_logprobs[i : i + 1], width, 0.0)[0] for r, i in rows]
    )  # [B*G, T]
    image_embeds = None
    if all(rounds[r].rollout.image_embeds is not None for r, _ in chosen):
        blocks = {r: _image_embeds_per_prompt(rounds[r], merge_size) for r in {r for r, _ in chosen}}
        image_embeds = torch.cat([blocks[r][g] for r, g in chosen])  # [N, D]
    # Each row keeps the mask its round computed, padded with 0: never re-derived from the padded
    # ids, where a pad that is also an EOS id (Qwen's <|endoftext|>) would read as an ending.
    mask = torch.stack(
        [_pad_columns(rounds[r].completion_mask[i : i + 1], width, 0.0)[0] for r, i in rows]
    )  # [B*G, T]
    is_truncated = torch.stack([rounds[r].is_truncated[i] for r, i in rows])  # [B*G]
    rollout = Rollout(
        completion_ids=completion_ids,
        sampler_logprobs=sampler_logprobs,
        image_embeds=image_embeds,
        images_per_prompt=[rounds[r].rollout.images_per_prompt[g] for r, g in chosen],
        num_generated_tokens=int(mask.sum()),
    )
    examples = [rounds[r].examples[g] for r, g in chosen]
    batch = collate(examples)
    return SampledGroups(
        examples=examples,
        batch=batch,
        batch_on_device={k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)},
        rollout=rollout,
        completion_mask=mask,
        is_truncated=is_truncated,
        completions=[rounds[r].completions[i] for r, i in rows],
        rewards=torch.stack([rounds[r].rewards[i] for r, i in rows]),  # [B*G]
        per_function=torch.stack([rounds[r].per_function[i] for r, i in rows]),  # [B*G, F]
    )


def sample_generation_batch(
    draw_round: Callable[[], SampledGroups],
    *,
    enabled: bool,
    needed: int,
    group_size: int,
    max_rounds: int,
    collate: Callable[[list[dict]], dict],
    device: torch.device,
    pad_token_id: int,
    merge_size: int,
) -> tuple[SampledGroups, dict[str, float]]:
    """The generation batch: one round when `enabled` is False, else DAPO's dynamic sampling.

    Returns the batch and, when enabled, the `dynamic/*` metrics summed over ranks.
    """
    if not enabled:
        return draw_round(), {}
    rounds = draw_rounds(draw_round, needed=needed, group_size=group_size, max_rounds=max_rounds)
    chosen, info = select_groups([zero_spread_groups(r.rewards, group_size) for r in rounds], needed)
    merged = merge_groups(
        rounds, chosen, collate=collate, device=device, group_size=group_size,
        pad_token_id=pad_token_id, merge_size=merge_size,
    )  # fmt: skip
    metrics = {f"dynamic/{key}": all_reduce_sum(float(value)) for key, value in info.items()}
    metrics["dynamic/extra_rounds"] = float(len(rounds) - 1)  # the same on every rank
    return merged, metrics
