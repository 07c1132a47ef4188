"""When things go wrong: signals, kill -9, non-finite steps, a failing rank, and bad input.

Each failure must end one of three ways: the run continues (a skipped row or step, counted), the
run stops cleanly with a checkpoint and says how to resume, or it stops at start-up with an error
that names the flag, column, function or row to fix. Never a hang, never a traceback that says
nothing about the cause. docs/troubleshooting.md is the user-facing side of this file.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_faults.py -q [-m slow]
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from conftest import (
    REPO,
    TORCHRUN,
    latest_model_dir,
    load_saved_model,
    read_metrics,
    run_command,
    run_script,
    subprocess_env,
    train_argv,
)
from PIL import Image

import train

# --- helpers ---


@pytest.fixture
def background():
    """start(command, log) runs a command in the background, output to `log`; whatever is still
    running at the end of the test (a failed test's job) is killed, with every process under it."""
    started: list[subprocess.Popen] = []

    def start(command: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as log_file:
            process = subprocess.Popen(
                command, cwd=REPO, env=subprocess_env(), stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            # torchrun starts its workers in sessions of their own: collect them before the kill.
            for pid in [*_descendants(process.pid), process.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return parents


def _descendants(pid: int) -> list[int]:
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _train_command(output_dir: Path, *flags: str) -> list[str]:
    """`python train.py` (GRPO, tiny)."""
    return [sys.executable, "train.py", *train_argv(output_dir, *flags)]


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"train.py exited ({process.returncode}) before the test could act:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for train.py:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def _metric_lines(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _steps(output_dir: Path) -> list[int]:
    return [record["step"] for record in read_metrics(output_dir)]


def _png(color: str, size=(56, 56)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _save_dataset(path: Path, rows: int, *, answers=None, corrupt: int = 0, drop: str | None = None) -> str:
    """A save_to_disk counting dataset shaped like the TRL recipe's (image, problem, solution)."""
    colors = ["red", "green", "blue", "yellow"]
    images = [{"bytes": _png(colors[i % 4]), "path": None} for i in range(rows)]
    for i in range(corrupt):  # the first `corrupt` rows hold bytes that are not an image
        images[i] = {"bytes": b"\x89PNG\r\n\x1a\n not an image", "path": None}
    columns = {
        "image": images,
        "problem": [f"How many objects are there in the image? ({i})" for i in range(rows)],
        "solution": [f"<answer> {a} </answer>" for a in (answers or [str(i % 5 + 1) for i in range(rows)])],
    }
    features = {"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")}
    if drop:
        del columns[drop], features[drop]
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(path))
    return str(path)


# --- preemption: SIGTERM, kill -9 ---


def test_sigterm_saves_exits_zero_and_says_how_to_resume(tmp_path, train_run, background):
    out, log = tmp_path / "run", tmp_path / "train.log"
    # save_steps 100: the only checkpoint the run can have is the one SIGTERM makes it write.
    process = background(_train_command(out, "--max_steps", "12", "--save_steps", "100"), log)
    _wait_for(lambda: _metric_lines(out) >= 1, process, log)  # after the first step
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "SIGTERM received: saved a checkpoint at step" in text
    assert "Resume with the same command plus --resume" in text
    stopped_at = int(latest_model_dir(out).parent.name.split("-")[1])
    assert 1 <= stopped_at < 12 and _steps(out) == list(range(1, stopped_at + 1))
    load_saved_model(latest_model_dir(out))  # loadable by plain transformers
    # Relaunching the same command plus --resume finishes the run.
    result = train_run(out, "--max_steps", "12", "--save_steps", "100", "--resume")
    assert _steps(result) == list(range(1, 13))
    assert latest_model_dir(out).parent.name == "checkpoint-00000012"


def test_kill_minus_nine_after_a_checkpoint_then_resume_completes(tmp_path, train_run, background):
    out, log = tmp_path / "run", tmp_path / "train.log"
    process = background(_train_command(out, "--max_steps", "16", "--save_steps", "2", "--save_total_limit", "1"), log)
    # Kill at some point after the first checkpoint: a few steps later, mid-step or mid-save.
    _wait_for(lambda: _metric_lines(out) >= 5, process, log)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed or cleaned up
    process.wait(timeout=30)
    checkpoint = latest_model_dir(out).parent  # a complete checkpoint survived
    saved_step = int(checkpoint.name.split("-")[1])
    assert saved_step >= 2 and saved_step % 2 == 0
    load_saved_model(checkpoint / "model")
    assert _steps(out)[:saved_step] == list(range(1, saved_step + 1))  # steps past it may be logged too
    train_run(out, "--max_steps", "16", "--save_steps", "2", "--save_total_limit", "1", "--resume")
    assert _steps(out) == list(range(1, 17))  # the steps after the checkpoint are logged once, again
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp-") or p.name.startswith(".replaced-")] == []
    assert latest_model_dir(out).parent.name == "checkpoint-00000016"


# --- non-finite loss ---


def _nan_loss_on(calls: set[int] | None, monkeypatch, module):
    """Patch the loop's loss so that the listed calls (1-based; None: all) return NaN."""
    original = module.grpo_loss
    count = {"calls": 0}

    def loss(*args, **kwargs):
        value, info = original(*args, **kwargs)
        count["calls"] += 1
        if calls is None or count["calls"] in calls:
            value = value * math.nan
        return value, info

    monkeypatch.setattr(module, "grpo_loss", loss)
    return count


def test_one_non_finite_step_is_skipped_and_logged(tmp_path, train_run, monkeypatch, capsys):
    import grpo.grpo_loop as loop

    _nan_loss_on({2}, monkeypatch, loop)  # one micro-batch per step: the 2nd optimizer step's loss
    # (no pre-flight: its loss call would be counted as the first)
    out = train_run(tmp_path / "run", "--max_steps", "3", "--save_steps", "0", "--skip_preflight")
    assert "step 2: non-finite loss/gradient (nan, nan); step skipped" in capsys.readouterr().out
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]  # the skipped step was redone on the next batch
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    weights = load_saved_model(latest_model_dir(out)).state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())  # NaN never reached the weights


def test_consecutive_non_finite_steps_stop_the_run_with_a_clear_message(tmp_path, train_run, monkeypatch):
    import grpo.grpo_loop as loop

    count = _nan_loss_on(None, monkeypatch, loop)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError, match="2 consecutive steps had a non-finite loss or gradient; lower --learning_rate"):
        train_run(tmp_path / "run", "--max_steps", "5", "--max_nonfinite_steps", "2", "--skip_preflight")
    assert count["calls"] == 2
    assert _steps(tmp_path / "run") == []
    # The loop's SIGTERM/SIGINT handlers are gone again although it raised: Ctrl-C works here.
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


