"""--fsdp (grpo/runtime/fsdp.py) computes what the replicated path computes, and saves what it saves.

FSDP2 changes where the weights live (each rank holds 1/world_size of each, as DTensor shards) and
how gradients are reduced (a reduce-scatter in backward instead of `sync_gradients`' all-reduce);
it must change no number. The tests:

1. Two gloo ranks with --fsdp against one process holding both ranks' rows: the handcrafted
   generation batch of tests/test_torchrun.py (rank 0's completions have 10 tokens, rank 1's 23,
   so a wrong normaliser shows), through `accumulate_step_gradients`, then clip_grad_norm_ and one
   AdamW step. Gradients, the clipped norm and the updated weights must match; for the tied
   embeddings of the tiny preset (one FSDP unit holding embed_tokens and lm_head, called before
   and inside model.forward) and for untied ones (embed_tokens alone, lm_head in the root unit).
   Rank 1 starts from different weights, so the test also sees rank 0's weights broadcast into
   the shards. The gathered optimizer state and model are what a replicated run would save.
2. In one process (a one-rank group), --fsdp repeats the replicated run bit for bit: metrics,
   checkpoint weights and optimizer state.
3. (slow) `torchrun --nproc_per_node 2 train.py --fsdp`, GRPO and SFT: the runs complete, the
   checkpoints load with plain `from_pretrained`, a --fsdp resume restores Adam's moments, and the
   runs agree with replicated torchrun runs up to float rounding.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_fsdp.py -q [-m slow]
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import (
    TORCHRUN,
    latest_model_dir,
    load_saved_model,
    read_metrics,
    run_command,
    saved_weights,
    subprocess_env,
    train_argv,
    without_timings,
)
from test_torchrun import _build_problem, _grpo_args, _join_as_rank
from tolerances import TINY_PATH_TERMS, UNIT_ROUNDOFF, after_adamw_steps, network_error, sum_error

AGGREGATION = "token"
LEARNING_RATE = 1e-2
MAX_GRAD_NORM = 0.05  # below the gradient's norm, so clipping acts and its norm must be right
U64 = UNIT_ROUNDOFF[torch.float64]



def _untie(problem: dict) -> dict:
    """The same problem with lm_head given its own copy of the embedding matrix."""
    model = problem["model"]
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False
    return problem


def _train_args():
    from grpo.config import TrainArguments

    return TrainArguments(learning_rate=LEARNING_RATE, weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM)


def _one_update(problem, generation, rows, micro, world_size):
    """accumulate_step_gradients + clip + one AdamW step, as the GRPO loop does; returns the optimizer."""
    from grpo.grpo_loop import accumulate_step_gradients
    from grpo.runtime.distributed import sync_gradients
    from grpo.runtime.optimizer import build_optimizer

    model = problem["model"]
    optimizer = build_optimizer(model, _train_args())
    # AdamW's first step is lr * g / (|g| + eps): with the default eps about lr * sign(g), blind to
    # the gradient's scale and to clipping, and jumpy where |g| ~ eps. With eps = 1 (and |g| << 1)
    # it is about lr * g, so the updated weights show both.
    for group in optimizer.param_groups:
        group["eps"] = 1.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    sums = accumulate_step_gradients(
        model, generation, torch.arange(len(rows)), advantages=problem["advantages"][rows],
        loss_mask=problem["mask"][rows], old_logprobs=problem["old_logprobs"][rows],
        ref_logprobs=problem["ref_logprobs"][rows], gargs=_grpo_args(AGGREGATION, micro),
        reuse_images=False, world_size=world_size,
    )  # fmt: skip
    if world_size == 1:
        sync_gradients(trainable, world_size)  # a no-op here; the --fsdp ranks skip it
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    optimizer.step()
    return optimizer, grads, float(grad_norm), sums


def _full(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _rank_worker(rank: int, world_size: int, port: int, out_dir: str, problems: dict) -> None:
    from grpo.runtime.fsdp import FullModel, FullStateOptimizer, shard_model

    distributed = _join_as_rank(rank, world_size, port)
    try:
        results = {}
        for name, problem in problems.items():
            model = problem["model"]
            if rank == 1:  # a rank that loaded other weights: sharding must take rank 0's
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
            shard_model(model, torch.device("cpu"))
            rows = list(range(4 * rank, 4 * rank + 4))
            optimizer, grads, grad_norm, _ = _one_update(problem, problem["per_rank"][rank], rows, micro=2, world_size=world_size)
            full_optimizer = FullStateOptimizer(optimizer).gather()  # collective
            local_moments = [optimizer.state[p]["exp_avg"].to_local().clone() for p in model.parameters()]
            # Loading the gathered state back gives every rank its own slices again.
            state = distributed.broadcast_object(full_optimizer.state_dict())
            FullStateOptimizer(optimizer).load_state_dict(state)
            reloaded = [optimizer.state[p]["exp_avg"].to_local() for p in model.parameters()]
            saved_model = FullModel(model)  # collective
            if rank == 0:
                saved_model.save_pretrained(os.path.join(out_dir, f"model-{name}"))
            results[name] = {
                "grads": {k: _full(g) for k, g in grads.items()},
                "grad_norm": grad_norm,
                "params": {k: _full(p.detach()) for k, p in model.named_parameters()},
                "optimizer": state,
                "reload_matches": all(torch.equal(a, b) for a, b in zip(local_moments, reloaded, strict=True)),
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def test_two_fsdp_ranks_give_the_single_process_update(tmp_path, monkeypatch, float64_hf, rendezvous_port):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    problems = {"tied": _build_problem(), "untied": _untie(_build_problem())}
    assert problems["tied"]["model"].lm_head.weight is problems["tied"]["model"].model.language_model.embed_tokens.weight
    # fork: the ranks inherit the problems (the test_torchrun.py way); they shard their own copies.
    mp.start_processes(
        _rank_worker, args=(2, rendezvous_port, str(tmp_path), problems), nprocs=2, join=True, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for name, problem in problems.items():
        model = problem["model"]
        optimizer, grads, grad_norm, _ = _one_update(problem, problem["whole"], list(range(8)), micro=3, world_size=1)
        assert grad_norm > MAX_GRAD_NORM  # clipping acted
        scale = float(max(g.abs().max() for g in grads.values()))
        entries = sum(g.numel() for g in grads.values())
        # Other micro-batches, shards and reduction orders of a float64 model: each gradient entry
        # within network_error of the backward's doubled path; the norm within ||error||_2 <=
        # sqrt(entries) * that, plus its own sum of squares; clipping scales by MAX / norm.
        grad_tol = network_error(2 * TINY_PATH_TERMS, scale)
        norm_tol = math.sqrt(entries) * grad_tol + sum_error(entries, grad_norm, torch.float64)
        clipped_tol = grad_tol + scale * norm_tol / grad_norm
        # AdamW's first step with eps = 1 moves p by lr * g / (|g| + 1) + lr * wd * p: the clipped
        # gradient's error times lr (d/dg of g / (|g| + 1) <= 1), plus a few roundings of |p| <= 2.
        param_tol = LEARNING_RATE * clipped_tol + 8 * U64 * 2.0
        embed = "model.language_model.embed_tokens.weight"
        for rank in range(2):
            got = ranks[rank][name]
            assert got["grad_norm"] == pytest.approx(grad_norm, rel=0, abs=norm_tol)
            assert got["grads"].keys() == grads.keys()
            for key, expected in grads.items():  # gradients before clipping
                torch.testing.assert_close(got["grads"][key], expected, rtol=0, atol=grad_tol, msg=lambda m, k=key, n=name: f"{n} {k}: {m}")
            for key, param in model.named_parameters():  # weights after the update
                assert param.abs().max() <= 2.0, key  # the |p| the bound assumes
                torch.testing.assert_close(got["params"][key], param.detach(), rtol=0, atol=param_tol, msg=lambda m, k=key, n=name: f"{n} {k}: {m}")
            assert got["reload_matches"]
        # The embedding gradient has two sources (the input embeddings, called before
        # model.forward, and the output head); both arrived before FSDP reduced it.
        assert grads[embed].abs().max() > 1e-3
        # The gathered optimizer state is the replicated optimizer's state_dict, layout included.
        expected_state = optimizer.state_dict()
        saved_state = ranks[0][name]["optimizer"]
        assert saved_state["param_groups"] == expected_state["param_groups"]
        for index, values in expected_state["state"].items():
            for key, value in values.items():
                # exp_avg = 0.1 g, exp_avg_sq = 0.001 g^2 (moves by 0.002 |g| dg <= dg): within the clipped
                # gradient's error, plus a rounding of each; the step count is exact.
                torch.testing.assert_close(saved_state["state"][index][key], value, rtol=4 * U64, atol=clipped_tol)
        # The saved folder is a plain Qwen2.5-VL holding rank 0's updated weights (checked above
        # against this process's), loaded in float32: their float32 rounding, to the last bit.
        saved_model = load_saved_model(tmp_path / f"model-{name}")
        saved = dict(saved_model.named_parameters())
        for key, _ in model.named_parameters():
            assert torch.equal(saved[key], ranks[0][name]["params"][key].float()), key
        assert (saved_model.lm_head.weight is saved_model.get_input_embeddings().weight) == (name == "tied")


def test_fsdp_in_one_process_repeats_the_replicated_run(train_run, tmp_path):
    """A one-rank --fsdp run goes through every FSDP hook (gather, reshard, reduce, state-dict
    gathering) but sums nothing across ranks, so it must give the same floats: FSDP2 shards each
    parameter on its own (no flat buffer), and one shard of one rank is the whole tensor, so both
    runs compute the same ops on the same shapes in the same order, on any kernel path."""
    import torch.distributed as dist

    flags = ["--max_steps", "3", "--save_steps", "0", "--beta", "0.04", "--gradient_checkpointing", "true"]
    replicated = train_run(tmp_path / "replicated", *flags)
    sharded = train_run(tmp_path / "fsdp", *flags, "--fsdp", "true")
    assert not dist.is_initialized()  # the one-rank group was torn down with the run
    expected = [without_timings(r) for r in read_metrics(replicated)]
    assert [without_timings(r) for r in read_metrics(sharded)] == expected
    assert expected[0]["grad_norm"] > 0 and expected[2]["kl"] > 0

    weights = saved_weights(latest_model_dir(replicated))
    fsdp_weights = saved_weights(latest_model_dir(sharded))
    assert fsdp_weights.keys() == weights.keys()  # the same on-disk names (transformers' layout)
    for name, tensor in weights.items():
        assert torch.equal(fsdp_weights[name], tensor), name
    for file in ("config.json", "generation_config.json"):
        assert (latest_model_dir(sharded) / file).read_text() == (latest_model_dir(replicated) / file).read_text()
    states = [torch.load(latest_model_dir(run).parent / "trainer_state.pt", weights_only=True)["optimizer"] for run in (replicated, sharded)]
    assert states[1]["param_groups"] == states[0]["param_groups"]
    for index, values in states[0]["state"].items():
        for key, value in values.items():
            assert torch.equal(states[1]["state"][index][key], value), (index, key)


def test_fsdp_rejects_lora():
    from grpo.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="--fsdp with --freeze_policy lora"):
        parse_config(["--fsdp", "true", "--freeze_policy", "lora"])


def test_fsdp_rejects_cuda_graph_decoding():
    from grpo.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="--fsdp with --decode cuda_graph"):
        parse_config(["--fsdp", "true", "--decode", "cuda_graph"])
    assert parse_config(["--fsdp", "true", "--decode", "static"]).grpo.decode == "static"


# --- the real command ---

# The sharded and replicated runs are two computation orders of one job (shard-wise norms, a
# reduce-scatter instead of an all-reduce), so they run in float64 throughout and are compared
# within tolerances.network_error; AdamW's epsilon is the learning rate, which keeps a gradient gap
# from growing more than 2x through an update (tolerances.after_adamw_steps).
LEARNING_RATE = 1e-3  # TINY_GRPO's and TINY_SFT's
FLOAT64_RUN = ["--dtype", "float64", "--adam_epsilon", str(LEARNING_RATE)]


def _torchrun(output_dir, *flags, stage):
    argv = train_argv(output_dir, *flags, "--device", "cpu", *FLOAT64_RUN, stage=stage)
    command = [*TORCHRUN, "--nproc_per_node", "2", "--standalone", "tests/torchrun_fingerprint.py", *argv]
    # 900 s: a guard against a hang, not a speed check (alone this takes ~20 s; on a machine shared by many jobs, minutes)
    result = run_command(command, timeout=900, env=subprocess_env(FLOAT64_HF="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return output_dir


def _assert_close_runs(got_dir, expected_dir):
    """Same steps; metrics within network_error at magnitude <= 10 (losses, logprobs, norms), grown
    by one AdamW factor per update before the step; saved weights within the sum over updates of
    each update's gradient gap (gradients clipped to norm <= 1) times lr / eps = 1."""
    got, expected = read_metrics(got_dir), read_metrics(expected_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for index, (record, reference) in enumerate(zip(got, expected, strict=True)):
        bound = after_adamw_steps(network_error(TINY_PATH_TERMS, 10.0), LEARNING_RATE, LEARNING_RATE, steps=index)
        for key, value in without_timings(reference).items():
            assert record[key] == pytest.approx(value, rel=0, abs=bound), (record["step"], key, abs(record[key] - value))
    gradient_gap = network_error(TINY_PATH_TERMS, 1.0)
    weight_bound = sum(after_adamw_steps(gradient_gap, LEARNING_RATE, LEARNING_RATE, steps=k) for k in range(len(got)))
    weights, reference_weights = saved_weights(latest_model_dir(got_dir)), saved_weights(latest_model_dir(expected_dir))
    assert weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        assert tensor.dtype == torch.float64, name
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=weight_bound, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_torchrun_fsdp_grpo_saves_loads_resumes_and_matches_replicas(tmp_path):
    flags = ["--beta", "0.04", "--save_steps", "2"]
    sharded = _torchrun(tmp_path / "fsdp", "--max_steps", "2", "--fsdp", "true", *flags, stage="grpo")
    model = load_saved_model(latest_model_dir(sharded))  # plain transformers, no FSDP
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    # Resume: weights from model/, Adam's moments from the gathered full state, sliced per rank.
    _torchrun(sharded, "--max_steps", "3", "--fsdp", "true", "--resume", *flags, stage="grpo")
    replicated = _torchrun(tmp_path / "replicated", "--max_steps", "3", *flags, stage="grpo")
    _assert_close_runs(sharded, replicated)


@pytest.mark.slow
def test_torchrun_fsdp_sft_matches_replicas(tmp_path):
    flags = ["--max_steps", "3", "--gradient_accumulation_steps", "2", "--eval_steps", "3", "--save_steps", "0"]
    sharded = _torchrun(tmp_path / "fsdp", *flags, "--fsdp", "true", stage="sft")
    replicated = _torchrun(tmp_path / "replicated", *flags, stage="sft")
    assert "val_loss" in read_metrics(sharded)[-1]
    load_saved_model(latest_model_dir(sharded))
    _assert_close_runs(sharded, replicated)
