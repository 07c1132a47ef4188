"""The demo's statistics and the baselines' data, by hand: the Student t interval over seeds, the
t quantiles it reads, GRPO's consumed prompts, RFT's filter of verified samples, and the correct
demonstrations of the filtered arm."""

from __future__ import annotations

import math

import pytest

from grpo.demo.report import T_975, t_interval, t_quantile_975


def _t_cdf_from_0(q: float, df: int, intervals: int = 4000) -> float:
    """P(0 < T < q) for Student's t with df degrees of freedom: Simpson's rule on its density
    Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + t^2/df)^(-(df+1)/2)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def density(t):
        return c * (1 + t * t / df) ** (-(df + 1) / 2)

    h = q / intervals
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    return h / 3 * (density(0.0) + inner + density(q))


@pytest.mark.parametrize("df", range(1, 31))
def test_each_tabulated_quantile_leaves_2_5_percent_in_the_upper_tail(df):
    # The table holds 3 decimals: a quantile off by at most 5e-4 moves P(0 < T < q) by at most
    # density(q) * 5e-4 < 0.07 * 5e-4 = 3.5e-5 (the density at q >= 2.04 is below 0.07 for every
    # df here; Simpson's error with 4000 intervals on this smooth density is far below that).
    assert abs(_t_cdf_from_0(T_975[df - 1], df) - 0.475) < 3.5e-5


def test_t_interval_by_hand():
    # Gains +10, +20, +30 over 3 seeds: mean 20; s^2 = (100 + 0 + 100) / (3 - 1) = 100, s = 10;
    # standard error 10 / sqrt(3) = 5.7735; t_{0.975, 2} = 4.303; half width 24.843.
    mean, low, high = t_interval([10.0, 20.0, 30.0])
    assert mean == 20.0
    assert low == pytest.approx(20 - 24.843, abs=5e-4)  # the hand value rounded to 3 decimals
    assert high == pytest.approx(20 + 24.843, abs=5e-4)
    # Two seeds, +4 and +6: mean 5, s = sqrt(2) = 1.4142, se = 1, t_{0.975, 1} = 12.706: [-7.706, 17.706].
    mean, low, high = t_interval([4.0, 6.0])
    assert (mean, low, high) == pytest.approx((5.0, -7.706, 17.706), abs=5e-4)
    # One seed has no spread to estimate: no interval.
    assert t_interval([7.0]) == (7.0, None, None)
    # Identical gains: a zero-width interval at the gain.
    assert t_interval([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)


def test_t_quantile_beyond_the_table_and_below_one_dof():
    assert t_quantile_975(2) == 4.303
    assert t_quantile_975(100) == T_975[-1] == 2.042  # wider than the exact 1.984: cautious, stated
    with pytest.raises(ValueError, match="degree of freedom"):
        t_quantile_975(0)


def test_consumed_prompts_are_the_ranks_streams_in_step_order():
    from data.index_stream import IndexStream
    from grpo.demo.pipeline import consumed_prompt_indices

    # 2 ranks x 3 prompts x 2 steps of a 20-prompt set: step 1 rank 0, step 1 rank 1, step 2 rank 0, ...
    rank0, rank1 = IndexStream(20, seed=5, rank=0, world_size=2), IndexStream(20, seed=5, rank=1, world_size=2)
    expected = rank0.take(3) + rank1.take(3) + rank0.take(3) + rank1.take(3)
    consumed = consumed_prompt_indices(20, 5, 2, 3, 2)
    assert consumed == expected and len(set(consumed)) == 12  # one epoch: no prompt twice


def test_rft_keeps_exactly_the_verified_well_formed_samples():
    from grpo.demo.pipeline import verified_rows

    samples = [  # eval.py's samples.jsonl records: `correct` is count_accuracy's verdict
        {"gold": "3", "outputs": ["<think>1, 2, 3.</think>\n<answer>3</answer>",  # kept
                                  "<think>1, 2.</think>\n<answer>2</answer>",  # wrong count
                                  "<answer>3</answer>"],  # right count, no <think>: GRPO's format reward says 0
         "correct": [True, False, True]},
        {"gold": "1", "outputs": ["<think>1.</think><answer>1</answer>", "<think>1.</think>\n<answer>1</answer> x"],
         "correct": [True, True]},  # the second has text after </answer>: not the format
    ]
    rows, traces, answers = verified_rows(samples)
    assert rows == [0, 1]
    assert traces == ["1, 2, 3.", "1."]
    assert answers == ["3", "1"]


def test_filtered_demonstrations_are_the_ones_with_the_true_count():
    from data.synthetic import make_counting_dataset
    from grpo.demo.pipeline import correct_demonstrations

    rows = make_counting_dataset(30, 2, count_range=(1, 6), demonstrator_misses="gray")
    demonstrations = {"answer": [r["answer"] for r in rows], "count": [r["count"] for r in rows]}
    kept = correct_demonstrations(demonstrations)
    import json

    no_gray = [i for i, r in enumerate(rows) if not any(o["color"] == "gray" for o in json.loads(r["objects"]))]
    assert kept == no_gray  # the blind demonstrator is right exactly on the scenes without gray
    assert 0 < len(kept) < 30