def test_sft_non_finite_steps_stop_the_run(tmp_path, train_run, monkeypatch):
    import grpo.sft_loop as loop

    original = loop.sft_token_losses
    monkeypatch.setattr(loop, "sft_token_losses", lambda model, batch: (original(model, batch)[0] * math.inf, torch.tensor(1)))
    with pytest.raises(RuntimeError, match="3 consecutive steps had a non-finite loss"):
        train_run(tmp_path / "sft", "--max_steps", "4", stage="sft")


# --- torchrun: one rank fails ---


@pytest.mark.slow
def test_a_rank_that_raises_stops_the_whole_torchrun_job(tmp_path):
    """Rank 1's reward function raises; rank 0 waits in the next all-reduce. torchrun must stop
    both with rank 1's error, well before the 30-minute collective timeout."""
    argv = train_argv(tmp_path / "run", "--max_steps", "3", "--device", "cpu", "--reward_functions", "reward_fns:raise_on_rank_one")
    started = time.monotonic()
    # Bound: half the collective timeout, so a job that waited for it fails; alone it takes ~20 s.
    result = run_command([*TORCHRUN, "--nproc_per_node", "2", "--standalone", "train.py", *argv], timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "reward function 'raise_on_rank_one' raised RuntimeError: reward_fns.raise_on_rank_one: rank 1 refuses" in output
    assert time.monotonic() - started < 900  # < 30 min: torchrun stopped it, not the collective timeout


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_ranks_at_the_same_step(tmp_path, background):
    """A scheduler's SIGTERM can reach the ranks at different times; here only rank 1 gets one.
    Both must leave the loop at the same step, save and exit 0 (not wait in different collectives)."""
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    argv = train_argv(out, "--max_steps", "200", "--save_steps", "1000", "--device", "cpu")
    process = background([*TORCHRUN, "--nproc_per_node", "2", "--standalone", "train.py", *argv], log)
    _wait_for(lambda: _metric_lines(out) >= 2, process, log, timeout=150)
    rank_one = _worker_with_rank(process.pid, 1)
    os.kill(rank_one, signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()[-4000:]
    assert "a stop signal on another rank received: saved a checkpoint" in log.read_text()
    stopped_at = int(latest_model_dir(out).parent.name.split("-")[1])
    assert 2 <= stopped_at < 200 and _steps(out) == list(range(1, stopped_at + 1))


def _worker_with_rank(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank (read from /proc)."""
    for _ in range(100):
        for pid in _descendants(agent_pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {agent_pid}")


# --- impossible settings: rejected at start, exit code 2, the flag named ---

BAD_SETTINGS = [
    (["--num_generations", "1"], "--num_generations 1: GRPO compares completions within a group"),
    (["--per_device_prompts", "3", "--steps_per_generation", "4"], "--steps_per_generation 4 equal mini-batches"),
    (["--micro_batch_size", "3"], "--micro_batch_size 3 does not divide"),
    (["--beta", "-0.1"], "--beta -0.1: the KL weight must be >= 0"),
    (["--epsilon", "1.5"], "--epsilon 1.5: must be in [0, 1)"),
    (["--max_completion_length", "0"], "--max_completion_length must be >= 1"),
    (["--reward_functions", "format", "--reward_weights", "1,2"], "--reward_weights has 2 values"),
    (["--max_steps", "0"], "--max_steps must be >= 1"),
    (["--stage", "rl"], "--stage 'rl' is not one of"),
]


@pytest.mark.parametrize("flags, message", BAD_SETTINGS, ids=[flags[-2] for flags, _ in BAD_SETTINGS])
def test_impossible_settings_exit_2_naming_the_flag(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_argv(tmp_path / "run", *flags))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # rejected before anything was written


def test_impossible_setting_through_the_real_command(tmp_path):
    result = run_script(["train.py", "--num_generations", "1", "--output_dir", str(tmp_path / "run")], timeout=60)
    assert result.returncode == 2
    assert "train.py: error: --num_generations 1" in result.stderr
    assert "Traceback" not in result.stderr


# --- output directories and stages ---


def test_output_dir_of_another_run_is_refused_without_resume_or_overwrite(tmp_path, train_run, capsys):
    out = train_run(tmp_path / "run", "--max_steps", "1", "--learning_rate", "1e-2")
    first = read_metrics(out)
    with pytest.raises(SystemExit) as exit_info:  # exit 2 before the model loads (it was a FileExistsError traceback)
        train_run(out, "--max_steps", "1")
    assert exit_info.value.code == 2
    assert re.search(r"already holds a run .*pass --resume to continue it or --overwrite_output_dir", capsys.readouterr().err)
    assert read_metrics(out) == first  # refused before touching anything
    train_run(out, "--max_steps", "2", "--overwrite_output_dir")
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]  # the old run's line is gone, not duplicated
    assert records[0]["lr"] == pytest.approx(1e-3)  # the new run's settings; the lr is a float64 python product of the schedule: exact to a few ulps; approx's rel 1e-6 is far above
    with pytest.raises(SystemExit):  # exit 2 before anything is read (test_settings_that_train_nothing_...)
        train_run(out, "--resume", "--overwrite_output_dir")
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_resume_without_a_checkpoint_starts_fresh_with_a_warning(tmp_path, train_run):
    with pytest.warns(UserWarning, match="holds no complete checkpoint; starting a new run"):
        out = train_run(tmp_path / "run", "--max_steps", "1", "--resume")
    assert _steps(out) == [1]


def test_resuming_an_sft_run_as_grpo_names_the_mismatch(tmp_path, train_run, capsys):
    out = train_run(tmp_path / "sft", "--max_steps", "1", stage="sft")
    with pytest.raises(SystemExit) as exit_info:  # exit 2 before the model loads (it was a ValueError traceback)
        train_run(out, "--max_steps", "2", "--resume")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"stage/checkpoint mismatch: .* --stage sft but this run is --stage grpo.*--init_from", err)
    # What the message suggests works: GRPO from the SFT checkpoint, in a new output dir.
    grpo = train_run(tmp_path / "grpo", "--max_steps", "1", "--init_from", str(out))
    assert _steps(grpo) == [1]


def test_resuming_with_other_trainable_parameters_is_refused(tmp_path, train_run, capsys):
    out = train_run(tmp_path / "run", "--max_steps", "1")
    with pytest.raises(SystemExit) as exit_info:  # the flag is named before the model loads
        train_run(out, "--max_steps", "2", "--resume", "--freeze_policy", "language")
    assert exit_info.value.code == 2 and "--freeze_policy language (the run has full)" in capsys.readouterr().err
    assert _steps(out) == [1]
    # Past the flag check (a library caller, or a checkpoint without run_config values), the optimizer
    # state still refuses to fit.
    from grpo.runtime import start_checks

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(start_checks, "check_resume_settings", lambda config: None)
        with pytest.raises(ValueError, match=r"the optimizer state in .* does not fit this run's optimizer .*--freeze_policy"):
            train_run(out, "--max_steps", "2", "--resume", "--freeze_policy", "language")
    assert _steps(out) == [1]


# --- bad data ---


def test_corrupt_images_are_skipped_and_counted(tmp_path, train_run):
    source = _save_dataset(tmp_path / "data", rows=12, corrupt=2)
    with pytest.warns(UserWarning, match="skipped 2 of 12 rows"):
        out = train_run(tmp_path / "run", "--dataset", source, "--max_steps", "2", "--num_examples", "12")
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["skipped_images"] == 2 for r in records)


def _refused(capsys, run, *args, **kwargs) -> str:
    """A bad --dataset row, column or file: `train.py: error: ...` and exit 2, no traceback; returns stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run(*args, **kwargs)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_dataset_missing_a_column_names_it_and_the_flag(tmp_path, train_run, capsys):
    source = _save_dataset(tmp_path / "data", rows=4, drop="solution")
    err = _refused(capsys, train_run, tmp_path / "run", "--dataset", source)
    assert re.search(r"no answer column .* the columns found are \['image', 'problem'\]. .*--answer_column", err)
    renamed = tmp_path / "renamed"
    datasets.load_from_disk(source).add_column("count", ["3"] * 4).save_to_disk(str(renamed))
    err = _refused(capsys, train_run, tmp_path / "run", "--dataset", str(renamed), "--answer_column", "total")
    assert "no answer column (looked for ['total'])" in err


@pytest.mark.parametrize("form", ["jsonl", "parquet", "save_to_disk"])
def test_an_empty_dataset_is_a_clear_error(tmp_path, train_run, capsys, form):
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")})
    empty = datasets.Dataset.from_dict({"image": [], "problem": [], "solution": []}, features=features)
    path = tmp_path / f"empty.{form}"
    if form == "jsonl":
        path.write_text("")
    elif form == "parquet":
        empty.to_parquet(str(path))
    else:
        empty.save_to_disk(str(path))
    with pytest.raises(SystemExit) as exit_info:  # found before the model loads: exit 2
        train_run(tmp_path / "run", "--dataset", str(path))
    assert exit_info.value.code == 2
    assert f"--dataset {path} holds no rows" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_val_fraction_zero_turns_the_sft_validation_loss_off(tmp_path, train_run, capsys):
    source = _save_dataset(tmp_path / "data", rows=10)
    out = train_run(tmp_path / "sft", "--dataset", source, "--val_fraction", "0", "--max_steps", "2", stage="sft")
    assert [("val_loss" in record) for record in read_metrics(out)] == [False, False]
    # eval.py scores the held-out part, which --val_fraction 0 leaves empty: it says so, before loading.
    import eval as eval_script

    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(["--model", str(out), "--dataset", source, "--val_fraction", "0", "--output_dir", str(tmp_path / "e")])
    assert exit_info.value.code == 2
    assert "--eval_part validation with --val_fraction 0 holds no examples; raise --val_fraction" in capsys.readouterr().err


def test_every_image_corrupt_is_a_clear_error(tmp_path, train_run, capsys):
    source = _save_dataset(tmp_path / "data", rows=3, corrupt=3)
    with pytest.warns(UserWarning, match="skipped 3 of 3 rows"):
        err = _refused(capsys, train_run, tmp_path / "run", "--dataset", source)
    assert "no usable examples (3 rows read, 3 skipped because their images failed" in err


def test_gold_answers_count_accuracy_cannot_read_fail_before_step_one(tmp_path, train_run, capsys):
    answers = ["3", "4", "blue", "5", "2", "1", "3", "two", "4", "5"]
    source = _save_dataset(tmp_path / "data", rows=10, answers=answers)
    flags = ("--dataset", source, "--val_fraction", "0.0", "--reward_functions", "count_accuracy")
    err = _refused(capsys, train_run, tmp_path / "run", *flags)
    assert re.search(r"reward function 'count_accuracy': the gold answer of row \d+ of --dataset \S+ \('(blue|two)'", err)
    assert "question 'How many objects are there in the image? (2)'" in err  # the first bad row
    assert "2 of 10 examples" not in err  # "two" is a number word count_accuracy reads
    assert "1 of 10 examples are like it" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or _steps(tmp_path / "run") == []
    # The same data with a reward that does not parse gold answers trains.
    out = train_run(tmp_path / "ok", "--dataset", source, "--val_fraction", "0.0", "--max_steps", "1")
    assert _steps(out) == [1]


def test_prompts_over_max_prompt_length_are_skipped_and_counted_or_rejected(tmp_path, train_run, capsys):
    from data.collators import prompt_length
    from data.prompts import SYSTEM_PROMPT
    from data.sources import load_examples
    from models.loading import load_policy

    # The tiny synthetic prompts are 121, 122 or 128 tokens long (images included).
    _, processor = load_policy("tiny")
    examples, _ = load_examples("synthetic", num_examples=64, seed=0, synthetic_kwargs={"question_kinds": ("total",)})
    lengths = [prompt_length(processor, examples[i], SYSTEM_PROMPT) for i in range(64)]
    limit = sorted(set(lengths))[-2]
    too_long = sum(n > limit for n in lengths)
    assert 0 < too_long < 64

    out = train_run(tmp_path / "skip", "--max_steps", "2", "--max_prompt_length", str(limit))
    assert [r["skipped_long_prompts"] for r in read_metrics(out)] == [too_long, too_long]
    err = _refused(capsys, train_run, tmp_path / "error", "--max_prompt_length", str(limit), "--long_prompts", "error")
    assert re.search(f"{too_long} of 64 prompts are longer than --max_prompt_length {limit} .*--long_prompts skip", err)
    err = _refused(capsys, train_run, tmp_path / "none", "--max_prompt_length", "10")
    assert "every prompt is over --max_prompt_length" in err


@pytest.mark.parametrize(
    "function, error, message",
    [
        ("always_raises", RuntimeError, r"reward function 'always_raises' raised KeyError: 'no such column'\n  on completion 0"),
        ("wrong_length", ValueError, r"reward function 'wrong_length' returned 3 values for 4 completions"),
        ("nan_reward", ValueError, r"reward function 'nan_reward' returned nan for completion 0; every reward must be a finite"),
    ],
)
def test_a_broken_reward_function_is_named(tmp_path, train_run, function, error, message):
    with pytest.raises(error, match=message):
        train_run(tmp_path / "run", "--reward_functions", f"reward_fns:length_reward,reward_fns:{function}")


def test_an_unknown_reward_function_fails_at_start(tmp_path, train_run, capsys):
    # A command-line mistake: exit 2 before the model loads (tests/test_bad_inputs.py checks the order).
    for spec, message in [("reward_fns:nope", "module 'reward_fns' has no attribute 'nope'"),
                          ("no_such_module:reward", "cannot import module 'no_such_module'")]:
        with pytest.raises(SystemExit) as exit_info:
            train_run(tmp_path / "run", "--reward_functions", spec)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or _steps(tmp_path / "run") == []


def test_eval_refuses_gold_answers_its_accuracy_reward_cannot_read(tmp_path, capsys):
    import eval as eval_script

    source = _save_dataset(tmp_path / "data", rows=6, answers=["1", "2", "3", "four", "5", "many"])
    argv = ["--model", "tiny", "--dataset", source, "--eval_part", "all", "--output_dir", str(tmp_path / "e"), "--progress_bar", "false"]
    err = _refused(capsys, eval_script.main, argv)
    assert re.search(r"eval.py: error: reward function 'count_accuracy': the gold answer of row \d+ of --dataset \S+ \('many'", err)


def test_metrics_file_and_checkpoint_left_by_a_crash_mid_line_are_repaired(tmp_path, train_run):
    """A kill -9 can cut metrics.jsonl mid-line and leave a half-written .tmp checkpoint."""
    out = train_run(tmp_path / "run", "--max_steps", "2", "--save_steps", "2")
    with open(out / "metrics.jsonl", "a") as file:
        file.write('{"step": 3, "loss": 0.1')  # the line being written when the process died
    (out / ".tmp-checkpoint-4-12345" / "model").mkdir(parents=True)
    train_run(out, "--max_steps", "3", "--resume")
    assert _steps(out) == [1, 2, 3]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert not (out / ".tmp-checkpoint-4-12345").exists()
    shutil.rmtree(out)


def test_a_command_past_its_timeout_is_stopped_with_everything_it_started():
    """run_command's guard (tests/conftest.py): the child and a grandchild in its own session (as
    torchrun starts its ranks) both stop, and the failure shows what the command printed."""
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
        "print('grandchild', p.pid, flush=True); time.sleep(600)"
    )
    with pytest.raises(pytest.fail.Exception, match="ran past its 5 s timeout") as failure:
        run_command([sys.executable, "-c", code], timeout=5)
    assert "grandchild" in str(failure.value)
    grandchild = int(str(failure.value).split("grandchild ")[1].split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and "Z" not in _process_state(grandchild):
        assert time.monotonic() < deadline, "the grandchild outlived the timeout"
        time.sleep(0.1)


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# --- round two: rewards that train on nothing, a failure only on the whole batch ---


def test_a_reward_that_scores_nothing_stops_the_run(tmp_path, train_run):
    # unscored_frac 1.0 used to be the only sign: every advantage 0, the steps trained on nothing.
    with pytest.raises(ValueError, match=r"the reward functions \['always_none'\] returned None for every one of the 4 completions"):
        train_run(tmp_path / "run", "--reward_functions", "reward_fns:always_none", "--max_steps", "1")


def test_a_reward_that_fails_only_on_the_whole_batch_says_so(tmp_path, train_run):
    with pytest.raises(RuntimeError, match=r"raised ValueError: expected one completion\n  on the whole batch of 4 completions") as info:
        train_run(tmp_path / "run", "--reward_functions", "reward_fns:fails_on_batches", "--max_steps", "1")
    assert "on completion 0" not in str(info.value)  # completion 0 alone scores fine


@pytest.mark.parametrize("flags, message", [
    (["--reward_functions", "format,count_accuracy", "--reward_weights", "0,0"], "--reward_weights '0,0': every weight is 0"),
    (["--freeze_policy", "lora", "--lora_alpha", "0"], "--lora_alpha 0.0: must be > 0"),
    (["--resume", "--overwrite_output_dir"], "pass only one of --resume and --overwrite_output_dir"),
], ids=["reward_weights", "lora_alpha", "resume_and_overwrite"])  # fmt: skip
def test_settings_that_train_nothing_exit_2_naming_the_flag(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_argv(tmp_path / "run", *flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_flag_that_changes_the_steps_and_names_what_may_change(tmp_path, train_run, capsys):
    out = train_run(tmp_path / "run", "--max_steps", "1")
    with pytest.raises(SystemExit) as exit_info:
        train_run(out, "--max_steps", "2", "--resume", "--num_generations", "4", "--learning_rate", "1e-2")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--resume: --learning_rate 0.01 (the run has 0.001), --num_generations 4 (the run has 2)" in err
    assert f"--init_from {out / 'checkpoint-00000001'} --output_dir NEW" in err
    assert "Flags that may change on resume:" in err and "--max_steps" in err and "--save_steps" in err
    assert _steps(out) == [1]  # nothing touched
    # What may change does: more steps, another save interval, another logging interval.
    train_run(out, "--max_steps", "2", "--resume", "--save_steps", "5", "--logging_steps", "1")
    assert _steps(out) == [1, 2]
    # A cosine schedule's length is --max_steps: a longer resumed run continues the lr from where
    # the checkpoint's run left it and decays it over the added steps, never above it
    # (grpo/runtime/optimizer.py, extend_schedule_on_resume).
    # Resumed from step 2 of 4 (lr still > 0 there), extended to 6 steps.
    cosine = train_run(tmp_path / "cosine", "--max_steps", "4", "--save_steps", "2", "--lr_scheduler", "cosine")
    shutil.rmtree(cosine / "checkpoint-00000004")
    train_run(cosine, "--max_steps", "6", "--resume", "--lr_scheduler", "cosine")
    lrs = [record["lr"] for record in read_metrics(cosine)]
    assert _steps(cosine) == [1, 2, 3, 4, 5, 6]
    assert lrs[1] > 0 and all(later <= earlier for earlier, later in zip(lrs[1:-1], lrs[2:], strict=True)), lrs  # never up
    assert lrs[2] > 0  # it still trains after the resume (the schedule was stretched, not ended)


@pytest.mark.parametrize("damaged", ["model/model.safetensors", "trainer_state.pt"])
def test_a_truncated_file_in_the_latest_checkpoint_names_it_and_offers_the_previous(tmp_path, train_run, damaged):
    out = train_run(tmp_path / "run", "--max_steps", "2", "--save_steps", "1")
    target = out / "checkpoint-00000002" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # a copy cut short
    shown = str(out / "checkpoint-00000002" / damaged.split("/")[0])  # model/ names the folder
    # It used to be a raw PytorchStreamReader / SafetensorError naming no file.
    with pytest.raises(RuntimeError, match="cannot be read") as info:
        train_run(out, "--max_steps", "3", "--resume")
    message = str(info.value)
    assert f"checkpoint {out / 'checkpoint-00000002'} is marked complete but {shown}" in message
    assert f"The previous complete checkpoint is {out / 'checkpoint-00000001'}: move the damaged one aside" in message
    # What it says works: moved aside, --resume continues from step 1.
    (out / "checkpoint-00000002").rename(out / "damaged-checkpoint-00000002")
    train_run(out, "--max_steps", "3", "--resume")
    assert _steps(out) == [1, 2, 3]
