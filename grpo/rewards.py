"""Reward functions: the verifiable signal GRPO learns from, a registry, and their weighted sum.

GRPO (DeepSeekMath, arXiv 2402.03300) needs no learned reward model when answers can be checked
by a program; DeepSeek-R1 pairs an accuracy reward with a format reward, and so do the blog post and the TRL recipe.

The reward-function contract (write your own in this form and pass `--reward_functions
my_module:my_reward`):

    def my_reward(completions: list[str], answers: list[str], **columns) -> list[float]:
        ...

- `completions`: the R = B*G decoded completion texts (special tokens stripped, but the tag
  text `<think>`, `</think>`, `<answer>`, `</answer>` kept). The G completions of a prompt are
  consecutive.
- `answers`: the gold answer of each completion's prompt (repeated G times), tags stripped.
- `columns`: optional extra per-row lists of the same length R (e.g. `questions=[...]`); accept
  `**columns` so that new columns never break an old function.
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

`compute_rewards` calls each function once per batch, checks what it returned, and sums the
columns with the given weights: `rewards = per_function @ weights` over the scored entries
(`weighted_sum`), shapes [R] and [R, F] (F reward functions; unscored entries NaN). The tensors
are float32 on the CPU; move them to the device yourself.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence

import torch

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
    rewards = []
    for completion, answer in zip(completions, answers, strict=True):
        gold = parse_integer(str(answer))
        if gold is None:
            raise ValueError(
                f"count_accuracy: gold answer {answer!r} is not an integer; use this reward on "
                "counting data, or choice_accuracy / math_accuracy for other answers"
            )
        extracted = extract_answer(completion)
        predicted = None if extracted is None else parse_integer(extracted)
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
    rewards = []
    for completion, answer in zip(completions, answers, strict=True):
        gold = parse_choice(str(answer))
        if gold is None:
            raise ValueError(
                f"choice_accuracy: gold answer {answer!r} does not start with an option letter A-E"
            )
        extracted = extract_answer(completion)
        predicted = None if extracted is None else parse_choice(extracted)
        rewards.append(1.0 if predicted == gold else 0.0)
    return rewards


# --- math (optional dependency) ---


def _import_math_verify():
    try:
        import math_verify
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
    math_verify = _import_math_verify()
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


# --- registry ---

REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "format": format_reward,
    "count_accuracy": count_accuracy_reward,
    "choice_accuracy": choice_accuracy_reward,
    "math_accuracy": math_accuracy_reward,
    "overlong": overlong_reward,
}
# Built-ins that need run settings, bound by resolve_reward_functions(..., **settings).
_SETTINGS_OF = {"overlong": ("max_completion_length", "overlong_buffer_length")}


def _import_reward_function(spec: str) -> RewardFunction:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--reward_functions {spec!r}: write a custom reward as module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"--reward_functions {spec!r}: cannot import module {module_name!r} ({error}); "
            "check the name and that its folder is on PYTHONPATH"
        ) from error
    if not hasattr(module, attribute):
        raise AttributeError(f"--reward_functions {spec!r}: module {module_name!r} has no attribute {attribute!r}")
    function = getattr(module, attribute)
    if not callable(function):
        raise TypeError(f"--reward_functions {spec!r}: {attribute!r} is a {type(function).__name__}, not a function")
    return function


def resolve_reward_functions(
    names: Sequence[str | RewardFunction], **settings
) -> list[tuple[str, RewardFunction]]:
    """Turn built-in names, `module:function` strings (or callables) into (name, function) pairs.

    settings: run settings some built-ins need (`overlong`: max_completion_length,
    overlong_buffer_length), bound to the function here.

    A custom function's name is the part after the colon; it names its metrics
    (`reward/{name}/mean`). Fails early, at start-up: unknown names, failed imports, a missing
    math-verify for math_accuracy, and two functions with the same name.
    """
    resolved: list[tuple[str, RewardFunction]] = []
    for spec in names:
        if callable(spec):
            name, function = getattr(spec, "__name__", type(spec).__name__), spec
        elif spec in REWARD_FUNCTIONS:
            name, function = spec, REWARD_FUNCTIONS[spec]
            if spec == "math_accuracy":
                _import_math_verify()
            if spec in _SETTINGS_OF:
                missing = [key for key in _SETTINGS_OF[spec] if settings.get(key) is None]
                if missing:
                    raise ValueError(f"--reward_functions {spec}: needs the settings {missing}")
                function = functools.partial(function, **{key: settings[key] for key in _SETTINGS_OF[spec]})
        elif ":" in spec:
            name, function = spec.partition(":")[2], _import_reward_function(spec)
        else:
            raise ValueError(
                f"--reward_functions: unknown reward {spec!r}; use one of {sorted(REWARD_FUNCTIONS)} "
                "or module:function for your own"
            )
        if any(name == seen for seen, _ in resolved):
            raise ValueError(f"--reward_functions: {name!r} is given twice; each reward may appear once")
        resolved.append((name, function))
    if not resolved:
        raise ValueError("--reward_functions is empty; GRPO needs at least one reward function")
    return resolved


# --- weighted sum ---


def _truncate(text: str, limit: int = 300) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def _find_failing_row(function: RewardFunction, completions, answers, columns) -> int:
    """Re-run `function` one row at a time to find the first row it fails on (error path only)."""
    for row in range(len(completions)):
        row_columns = {key: [values[row]] for key, values in columns.items()}
        try:
            function([completions[row]], [answers[row]], **row_columns)
        except Exception:
            return row
    return 0  # fails only on the whole batch; show the first row


def _check_output(name: str, output, num_rows: int) -> list[float]:
    """The function's values as floats, None (unscored) as NaN; anything else is an error."""
    if isinstance(output, torch.Tensor):
        output = output.detach().cpu().reshape(-1).tolist() if output.dim() else [output.item()]
    try:
        values = list(output)
    except TypeError:
        raise TypeError(
            f"reward function {name!r} returned a {type(output).__name__}; expected a list of "
            f"{num_rows} floats (or None), one per completion"
        ) from None
    if len(values) != num_rows:
        raise ValueError(
            f"reward function {name!r} returned {len(values)} values for {num_rows} completions; "
            f"expected {num_rows} (one float per completion)"
        )
    checked = []
    for row, value in enumerate(values):
        if value is None:  # the function cannot score this completion: left out, not 0
            checked.append(math.nan)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(
                f"reward function {name!r} returned {value!r} for completion {row}; every reward "
                "must be a finite number, or None for a completion it cannot score"
            )
        checked.append(float(value))
    return checked


