"""Checkpoints: round trip, pruning, crashes mid-save (simulated and a real kill -9), and resume rules."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerances import U32

import grpo.runtime.checkpoint as checkpoint_module
from grpo.runtime.checkpoint import (
    capture_rng_state,
    check_output_dir,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    restore_rng_state,
    save_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


class TinyPretrained(torch.nn.Module):
    """A stand-in policy: a Linear layer with a save_pretrained that writes safetensors."""

    def __init__(self, size: int = 4):
        super().__init__()
        self.linear = torch.nn.Linear(size, size)

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        save_file(self.state_dict(), os.path.join(directory, "model.safetensors"))
        Path(directory, "config.json").write_text("{}")


class StubProcessor:
    def save_pretrained(self, directory):
        Path(directory, "processor_config.json").write_text('{"stub": true}')


def _train_a_little(model, optimizer, scheduler, steps=3):
    for _ in range(steps):
        loss = model.linear(torch.ones(1, 4)).pow(2).sum()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _make_training_state(seed=0):
    torch.manual_seed(seed)
    model = TinyPretrained()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def _save(output_dir, step, model, **kwargs):
    kwargs.setdefault("run_config", {"stage": "grpo"})
    return save_checkpoint(output_dir, step, model=model, processor=StubProcessor(), **kwargs)


def test_round_trip_restores_optimizer_scheduler_rng_and_data_position(tmp_path):
    model, optimizer, scheduler = _make_training_state()
    _train_a_little(model, optimizer, scheduler)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(
        tmp_path, 7, model=model, processor=StubProcessor(), optimizer=optimizer, scheduler=scheduler,
        data_state={"epoch": 1, "index": 17}, run_config={"stage": "grpo", "learning_rate": 0.01},
        extra={"best_accuracy": 0.5, "lora": {"a": torch.arange(3.0)}},
    )  # fmt: skip
    # What the run would have drawn next, had it not stopped:
    expected = (random.random(), np.random.rand(), torch.rand(3))

    assert path == tmp_path / "checkpoint-00000007" and latest_checkpoint(tmp_path) == path
    names = {p.name for p in path.iterdir()}
    assert names == {"model", "trainer_state.pt", "run_config.json", "COMPLETE"}
    assert {p.name for p in (path / "model").iterdir()} == {"model.safetensors", "config.json", "processor_config.json"}
    assert torch.equal(load_file(path / "model" / "model.safetensors")["linear.weight"], model.linear.weight)

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # a new process, differently seeded
    _, new_optimizer, new_scheduler = _make_training_state(seed=5)
    state = load_trainer_state(path, optimizer=new_optimizer, scheduler=new_scheduler)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
    assert state["step"] == 7
    assert state["data_state"] == {"epoch": 1, "index": 17}
    assert state["run_config"] == {"stage": "grpo", "learning_rate": 0.01}
    assert state["extra"]["best_accuracy"] == 0.5 and torch.equal(state["extra"]["lora"]["a"], torch.arange(3.0))
    assert state["model_dir"] == path / "model"
    assert new_scheduler.state_dict() == scheduler.state_dict()
    assert new_scheduler.get_last_lr() == scheduler.get_last_lr()  # 0.01 / (1 + 3)
    saved, loaded = optimizer.state_dict(), new_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, param_state in saved["state"].items():
        for key, value in param_state.items():
            assert torch.equal(loaded["state"][index][key], value), key


def test_real_transformers_model_loads_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config)

    class Compiled(torch.nn.Module):  # what torch.compile returns keeps the model in _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    path = save_checkpoint(tmp_path, 1, model=Compiled(policy), processor=None)
    loaded = AutoModelForCausalLM.from_pretrained(path / "model")
    for name, tensor in policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_model_to_save_replaces_the_model(tmp_path):
    model, merged = TinyPretrained(), TinyPretrained()
    path = save_checkpoint(tmp_path, 1, model=model, processor=None, model_to_save=merged)
    assert torch.equal(load_file(path / "model" / "model.safetensors")["linear.weight"], merged.linear.weight)


def test_keep_last_prunes_oldest_after_the_new_one_is_complete(tmp_path):
    model = TinyPretrained()
    for step in range(1, 6):
        _save(tmp_path, step, model, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000004", "checkpoint-00000005"]
    _save(tmp_path, 6, model, keep_last=1)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [6]
    with pytest.raises(ValueError, match="--save_total_limit"):
        _save(tmp_path, 7, model, keep_last=0)


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    model = TinyPretrained()
    _save(tmp_path, 3, model, extra={"version": 1})
    _save(tmp_path, 3, model, extra={"version": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000003"]
    assert load_trainer_state(tmp_path / "checkpoint-00000003", restore_rng=False)["extra"] == {"version": 2}


def test_exception_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = _make_training_state()
    _save(tmp_path, 1, model, optimizer=optimizer)
    real_save = torch.save

    def crash_on_trainer_state(obj, file, *args, **kwargs):
        if str(file).endswith("trainer_state.pt"):  # the model files are already written
            raise OSError("No space left on device")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_on_trainer_state)
    with pytest.raises(OSError, match="(?i)no space left"):  # the save's own message names the folder
        _save(tmp_path, 2, model, optimizer=optimizer)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000001"
    assert load_trainer_state(latest_checkpoint(tmp_path), optimizer=optimizer)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000001"]  # the tmp dir is gone


def test_leftovers_of_a_hard_crash_are_ignored_then_cleaned(tmp_path):
    model = TinyPretrained()
    first = _save(tmp_path, 1, model)
    # A kill -9 before the rename: a tmp folder, even one whose marker made it to disk.
    shutil.copytree(first, tmp_path / ".tmp-checkpoint-2-4242")
    shutil.copytree(first, tmp_path / ".tmp-checkpoint-3-4242", ignore=shutil.ignore_patterns("COMPLETE"))
    # A kill -9 during pruning: the marker went first, the rest half deleted.
    shutil.copytree(first, tmp_path / "checkpoint-00000000", ignore=shutil.ignore_patterns("COMPLETE", "*.pt"))
    assert latest_checkpoint(tmp_path) == first
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_trainer_state(tmp_path / "checkpoint-00000000")

    _save(tmp_path, 4, model)  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001", "checkpoint-00000004"]


def test_crash_between_the_two_renames_of_a_same_step_save(tmp_path):
    model = TinyPretrained()
    first = _save(tmp_path, 1, model, keep_last=1)
    aside = tmp_path / ".replaced-checkpoint-00000001-4242"
    os.replace(first, aside)  # the old one was moved aside, the new one never renamed in
    assert latest_checkpoint(tmp_path) == aside
    assert load_trainer_state(aside, restore_rng=False)["step"] == 1
    _save(tmp_path, 2, model, keep_last=2)  # cleanup puts it back under its name
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 2]
    assert not aside.exists()


def test_per_rank_rng_states(tmp_path):
    torch.manual_seed(10)
    rank0 = capture_rng_state()
    torch.manual_seed(11)
    rank1 = capture_rng_state()
    expected_rank1 = torch.rand(2)
    path = _save(tmp_path, 1, TinyPretrained(), rng_states=[rank0, rank1])
    load_trainer_state(path, rank=1)
    assert torch.equal(torch.rand(2), expected_rank1)
    with pytest.warns(UserWarning, match="rank 2 keeps its fresh seeding"):
        load_trainer_state(path, rank=2)


def test_capture_and_restore_rng_directly():
    state = capture_rng_state()
    expected = (random.random(), np.random.normal(), torch.randn(2))  # normal: numpy's gauss cache
    restore_rng_state(state)
    assert (random.random(), np.random.normal()) == expected[:2]
    assert torch.equal(torch.randn(2), expected[2])


def test_cuda_rng_state_of_the_current_device_is_kept(monkeypatch):
    # No GPU here: stand-ins record what would be read from and written to cuda:LOCAL_RANK.
    written = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", written.append)
    state = capture_rng_state()
    restore_rng_state(state)
    assert written[0].tolist() == [7]


def test_load_and_save_errors(tmp_path):
    model, optimizer, _ = _make_training_state()
    path = _save(tmp_path, 1, model, optimizer=optimizer)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])  # one param, not two
    with pytest.raises(ValueError, match="optimizer state in .* does not fit this run's optimizer"):
        load_trainer_state(path, optimizer=other)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ValueError, match="holds no scheduler state"):
        load_trainer_state(path, scheduler=scheduler)
    with pytest.raises(TypeError, match="data_state must hold only plain Python values"):
        _save(tmp_path, 2, model, data_state={"index": np.int64(3), "rng": np.random.default_rng(0)})
    assert latest_checkpoint(tmp_path) == path


# --- check_output_dir ---


def test_check_output_dir_fresh_refuse_resume_overwrite(tmp_path):
    assert check_output_dir(tmp_path / "new", resume=False, overwrite=False, stage="grpo") is None
    with pytest.warns(UserWarning, match="holds no complete checkpoint; starting a new run"):
        assert check_output_dir(tmp_path, resume=True, overwrite=False, stage="grpo") is None

    model = TinyPretrained()
    _save(tmp_path, 1, model, run_config={"train": {"stage": "grpo"}})  # the shape of Config.to_dict()
    last = _save(tmp_path, 2, model, run_config={"train": {"stage": "grpo"}})
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    message = (
        f"output_dir {tmp_path} already holds a run (checkpoint-00000002); pass --resume to "
        "continue it or --overwrite_output_dir to start over"
    )
    with pytest.raises(FileExistsError) as info:
        check_output_dir(tmp_path, resume=False, overwrite=False, stage="grpo")
    assert str(info.value) == message
    assert check_output_dir(tmp_path, resume=True, overwrite=False, stage="grpo") == last
    with pytest.raises(ValueError, match="stage/checkpoint mismatch: .* --stage grpo but this run is --stage sft"):
        check_output_dir(tmp_path, resume=True, overwrite=False, stage="sft")
    with pytest.raises(ValueError, match="only one of --resume and --overwrite_output_dir"):
        check_output_dir(tmp_path, resume=True, overwrite=True, stage="grpo")

    assert check_output_dir(tmp_path, resume=False, overwrite=True, stage="sft") is None
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # only checkpoints go


def test_check_output_dir_refuses_foreign_checkpoint_folders(tmp_path):
    (tmp_path / "checkpoint-500").mkdir()  # e.g. a transformers Trainer run
    with pytest.raises(FileExistsError, match="not complete checkpoints of this trainer"):
        check_output_dir(tmp_path, resume=True, overwrite=False, stage="grpo")
    assert check_output_dir(tmp_path, resume=False, overwrite=True, stage="grpo") is None
    assert not any(tmp_path.iterdir())


# --- a real kill -9 ---


class KillPolicy(torch.nn.Module):
    """~256 KB of weights (+512 KB of Adam state): big enough that a save takes a few ms."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(256, 256)

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        save_file(self.state_dict(), os.path.join(directory, "model.safetensors"))


