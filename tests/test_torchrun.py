"""Two ranks give the gradient of one process holding both ranks' completions.

What data parallelism must preserve: with the batch split over ranks, each rank's loss normalised
by the step's GLOBAL count (tokens or completions, all-reduced) divided by world_size, and the
gradients averaged over ranks, the result is the gradient of the whole batch's loss. Comparing a
whole torchrun run with a single process cannot test this sharply: ranks draw their own prompts
and sample with their own generators, so the rollouts differ; greedy rollouts make every
completion of a group identical, so the advantages (and the policy gradient) are 0; and AdamW's
first update is about lr * sign(grad), blind to a wrong scale.

So the main test fixes the rollout by hand and runs the update itself, `accumulate_step_gradients`
+ `sync_gradients` from the GRPO loop, once in this process on all 8 rows and once on two gloo
ranks with 4 rows each, and compares the gradients (before AdamW). The rollout is built to make
a wrong normaliser visible: rank 0's completions have 10 tokens in all, rank 1's 23, so a rank
that divided by its own token count would weigh rank 0's tokens 2.3x too much; the micro-batches
split the rows differently (3 + 3 + 2 in one process, 2 + 2 per rank); old/reference logprobs
differ from the policy's so the clip and the KL terms have gradients too; the vision tower trains.

A second, slow test runs the real command, `torchrun --nproc_per_node 2 train.py`, and checks the
job completes, logs, saves a loadable checkpoint, and that its two ranks held the same weights.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_torchrun.py -q [-m slow]
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import (
    TORCHRUN,
    join_rendezvous,
    latest_model_dir,
    load_saved_model,
    read_metrics,
    run_command,
    subprocess_env,
    train_argv,
)
from tolerances import TINY_PATH_TERMS, network_error

AGGREGATIONS = ("token", "sequence", "constant")
G = 2  # completions per prompt
T = 6  # max completion length
# Completion lengths (EOS included) of the 8 rows: rows 0-3 are rank 0's (2 prompts), rows 4-7
# rank 1's. None: no EOS, cut at T (truncated). Rank 0: 2+3+2+3 = 10 tokens; rank 1: 6+6+5+6 = 23.
LENGTHS = [2, 3, 2, 3, 6, None, 5, None]
REWARDS = [1.0, 0.0, 0.2, 0.9, 0.0, 1.0, 0.7, 0.3]
# One process and two ranks are two computation orders (other micro-batches, other padding, an
# all-reduce), so the problem runs in float64 throughout (tolerances.network_error).



def _grpo_args(aggregation: str, micro_batch_size: int, top_entropy_quantile: float = 1.0, **flags):
    from grpo.config import GRPOArguments

    args = GRPOArguments(
        per_device_prompts=4, num_generations=G, micro_batch_size=4, max_completion_length=T,
        beta=0.1, epsilon=0.2, epsilon_high=0.28, loss_aggregation=aggregation,
        top_entropy_quantile=top_entropy_quantile, **flags,
    )  # fmt: skip
    # Set after the checks: 3 does not divide the 8 rows, which the loop never asks for but this
    # function handles (the last micro-batch is smaller); it makes the split differ from the ranks'.
    args.micro_batch_size = micro_batch_size
    return args


def _build_problem():
    """The tiny model in float64 and a handcrafted generation batch of 4 prompts x 2 completions."""
    from data.collators import GRPOCollator
    from data.sources import load_examples
    from grpo.advantages import group_advantages
    from grpo.engine.forward import GenerationBatch
    from grpo.masks import completion_mask
    from models.loading import load_policy, special_token_ids

    torch.manual_seed(0)
    model, processor = load_policy("tiny", dtype=torch.float64, device="cpu", seed=0)
    tokens = special_token_ids(model, processor)
    examples, _ = load_examples("synthetic", num_examples=4, seed=0)
    examples = [examples[i] for i in range(4)]
    collator = GRPOCollator(processor)

    generator = torch.Generator().manual_seed(1)
    completion_ids = torch.randint(10, 400, (4 * G, T), generator=generator)  # [B*G, T] ordinary tokens
    eos = tokens.eos_token_ids[0]
    for row, length in enumerate(LENGTHS):
        if length is not None:
            completion_ids[row, length - 1] = eos
            completion_ids[row, length:] = tokens.pad_token_id
    mask, _ = completion_mask(completion_ids, tokens.eos_token_ids)  # [B*G, T]
    assert mask[:4].sum() == 10 and mask[4:].sum() == 23
    advantages, _ = group_advantages(torch.tensor(REWARDS), G)  # [B*G]

    def generation_batch(prompts: list[int]) -> GenerationBatch:
        batch = collator([examples[p] for p in prompts])
        rows = [p * G + g for p in prompts for g in range(G)]
        return GenerationBatch(
            prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"], images_per_prompt=[len(examples[p]["images"]) for p in prompts],
            completion_ids=completion_ids[rows], completion_mask=mask[rows], rollout_image_embeds=None,
            group_size=G, temperature=1.0, spatial_merge_size=model.config.vision_config.spatial_merge_size,
        )  # fmt: skip

    # Old and reference logprobs that differ from the policy's, so that ratio != 1 (some clipped)
    # and the KL is not 0: the policy's own logprobs, shifted by fixed noise.
    whole = generation_batch([0, 1, 2, 3])
    with torch.no_grad():
        current = whole.logprobs(model, torch.arange(4 * G), reuse_rollout_images=False)  # [B*G, T]
    noise = torch.randn(2, 4 * G, T, generator=generator)  # [2, B*G, T]
    return {
        "model": model,
        "whole": whole,
        # Each rank collates its own 2 prompts (left padded to its own longest prompt).
        "per_rank": [generation_batch([0, 1]), generation_batch([2, 3])],
        "mask": mask,
        "advantages": advantages,
        "old_logprobs": (current + 0.3 * noise[0]) * mask,  # [B*G, T]
        "ref_logprobs": (current + 0.5 * noise[1]) * mask,  # [B*G, T]
    }


# (aggregation, top_entropy_quantile) cases: the entropy selection's quantile spans both ranks' tokens
CASES = [(aggregation, 1.0) for aggregation in AGGREGATIONS] + [("token", 0.4)]


def _gradients(problem, generation, rows, aggregation, micro, world_size, quantile=1.0):
    """.grad of every parameter after this rank's backward and the ranks' average (as the loop does)."""
    from grpo.grpo_loop import accumulate_step_gradients
    from grpo.runtime.distributed import sync_gradients

    model = problem["model"]
    mask, advantages = problem["mask"], problem["advantages"]
    old_logprobs, ref_logprobs = problem["old_logprobs"], problem["ref_logprobs"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    model.train()
    sums = accumulate_step_gradients(
        model, generation, torch.arange(len(rows)), advantages=advantages[rows], loss_mask=mask[rows],
        old_logprobs=old_logprobs[rows], ref_logprobs=ref_logprobs[rows], gargs=_grpo_args(aggregation, micro, quantile),
        reuse_images=False, world_size=world_size,
    )  # fmt: skip
    local = [p.grad.clone() for p in trainable]
    sync_gradients(trainable, world_size)
    return [p.grad.clone() for p in trainable], local, sums


def _join_as_rank(rank: int, world_size: int, port: int):
    """In a spawned worker: set torchrun's variables for this rank, one thread, join the gloo group."""
    join_rendezvous(rank, world_size, port)
    from grpo.runtime import distributed

    torch.set_num_threads(1)
    distributed.init_distributed("cpu", timeout_minutes=2)
    return distributed


