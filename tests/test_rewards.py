"""Reward functions by hand-written examples, the registry, and every error `compute_rewards` raises."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from grpo.reward_functions import (
    choice_accuracy_reward,
    count_accuracy_reward,
    extract_answer,
    format_reward,
    math_accuracy_reward,
    parse_integer,
)
from grpo.rewards import REWARD_FUNCTIONS, compute_rewards, resolve_reward_functions, reward_metrics

# --- extract_answer ---


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>3</answer>", "3"),
        ("<think>x</think><answer> 3 \n</answer>", "3"),
        ("<think>maybe <answer>2</answer>?</think><answer>4</answer>", "4"),  # the LAST one
        ("<answer>\nmulti\nline\n</answer>", "multi\nline"),
        ("no tags at all", None),
        ("<answer>3", None),  # never closed
        ("<answer></answer>", ""),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# --- format ---


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>count them</think><answer>3</answer>", 1.0),
        ("<think>a\nb</think>\n<answer>3</answer>", 1.0),  # the seed's newline between the tags
        ("  \n<think></think> <answer>3</answer>\n", 1.0),  # empty thinking, surrounding space
        ("<answer>3</answer>", 0.0),  # no thinking
        ("<think>x</think>", 0.0),  # no answer
        ("<answer>3</answer><think>x</think>", 0.0),  # wrong order
        ("<think>x</think><answer>3</answer> trailing words", 0.0),
        ("preamble <think>x</think><answer>3</answer>", 0.0),
        ("<think>x</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
        ("<think>x <think>y</think></think><answer>1</answer>", 0.0),  # nested thinking
        ("<think>x</think><answer>  </answer>", 0.0),  # blank answer
        ("<think>x</think><answer></answer></answer>", 0.0),  # stray closing tag as "content"
    ],
)
def test_format_reward(text, expected):
    assert format_reward([text], ["3"]) == [expected]


# --- count_accuracy ---


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>x</think><answer>3</answer>", 1.0),
        ("<answer> 3 </answer>", 1.0),
        ("<answer>3.</answer>", 1.0),
        ("<answer>3.0</answer>", 1.0),
        ("<answer>+3</answer>", 1.0),
        ("<answer>Three</answer>", 1.0),  # number words zero..twenty count
        ("<answer>4</answer>", 0.0),
        ("<answer>3 objects</answer>", 0.0),  # only the number may be inside the tag
        ("<answer>3.5</answer>", 0.0),
        ("<answer>2</answer> then <answer>3</answer>", 1.0),  # the last tag decides
        ("<answer>3</answer> then <answer>2</answer>", 0.0),
        ("The answer is 3", 0.0),  # no tag -> 0
        ("<answer></answer>", 0.0),
    ],
)
def test_count_accuracy_reward(completion, expected):
    assert count_accuracy_reward([completion], ["3"]) == [expected]


def test_parse_integer_edges():
    assert parse_integer("0") == 0
    assert parse_integer("twenty") == 20
    assert parse_integer("-2") == -2
    assert parse_integer("12345678901234567890") == 12345678901234567890  # no float rounding
    assert parse_integer("twenty-one") is None
    assert parse_integer("3..") is None


def test_count_accuracy_rejects_non_integer_gold():
    with pytest.raises(ValueError, match="gold answer 'B' is not an integer"):
        count_accuracy_reward(["<answer>3</answer>"], ["B"])


# --- choice_accuracy ---


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>B</answer>", 1.0),
        ("<answer>(B)</answer>", 1.0),
        ("<answer> B. 5</answer>", 1.0),
        ("<answer>B) five</answer>", 1.0),
        ("<answer>b</answer>", 1.0),  # a lone lower-case letter
        ("<answer>C</answer>", 0.0),
        ("<answer>Blue</answer>", 0.0),  # a word, not an option
        ("<answer>F</answer>", 0.0),
        ("B", 0.0),  # no tag
    ],
)
def test_choice_accuracy_reward(completion, expected):
    assert choice_accuracy_reward([completion], ["B"]) == [expected]


def test_choice_accuracy_gold_forms():
    assert choice_accuracy_reward(["<answer>D</answer>"] * 2, ["(D)", "D. 12"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="option letter"):
        choice_accuracy_reward(["<answer>D</answer>"], ["12"])


# --- math_accuracy ---


def test_math_accuracy_without_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail
    with pytest.raises(ImportError, match=r'pip install -e "\.\[math\]"'):
        math_accuracy_reward(["<answer>1/2</answer>"], ["1/2"])
    with pytest.raises(ImportError, match="math-verify"):
        resolve_reward_functions(["math_accuracy"])  # fails at start-up, not at step 1


def test_math_accuracy_through_math_verify(monkeypatch):
    # A stand-in math_verify that knows 1/2 == 0.5 == \frac{1}{2}; parse returns [] for what it
    # cannot read. This pins the wiring (extract, parse gold and answer, verify), not math-verify.
    def parse(text):
        text = text.strip("$ ")
        table = {"1/2": 0.5, "0.5": 0.5, "\\frac{1}{2}": 0.5, "3": 3.0}
        return [table[text]] if text in table else []

    fake = types.SimpleNamespace(parse=parse, verify=lambda gold, answer: gold == answer)
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    completions = [
        "<think>half</think><answer>0.5</answer>",
        "<answer>\\frac{1}{2}</answer>",
        "<answer>3</answer>",
        "<answer>gibberish</answer>",
        "0.5",  # no tag
    ]
    assert math_accuracy_reward(completions, ["1/2"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    # A gold answer math-verify cannot parse falls back to a string comparison.
    assert math_accuracy_reward(["<answer>Paris</answer>"], ["paris"]) == [1.0]


# --- registry ---


def length_reward(completions, answers, **columns):
    """A custom reward for the module:function test: shorter is better."""
    return [1.0 / (1 + len(text)) for text in completions]


NOT_CALLABLE = 3


def test_resolve_built_ins_and_module_function():
    resolved = resolve_reward_functions(["format", "count_accuracy", f"{__name__}:length_reward"])
    assert [name for name, _ in resolved] == ["format", "count_accuracy", "length_reward"]
    assert resolved[0][1] is REWARD_FUNCTIONS["format"]
    assert resolved[2][1] is length_reward
    assert set(REWARD_FUNCTIONS) == {"format", "count_accuracy", "choice_accuracy", "math_accuracy", "overlong"}


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("nonsense", ValueError, "unknown reward 'nonsense'"),
        ("no_such_module_xyz:fn", ImportError, "cannot import module 'no_such_module_xyz'"),
        (f"{__name__}:missing", AttributeError, "has no attribute 'missing'"),
        (f"{__name__}:NOT_CALLABLE", TypeError, "not a function"),
        (":fn", ValueError, "module:function"),
    ],
)
def test_resolve_errors(spec, error, message):
    with pytest.raises(error, match=message):
        resolve_reward_functions([spec])


def test_resolve_rejects_duplicates_and_empty():
    with pytest.raises(ValueError, match="given twice"):
        resolve_reward_functions(["format", "format"])
    with pytest.raises(ValueError, match="empty"):
        resolve_reward_functions([])


# --- compute_rewards ---


def test_compute_rewards_weighted_sum_and_metrics():
    functions = resolve_reward_functions(["format", "count_accuracy"])
    completions = [
        "<think>a</think><answer>3</answer>",  # format 1, count 1
        "<think>a</think><answer>2</answer>",  # format 1, count 0
        "<answer>3</answer>",  # format 0, count 1
        "3",  # format 0, count 0
    ]
    rewards, per_function = compute_rewards(functions, [0.5, 2.0], completions, ["3"] * 4)
    metrics = reward_metrics(per_function, rewards, [name for name, _ in functions])
    # total = 0.5 * format + 2 * count: [2.5, 0.5, 2.0, 0.0]
    assert per_function.shape == (4, 2) and per_function.dtype == torch.float32
    assert per_function.tolist() == [[1, 1], [1, 0], [0, 1], [0, 0]]
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == [2.5, 0.5, 2.0, 0.0]
    # each function: values {1,1,0,0}: mean 0.5, population std 0.5
    assert metrics["reward/format/mean"] == 0.5 and metrics["reward/format/std"] == 0.5
    assert metrics["reward/count_accuracy/mean"] == 0.5
    assert metrics["reward/total/mean"] == pytest.approx(5.0 / 4)  # (2.5 + 0.5 + 2 + 0) / 4; approx's rel 1e-6 is ~16 float32 ulps: a float32 mean/fraction of a few O(1) terms is within a few
    # total std: deviations 1.25, -0.75, 0.75, -1.25 -> mean square (1.5625+0.5625)*2/4 = 1.0625
    assert metrics["reward/total/std"] == pytest.approx(math.sqrt(1.0625))  # approx's rel 1e-6 is ~16 float32 ulps: a float32 mean/fraction of a few O(1) terms is within a few


def test_compute_rewards_default_weights_and_columns():
    def uses_questions(completions, answers, questions, **columns):
        return [float(len(q)) for q in questions]

    functions = [("count_accuracy", count_accuracy_reward), ("question_length", uses_questions)]
    rewards, _ = compute_rewards(
        functions, None, ["<answer>1</answer>", "x"], ["1", "1"], questions=["ab", "abc"]
    )
    assert rewards.tolist() == [1.0 + 2.0, 0.0 + 3.0]


def test_compute_rewards_names_raising_function_and_offending_row():
    def breaks_on_b(completions, answers, **columns):
        return [1.0 if "b" not in text else 1 / 0 for text in completions]

    completions = ["a", "a", "b" * 1000]
    with pytest.raises(RuntimeError) as info:
        compute_rewards([("breaks_on_b", breaks_on_b)], None, completions, ["gold-7"] * 3)
    message = str(info.value)
    assert "'breaks_on_b' raised ZeroDivisionError" in message
    assert "on completion 2" in message  # the row that fails, found by re-running row by row
    assert "gold-7" in message
    assert "more chars" in message and len(message) < 1000  # the completion is truncated


@pytest.mark.parametrize(
    "output, message",
    [
        ([1.0], r"returned 1 values for 2 completions; expected 2"),
        ([1.0, float("nan")], r"returned nan for completion 1"),
        ([1.0, "1"], r"returned '1' for completion 1"),
        (1.0, r"returned a float"),
    ],
)
def test_compute_rewards_rejects_bad_outputs(output, message):
    def bad(completions, answers, **columns):
        return output

    with pytest.raises((ValueError, TypeError), match=r"reward function 'bad' " + message):
        compute_rewards([("bad", bad)], None, ["x", "y"], ["1", "1"])


def test_compute_rewards_accepts_tensor_and_numpy_outputs():
    import numpy as np

    functions = [
        ("tensor", lambda completions, answers, **c: torch.tensor([1.0, 2.0])),
        ("numpy", lambda completions, answers, **c: np.array([0.5, 0.25])),
    ]
    rewards, _ = compute_rewards(functions, None, ["x", "y"], ["1", "1"])
    assert rewards.tolist() == [1.5, 2.25]


def test_compute_rewards_checks_weights_and_lengths():
    functions = resolve_reward_functions(["format", "count_accuracy"])
    with pytest.raises(ValueError, match="--reward_weights has 1 values but there are 2"):
        compute_rewards(functions, [1.0], ["x"], ["1"])
    with pytest.raises(ValueError, match="1 completions but 2 answers"):
        compute_rewards(functions, None, ["x"], ["1", "2"])
    with pytest.raises(ValueError, match="column 'questions' has 2 rows, expected 1"):
        compute_rewards(functions, None, ["x"], ["1"], questions=["a", "b"])


# --- rewards a function cannot score (None) ---


def test_none_is_left_out_of_the_function_and_the_weighted_sum():
    """None = unscored: out of its function's statistics (not a 0), skipped in the weighted sum."""

    def parses_digits(completions, answers, **columns):  # a checker that cannot read words
        return [float(text == answer) if text.isdigit() else None for text, answer in zip(completions, answers, strict=True)]

    def short(completions, answers, **columns):
        return [1.0 if len(text) < 3 else None for text in completions]

    functions = [("parses_digits", parses_digits), ("short", short)]
    completions = ["3", "4", "three", "many words"]
    rewards, per_function = compute_rewards(functions, [2.0, 0.5], completions, ["3"] * 4)
    metrics = reward_metrics(per_function, rewards, [name for name, _ in functions])
    # parses_digits: 1, 0, None, None; short: 1, 1, None, None (lengths 1, 1, 5, 10)
    # rows: 2*1 + 0.5*1 = 2.5; 2*0 + 0.5*1 = 0.5; nothing scores rows 2 and 3 -> NaN
    assert rewards[:2].tolist() == [2.5, 0.5] and torch.isnan(rewards[2:]).all()
    assert torch.isnan(per_function[2:]).all()
    # parses_digits over its 2 scored rows: mean (1 + 0) / 2 = 0.5 (not 1/4), population std 0.5
    assert metrics["reward/parses_digits/mean"] == 0.5 and metrics["reward/parses_digits/std"] == 0.5
    assert metrics["reward/parses_digits/unscored_frac"] == 0.5
    assert metrics["reward/total/mean"] == 1.5  # (2.5 + 0.5) / 2 scored rows
    assert metrics["reward/unscored_frac"] == 0.5

    # one function scores a row the other cannot: the row's total is that function's part alone
    def words_only(completions, answers, **columns):
        return [None if text.isdigit() else 0.25 for text in completions]

    rewards, _ = compute_rewards([("parses_digits", parses_digits), ("words_only", words_only)], [2.0, 4.0], completions, ["3"] * 4)
    # row 0: 2*1 (words_only None); row 1: 2*0; rows 2, 3: 4*0.25 = 1 (parses_digits None)
    assert rewards.tolist() == [2.0, 0.0, 1.0, 1.0]


