"""From reward functions to the reward r: the registry, the calls, the weighted sum, the statistics.

    resolve_reward_functions  --reward_functions names (built-ins of grpo/reward_functions.py, or
                              module:function for your own) -> (name, function) pairs, at start-up
    compute_rewards           each function once per batch, its output checked; r = their weighted sum
    weighted_sum              r = per_function @ weights over the scored entries (NaN-aware, as TRL)
    reward_metrics            per function and for r: mean, population std, unscored fraction

`compute_rewards` sums the columns with the given weights: `rewards = per_function @ weights`
over the scored entries (`weighted_sum`), shapes [R] and [R, F] (F reward functions; unscored
entries NaN). The tensors are float32 on the CPU; move them to the device yourself. The
contract a reward function follows is in grpo/reward_functions.py.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
from collections.abc import Sequence

import torch

from grpo.reward_functions import (
    RewardFunction,
    choice_accuracy_reward,
    count_accuracy_reward,
    format_reward,
    import_math_verify,
    math_accuracy_reward,
    overlong_reward,
)

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


def _import_reward_function(spec: str, flag: str) -> RewardFunction:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{flag} {spec!r}: write a custom reward as module:function")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as error:  # a syntax error in the module too: its message names file and line
        raise ImportError(
            f"{flag} {spec!r}: cannot import module {module_name!r} ({error}); "
            "check the name and that its folder is on PYTHONPATH"
        ) from error
    if not hasattr(module, attribute):
        raise AttributeError(f"{flag} {spec!r}: module {module_name!r} has no attribute {attribute!r}")
    function = getattr(module, attribute)
    if not callable(function):
        raise TypeError(f"{flag} {spec!r}: {attribute!r} is a {type(function).__name__}, not a function")
    try:  # the two positional lists every call passes, tried now rather than at step 1; the columns
        # come by name and depend on the data, so a parameter beyond the two may well be one of them
        inspect.signature(function).bind_partial([], [])
    except TypeError:
        raise TypeError(
            f"{flag} {spec!r}: {attribute}{inspect.signature(function)} cannot be called as "
            f"{attribute}(completions, answers, **columns); define it as def {attribute}(completions, answers, **columns)"
        ) from None
    except ValueError:  # no signature to read (a C function): it is called as it is
        pass
    return function


def resolve_reward_functions(
    names: Sequence[str | RewardFunction], *, flag: str = "--reward_functions", **settings
) -> list[tuple[str, RewardFunction]]:
    """Turn built-in names, `module:function` strings (or callables) into (name, function) pairs.

    flag: the command-line flag the error messages name (eval.py's --accuracy_reward, say).
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
                import_math_verify()
            if spec in _SETTINGS_OF:
                missing = [key for key in _SETTINGS_OF[spec] if settings.get(key) is None]
                if missing:
                    raise ValueError(f"{flag} {spec}: needs the settings {missing}")
                function = functools.partial(function, **{key: settings[key] for key in _SETTINGS_OF[spec]})
        elif ":" in spec:
            name, function = spec.partition(":")[2], _import_reward_function(spec, flag)
        else:
            raise ValueError(
                f"{flag}: unknown reward {spec!r}; use one of {sorted(REWARD_FUNCTIONS)} "
                "or module:function for your own"
            )
        if any(name == seen for seen, _ in resolved):
            raise ValueError(f"{flag}: {name!r} is given twice; each reward may appear once")
        resolved.append((name, function))
    if not resolved:
        raise ValueError(f"{flag} is empty; GRPO needs at least one reward function")
    return resolved


# --- weighted sum ---


def _truncate(text: str, limit: int = 300) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def _find_failing_row(function: RewardFunction, completions, answers, columns) -> int | None:
    """Re-run `function` one row at a time to find the first row it fails on (error path only);
    None when it fails on none alone (only on the whole batch)."""
    for row in range(len(completions)):
        row_columns = {key: [values[row]] for key, values in columns.items()}
        try:
            function([completions[row]], [answers[row]], **row_columns)
        except Exception:
            return row
    return None


def check_reward_output(name: str, output, num_rows: int) -> list[float]:
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


def parse_reward_weights(text: str | None, num_functions: int) -> list[float] | None:
    """--reward_weights as numbers, one per reward function (None or "": every weight 1)."""
    if not text:
        return None
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ValueError(f"--reward_weights {text!r}: give comma-separated numbers, e.g. 1,0.5") from None
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"--reward_weights {text!r}: every weight must be a finite number")
    if len(weights) != num_functions:
        raise ValueError(
            f"--reward_weights has {len(weights)} values but --reward_functions names {num_functions} "
            "functions; give one weight per function"
        )
    if all(w == 0 for w in weights):  # the reward would be 0 for every completion
        raise ValueError(
            f"--reward_weights {text!r}: every weight is 0, so every reward and advantage would be 0 and "
            "nothing would train; give at least one function a non-zero weight"
        )
    return weights


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
            where = (
                f"  on completion {row}: {_truncate(completions[row])!r}\n  with gold answer: {_truncate(answers[row])!r}"
                if row is not None
                else f"  on the whole batch of {num_rows} completions: called on each one alone it raises on none, "
                "so look at what it does with the batch (its length, how it pairs the lists)"
            )
            raise RuntimeError(f"reward function {name!r} raised {type(error).__name__}: {error}\n{where}") from error
        per_function[:, column] = torch.tensor(check_reward_output(name, output, num_rows), dtype=torch.float32)
    if num_rows and bool(torch.isnan(per_function).all()):  # nothing scored: every advantage would be 0
        raise ValueError(
            f"the reward functions {names} returned None for every one of the {num_rows} completions of this "
            "batch, so no completion has a reward and the step would train on zero advantages; None is for a "
            "completion a function cannot score: return a number for the others (grpo/reward_functions.py)"
        )

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


# --- the columns a reward function gets ---

# The example fields that reach a reward function under another name (`questions`, the name the
# contract has always used), or not as a column (`answer`: the positional `answers`).
_COLUMN_NAMES = {"question": "questions", "answer": None}
# Arguments of the call itself: a dataset column of this name cannot be passed as well.
_CALL_ARGUMENTS = ("completions", "answers", "completion_lengths")


def example_columns(examples: Sequence[dict], group_size: int) -> dict[str, list]:
    """Every column of `examples` as a per-completion list: example i repeated G times, in order.

    The G completions of prompt i are rows i*G .. i*G + G - 1 (as the sampler lays them out), so
    each row gets its own prompt's values: `questions`, `images`, `image_paths` (where each image
    was read from; None for an image given as bytes), `source_row`, and every other column of
    the data under its own name (as TRL passes them). Only `answer` is left out: it is the call's
    `answers`. A column named like an argument of the call is a clear error (rename it).
    """
    columns: dict[str, list] = {}
    for field in examples[0] if examples else ():
        name = _COLUMN_NAMES.get(field, field)
        if name is None:
            continue
        if name in _CALL_ARGUMENTS or name in columns:
            raise ValueError(
                f"the dataset column {field!r} would reach the reward functions as {name!r}, which "
                f"is already an argument of theirs; rename the column in the dataset"
            )
        columns[name] = [example[field] for example in examples for _ in range(group_size)]
    return columns