def save_forever(output_dir: str, ready=None) -> None:
    """Resume from the latest checkpoint, then save a checkpoint per step until killed."""
    # A forked child must not enter the OpenMP thread pool it inherited from the parent: the pool's
    # threads do not exist after fork(), and with more than one thread the first parallel op hangs.
    torch.set_num_threads(1)
    policy = KillPolicy()
    optimizer = torch.optim.AdamW(policy.parameters())
    policy.linear(torch.ones(1, 256)).sum().backward()
    optimizer.step()
    latest = latest_checkpoint(output_dir)
    step = load_trainer_state(latest, optimizer=optimizer)["step"] if latest else 0
    if ready is not None:
        ready.set()
    else:
        print("ready", flush=True)
    while True:
        step += 1
        with torch.no_grad():
            policy.linear.weight.fill_(step)  # the weights say which step they belong to
        save_checkpoint(output_dir, step, model=policy, processor=None, optimizer=optimizer,
                        data_state={"index": step}, run_config={"stage": "grpo"}, keep_last=2)


def _start_forked(output_dir):
    context = multiprocessing.get_context("fork")  # torch is already imported: starts in ms
    ready = context.Event()
    process = context.Process(target=save_forever, args=(str(output_dir), ready), daemon=True)
    process.start()
    assert ready.wait(timeout=30)
    return process, process.join


