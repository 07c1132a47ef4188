"""Trainer plumbing: the learning-rate schedule, the resumable index stream, the eval interval."""

import math

import pytest

from data.index_stream import IndexStream
from grpo.config import TrainArguments
from grpo.runtime.optimizer import lr_multiplier


def test_warmup_then_constant():
    args = TrainArguments(max_steps=10, warmup_steps=4, lr_scheduler="constant")
    # step 0..3 ramp (step + 1) / 4: 0.25, 0.5, 0.75, 1.0; then flat
    assert [lr_multiplier(s, args) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_reaches_zero_at_max_steps():
    args = TrainArguments(max_steps=10, warmup_steps=2, lr_scheduler="cosine")
    # after warm-up, progress = (step - 2) / 8; step 6 is half way: 0.5 * (1 + cos(pi/2)) = 0.5
    assert lr_multiplier(6, args) == pytest.approx(0.5)  # float64 schedule arithmetic: a few ulps; approx's rel 1e-6 is far above
    assert lr_multiplier(10, args) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(2, args) == pytest.approx(1.0)  # float64 schedule arithmetic: a few ulps; approx's rel 1e-6 is far above


def test_index_stream_ranks_are_disjoint_and_cover_an_epoch():
    streams = [IndexStream(10, seed=3, rank=r, world_size=2) for r in range(2)]
    taken = [s.take(5) for s in streams]
    assert set(taken[0]).isdisjoint(taken[1])
    assert sorted(taken[0] + taken[1]) == list(range(10))


def test_index_stream_resumes_exactly():
    stream = IndexStream(7, seed=1)
    stream.take(5)
    state = stream.state_dict()
    expected = stream.take(9)  # crosses into the next epoch
    resumed = IndexStream(7, seed=1)
    resumed.load_state_dict(state)
    assert resumed.take(9) == expected


def test_index_stream_needs_an_example_per_rank():
    with pytest.raises(ValueError, match="fewer than"):
        IndexStream(1, seed=0, rank=0, world_size=2)


def test_wilson_interval_by_hand():
    from eval import wilson_interval

    # 50 of 100: p = 0.5, z = 1.96; centre = (0.5 + 1.96^2/200) / (1 + 1.96^2/100) = 0.5
    # half = 1.96 * sqrt(0.25/100 + 3.8416/40000) / 1.038416
    #      = 1.96 * sqrt(0.00259604) / 1.038416 = 1.96 * 0.0509514 / 1.038416 = 0.0961703
    low, high = wilson_interval(50, 100)
    # float64 arithmetic against the 7-digit hand value: its rounding (5e-8) is the whole gap
    assert low == pytest.approx(0.5 - 0.0961703, abs=1e-6)
    assert high == pytest.approx(0.5 + 0.0961703, abs=1e-6)
    assert math.isclose(sum(wilson_interval(0, 10)), wilson_interval(0, 10)[1])  # low is 0


def test_a_longer_resumed_schedule_continues_from_where_the_first_left_the_lr():
    from grpo.runtime.optimizer import extended_lr_multiplier

    first = TrainArguments(max_steps=10, warmup_steps=2, lr_scheduler="cosine")
    longer = TrainArguments(max_steps=14, warmup_steps=2, lr_scheduler="cosine")
    # The first run at step 6: progress (6 - 2) / 8 = 0.5, multiplier 0.5 * (1 + cos(pi/2)) = 0.5.
    # Rebuilt over 14 steps it would be 0.5 * (1 + cos(pi * 4/12)) = 0.75 there: a rise at the resume.
    assert lr_multiplier(6, longer) == pytest.approx(0.75)  # float64 schedule arithmetic: a few ulps; approx's rel 1e-6 is far above
    # Extended: 0.5 at the resume step, then 0.5 * cosine over the remaining 8 steps; at step 10,
    # half way, 0.5 * 0.5 * (1 + cos(pi/2)) = 0.25; at step 14, 0.
    assert extended_lr_multiplier(6, longer, 6, first) == pytest.approx(0.5)  # float64 schedule arithmetic: a few ulps
    assert extended_lr_multiplier(10, longer, 6, first) == pytest.approx(0.25)  # float64 schedule arithmetic: a few ulps
    assert extended_lr_multiplier(14, longer, 6, first) == pytest.approx(0.0, abs=1e-12)
    assert extended_lr_multiplier(3, longer, 6, first) == lr_multiplier(3, first)  # before the resume: unchanged
    assert max(extended_lr_multiplier(s, longer, 6, first) for s in range(6, 15)) == extended_lr_multiplier(6, longer, 6, first)


def test_resuming_sft_with_more_steps_never_raises_the_lr(train_run, tmp_path):
    import shutil

    from conftest import read_metrics

    out = tmp_path / "sft"
    flags = ["--learning_rate", "1e-3", "--warmup_steps", "2", "--lr_scheduler", "cosine", "--save_total_limit", "10"]
    train_run(out, "--max_steps", "10", "--save_steps", "6", *flags, stage="sft")
    shutil.rmtree(out / "checkpoint-00000010")  # resume from step 6, as the demo's continued SFT does
    train_run(out, "--max_steps", "14", "--save_steps", "12", "--resume", *flags, stage="sft")
    lr = {m["step"]: m["lr"] for m in read_metrics(out)}  # the lr after step s: the one step s + 1 uses
    # lr after step 6 of the first run: 1e-3 * 0.5 (the hand-worked multiplier above)
    assert lr[6] == pytest.approx(5e-4)  # float64 schedule arithmetic: a few ulps; approx's rel 1e-6 is far above
    assert max(lr[s] for s in range(7, 15)) < lr[6]
    assert lr[10] == pytest.approx(2.5e-4)  # 1e-3 * 0.25; float64 schedule arithmetic
    assert lr[14] == pytest.approx(0.0, abs=1e-12)
    # A second resume of the extended run keeps its schedule (the origin travels in the checkpoint).
    before = dict(lr)
    shutil.rmtree(out / "checkpoint-00000014")
    train_run(out, "--max_steps", "14", "--save_steps", "12", "--resume", *flags, stage="sft")
    lr = {m["step"]: m["lr"] for m in read_metrics(out)}
    assert lr[13] == pytest.approx(before[13])  # float64 schedule arithmetic: a few ulps
