"""The files one default GRPO step crosses, measured: docs/architecture.md's table is this test's output.

docs/architecture.md, "One GRPO step, file by file", lists the files one optimizer step at the
default flags crosses from train.py to the loss, and says the step never enters the option modules.
Here one tiny step runs in this process under `sys.setprofile`, which sees every Python call: for
each call into a project file (train.py, eval.py, grpo/, data/, models/; tests/, bench/ and a
virtual environment inside the checkout left out) it records
the callee's file, its function, and the nearest project file below it on the stack (the caller).

The counting rule, as the page states it (`counted_files`):
- the step is the loop's first iteration: from the first call of `RolloutRounds.__call__` (the
  rollout) to the call of `TrainingRun.finish` (after the step's optimizer update, metrics and
  log); the files on the stack when it starts (train.py's `main`, grpo_loop.py's `train_grpo`)
  count first, as the step runs inside them;
- a file counts when a GRPO-level file (train.py, or a module directly under grpo/: the loop, the
  config, the math, the rewards) calls into it, or when it is itself directly under grpo/ (a math
  file such as grpo/logprobs.py, entered from grpo/engine/forward.py);
- calls made from inside grpo/engine/, grpo/runtime/, data/, models/ are not followed (their
  internals), and grpo/runtime/metrics.py, the step's metric plumbing, does not count (the page
  names it under the table instead);
- the reward functions' own file, grpo/reward_functions.py, counts: grpo/rewards.py (GRPO-level)
  calls the default reward functions there.
The order is the order of first entry. "Switches" counts the changes of file along the sequence of
counted calls (each call's callee file; consecutive calls into the same file merged).

The flags are the CLI defaults except tests/conftest.py's TINY_GRPO sizes (--num_examples 64,
--per_device_prompts 2, --num_generations 2, --micro_batch_size 4, --max_completion_length 8,
--learning_rate 1e-3, --save_steps 2, --progress_bar false), which only make the step small and
quiet, and --max_steps 1. TINY_GRPO's `reward_fns:length_reward` (tests/reward_fns.py) is put
back to the default --reward_functions, so the rewards go through grpo/reward_functions.py as in
a default run (the tiny model scores 0 there; the path is what is measured, not the gradient).
Preflight runs, as by default (outside the step's window; the option check covers it too).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import TORCHRUN_VARIABLES, train_argv

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "architecture.md"
SECTION = "## One GRPO step, file by file"
ROW = re.compile(r"^\| (\d+) \| `([^`]+)` \|", re.MULTILINE)

METRICS_PLUMBING = "grpo/runtime/metrics.py"
# Off at the default flags; each is entered only when its flag is on (the page names them).
OPTION_MODULES = {
    "grpo/dynamic_sampling.py": "--dynamic_sampling",
    "grpo/token_selection.py": "--top_entropy_quantile",
    "grpo/entropy_bonus.py": "--entropy_coef",
    "grpo/reference_sync.py": "--sync_ref_model",
    "grpo/runtime/reference_sync.py": "--sync_ref_model",
    "grpo/engine/hf_generate.py": "(the twin tests and benchmarks only)",
    "grpo/runtime/fsdp.py": "--fsdp",
    "models/lora.py": "--freeze_policy lora",
}
# Option functions inside a file the default step does enter.
OPTION_FUNCTIONS = {("grpo/sampler_correction.py", "importance_weights"): "--sampler_correction"}


# The project's own code: its two scripts and its three packages. Everything else in the
# repository is left out: tests/ (the test's own code), bench/, and a virtual environment made
# inside the checkout (CI's .venv-ci holds torch and transformers under the repository's root).
PROJECT_SCRIPTS = ("train.py", "eval.py")
PROJECT_PACKAGES = ("grpo/", "data/", "models/")


def _project_file(path: str) -> str | None:
    """`path` relative to the repository when it is the project's own code, else None."""
    root = str(REPO) + "/"
    if not path.startswith(root):
        return None
    relative = path[len(root) :]
    return relative if relative in PROJECT_SCRIPTS or relative.startswith(PROJECT_PACKAGES) else None


def is_grpo_level(path: str) -> bool:
    """train.py or a module directly under grpo/ (the loop, config, math, rewards)."""
    return path == "train.py" or (path.startswith("grpo/") and path.count("/") == 1)


def is_top_of_grpo(path: str) -> bool:
    return path.startswith("grpo/") and path.count("/") == 1


@dataclass
class Trace:
    entered: set = field(default_factory=set)  # (file, function) anywhere in the run
    stack_at_step: list = field(
        default_factory=list
    )  # project files on the stack when the step starts, outermost first
    step_calls: list = field(
        default_factory=list
    )  # (caller file, callee file, function) within the step