def _start_subprocess(output_dir):
    environment = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}", OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", f"from test_checkpoint import save_forever; save_forever({str(output_dir)!r})"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=environment)
    assert process.stdout.readline().strip() == b"ready"

    def wait():
        process.wait(timeout=30)
        process.stdout.close()

    return process, wait


def _saved_past(output_dir, step: int, process, timeout: float = 60.0) -> None:
    """Wait until the loop has completed a save past `step` (or fail if it died first)."""
    deadline = time.monotonic() + timeout
    while True:
        latest = latest_checkpoint(output_dir)
        if latest is not None and int(latest.name.split("-")[1]) > step:
            return
        alive = process.is_alive() if hasattr(process, "is_alive") else process.poll() is None  # fork or Popen
        assert alive, "the saving process died before its first save"
        assert time.monotonic() < deadline, f"no checkpoint past step {step} within {timeout:.0f} s"
        time.sleep(0.05)


def _kill_during_saves(output_dir, start, rounds=3):
    delays, last_step = [], 0
    for _ in range(rounds):  # each round resumes from what the previous kill left
        process, wait = start(output_dir)
        # Wait for this round's first completed save (a condition, not a fixed sleep: a loaded
        # machine can take longer than any fixed delay to write one), then kill at a random point
        # of the saves that follow.
        _saved_past(output_dir, last_step, process)
        delays.append(random.uniform(0.0, 0.2))
        time.sleep(delays[-1])
        os.kill(process.pid, signal.SIGKILL)
        wait()
        latest = latest_checkpoint(output_dir)
        assert latest is not None, f"no checkpoint after kills at {delays}"
        state = load_trainer_state(latest, restore_rng=False)
        weights = load_file(latest / "model" / "model.safetensors")["linear.weight"]
        assert torch.all(weights == state["step"]), f"weights and step disagree after kills at {delays}"
        assert state["data_state"] == {"index": state["step"]}
        assert state["step"] > last_step  # this round's completed save survived the kill
        last_step = state["step"]
    assert last_step >= rounds, f"the loop saved too few checkpoints to test anything (kills at {delays})"


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")
def test_kill_9_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    _kill_during_saves(tmp_path / "run", _start_forked, rounds=4)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_kill_9_of_a_fresh_interpreter_during_saves(tmp_path):
    _kill_during_saves(tmp_path / "run", _start_subprocess, rounds=3)


