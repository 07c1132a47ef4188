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