def compute_rewards(
    reward_functions: list[tuple[str, RewardFunction]],
    weights: Sequence[float] | None,
    completions: list[str],
    answers: list[str],
    **columns,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every reward function on the batch and sum them with `weights` (default: all 1).

    Returns (rewards [R] float32, per_function [R, F] float32). Unscored entries (None) are NaN in
    per_function; see `weighted_sum`. The logged statistics are `reward_metrics` of the two, taken
    over every rank's rows (grpo/runtime/metrics.py, rollout_metrics).
    """
    num_rows = len(completions)
    num_functions = len(reward_functions)
    if len(answers) != num_rows:
        raise ValueError(f"compute_rewards: {num_rows} completions but {len(answers)} answers")
    for key, values in columns.items():
        if len(values) != num_rows:
            raise ValueError(f"compute_rewards: column {key!r} has {len(values)} rows, expected {num_rows}")
    names = [name for name, _ in reward_functions]
    if weights is None:
        weights = [1.0] * num_functions
    if len(weights) != num_functions:
        raise ValueError(
            f"--reward_weights has {len(weights)} values but there are {num_functions} reward "
            f"functions {names}; give one weight per function"
        )

    per_function = torch.zeros(num_rows, num_functions, dtype=torch.float32)  # [R, F]
    for column, (name, function) in enumerate(reward_functions):
        try:
            output = function(list(completions), list(answers), **columns)
        except Exception as error:
            row = _find_failing_row(function, completions, answers, columns)
            raise RuntimeError(
                f"reward function {name!r} raised {type(error).__name__}: {error}\n"
                f"  on completion {row}: {_truncate(completions[row])!r}\n"
                f"  with gold answer: {_truncate(answers[row])!r}"
            ) from error
        per_function[:, column] = torch.tensor(_check_output(name, output, num_rows), dtype=torch.float32)

    rewards = weighted_sum(per_function, weights)  # [R] the one place the weights are applied
    return rewards, per_function


def weighted_sum(per_function: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """[R] the weighted sum of each row's scored entries (NaN = unscored, skipped, as TRL's nansum);
    NaN for a row no function scored, so that it stays out of the group statistics.

    per_function: [R, F]. Without NaN this is exactly `per_function @ weights`.
    """
    is_scored = ~torch.isnan(per_function)  # [R, F]
    weight_vector = torch.tensor([float(w) for w in weights], dtype=torch.float32)  # [F]
    rewards = torch.where(is_scored, per_function, 0.0) @ weight_vector  # [R]
    return torch.where(is_scored.any(dim=1), rewards, math.nan)  # [R]


def _scored_mean_std(values: torch.Tensor) -> tuple[float, float]:
    """Mean and population std of the non-NaN entries; 0.0, 0.0 when there are none (the
    unscored fraction, logged beside them, says so), so the metrics stay finite numbers."""
    scored = values[~torch.isnan(values)]  # [scored rows]
    if scored.numel() == 0:
        return 0.0, 0.0
    return scored.mean().item(), scored.std(correction=0).item()


def reward_metrics(per_function: torch.Tensor, rewards: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """`reward/{name}/mean|std` per function (unweighted) and `reward/total/mean|std` (the weighted
    sum, `rewards`), over the completions each one scored; `reward/{name}/unscored_frac` and
    `reward/unscored_frac` (completions no function scored) beside them.

    per_function: [R, F], rewards: [R] (`weighted_sum` of it), NaN = unscored. Stds are population
    stds (divide by R), so one row gives 0, not NaN.
    """
    metrics: dict[str, float] = {}
    for column, name in enumerate(names):
        values = per_function[:, column]  # [R]
        metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = _scored_mean_std(values)
        metrics[f"reward/{name}/unscored_frac"] = torch.isnan(values).float().mean().item()
    metrics["reward/total/mean"], metrics["reward/total/std"] = _scored_mean_std(rewards)
    metrics["reward/unscored_frac"] = torch.isnan(rewards).float().mean().item()
    return metrics