def test_loading_an_optimizer_state_keeps_this_runs_adamw_kernel():
    """A checkpoint records fused/foreach in its param_groups, and torch's load_state_dict would
    take them; the loading run keeps its own kernel (FSDP shards cannot run the fused one)."""
    from grpo.runtime.checkpoint import _with_this_runs_kernels

    weight = torch.nn.Parameter(torch.ones(3))
    fused = torch.optim.AdamW([weight], lr=0.1, fused=True)
    plain = torch.optim.AdamW([weight], lr=0.2)
    weight.grad = torch.ones(3)
    fused.step()
    saved = fused.state_dict()
    plain.load_state_dict(_with_this_runs_kernels(saved, plain))
    assert plain.param_groups[0]["fused"] is None  # this run's choice
    assert plain.param_groups[0]["lr"] == 0.1  # the checkpoint's settings otherwise
    # exp_avg = (1 - beta1) * g = 0.1 from zero: one float32 rounding in either kernel, u * 0.1 each.
    torch.testing.assert_close(plain.state[weight]["exp_avg"], fused.state[weight]["exp_avg"], atol=2 * U32 * 0.1, rtol=0)
    fused.load_state_dict(_with_this_runs_kernels(plain.state_dict(), fused))
    assert fused.param_groups[0]["fused"] is True
    plain.load_state_dict(saved)  # what torch alone would do: the checkpoint's kernel
    assert plain.param_groups[0]["fused"] is True
