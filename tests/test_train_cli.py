"""train.py end to end on the tiny model: both stages, the metrics they log, the checkpoints they save.

The runs go through the real command line (`train.main(argv)` in-process, and once as
`python train.py` in a subprocess). Settings are tiny (2 prompts x 2 completions of <= 8 tokens),
so each run takes a few seconds on one CPU core.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_train_cli.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    latest_model_dir,
    load_saved_model,
    model_state,
    read_metrics,
    run_script,
    saved_weights,
    without_timings,
)
from tolerances import TINY_PATH_TERMS, U32, after_adamw_steps, network_error

# What the GRPO loop documents it logs every step (docs/grpo.md, "What metrics.jsonl holds").
GRPO_KEYS = {
    "step", "loss", "kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy", "grad_norm", "lr",
    "completion_length_mean", "completion_length_max", "truncated_frac", "rollout_seconds", "update_seconds",
    "rollout_tokens_per_second", "skipped_images", "skipped_long_prompts", "sampler_gap_mean", "sampler_gap_max",
    "reward/total/mean", "reward/total/std", "reward/unscored_frac",
    "advantage/frac_zero_std_groups", "advantage/mean", "advantage/std",
}  # fmt: skip
SFT_KEYS = {"step", "loss", "grad_norm", "lr", "tokens", "step_seconds", "skipped_images"}


def _changed(before: dict, after: dict, names) -> set[str]:
    return {name for name in names if not torch.equal(before[name], after[name])}


def test_grpo_two_steps_log_every_metric_and_save_a_plain_transformers_checkpoint(train_run, tmp_path, initial_tiny_weights):
    # Two reward functions with weights 2 and 0.5: the total must be their weighted sum.
    out = train_run(
        tmp_path / "grpo", "--max_steps", "2", "--beta", "0.04", "--save_steps", "0",
        "--reward_functions", "reward_fns:length_reward,reward_fns:vowel_reward", "--reward_weights", "2,0.5",
    )  # fmt: skip
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    per_function = {f"reward/{name}/{stat}" for name in ("length_reward", "vowel_reward")
                    for stat in ("mean", "std", "unscored_frac")}
    for record in records:
        assert set(record) == GRPO_KEYS | per_function
        assert all(math.isfinite(value) for value in record.values()), record
        # total = 2 * length + 0.5 * vowel, row by row, so the means add the same way
        expected_total = 2 * record["reward/length_reward/mean"] + 0.5 * record["reward/vowel_reward/mean"]
        # float32 means of 4 rows (B*G) of rewards <= 1 and their weighted sum: each side <= 8
        # roundings of values <= 2.5 (worst case, any order), so 2 * 8 u * 2.5 apart.
        assert record["reward/total/mean"] == pytest.approx(expected_total, rel=0, abs=2 * 8 * U32 * 2.5)
        assert record["lr"] == pytest.approx(1e-3)  # constant schedule, no warm-up; the lr is a float64 python product of the schedule: exact to a few ulps; approx's rel 1e-6 is far above
        assert 1 <= record["completion_length_mean"] <= record["completion_length_max"] <= 8
        assert 0.0 <= record["truncated_frac"] <= 1.0
        assert record["advantage/frac_zero_std_groups"] in (0.0, 0.5, 1.0)  # B = 2 groups
        # one inner epoch: old = logp.detach(), so every ratio is exp(0) = 1 exactly and so is their mean
        assert record["ratio_mean"] == 1.0
        assert record["clip_frac_low"] == record["clip_frac_high"] == 0.0
        assert record["rollout_seconds"] > 0 and record["update_seconds"] > 0 and record["rollout_tokens_per_second"] > 0
        assert record["skipped_images"] == 0 and record["skipped_long_prompts"] == 0
    # Step 1: the policy is its own reference, so the KL is exactly 0; step 2 it has moved.
    assert records[0]["kl"] == 0.0
    assert records[1]["kl"] > 0.0
    assert records[0]["grad_norm"] > 0.0

    # save_steps 0: one checkpoint, at the end; loadable by plain transformers, and trained.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000002"]
    model_dir = latest_model_dir(out)
    model = load_saved_model(model_dir)
    assert sum(p.numel() for p in model.parameters()) == 739_648
    loaded = model_state(model)
    assert loaded.keys() == initial_tiny_weights.keys()
    assert _changed(initial_tiny_weights, loaded, loaded)  # the weights moved
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(str(model_dir)).tokenizer.vocab_size > 0
    run_config = json.loads((model_dir.parent / "run_config.json").read_text())
    assert run_config["stage"] == "grpo" and run_config["grpo"]["reward_weights"] == "2,0.5"


def test_sft_two_steps_log_every_metric_and_save_a_plain_transformers_checkpoint(train_run, tmp_path, initial_tiny_weights):
    out = train_run(tmp_path / "sft", "--max_steps", "2", "--save_steps", "1", "--save_total_limit", "5", stage="sft")
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert set(records[0]) == SFT_KEYS
    assert set(records[1]) == SFT_KEYS | {"val_loss"}  # validation at the last step
    vocab = 927  # the tiny tokenizer; an untrained model's cross-entropy is about ln(927) = 6.83
    for record in [*records, {"loss": records[1]["val_loss"]}]:
        assert abs(record["loss"] - math.log(vocab)) < 1.0, record
    assert records[0]["tokens"] > 0 and records[0]["grad_norm"] > 0 and records[0]["lr"] == pytest.approx(1e-3)  # the lr is a float64 python product of the schedule: exact to a few ulps; approx's rel 1e-6 is far above
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000001", "checkpoint-00000002"]
    loaded = model_state(load_saved_model(latest_model_dir(out)))
    assert _changed(initial_tiny_weights, loaded, loaded)


def test_python_train_py_entry_point_with_a_config_file(tmp_path):
    """`python train.py --config run.yaml` with a CLI override, as a user runs it."""
    config = tmp_path / "run.yaml"
    config.write_text(
        "stage: sft\nmodel: tiny\nnum_examples: 32\nper_device_batch_size: 2\nmax_steps: 5\n"
        "progress_bar: false\nmax_eval_examples: 4\nlearning_rate: 0.001\n"
    )
    out = tmp_path / "run"
    result = run_script(["train.py", "--config", str(config), "--max_steps", "2", "--output_dir", str(out)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # the CLI's 2, not the file's 5
    run_config = json.loads((latest_model_dir(out).parent / "run_config.json").read_text())
    assert run_config["stage"] == "sft" and run_config["train"]["max_steps"] == 2
    assert run_config["data"]["num_examples"] == 32


def test_two_inner_epochs_with_kl_move_the_ratio_and_the_kl(train_run, tmp_path, float64_hf):
    # num_iterations 2: steps 1 and 3 are the first epoch over a generation batch, 2 and 4 the second.
    # float64 throughout, so that the old-policy forward and the training forward (other micro-batch
    # code paths of one network) agree within tolerances.network_error.
    out = train_run(
        tmp_path / "mu2", "--max_steps", "4", "--num_iterations", "2", "--beta", "0.1", "--learning_rate", "1e-2",
        "--save_steps", "0", "--dtype", "float64",
    )  # fmt: skip
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    first, second, third, fourth = records
    # Step 1: policy = old policy = reference, so the ratio is exactly 1 and the KL exactly 0.
    assert first["ratio_mean"] == 1.0 and first["kl"] == 0.0
    assert first["clip_frac_low"] == first["clip_frac_high"] == 0.0
    # Step 2 re-uses step 1's completions after an AdamW step at lr 1e-2: the ratio has left 1.
    assert abs(second["ratio_mean"] - 1.0) > 1e-3
    assert second["kl"] > 1e-4
    assert second["clip_frac_low"] + second["clip_frac_high"] > 0.0
    # Step 3 starts a new generation batch: old logprobs are the current policy's again, so
    # log pi - log pi_old is two evaluation orders of logprobs of size <= ~10, and the ratio
    # exp(that) is 1 within that gap (it is below 1e-8, where exp(d) - 1 = d to first order)...
    assert third["ratio_mean"] == pytest.approx(1.0, abs=network_error(TINY_PATH_TERMS, 10.0))
    # ...but the reference stays the starting point, so the KL stays positive.
    assert third["kl"] > 1e-4
    # Same completions on both epochs of a batch: lengths and rewards are logged identically.
    for a, b in ((first, second), (third, fourth)):
        assert a["completion_length_mean"] == b["completion_length_mean"]
        assert a["reward/total/mean"] == b["reward/total/mean"]


@pytest.mark.parametrize("policy", ["language", "lora"])
def test_freeze_policies_train_only_their_parameters(train_run, tmp_path, initial_tiny_weights, policy):
    out = train_run(tmp_path / policy, "--max_steps", "2", "--freeze_policy", policy, "--beta", "0.04")
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    model_dir = latest_model_dir(out)
    assert not [name for name in saved_weights(model_dir) if "lora" in name]  # merged, plain weights
    loaded = model_state(load_saved_model(model_dir))
    assert loaded.keys() == initial_tiny_weights.keys()
    changed = _changed(initial_tiny_weights, loaded, loaded)
    vision = {name for name in loaded if ".visual." in name}
    if policy == "language":
        assert changed and not changed & vision
        assert "model.language_model.layers.0.mlp.up_proj.weight" in changed
    else:  # LoRA on q_proj and v_proj (the default --lora_targets) of the language model only
        assert changed == {
            f"model.language_model.layers.{i}.self_attn.{proj}.weight" for i in (0, 1) for proj in ("q_proj", "v_proj")
        }


def test_full_freeze_policy_trains_the_vision_tower_too(grpo_run_dir, initial_tiny_weights):
    loaded = model_state(load_saved_model(latest_model_dir(grpo_run_dir)))
    changed = _changed(initial_tiny_weights, loaded, loaded)
    assert "model.visual.patch_embed.proj.weight" in changed
    assert "model.language_model.layers.1.self_attn.o_proj.weight" in changed


def test_rollout_metrics_cover_every_rank_by_hand():
    """The job-wide statistics rank 0 logs, on one rank, checked by hand.

    Two groups of G = 2 with one reward function:  rewards [1, 0 | 1, 1]
      reward mean = 3/4 = 0.75, population std = sqrt(((.25)^2*3 + (.75)^2) / 4) = sqrt(0.1875) = 0.4330127
      the second group has zero spread: frac_zero_std_groups = 1/2
      lengths [3, 1, 2, 2] -> mean 2, max 3; truncated [F, F, T, F] -> 0.25
    """
    import torch

    from grpo.rewards import weighted_sum
    from grpo.runtime.metrics import rollout_metrics

    per_function = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    advantages = torch.tensor([0.7071, -0.7071, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.float32)
    truncated = torch.tensor([False, False, True, False])
    metrics = rollout_metrics(per_function, weighted_sum(per_function, [1.0]), ["count_accuracy"], advantages, mask, truncated, 2, 1)
    assert metrics["reward/count_accuracy/mean"] == pytest.approx(0.75)  # approx's rel 1e-6 is ~16 float32 ulps: a float32 mean/fraction of a few O(1) terms is within a few
    # float32 std of 4 values <= 1: <= 8 roundings of values <= 1 (mean, squares, sum, sqrt), plus
    # the hand value's 7-decimal rounding
    assert metrics["reward/total/std"] == pytest.approx(0.4330127, abs=8 * U32 + 5e-8)
    assert metrics["advantage/frac_zero_std_groups"] == 0.5
    assert metrics["advantage/mean"] == pytest.approx(0.0, abs=4 * U32 * 0.7071)  # a float32 sum of 4 terms <= 0.71
    assert metrics["completion_length_mean"] == 2.0 and metrics["completion_length_max"] == 3.0
    assert metrics["truncated_frac"] == 0.25


def _assert_same_steps(got: list[dict], expected: list[dict], learning_rate: float, adam_epsilon: float) -> None:
    """Two float64 runs' metrics, step by step, within what two computation orders can differ by.

    Step 1 is one rollout and one update of the same weights in two orders: tolerances.network_error
    at the logprobs' magnitude (<= ~10; every logged metric is a mean or sum of at most that size
    over <= 48 tokens). Each later step starts from weights one more AdamW update apart
    (tolerances.after_adamw_steps).
    """
    first_step = network_error(TINY_PATH_TERMS, 10.0)
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.keys() == b.keys()
        bound = after_adamw_steps(first_step, learning_rate, adam_epsilon, steps=index)
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=0, abs=bound), (a["step"], key, abs(a[key] - b[key]), bound)


def test_shared_prompt_forward_trains_like_the_naive_forward(train_run, tmp_path, initial_tiny_weights, float64_hf):
    """--shared_prompt_forward (each prompt once, KV cache copied to its completions) against its
    naive twin (every completion runs [prompt ; completion]) through the whole loop: old-policy,
    reference and training forwards, the vision tower trained (images re-encoded in each), and
    micro-batches of 3 rows that cut across groups of 2. Float64 throughout: two computation orders
    of one network, compared within the bounds of tests/tolerances.py."""
    flags = ["--max_steps", "2", "--num_iterations", "2", "--beta", "0.04", "--freeze_policy", "full",
             "--learning_rate", "1e-3", "--save_steps", "2", "--per_device_prompts", "3", "--micro_batch_size", "3",
             "--dtype", "float64", "--adam_epsilon", "1e-3"]  # fmt: skip
    shared = train_run(tmp_path / "shared", *flags, "--shared_prompt_forward", "true")
    naive = train_run(tmp_path / "naive", *flags, "--shared_prompt_forward", "false")
    got, expected = [without_timings(r) for r in read_metrics(shared)], [without_timings(r) for r in read_metrics(naive)]
    assert [r["step"] for r in got] == [1, 2]
    assert expected[1]["kl"] > 1e-6  # step 2 is off the starting point, so the match means something
    _assert_same_steps(got, expected, learning_rate=1e-3, adam_epsilon=1e-3)
    # The weights after the two updates, entry by entry: update k's gradients are
    # after_adamw_steps(network_error, k - 1) apart (gradients clipped to norm <= 1), which moves a
    # weight by at most lr / eps = 1 times that; the two updates add up.
    weights_shared, weights_naive = (model_state(load_saved_model(latest_model_dir(out), torch.float64)) for out in (shared, naive))
    gradient_gap = network_error(TINY_PATH_TERMS, 1.0)
    bound = sum(after_adamw_steps(gradient_gap, 1e-3, 1e-3, steps=k) for k in (0, 1))
    moved = max((weights_naive[n] - initial_tiny_weights[n].double()).abs().max().item() for n in weights_naive)
    assert moved > 1e-4  # both updates moved the weights, far more than the bound
    for name in weights_naive:
        torch.testing.assert_close(weights_shared[name], weights_naive[name], rtol=0, atol=bound, msg=name)


def test_old_logprobs_from_the_sampler_train_like_the_old_policy_forward(train_run, tmp_path, float64_hf):
    """--old_logprobs_from_sampler skips the old-policy forward: the sampler recorded the same
    log pi_old while drawing (two computation orders of one network, float64 throughout here), so
    the two runs log the same steps."""
    flags = ["--max_steps", "2", "--num_iterations", "2", "--learning_rate", "1e-2", "--save_steps", "0", "--dtype", "float64",
             "--adam_epsilon", "1e-2"]  # fmt: skip
    sampler = train_run(tmp_path / "sampler", *flags, "--old_logprobs_from_sampler", "true")
    forward = train_run(tmp_path / "forward", *flags, "--old_logprobs_from_sampler", "false")
    got, expected = [without_timings(r) for r in read_metrics(sampler)], [without_timings(r) for r in read_metrics(forward)]
    # pi / pi_old at the rollout's weights: exp of a logprob gap of two evaluation orders
    assert got[0]["ratio_mean"] == pytest.approx(1.0, abs=network_error(TINY_PATH_TERMS, 10.0))
    assert abs(expected[1]["ratio_mean"] - 1.0) > 1e-3  # the second epoch has moved off the rollout
    _assert_same_steps(got, expected, learning_rate=1e-2, adam_epsilon=1e-2)


def test_preflight_runs_with_every_loss_option(train_run, tmp_path):
    """The pre-flight step feeds the same step function as the loop; an option that needs an extra
    input (the sampler correction needs the sampler's logprobs) must get it there too."""
    out = train_run(
        tmp_path / "run", "--max_steps", "2", "--save_steps", "0", "--sampler_correction", "token_truncate",
        "--top_entropy_quantile", "0.5", "--num_iterations", "2",
    )
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # two inner epochs of one generation batch


# The loss options of issue 24 (TRL's names), each end to end: 2 steps of a second inner epoch
# (so the ratio has moved off 1 and every bound, gate and mask can act), finite, logged, training.
TRL_LOSS_OPTIONS = {
    "delta": ["--delta", "1.5"],
    "off_policy_mask": ["--off_policy_mask_threshold", "0.0"],
    "bnpo": ["--loss_type", "bnpo", "--micro_batch_size", "2"],  # two micro-batches per step
    "sapo": ["--loss_type", "sapo", "--sapo_temperature_pos", "2.0", "--sapo_temperature_neg", "2.5"],
    "luspo": ["--loss_type", "luspo"],
    "vespo": ["--loss_type", "vespo", "--vespo_k_pos", "1.5", "--vespo_lambda_neg", "1.5"],
    "sampler_min": ["--sampler_correction", "token_truncate", "--sampler_correction_min", "0.5"],
}


@pytest.mark.parametrize("flags", TRL_LOSS_OPTIONS.values(), ids=TRL_LOSS_OPTIONS.keys())
def test_each_trl_loss_option_trains_end_to_end(train_run, tmp_path, flags):
    out = train_run(tmp_path / "run", "--max_steps", "2", "--save_steps", "0", "--num_iterations", "2", *flags)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
    assert records[1]["ratio_mean"] != 1.0  # the second inner epoch trains off-policy
    if "--off_policy_mask_threshold" in flags:
        assert all(0.0 <= r["off_policy_masked_frac"] <= 1.0 for r in records)