def _rank_worker(rank: int, world_size: int, port: int, out_dir: str, problem: dict) -> None:
    distributed = _join_as_rank(rank, world_size, port)
    try:
        rows = list(range(4 * rank, 4 * rank + 4))  # rank 0: prompts 0, 1 (rows 0-3); rank 1: prompts 2, 3
        results = {}
        for aggregation, quantile in CASES:
            synced, local, sums = _gradients(
                problem, problem["per_rank"][rank], rows, aggregation, micro=2, world_size=world_size, quantile=quantile
            )
            results[f"{aggregation}-{quantile}"] = {
                "synced": synced, "local": local, "loss": distributed.all_reduce_sum(sums.loss) / world_size,
                "selected": distributed.all_reduce_sum(sums.selected_tokens),
            }  # fmt: skip
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def run_two_gloo_ranks(worker, payload, tmp_path, monkeypatch, port: int, prefix: str = "rank") -> list:
    """Run `worker(rank, 2, port, out_dir, payload)` on two gloo ranks in this test's process tree;
    returns what each rank saved to `{prefix}{rank}.pt`, in rank order.

    fork, not spawn: the ranks inherit the imported modules and the payload instead of spending
    seconds re-importing transformers. Each rank is single-threaded (as DataLoader workers are),
    which keeps OpenMP out of trouble after a fork. The launcher's variables of an outer torchrun
    are cleared first, so the ranks rendezvous at `port` only."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    mp.start_processes(worker, args=(2, port, str(tmp_path), payload), nprocs=2, join=True, start_method="fork")
    return [torch.load(tmp_path / f"{prefix}{rank}.pt", weights_only=True) for rank in range(2)]


def test_two_gloo_ranks_give_the_single_process_gradient(tmp_path, monkeypatch, float64_hf, rendezvous_port):
    problem = _build_problem()
    ranks = run_two_gloo_ranks(_rank_worker, problem, tmp_path, monkeypatch, rendezvous_port)

    names = [name for name, p in problem["model"].named_parameters() if p.requires_grad]
    for aggregation, quantile in CASES:
        single, _, sums = _gradients(problem, problem["whole"], list(range(4 * G)), aggregation, micro=3, world_size=1, quantile=quantile)
        if quantile < 1.0:
            # 33 loss tokens on the two ranks (10 + 23); the 0.6 quantile sits at sorted position
            # 0.6 * (33 - 1) = 19.2, between the 20th and 21st smallest: the 13 largest are kept,
            # the same tokens in one process (micro-batches of 3) as on two ranks (2 + 2)
            assert sums.selected_tokens == 13.0
            assert ranks[0][f"{aggregation}-{quantile}"]["selected"] == sums.selected_tokens
        aggregation = f"{aggregation}-{quantile}"
        scale = max(g.abs().max() for g in single)
        assert scale > 1e-3, "the gradient must not be trivially 0"
        # Each |log p| <= 10 moves by network_error(.., 10); the loss weighs them by |A| * ratio
        # (+ beta's KL weight) < 10 per normalised token.
        loss_tol = network_error(TINY_PATH_TERMS, 10.0 * 10.0)
        assert ranks[0][aggregation]["loss"] == pytest.approx(sums.loss, rel=0, abs=loss_tol)
        # The backward doubles the path; bound at the largest gradient entry.
        atol = network_error(2 * TINY_PATH_TERMS, scale)
        for rank in range(2):
            for name, expected, got in zip(names, single, ranks[rank][aggregation]["synced"], strict=True):
                torch.testing.assert_close(got, expected, rtol=0, atol=atol, msg=lambda m, n=name, a=aggregation: f"{a} {n}: {m}")
        # Before the all-reduce a rank holds only its share: the test above is not trivially true.
        local = ranks[0][aggregation]["local"]
        assert max((a - b).abs().max() for a, b in zip(local, single, strict=True)) > 1e-2 * scale
        # The vision tower trains (full freeze policy), so its gradients are compared too.
        assert any("visual" in name and g.abs().max() > 0 for name, g in zip(names, single, strict=True))


def _advantage_worker(rank: int, world_size: int, port: int, out_dir: str, rewards: list[float]) -> None:
    distributed = _join_as_rank(rank, world_size, port)
    try:
        from grpo.grpo_loop import generation_advantages

        share = torch.tensor(rewards).view(world_size, -1)[rank]  # rank 0: prompt 0; rank 1: prompt 1
        advantages, _ = generation_advantages(share, 4, "batch", world_size)
        torch.save(advantages, os.path.join(out_dir, f"advantages{rank}.pt"))
    finally:
        distributed.cleanup()


def test_batch_scaled_advantages_do_not_depend_on_the_number_of_ranks(tmp_path, monkeypatch, rendezvous_port):
    from grpo.grpo_loop import generation_advantages

    # G = 4, two prompts: [0,1,0,1] and [5,7,5,7]. The batch std is 3.0589447 (worked out in
    # test_advantages.py::test_batch_scale_divides_by_the_std_passed_in), so A = +-0.5 / 3.0590447
    # = +-0.1634497 and +-1 / 3.0590447 = +-0.3268994. A rank dividing by its own rewards' std would
    # give +-0.8658757 on rank 0.
    rewards = [0.0, 1.0, 0.0, 1.0, 5.0, 7.0, 5.0, 7.0]
    single, _ = generation_advantages(torch.tensor(rewards), 4, "batch", world_size=1)
    a, b = 0.1634497, 0.3268994
    expected = torch.tensor([-a, a, -a, a, -b, b, -b, b])
    # float32 mean/std of 8 numbers <= 7 then one division: a few ulps of 7, ~1e-6 absolute at most.
    torch.testing.assert_close(single, expected, atol=2e-6, rtol=0)
    ranks = torch.cat(run_two_gloo_ranks(_advantage_worker, rewards, tmp_path, monkeypatch, rendezvous_port, "advantages"))
    # Same float32 std, of the same 8 numbers in the same order (gathered in rank order): the
    # same kernel on the same values, so equal to the last bit on any CPU.
    assert torch.equal(ranks, single)


# --- the real command ---


@pytest.mark.slow
def test_torchrun_two_ranks_runs_saves_and_keeps_ranks_in_step(tmp_path, train_run):
    """`torchrun --nproc_per_node 2 train.py --stage grpo` on CPU: two steps, a loadable checkpoint,
    and ranks that agree (each rank writes a fingerprint of its weights; they must be equal)."""
    out = tmp_path / "run"
    argv = train_argv(out, "--max_steps", "2", "--beta", "0.04", "--device", "cpu", "--save_steps", "0")
    command = [*TORCHRUN, "--nproc_per_node", "2", "--standalone", "tests/torchrun_fingerprint.py", *argv]
    # 900 s: a guard against a hang, not a speed check (alone this takes ~20 s; on a machine shared by many jobs, minutes)
    result = run_command(command, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["kl"] == 0.0 and records[1]["kl"] > 0.0 and records[0]["grad_norm"] > 0.0
    fingerprints = [torch.load(out / f"fingerprint-rank{r}.pt", weights_only=True) for r in range(2)]
    assert fingerprints[0].keys() == fingerprints[1].keys()
    for name in fingerprints[0]:
        assert torch.equal(fingerprints[0][name], fingerprints[1][name]), name
    # The checkpoint (written by rank 0) holds those weights.
    saved = dict(load_saved_model(latest_model_dir(out)).named_parameters())
    for name, tensor in fingerprints[0].items():
        assert torch.equal(saved[name].detach(), tensor), name
    # The job shrinks (a node lost): one process resumes the two ranks' checkpoint.
    train_run(out, "--max_steps", "3", "--beta", "0.04", "--device", "cpu", "--save_steps", "0", "--resume")
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_a_single_process_checkpoint_resumes_on_two_ranks(tmp_path, train_run):
    """The job grows: rank 1 has no saved sampler or RNG state; it starts fresh, with a warning."""
    out = train_run(tmp_path / "run", "--max_steps", "1", "--device", "cpu")
    argv = train_argv(out, "--max_steps", "2", "--device", "cpu", "--resume")
    command = [*TORCHRUN, "--nproc_per_node", "2", "--standalone", "train.py", *argv]
    # 900 s: a guard against a hang, not a speed check (alone this takes ~20 s; on a machine shared by many jobs, minutes)
    result = run_command(command, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "holds RNG states for 1 ranks; rank 1 keeps its fresh seeding" in result.stderr
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        # GSPO's sequence ratio, masked IS per completion, k2; a second inner epoch so the ratio moves
        ["--loss_type", "gspo", "--sampler_correction", "sequence_mask", "--kl_estimator", "k2", "--num_iterations", "2"],
        # CISPO with k3+, truncated IS per token
        ["--loss_type", "cispo", "--kl_estimator", "k3_plus", "--sampler_correction", "token_truncate"],
    ],
    ids=["gspo-mis-k2", "cispo-k3plus-tis"],
)
def test_torchrun_two_ranks_with_the_other_objectives(tmp_path, flags):
    """GSPO, CISPO, the KL estimators and the sampler correction run under torchrun: 2 ranks, 2 steps,
    ranks in step, and the logged sampler/trainer gap is rounding only (float64 throughout here, so
    within tolerances.network_error: the sampler's cached decode and the training forward are two
    evaluation orders of one network)."""
    out = tmp_path / "run"
    argv = train_argv(out, "--max_steps", "2", "--beta", "0.04", "--device", "cpu", "--save_steps", "0", "--dtype", "float64", *flags)
    command = [*TORCHRUN, "--nproc_per_node", "2", "--standalone", "tests/torchrun_fingerprint.py", *argv]
    result = run_command(command, timeout=900, env=subprocess_env(FLOAT64_HF="1"))  # a hang guard, not a speed check
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    # The gap is taken against the training forward: with --num_iterations 2 the second step's
    # forward has moved by one update, so only the first epoch's gap is pure sampler/trainer mismatch.
    first_epoch = records[:1] if "--num_iterations" in flags else records
    gap_bound = network_error(TINY_PATH_TERMS, 10.0)  # log-probs of size <= ~10
    for record in first_epoch:
        assert 0.0 <= record["sampler_gap_max"] < gap_bound
    for record in records:
        # pi_old / pi_sampler is exp(gap) ~ 1 + gap per token (a completion's product: <= 8 tokens'
        # gaps); pi_old comes from the rollout's policy, so this holds in the second epoch too.
        assert abs(record["sampler_weight_mean"] - 1.0) < 8 * gap_bound
        assert record["sampler_over_cap_frac"] == 0.0 and record["grad_norm"] > 0.0


@pytest.mark.slow
def test_torchrun_two_ranks_with_the_batch_options(tmp_path):
    """Dynamic sampling, unscored rewards, the overlong reward and top-entropy tokens on two ranks:
    the ranks run the same rounds (no hang), train equal batches and stay bit-identical."""
    out = tmp_path / "run"
    argv = train_argv(
        out, "--max_steps", "3", "--device", "cpu", "--save_steps", "0",
        "--dynamic_sampling", "--max_generation_rounds", "3", "--top_entropy_quantile", "0.5",
        "--reward_functions", "reward_fns:coarse_length_reward,reward_fns:unscored_sometimes,overlong",
        "--reward_weights", "1,1,0.5", "--overlong_buffer_length", "4",
    )  # fmt: skip
    command = [*TORCHRUN, "--nproc_per_node", "2", "--standalone", "tests/torchrun_fingerprint.py", *argv]
    result = run_command(command, timeout=900)  # a hang guard, not a speed check
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        rounds = record["dynamic/extra_rounds"] + 1
        # both ranks ran `rounds` rounds of B = 2 prompts (summed over the 2 ranks)
        assert record["dynamic/groups_drawn"] == rounds * 2 * 2
        assert 0.0 < record["entropy_selected_frac"] <= 1.0
        assert -1.0 <= record["reward/overlong/mean"] <= 0.0
        assert 0.0 <= record["reward/unscored_sometimes/unscored_frac"] <= 1.0
    fingerprints = [torch.load(out / f"fingerprint-rank{r}.pt", weights_only=True) for r in range(2)]
    for name in fingerprints[0]:
        assert torch.equal(fingerprints[0][name], fingerprints[1][name]), name


# The loss options of issue 24 (TRL's names) in four runs that cover every new flag: the options
# that change the clip objective's terms go together; each other --loss_type runs alone.
TRL_LOSS_OPTION_RUNS = {
    "delta-opsm-bnpo-cmin": [
        "--loss_type", "bnpo", "--micro_batch_size", "2", "--delta", "1.5", "--off_policy_mask_threshold", "0.0",
        "--sampler_correction", "sequence_truncate", "--sampler_correction_min", "0.5",
    ],
    "sapo": ["--loss_type", "sapo", "--sapo_temperature_pos", "2.0", "--sapo_temperature_neg", "2.5"],
    "luspo": ["--loss_type", "luspo"],
    "vespo": ["--loss_type", "vespo", "--vespo_k_pos", "1.5", "--vespo_lambda_neg", "1.5"],
}  # fmt: skip


@pytest.mark.slow
def test_torchrun_two_ranks_with_each_trl_loss_option(tmp_path):
    """Every loss option of issue 24 under torchrun: 2 ranks, 2 steps (a second inner epoch, so the
    ratio has moved), finite, and the two ranks bit-identical after (bnpo's normaliser counts every
    rank's micro-batches; the others' are the step's counts as before)."""
    for name, flags in TRL_LOSS_OPTION_RUNS.items():
        out = tmp_path / name
        argv = train_argv(
            out, "--max_steps", "2", "--beta", "0.04", "--device", "cpu", "--save_steps", "0", "--num_iterations", "2",
            *flags,
        )  # fmt: skip
        command = [*TORCHRUN, "--nproc_per_node", "2", "--standalone", "tests/torchrun_fingerprint.py", *argv]
        result = run_command(command, timeout=900)  # a hang guard, not a speed check
        assert result.returncode == 0, name + "\n" + result.stdout[-2000:] + result.stderr[-4000:]
        records = read_metrics(out)
        assert [r["step"] for r in records] == [1, 2], name
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records), name
        fingerprints = [torch.load(out / f"fingerprint-rank{r}.pt", weights_only=True) for r in range(2)]
        for key in fingerprints[0]:
            assert torch.equal(fingerprints[0][key], fingerprints[1][key]), (name, key)