def traced_run(run) -> Trace:
    """Run `run()` under sys.setprofile; the step's window opens at RolloutRounds.__call__, closes at finish."""
    from grpo.grpo_loop import RolloutRounds
    from grpo.runtime.run import TrainingRun

    opens, closes = RolloutRounds.__call__.__code__, TrainingRun.finish.__code__
    trace, files, state = Trace(), {}, {"in_step": False, "done": False}

    def file_of(code) -> str | None:
        if (
            code not in files
        ):  # one path test per code object, not per call: the profile stays cheap
            files[code] = _project_file(code.co_filename)
        return files[code]

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        callee = file_of(code)
        if callee is None:
            return
        trace.entered.add((callee, code.co_name))
        if code is opens and not state["in_step"] and not state["done"]:
            state["in_step"] = True
            back, stack = frame.f_back, []
            while back is not None:
                if (path := file_of(back.f_code)) is not None and path not in stack:
                    stack.append(path)
                back = back.f_back
            trace.stack_at_step = stack[::-1]
        elif code is closes and state["in_step"]:
            state["in_step"], state["done"] = False, True
        if not state["in_step"]:
            return
        back = frame.f_back
        while back is not None and file_of(back.f_code) is None:
            back = back.f_back
        trace.step_calls.append(
            (file_of(back.f_code) if back is not None else None, callee, code.co_name)
        )

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    assert trace.step_calls, (
        "the step's window never opened: is RolloutRounds.__call__ still the rollout?"
    )
    assert state["done"], (
        "the step's window never closed: is TrainingRun.finish still called after the loop?"
    )
    return trace


def counted_calls(trace: Trace) -> list[tuple[str, str, str]]:
    """The step's calls that count (the rule in the module docstring)."""
    return [
        (caller, callee, function)
        for caller, callee, function in trace.step_calls
        if callee != METRICS_PLUMBING
        and caller is not None
        and (is_grpo_level(caller) or is_top_of_grpo(callee))
    ]


def counted_files(trace: Trace) -> list[str]:
    """The files the step crosses, in the order it first enters them."""
    order = list(trace.stack_at_step)
    for _, callee, _ in counted_calls(trace):
        if callee not in order:
            order.append(callee)
    return order


def file_switches(trace: Trace) -> int:
    sequence = [callee for _, callee, _ in counted_calls(trace)]
    return sum(1 for before, after in pairwise(sequence) if before != after)


def doc_table() -> list[str]:
    """The files of the page's table, in its order (its # column checked to run 1..n)."""
    text = PAGE.read_text()
    assert SECTION in text, f"docs/architecture.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0].split("**The engine**", 1)[0]
    rows = ROW.findall(section)
    assert [int(n) for n, _ in rows] == list(range(1, len(rows) + 1)), (
        f"the table's # column is not 1..n: {rows}"
    )
    return [path for _, path in rows]


def default_argv_flags() -> list[str]:
    from grpo.config import GRPOArguments

    default_rewards = GRPOArguments.__dataclass_fields__["reward_functions"].default
    return ["--max_steps", "1", "--reward_functions", default_rewards]


def report(trace: Trace) -> str:
    files = counted_files(trace)
    lines = [
        f"{len(files)} files, {file_switches(trace)} switches between them along the step's counted calls:"
    ]
    first = {}
    for caller, callee, function in counted_calls(trace):
        first.setdefault(callee, f"{function} (from {caller})")
    lines += [
        f"  {n:2d} {path}: {first.get(path, 'on the stack')}" for n, path in enumerate(files, 1)
    ]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def default_trace(tmp_path_factory, monkeypatch_module):
    import train

    out = tmp_path_factory.mktemp("default_step")
    return traced_run(lambda: train.main(train_argv(out, *default_argv_flags())))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        # A test process launched under torchrun must still run alone.
        for name in TORCHRUN_VARIABLES:
            patch.delenv(name, raising=False)
        yield patch


def test_the_default_step_crosses_the_files_of_the_table(default_trace):
    measured, table = counted_files(default_trace), doc_table()
    assert measured == table, (
        'docs/architecture.md, "One GRPO step, file by file", no longer lists the files the default step '
        f"crosses (in the order it enters them); update the table and the count and switches in the sentence above it.\n"
        f"table ({len(table)}): {table}\nmeasured: {report(default_trace)}"
    )
    print(report(default_trace))


def test_the_page_states_the_measured_count_and_switches(default_trace):
    section = PAGE.read_text().split(SECTION, 1)[1].split("\n| # |", 1)[0]
    files, switches = len(counted_files(default_trace)), file_switches(default_trace)
    stated = f"{files} files, {switches} switches"
    assert stated in section, (
        f"the sentence above the table should say '{stated}':\n{report(default_trace)}"
    )


def test_the_default_step_enters_no_option_module(default_trace):
    entered_files = {path for path, _ in default_trace.entered}
    entered = sorted(set(OPTION_MODULES) & entered_files)
    assert not entered, (
        f"the default run entered option modules: {[(p, OPTION_MODULES[p]) for p in entered]}"
    )
    functions = sorted(set(OPTION_FUNCTIONS) & default_trace.entered)
    assert not functions, f"the default run called option functions: {functions}"
    text = PAGE.read_text()
    unnamed = [
        path
        for path in [*OPTION_MODULES, *(p for p, _ in OPTION_FUNCTIONS)]
        if f"`{path}`" not in text
    ]
    assert not unnamed, f"docs/architecture.md should name these option modules: {unnamed}"


def test_an_option_flag_does_enter_its_module(tmp_path, monkeypatch_module):
    # The check above can fail: with --dynamic_sampling on, the loop samples through its module.
    import train

    flags = [
        *default_argv_flags(),
        "--dynamic_sampling",
        "--skip_preflight",
    ]  # no preflight: outside the step anyway
    trace = traced_run(lambda: train.main(train_argv(tmp_path, *flags)))
    entered_files = {path for path, _ in trace.entered}
    assert "grpo/dynamic_sampling.py" in entered_files, sorted(entered_files)
    assert "grpo/dynamic_sampling.py" in counted_files(trace), report(trace)
