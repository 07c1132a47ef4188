"""Preemption without losing the run: a signal during the final save, torchrun's grace period, and
one run per output_dir.

- A SIGTERM or Ctrl-C that lands while the final checkpoint is written must not kill the save: the
  loops keep their signal handlers until after it (grpo/runtime/run.py, TrainingRun.finish).
- torchrun gives its workers 30 s (--shutdown_timeout) between its SIGTERM and SIGKILL; a step can
  be longer. `python -m grpo.runtime.launch` is torchrun without that extra deadline, and it exits 0 when
  it was signalled and every worker saved and exited cleanly (grpo/runtime/launch.py).
- A second run into the folder of a live run is refused, naming the other process; a lock left by
  a dead one is taken over with a warning (grpo/runtime/run_lock.py).
docs/troubleshooting.md ("Preemption and crashes") is the user-facing side of this file.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_preemption.py -q [-m slow]
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest
from conftest import TORCHRUN, latest_model_dir, read_metrics, run_script, train_argv

# `background` is test_faults.py's fixture (a job killed with its children at the end of the test).
from test_faults import _metric_lines, _train_command, _wait_for, background  # noqa: F401

# --- a signal during the final save ---

SIGNAL_DURING_SAVE = """
import os, signal, sys
import grpo.runtime.run
save_checkpoint = grpo.runtime.run.save_checkpoint

def signalled_save(*args, **kwargs):
    for _ in range({count}):  # the signal lands while the checkpoint is written
        os.kill(os.getpid(), signal.{signal_name})
    return save_checkpoint(*args, **kwargs)

