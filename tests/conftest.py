"""Shared fixtures for the end-to-end tests: train.py in-process or as a subprocess, on tiny settings.

Every run uses the built-in tiny model (0.74M parameters) and synthetic data, a handful of prompts
and short completions, so a GRPO step takes well under a second on one CPU core. The tiny model
never writes a correct answer, so GRPO runs score with `reward_fns:length_reward` (tests/reward_fns.py)
to have a reward spread and a gradient.

    train_run(out, "--max_steps", "2")                 # train.main([...]) in-process -> Path(out)
    train_run(out, "--max_steps", "2", stage="sft")
    run_script(["train.py", ...], timeout=60)          # python train.py ... in a subprocess
    run_command([*TORCHRUN, ...], timeout=900)         # any command; on a timeout its whole tree stops
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

TINY_COMMON = ["--model", "tiny", "--num_examples", "64", "--progress_bar", "false", "--save_steps", "2"]
TINY_GRPO = [
    *TINY_COMMON, "--per_device_prompts", "2", "--num_generations", "2", "--micro_batch_size", "4",
    "--max_completion_length", "8", "--learning_rate", "1e-3", "--reward_functions", "reward_fns:length_reward",
]  # fmt: skip
TINY_SFT = [*TINY_COMMON, "--per_device_batch_size", "2", "--learning_rate", "1e-3", "--max_eval_examples", "4"]

# Wall-clock measurements: the only metrics two identical runs may disagree on.
TIMING_KEYS = frozenset({"rollout_seconds", "update_seconds", "rollout_tokens_per_second", "step_seconds"})

# torchrun's launcher from this interpreter's own torch: always present, whatever the venv is called.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def train_argv(output_dir, *flags: str, stage: str = "grpo") -> list[str]:
    """The argv of a tiny run; later flags override the defaults (argparse keeps the last value)."""
    defaults = TINY_GRPO if stage == "grpo" else TINY_SFT
    return ["--stage", stage, "--output_dir", str(output_dir), *defaults, *flags]


@pytest.fixture
def train_run(monkeypatch):
    """Run train.py's `main(argv)` in this process; returns the output dir as a Path."""
    for name in TORCHRUN_VARIABLES:  # a test process launched under torchrun must still run alone
        monkeypatch.delenv(name, raising=False)

    def run(output_dir, *flags: str, stage: str = "grpo") -> Path:
        import train

        train.main(train_argv(output_dir, *flags, stage=stage))
        return Path(output_dir)

    return run


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child python/torchrun: one thread, tests/ importable, no torchrun state."""
    env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(extra)
    return env


def run_script(args: list[str], *, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`python ARGS...` from the repository root, output captured; fails the test on a timeout."""
    return run_command([sys.executable, *args], timeout=timeout, env=subprocess_env(**env))


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        found += frontier
    return found


def run_command(command: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `command` from the repository root, output captured, as `subprocess.run` would.

    On a timeout, `subprocess.run` kills only the child and drops its output. Under torchrun that
    child is the launcher: its ranks (each in its own session) would live on, waiting up to the
    process group's 30-minute timeout and loading the machine for the tests after, and the failure
    would say nothing. Here the launcher gets SIGTERM (it then stops its ranks), anything left
    below it SIGKILL, and the test fails with the output the command had written.
    """
    process = subprocess.Popen(
        command, cwd=REPO, env=subprocess_env() if env is None else env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        below = _descendants(process.pid)
        process.terminate()
        try:
            process.wait(timeout=30)  # torchrun stops its ranks, then exits
        except subprocess.TimeoutExpired:
            pass
        process.kill()
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already stopped by the launcher
        stdout, stderr = process.communicate()  # every writer is gone: the pipes reach EOF
        pytest.fail(
            f"ran past its {timeout:.0f} s timeout: {' '.join(command[:8])} ...\n"
            f"--- stdout (end) ---\n{stdout[-3000:]}\n--- stderr (end) ---\n{stderr[-5000:]}"
        )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def read_metrics(output_dir) -> list[dict]:
    from grpo.runtime.metrics import read_metrics as read

    return read(Path(output_dir) / "metrics.jsonl")


def without_timings(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in TIMING_KEYS}


def latest_model_dir(output_dir) -> Path:
    from grpo.runtime.checkpoint import latest_checkpoint

    latest = latest_checkpoint(output_dir)
    assert latest is not None, f"no complete checkpoint in {output_dir}: {sorted(os.listdir(output_dir))}"
    return latest / "model"


def saved_weights(model_dir) -> dict[str, torch.Tensor]:
    """The safetensors tensors of a saved model folder, by name."""
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(path))
    assert weights, f"no safetensors in {model_dir}"
    return weights


def load_saved_model(model_dir, dtype=torch.float32):
    """A checkpoint's model/ through plain transformers, as a user would load it."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype)


def model_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="session")
def initial_tiny_weights() -> dict[str, torch.Tensor]:
    """The tiny preset's weights before any training (seed 0), named as the model's state_dict names them."""
    from models.loading import load_policy

    model, _ = load_policy("tiny", dtype=torch.float32, device=torch.device("cpu"), seed=0)
    return model_state(model)


@pytest.fixture(scope="session")
def grpo_run_dir(tmp_path_factory) -> Path:
    """A finished two-step tiny GRPO run, shared by the tests that only read it (eval, loading)."""
    import train

    for name in TORCHRUN_VARIABLES:
        os.environ.pop(name, None)
    output_dir = tmp_path_factory.mktemp("grpo-run") / "run"
    train.main(train_argv(output_dir, "--max_steps", "2", "--beta", "0.04"))
    return output_dir


@pytest.fixture
def float64_hf():
    """HF's Qwen2.5-VL keeps float64 activations in float64 during the test (tests/tolerances.py)."""
    from tolerances import float64_throughout

    with float64_throughout():
        yield


@pytest.fixture
def rendezvous_port():
    """The port of a TCP store this process hosts for the 2-rank groups a test spawns.

    Picking a free port (bind to 0, read it, close) and letting rank 0 bind it again leaves a
    window in which another process can take the port. Here the store stays bound from the moment
    the OS picks the port; the ranks join it as clients, the way torchrun's ranks join the store
    its agent hosts (`TORCHRUN_AGENT_STORE`, set by `join_rendezvous`).
    """
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield store.port
    del store


# torchrun's own variable: every rank connects to MASTER_ADDR:MASTER_PORT as a client of a store
# the launcher hosts, instead of rank 0 binding the port itself.
TORCHRUN_AGENT_STORE = {"TORCHELASTIC_USE_AGENT_STORE": "True"}


def join_rendezvous(rank: int, world_size: int, port: int) -> None:
    """In a spawned worker: torchrun's variables for this rank, on the store `rendezvous_port` hosts."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **TORCHRUN_AGENT_STORE,
    )  # fmt: skip
