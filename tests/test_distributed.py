"""torch.distributed helpers: single-process no-ops, and a real 2-process gloo group on CPU."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import join_rendezvous

from grpo.runtime import distributed
from grpo.runtime.distributed import DistInfo

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_single_process_without_environment(no_torchrun_env):
    info = distributed.init_distributed("cpu")
    assert info == DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    assert not distributed.is_initialized()
    assert distributed.is_main(info) and distributed.is_main()
    distributed.barrier()
    assert distributed.all_reduce_sum(2.5) == 2.5
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(7) == [7]
    distributed.cleanup()


def test_device_preference_errors(no_torchrun_env, monkeypatch):
    with pytest.raises(ValueError, match="--device 'tpu'"):
        distributed.init_distributed("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.init_distributed("auto").device == torch.device("cpu")
    with pytest.raises(RuntimeError, match="--device cuda .* not available"):
        distributed.init_distributed("cuda")


def test_multi_process_environment_without_master_is_an_error(no_torchrun_env, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT is not set; launch .* torchrun"):
        distributed.init_distributed("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 and WORLD_SIZE=2 are inconsistent"):
        distributed.init_distributed("cpu")


def _collectives_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    join_rendezvous(rank, world_size, port)
    info = distributed.init_distributed("cpu", timeout_minutes=1)
    try:
        # rank 0 holds 1.0, rank 1 holds 2.0 -> sum 3.0
        value = float(rank + 1)
        tensor = torch.tensor([value, 10.0 * value])  # rank 0: [1, 10]; rank 1: [2, 20]
        summed_tensor = distributed.all_reduce_sum(tensor)
        result = {
            "info": [info.rank, info.local_rank, info.world_size, str(info.device)],
            "sum": distributed.all_reduce_sum(value),
            "sum_tensor": summed_tensor.tolist(),
            "input_untouched": tensor.tolist(),
            "broadcast": distributed.broadcast_object({"from": rank, "step": 42}),
            "gathered": distributed.all_gather_object(f"rank-{rank}"),
            "is_main": distributed.is_main(info),
        }
        distributed.barrier()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
            json.dump(result, file)
    finally:
        distributed.cleanup()


def test_two_process_gloo_collectives(tmp_path, rendezvous_port):
    mp.spawn(_collectives_worker, args=(2, rendezvous_port, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, result in enumerate(results):
        assert result["info"] == [rank, rank, 2, "cpu"]
        assert result["sum"] == 3.0 and isinstance(result["sum"], float)
        assert result["sum_tensor"] == [3.0, 30.0]
        assert result["input_untouched"] == [float(rank + 1), 10.0 * (rank + 1)]
        assert result["broadcast"] == {"from": 0, "step": 42}  # rank 0's object everywhere
        assert result["gathered"] == ["rank-0", "rank-1"]
        assert result["is_main"] == (rank == 0)


def _stuck_peer_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    join_rendezvous(rank, world_size, port)
    distributed.init_distributed("cpu", timeout_minutes=2 / 60)  # a 2-second collective timeout
    result_path = os.path.join(out_dir, "rank0.json")
    if rank == 1:
        # Alive but never joins the collective (stuck, or busy in a loop that diverged).
        while not os.path.exists(result_path):
            time.sleep(0.05)
        os._exit(0)
    start = time.monotonic()
    try:
        distributed.barrier()
        outcome = "returned"
    except Exception as error:  # the process-group timeout turns the hang into an error
        outcome = type(error).__name__
    with open(result_path + ".tmp", "w") as file:
        json.dump({"outcome": outcome, "seconds": time.monotonic() - start}, file)
    os.replace(result_path + ".tmp", result_path)
    os._exit(0)


def test_collective_with_a_stuck_peer_times_out_instead_of_hanging(tmp_path, rendezvous_port):
    mp.spawn(_stuck_peer_worker, args=(2, rendezvous_port, str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["outcome"] != "returned"
    assert 1.5 < result["seconds"] < 20  # about the 2-second timeout, not forever


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_prints_the_model_line_and_the_dataset_bars(monkeypatch, capsys, rank):
    """README: rank 0 logs for the job. Rank 1 printed its own `[model] tiny: trainable ...` line and
    datasets' "Casting the dataset" bar (seen in its own torchrun log files)."""
    import datasets
    import transformers

    from data.sources import load_examples
    from grpo.config import parse_config
    from grpo.runtime.policy import build_policy

    monkeypatch.setattr(distributed, "get_rank", lambda: rank)  # as under torchrun, without a process group
    config = parse_config(["--model", "tiny", "--beta", "0"])
    try:
        distributed.quiet_other_ranks(rank)
        build_policy(config, torch.device("cpu"), with_reference=False)
        load_examples("synthetic", num_examples=4)
        captured = capsys.readouterr()
    finally:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
    printed = captured.out + captured.err
    assert ("[model] tiny:" in printed) == (rank == 0)
    assert ("Casting the dataset" in printed) == (rank == 0)  # rank 0 still shows them