grpo.runtime.run.save_checkpoint = signalled_save
import train
train.main(sys.argv[1:])
"""


# SIGTERM twice: a scheduler's own and torchrun's forwarded copy; the second must not kill the save.
@pytest.mark.parametrize("stage, signal_name, count", [("grpo", "SIGTERM", 2), ("sft", "SIGINT", 1)])
def test_a_signal_during_the_final_save_does_not_lose_the_run(tmp_path, stage, signal_name, count):
    out = tmp_path / "run"
    # --save_steps 0: the final save is the only one, so losing it would lose every step.
    argv = train_argv(out, "--max_steps", "2", "--save_steps", "0", stage=stage)
    result = run_script(
        ["-c", SIGNAL_DURING_SAVE.format(signal_name=signal_name, count=count), *argv], timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert latest_model_dir(out).parent.name == "checkpoint-00000002"
    assert f"{signal_name} received: saved a checkpoint at step 2" in result.stdout
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp-")] == []


# --- torchrun: a step longer than the launcher's grace period ---


def _launch(launcher: str, out, *extra: str) -> list[str]:
    argv = train_argv(
        out,
        "--max_steps",
        "3",
        "--save_steps",
        "1000",
        "--device",
        "cpu",
        "--reward_functions",
        "reward_fns:slow_from_second_call",
    )
    front = TORCHRUN if launcher == "torchrun" else [sys.executable, "-m", "grpo.runtime.launch"]
    return [*front, *extra, "--nproc_per_node", "2", "--standalone", "train.py", *argv]


@pytest.mark.slow
def test_plain_torchrun_kills_a_step_longer_than_its_grace(tmp_path, background, monkeypatch):  # noqa: F811
    """What goes wrong without grpo.runtime.launch: torchrun SIGKILLs the workers --shutdown_timeout
    seconds (default 30; 2 here to keep the test short) after its SIGTERM, in the middle of a
    6-second step, so nothing is saved and the job fails."""
    out, log, marker = tmp_path / "run", tmp_path / "torchrun.log", tmp_path / "sleeping"
    monkeypatch.setenv("SLOW_REWARD_MARKER", str(marker))
    # A 120-second step: the SIGKILL comes 2 s after the SIGTERM whatever the machine's load (with
    # 6 s, a test that signals more than 4 s late would see the step end and a checkpoint saved).
    monkeypatch.setenv("SLOW_REWARD_SECONDS", "120")
    process = background(_launch("torchrun", out, "--shutdown_timeout", "2"), log)
    _wait_for(marker.exists, process, log, timeout=150)  # rank 0 is 120 s from the end of step 2
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) != 0
    assert (
        "forcefully exiting via" in log.read_text()
    )  # torchrun: "Unable to shutdown process ... via 15"
    assert not any(out.glob("checkpoint-*"))


@pytest.mark.slow
def test_grpo_launch_finishes_a_long_step_saves_exits_0(tmp_path, background, monkeypatch):  # noqa: F811
    out, log, marker = tmp_path / "run", tmp_path / "launch.log", tmp_path / "sleeping"
    monkeypatch.setenv("SLOW_REWARD_MARKER", str(marker))
    process = background(_launch("grpo.runtime.launch", out), log)
    _wait_for(marker.exists, process, log, timeout=150)
    process.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler would
    assert process.wait(timeout=120) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "SIGTERM received: saved a checkpoint at step 2" in text
    assert "every worker saved and exited cleanly" in text
    assert latest_model_dir(out).parent.name == "checkpoint-00000002"
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


# --- one run per output_dir ---


def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path, train_run, background, capsys):  # noqa: F811
    out, log = tmp_path / "run", tmp_path / "first.log"
    first = background(_train_command(out, "--max_steps", "1000", "--save_steps", "0"), log)
    _wait_for(lambda: _metric_lines(out) >= 1, first, log)
    with pytest.raises(SystemExit) as exit_info:
        train_run(out, "--max_steps", "2", "--overwrite_output_dir")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert f"is in use by another run (pid {first.pid} on host {socket.gethostname()}" in message
    assert "--output_dir" in message  # the fix: another folder, or wait for that run
    # The first run was not disturbed: it stops on SIGTERM with its own checkpoint.
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0, log.read_text()[-3000:]
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(1, len(steps) + 1))
    assert not (out / ".lock").exists()  # released at the end of the run


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, train_run):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.warns(
        UserWarning, match=rf"taking over the lock of output_dir .* left by pid {dead.pid} on host"
    ):
        train_run(out, "--max_steps", "1")
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("flag, value", [(["--nproc_per_node", "0"], "0"), (["--nproc-per-node=-1"], "-1")])
def test_launch_refuses_a_nproc_per_node_below_1(capsys, flag, value):
    from grpo.runtime.launch import main

    with pytest.raises(SystemExit) as exit_info:  # torchrun itself stops on a bare AssertionError
        main([*flag, "train.py", "--nproc_per_node", "1"])  # the script's flags are its own
    assert exit_info.value.code == 2
    assert f"launch: error: --nproc_per_node {value}: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("codes, refused", [
    ((2, 2), True),         # both workers refused their command line
    ((2, -15), True),       # the second was stopped by torchrun (SIGTERM) before it got to its exit 2
    ((2, 1), False),        # a worker that crashed: torchrun's own error, unchanged
    ((1, 2), False),
])  # fmt: skip
def test_launch_exits_2_when_the_workers_refuse_their_command_line(monkeypatch, capsys, codes, refused):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    import grpo.runtime.launch as launch

    def workers_fail(argv):  # rank 0 fails first (the timestamps order them)
        failures = {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="") for rank, code in enumerate(codes)}
        for rank, failure in failures.items():
            failure.timestamp = rank
        raise ChildFailedError("train.py", failures)

    monkeypatch.setattr(launch, "torchrun_main", workers_fail)
    if refused:
        assert launch.main(["--nproc_per_node", "2", "train.py"]) == 2  # was torchrun's traceback and exit 1
        assert "[launch] the workers refused the command line (exit 2)" in capsys.readouterr().err
    else:
        with pytest.raises(ChildFailedError):
            launch.main(["--nproc_per_node", "2", "train.py"])
