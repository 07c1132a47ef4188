"""The built-in reward functions: the verifiable signal GRPO learns from.

GRPO (DeepSeekMath, arXiv 2402.03300) needs no learned reward model when answers can be checked
by a program; DeepSeek-R1 pairs an accuracy reward with a format reward, and so do the blog post
and the TRL recipe. grpo/rewards.py turns names into these functions and their outputs into the
reward r.

The reward-function contract (write your own in this form and pass `--reward_functions
my_module:my_reward`):

    def my_reward(completions: list[str], answers: list[str], **columns) -> list[float]:
        ...

- `completions`: the R = B*G decoded completion texts (special tokens stripped, but the tag
  text `<think>`, `</think>`, `<answer>`, `</answer>` kept). The G completions of a prompt are
  consecutive.
- `answers`: the gold answer of each completion's prompt (repeated G times), tags stripped.
- `columns`: per-row lists of the same length R, each row its own prompt's value (repeated G
  times, like `answers`): `questions`, `images` (PIL), `image_paths` (as the dataset gave them;
  None for images given as bytes), `source_row`, every other column of the dataset under its own
  name, and `completion_lengths` (tokens through the first EOS; grpo.rewards.example_columns).
  Accept `**columns` so that new columns never break an old function.
- Returns one finite float per completion, or `None` for a completion the function cannot
  score (e.g. an answer it cannot parse). An unscored value is left out of that function's
  statistics instead of counted as 0; the total is the weighted sum over the functions that did
  score the completion (NaN-aware, as TRL); a completion no function scores has total NaN,
  advantage 0 (grpo/advantages.py) and is counted in `reward/unscored_frac`. NaN itself is an
  error (a bug in the function), not a way to say "unscored".

Built-in functions (the first four return 1.0 or 0.0):

| name            | pays for                                                                    |
|-----------------|-----------------------------------------------------------------------------|
| format          | exactly `<think>...</think>` then `<answer>...</answer>`, whitespace around |
| count_accuracy  | the integer in the LAST `<answer>` equals the gold integer                  |
| choice_accuracy | the letter A-E in the LAST `<answer>` equals the gold letter                |
| math_accuracy   | math-verify judges the LAST `<answer>` equal to the gold (`.[math]` extra)  |
| overlong        | 0, falling linearly to -1 over the last L tokens before max_completion_length |

`overlong` (DAPO's soft overlong punishment, arXiv 2503.14476 sec. 3.4, eq. 13) reads the column
`completion_lengths` (tokens through the first EOS, which the GRPO loop passes to every function)
and is bound to `--max_completion_length` and `--overlong_buffer_length` L when resolved.
"""

from __future__ import annotations

import re
from collections.abc import Callable

RewardFunction = Callable[..., list[float]]

# --- answer extraction ---

_ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The stripped content of the LAST `<answer>...</answer>` in `text`, or None if there is none.

    The last one, because a model that thinks aloud may quote the tags inside its reasoning.
    """
    matches = _ANSWER_PATTERN.findall(text)
    return matches[-1].strip() if matches else None


# --- format ---

# Content of a tag pair: anything that does not open or close another think/answer tag. This is
# what makes the format strict: `<answer>1</answer><answer>2</answer>` does not pass as one tag.
_NO_TAGS = r"(?:(?!</?think>|</?answer>).)*"
_TAG_FREE_NON_SPACE = r"(?!</?think>|</?answer>)\S"
_FORMAT_PATTERN = re.compile(
    rf"\s*<think>{_NO_TAGS}</think>\s*<answer>{_NO_TAGS}{_TAG_FREE_NON_SPACE}{_NO_TAGS}</answer>\s*",
    re.DOTALL,
)


def format_reward(completions: list[str], answers: list[str], **columns) -> list[float]:
    """1.0 for `<think>...</think>` then `<answer>...</answer>` and nothing else but whitespace.

    Strict: one pair of each, in that order, no other text outside them, no nested tags. The
    thinking may be empty; the answer must hold at least one non-space character (an empty
    answer is not a format worth paying for). Models SFT'd on `<answer>N</answer>` alone (the
    synthetic demo's target) score 0 here; train them with `count_accuracy` only.
    """
    return [1.0 if _FORMAT_PATTERN.fullmatch(text) else 0.0 for text in completions]


# --- counting ---

_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_INTEGER_PATTERN = re.compile(r"[+-]?\d+(?:\.0*)?")


def parse_integer(text: str) -> int | None:
    """`text` as an integer if it is one, else None. Used for both completions and gold answers.

    Accepted: digits with optional sign and whitespace, one trailing period ("3."), a zero
    fraction ("3.0"), and the English words zero..twenty in any case ("Three"). Rejected:
    anything else, including sentences ("3 objects", "there are 3"), so that the model learns to
    put only the number inside `<answer>`.
    """
    text = text.strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    if _INTEGER_PATTERN.fullmatch(text):
        return int(text.partition(".")[0])
    return _NUMBER_WORDS.get(text.lower())


def count_accuracy_reward(completions: list[str], answers: list[str], **columns) -> list[float]:
    """1.0 when the integer in the last `<answer>` equals the gold integer (see `parse_integer`).

    No answer tag, or tag content that is not an integer: 0.0. A gold answer that is not an
    integer is a data error and raises (this reward is for counting datasets).
    """
    return _parsed_answer_matches(
        completions, answers, parse_integer,
        "count_accuracy: gold answer {answer!r} is not an integer; use this reward on counting data, "
        "or choice_accuracy / math_accuracy for other answers",
    )  # fmt: skip


def _parsed_answer_matches(completions, answers, parse, bad_gold: str) -> list[float]:
    """1.0 where parse(the last `<answer>`) equals parse(gold), else 0.0; a gold answer parse
    cannot read raises ValueError(bad_gold.format(answer=...)) (a data error, not a miss)."""
    rewards = []
    for completion, answer in zip(completions, answers, strict=True):
        gold = parse(str(answer))
        if gold is None:
            raise ValueError(bad_gold.format(answer=answer))
        extracted = extract_answer(completion)
        predicted = None if extracted is None else parse(extracted)
        rewards.append(1.0 if predicted == gold else 0.0)
    return rewards


# --- multiple choice ---

# An option letter at the start, optionally in parentheses, not followed by another letter:
# "B", "(B)", "B)", "B. 5", "B: red" -> B; "Blue" -> nothing.
_CHOICE_PATTERN = re.compile(r"\(?\s*([A-E])\s*\)?(?![A-Za-z])")


def parse_choice(text: str) -> str | None:
    """The option letter A-E that `text` starts with, or None. Lower case only as a lone letter."""
    text = text.strip()
    if re.fullmatch(r"\(?[a-e]\)?", text):
        return text.strip("()").upper()
    match = _CHOICE_PATTERN.match(text)
    return match.group(1) if match else None


def choice_accuracy_reward(completions: list[str], answers: list[str], **columns) -> list[float]:
    """1.0 when the option letter in the last `<answer>` equals the gold letter (`parse_choice`)."""
    return _parsed_answer_matches(
        completions, answers, parse_choice, "choice_accuracy: gold answer {answer!r} does not start with an option letter A-E"
    )


# --- math (optional dependency) ---


def import_math_verify():
    try:
        import math_verify  # optional: pip install .[math]
    except ImportError as error:
        raise ImportError(
            "the math_accuracy reward needs the math-verify package; install it with "
            'pip install -e ".[math]"'
        ) from error
    return math_verify


def _parse_math(math_verify, text: str):
    """math-verify's parse, retried inside `$...$` for bare LaTeX such as `\\frac{1}{2}`."""
    parsed = math_verify.parse(text)
    if not parsed and "$" not in text:
        parsed = math_verify.parse(f"${text}$")
    return parsed


def math_accuracy_reward(completions: list[str], answers: list[str], **columns) -> list[float]:
    """1.0 when math-verify judges the last `<answer>` equal to the gold answer.

    Needs the `math` extra (`pip install -e ".[math]"`). A gold answer math-verify cannot parse
    falls back to a case-insensitive string comparison, so one odd row does not stop training.
    """
    math_verify = import_math_verify()
    rewards = []
    for completion, answer in zip(completions, answers, strict=True):
        extracted = extract_answer(completion)
        if extracted is None or not extracted:
            rewards.append(0.0)
            continue
        gold_parsed = _parse_math(math_verify, str(answer))
        if not gold_parsed:
            rewards.append(float(extracted.lower() == str(answer).strip().lower()))
            continue
        predicted_parsed = _parse_math(math_verify, extracted)
        rewards.append(float(bool(predicted_parsed) and math_verify.verify(gold_parsed, predicted_parsed)))
    return rewards


# --- overlong (DAPO's soft length penalty) ---


def overlong_penalty(length: int, max_completion_length: int, buffer_length: int) -> float:
    """DAPO eq. 13 with L_max = max_completion_length and L_cache = buffer_length:

        0                                   if length <= L_max - L_cache
        (L_max - L_cache - length) / L_cache  if L_max - L_cache < length <= L_max
        -1                                  if length > L_max (cannot happen here: the sampler stops)
    """
    start = max_completion_length - buffer_length  # the last length with no penalty
    if length <= start:
        return 0.0
    return max((start - length) / buffer_length, -1.0)


def overlong_reward(
    completions: list[str],
    answers: list[str],
    *,
    completion_lengths: list[int] | None = None,
    max_completion_length: int,
    overlong_buffer_length: int,
    **columns,
) -> list[float]:
    """A penalty in [-1, 0] that grows linearly over the last `overlong_buffer_length` tokens.

    Lengths are in tokens (the `completion_lengths` column, EOS included), not characters: the
    limit it warns about is the sampler's token limit. A completion cut at the limit gets -1.
    """
    if completion_lengths is None:
        raise ValueError(
            "the overlong reward needs the completion_lengths column (tokens per completion); the "
            "GRPO loop passes it, a caller of compute_rewards must pass completion_lengths=[...]"
        )
    return [overlong_penalty(int(n), max_completion_length, overlong_buffer_length) for n in completion_lengths]
