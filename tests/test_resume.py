"""Resume is exact: 2 steps + `--resume` to 4 steps gives the run that went to 4 steps straight.

Exact means the metrics of every step (timings aside) are the same numbers and the final weights
and optimizer state are bit-identical. That holds only if a checkpoint restores everything that
decides the next steps: the weights, AdamW's moments, the scheduler, the data position, every RNG
(python, numpy, torch) and, for GRPO, the sampler's own generator (and LoRA adapters, whose
checkpoint model/ holds merged weights).
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_resume.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import latest_model_dir, read_metrics, saved_weights, without_timings

CASES = {
    # beta > 0: the reference must be rebuilt from the starting point, not from the checkpoint.
    "grpo": ("grpo", ["--beta", "0.04"]),
    # LoRA: adapters come back from the trainer state; two inner epochs: old-policy logprobs.
    "grpo-lora-two-epochs": ("grpo", ["--freeze_policy", "lora", "--num_iterations", "2", "--learning_rate", "1e-2"]),
    "sft": ("sft", ["--gradient_accumulation_steps", "2", "--eval_steps", "2"]),
    # Dynamic sampling draws a varying number of prompts per batch: the stream must resume where
    # the rounds left it. With the other batch options: unscored rewards, overlong, top entropy.
    "grpo-dynamic-sampling": ("grpo", [
        "--dynamic_sampling", "--max_generation_rounds", "3", "--top_entropy_quantile", "0.5",
        "--reward_functions", "reward_fns:coarse_length_reward,reward_fns:unscored_sometimes,overlong",
        "--reward_weights", "1,1,0.5", "--overlong_buffer_length", "4",
    ]),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_repeats_the_straight_run(train_run, tmp_path, case):
    stage, flags = CASES[case]
    straight = train_run(tmp_path / "straight", "--max_steps", "4", "--save_steps", "2", *flags, stage=stage)
    interrupted = train_run(tmp_path / "resumed", "--max_steps", "2", "--save_steps", "2", *flags, stage=stage)
    assert [r["step"] for r in read_metrics(interrupted)] == [1, 2]
    resumed = train_run(tmp_path / "resumed", "--max_steps", "4", "--save_steps", "2", "--resume", *flags, stage=stage)

    expected = [without_timings(r) for r in read_metrics(straight)]
    got = [without_timings(r) for r in read_metrics(resumed)]
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # each step once, in order
    assert got == expected  # the same floats, not merely close
    assert expected[2]["loss"] != expected[3]["loss"]  # the steps differ, so the match means something
    if "--dynamic_sampling" in flags:  # extra rounds happened, so the stream moved unevenly
        assert sum(r["dynamic/extra_rounds"] for r in expected) > 0

    final_straight, final_resumed = latest_model_dir(straight), latest_model_dir(resumed)
    assert final_straight.parent.name == final_resumed.parent.name == "checkpoint-00000004"
    weights_straight, weights_resumed = saved_weights(final_straight), saved_weights(final_resumed)
    assert weights_straight.keys() == weights_resumed.keys()
    for name in weights_straight:
        assert torch.equal(weights_straight[name], weights_resumed[name]), name
    states = [
        torch.load(path.parent / "trainer_state.pt", weights_only=True) for path in (final_straight, final_resumed)
    ]
    assert states[0]["data_state"] == states[1]["data_state"]
    moments = [[s["exp_avg"] for s in state["optimizer"]["state"].values()] for state in states]
    assert all(torch.equal(a, b) for a, b in zip(*moments, strict=True))


def test_resume_of_a_finished_run_does_nothing_more(train_run, tmp_path):
    """Relaunching a finished job (a scheduler retry) must neither train nor duplicate metrics."""
    out = train_run(tmp_path / "run", "--max_steps", "2")
    before = read_metrics(out)
    weights = saved_weights(latest_model_dir(out))
    train_run(out, "--max_steps", "2", "--resume")
    assert read_metrics(out) == before
    after = saved_weights(latest_model_dir(out))
    assert all(torch.equal(weights[name], after[name]) for name in weights)