def test_weighted_sum_without_none_is_the_matrix_product():
    from grpo.rewards import weighted_sum

    per_function = torch.rand(16, 3, generator=torch.Generator().manual_seed(0))  # [R, F]
    weights = [0.3, 1.7, -0.2]
    assert torch.equal(weighted_sum(per_function, weights), per_function @ torch.tensor(weights))


# --- overlong (DAPO sec. 3.4) ---


def test_overlong_penalty_by_hand():
    from grpo.reward_functions import overlong_penalty, overlong_reward

    # L_max = 10, L_cache = 4: no penalty up to 10 - 4 = 6 tokens, then (6 - n) / 4
    assert [overlong_penalty(n, 10, 4) for n in (1, 6, 7, 8, 10, 11)] == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_reward(["a", "b"], ["1", "1"], completion_lengths=[9, 3], max_completion_length=10, overlong_buffer_length=4) == [-0.75, 0.0]
    with pytest.raises(ValueError, match="completion_lengths"):
        overlong_reward(["a"], ["1"], max_completion_length=10, overlong_buffer_length=4)


def test_overlong_is_resolved_with_its_settings_and_weighted_like_the_others():
    functions = resolve_reward_functions(["count_accuracy", "overlong"], max_completion_length=8, overlong_buffer_length=2)
    assert [name for name, _ in functions] == ["count_accuracy", "overlong"]
    completions = ["<answer>2</answer>", "<answer>2</answer>"]
    rewards, per_function = compute_rewards(functions, [1.0, 0.5], completions, ["2", "2"], completion_lengths=[8, 7])
    metrics = reward_metrics(per_function, rewards, [name for name, _ in functions])
    # count_accuracy 1 for both; overlong: L_max 8, L_cache 2, start 6: (6 - 8) / 2 = -1, (6 - 7) / 2 = -0.5
    # totals: 1 + 0.5 * -1 = 0.5 and 1 + 0.5 * -0.5 = 0.75
    assert rewards.tolist() == [0.5, 0.75]
    assert metrics["reward/overlong/mean"] == -0.75
    with pytest.raises(ValueError, match="overlong: needs the settings"):
        resolve_reward_functions(["overlong"])


