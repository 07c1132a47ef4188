"""Reward functions the end-to-end tests pass as `--reward_functions reward_fns:NAME`.

The tiny model never writes a correct answer, so the built-in rewards are all 0 and GRPO's
advantages (and gradients) would be 0 too. These give a reward spread on random text, so the
policy moves. The tests put this folder on PYTHONPATH (pytest already has it on sys.path).
"""

from __future__ import annotations

import math
import os


def length_reward(completions, answers, **columns):
    """The completion's length in characters, scaled to [0, 1] (random text has a spread)."""
    return [min(len(text), 64) / 64 for text in completions]


def vowel_reward(completions, answers, **columns):
    """Fraction of the completion's characters that are vowels: a second, independent spread."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def even_parity(completions, answers, **columns):
    """1.0 when len(completion) + gold is even: a "correctness" eval.py can score on random text
    (greedy decoding of the tiny model writes the same text for every prompt; the gold varies)."""
    return [float((len(text) + int(answer)) % 2 == 0) for text, answer in zip(completions, answers, strict=True)]


def raise_on_rank_one(completions, answers, **columns):
    """Fails on rank 1 only, as a user's reward that breaks on one rank's data would."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("reward_fns.raise_on_rank_one: rank 1 refuses to score")
    return length_reward(completions, answers)


def always_raises(completions, answers, **columns):
    raise KeyError("no such column")


def wrong_length(completions, answers, **columns):
    """One value too few."""
    return [0.0] * (len(completions) - 1)


def nan_reward(completions, answers, **columns):
    return [math.nan] * len(completions)


_calls = {"slow_from_second_call": 0}


def slow_from_second_call(completions, answers, **columns):
    """length_reward, but from its second call on it sleeps SLOW_REWARD_SECONDS (default 6) first:
    a step longer than a launcher's grace period. Rank 0 touches SLOW_REWARD_MARKER (a path) as it
    starts sleeping, so a test can signal the job in the middle of that long step."""
    import time

    _calls["slow_from_second_call"] += 1
    if _calls["slow_from_second_call"] >= 2:
        marker = os.environ.get("SLOW_REWARD_MARKER")
        if marker and os.environ.get("RANK", "0") == "0":
            open(marker, "w").close()
        time.sleep(float(os.environ.get("SLOW_REWARD_SECONDS", "6")))
    return length_reward(completions, answers)


def coarse_length_reward(completions, answers, **columns):
    """1.0 for a completion of at least 12 characters, else 0.0: a group's rewards often agree
    (zero spread), which is what dynamic sampling drops."""
    return [float(len(text) >= 12) for text in completions]


def unscored_sometimes(completions, answers, **columns):
    """length_reward, or None (cannot score) for a completion whose length is a multiple of 3."""
    return [None if len(text) % 3 == 0 else min(len(text), 64) / 64 for text in completions]


def record_columns(completions, answers, **columns):
    """Appends what it was given (one JSON line per call) to $REWARD_COLUMNS_DIR/rank{RANK}.jsonl
    (images as their sizes), for tests/test_vlm_pitfalls.py. Pays length_reward to the prompts of
    odd `uid` and a constant 0.5 to the others, whose groups dynamic sampling then drops."""
    import json
    from pathlib import Path

    record = {"completions": completions, "answers": answers}
    record.update({name: values for name, values in columns.items() if name != "images"})
    record["image_sizes"] = [[list(image.size) for image in images] for images in columns["images"]]
    path = Path(os.environ["REWARD_COLUMNS_DIR"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
    return [min(len(text), 64) / 64 if uid % 2 else 0.5 for text, uid in zip(completions, columns["uid"], strict=True)]


def always_none(completions, answers, **columns):
    """None (cannot score) for every completion: a broken reward that would train on zero advantages."""
    return [None] * len(completions)


def nan_for_the_second(completions, answers, **columns):
    """even_parity, but NaN for completion 1: a value eval.py must refuse, not count as wrong."""
    values = even_parity(completions, answers)
    if len(values) > 1:
        values[1] = math.nan
    return values


def fails_on_batches(completions, answers, **columns):
    """Scores one completion at a time; raises on any batch of two or more (a batch-level bug)."""
    if len(completions) > 1:
        raise ValueError("expected one completion")
    return length_reward(completions, answers)


def completions_only(completions):
    """Takes no answers and no columns: the call every step makes cannot bind (refused at start-up)."""
    return [1.0] * len(completions)


def named_columns(completions, answers, solution, completion_lengths, **columns):
    """Names a data column (`solution`) and the loop's `completion_lengths` as parameters: both come
    by name at each call, so the start-up check must not refuse it."""
    return [float(length <= 4) for length in completion_lengths]