def test_example_columns_repeat_each_prompts_columns_for_its_completions():
    from grpo.rewards import example_columns

    examples = [
        {"images": ["img0"], "question": "q0", "answer": "1", "image_paths": ["a.png"], "level": 3},
        {"images": ["img1"], "question": "q1", "answer": "2", "image_paths": [None], "level": 5},
    ]
    # G = 2: rows 0, 1 answer prompt 0, rows 2, 3 prompt 1; `answer` is the call's `answers`.
    assert example_columns(examples, 2) == {
        "images": [["img0"], ["img0"], ["img1"], ["img1"]],
        "questions": ["q0", "q0", "q1", "q1"],
        "image_paths": [["a.png"], ["a.png"], [None], [None]],
        "level": [3, 3, 5, 5],
    }
    with pytest.raises(ValueError, match="dataset column 'completions' .* rename the column"):
        example_columns([{"question": "q", "answer": "1", "completions": "x"}], 2)
    with pytest.raises(ValueError, match="dataset column 'questions' would reach the reward functions as 'questions'"):
        example_columns([{"question": "q", "answer": "1", "questions": "x"}], 1)


def test_the_start_up_signature_check_refuses_only_what_no_call_can_bind(monkeypatch):
    # The columns reach a reward function by name and depend on the data: a function naming one
    # (`solution`) or the loop's `completion_lengths` is accepted at start-up and then called with
    # them; only a function that cannot take (completions, answers) is refused.
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    [(name, function)] = resolve_reward_functions(["reward_fns:named_columns"])
    rewards, _ = compute_rewards([(name, function)], None, ["a", "b"], ["1", "2"], solution=["1", "2"],
                                 completion_lengths=[3, 9])  # fmt: skip
    assert rewards.tolist() == [1.0, 0.0]
    with pytest.raises(TypeError, match=r"completions_only\(completions\) cannot be called as"):
        resolve_reward_functions(["reward_fns:completions_only"])
