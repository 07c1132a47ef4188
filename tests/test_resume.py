"""Resume is exact: 2 steps + `--resume` to 4 steps gives the run that went to 4 steps straight.

Exact means the metrics of every step (timings aside) are the same numbers and the final weights
and optimizer state are bit-identical. That holds only if a checkpoint restores everything that
decides the next steps: the weights, AdamW's moments, the scheduler, the data position, every RNG
(python, numpy, torch) and, for GRPO, the sampler's own generator (and LoRA adapters, whose
checkpoint model/ holds merged weights; a --sync_ref_model reference; --use_adaptive_entropy's coefficient).
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_resume.py -q
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import latest_model_dir, read_metrics, saved_weights, without_timings

CASES = {
    # beta > 0: the reference must be rebuilt from the starting point, not from the checkpoint.
    "grpo": ("grpo", ["--beta", "0.04"]),
    # LoRA: adapters come back from the trainer state; two inner epochs: old-policy logprobs.
    "grpo-lora-two-epochs": ("grpo", ["--freeze_policy", "lora", "--num_iterations", "2", "--learning_rate", "1e-2"]),
    "sft": ("sft", ["--gradient_accumulation_steps", "2", "--eval_steps", "2"]),
    # LoRA dropout draws from torch's global generator: a save (merging LoRA) must not move it.
    "grpo-lora-dropout": ("grpo", ["--freeze_policy", "lora", "--lora_dropout", "0.1", "--learning_rate", "1e-2"]),
    # LoRA dropout and two inner epochs: pi_old's forward runs in eval mode on every generation batch,
    # not in eval on a process's first one and in train mode (dropout on) after (issue: resume drifted).
    "grpo-lora-dropout-two-epochs": ("grpo", [
        "--freeze_policy", "lora", "--lora_dropout", "0.1", "--num_iterations", "2", "--learning_rate", "1e-2",
    ]),  # fmt: skip
    # Dynamic sampling draws a varying number of prompts per batch: the stream must resume where
    # the rounds left it. With the other batch options: unscored rewards, overlong, top entropy.
    "grpo-dynamic-sampling": ("grpo", [
        "--dynamic_sampling", "--max_generation_rounds", "3", "--top_entropy_quantile", "0.5",
        "--reward_functions", "reward_fns:coarse_length_reward,reward_fns:unscored_sometimes,overlong",
        "--reward_weights", "1,1,0.5", "--overlong_buffer_length", "4",
    ]),  # fmt: skip
    # --sync_ref_model: the reference moved after every step, so a resume must restore the moved
    # reference (from the trainer state), not rebuild the starting point; full weights and LoRA.
    "grpo-sync-ref": ("grpo", [
        "--beta", "0.04", "--sync_ref_model", "true", "--ref_model_sync_steps", "1", "--ref_model_mixup_alpha", "0.5",
        "--learning_rate", "1e-2",
    ]),  # fmt: skip
    "grpo-lora-sync-ref": ("grpo", [
        "--freeze_policy", "lora", "--beta", "0.04", "--sync_ref_model", "true", "--ref_model_sync_steps", "1",
        "--learning_rate", "1e-2",
    ]),  # fmt: skip
    # --use_adaptive_entropy: the coefficient (0.01 -> 0.03 -> 0.05 at the save) and the last
    # measured entropy carry over; a fresh start would apply 0 at step 3 instead of 0.05.
    "grpo-adaptive-entropy": ("grpo", [
        "--use_adaptive_entropy", "true", "--entropy_coef", "0.01", "--entropy_coef_delta", "0.02",
        "--entropy_target", "100",
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
    # The same floats, not merely close: the resumed run reloads bit-exact weights, moments, RNG and
    # data stream and then runs the same ops on the same shapes in the same order as the straight
    # run, so this holds on whichever kernel path torch picks (both runs take the same one).
    assert got == expected
    assert expected[2]["loss"] != expected[3]["loss"]  # the steps differ, so the match means something
    if "--dynamic_sampling" in flags:  # extra rounds happened, so the stream moved unevenly
        assert sum(r["dynamic/extra_rounds"] for r in expected) > 0
    if "--sync_ref_model" in flags:  # the reference moved at every step, and the KL saw it
        assert [r["ref_model_synced"] for r in expected] == [1.0] * 4 and expected[2]["kl"] > 0
    if "--use_adaptive_entropy" in flags:  # the resumed steps applied the carried coefficient
        assert [r["entropy_coef_applied"] for r in got][2:] == pytest.approx([0.05, 0.07], rel=0, abs=1e-15)

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


def test_resume_of_a_finished_run_does_nothing_more(train_run, tmp_path, capsys):
    """Relaunching a finished job (a scheduler retry) must neither train nor duplicate metrics,
    and says so (it used to exit 0 without a word)."""
    out = train_run(tmp_path / "run", "--max_steps", "2")
    before = read_metrics(out)
    weights = saved_weights(latest_model_dir(out))
    capsys.readouterr()
    train_run(out, "--max_steps", "2", "--resume")
    assert "[resume] nothing to train: the run is at step 2 and --max_steps is 2; raise --max_steps" in capsys.readouterr().out
    train_run(out, "--max_steps", "1", "--resume")
    assert "the run is at step 2 and --max_steps is 1 (below it: the steps after it stay as they are)" in capsys.readouterr().out
    assert read_metrics(out) == before
    after = saved_weights(latest_model_dir(out))
    assert all(torch.equal(weights[name], after[name]) for name in weights)


def test_a_resumed_run_saves_at_the_multiples_of_save_steps(train_run, tmp_path):
    """Saves land on multiples of --save_steps however the run got to its checkpoint: a run stopped
    at step 2 and resumed with --save_steps 3 saves at 3 and 6 (and 7, the end), not 5 (2 + 3)."""
    out = train_run(tmp_path / "run", "--max_steps", "2", "--save_steps", "0")  # only the final save, at 2
    train_run(out, "--max_steps", "7", "--save_steps", "3", "--save_total_limit", "10", "--resume")
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == [
        "checkpoint-00000002", "checkpoint-00000003", "checkpoint-00000006", "checkpoint-00000007",
    ]  # fmt: skip


def test_save_steps_do_not_change_a_lora_dropout_run(train_run, tmp_path):
    """Saving merges LoRA into a copy of the model; with dropout on, the training must not notice."""
    flags = ["--max_steps", "3", "--freeze_policy", "lora", "--lora_dropout", "0.1", "--learning_rate", "1e-2"]
    saving = train_run(tmp_path / "saving", *flags, "--save_steps", "1")
    quiet = train_run(tmp_path / "quiet", *flags, "--save_steps", "0")
    expected = [without_timings(r) for r in read_metrics(quiet)]
    assert [without_timings(r) for r in read_metrics(saving)] == expected
    assert expected[1]["loss"] != expected[2]["loss"]


def _sample_steps(output_dir) -> list[int]:
    text = (output_dir / "samples.log").read_text()
    return [int(line.split()[2]) for line in text.splitlines() if line.startswith("-" * 20 + " step ")]


def test_samples_log_is_cut_back_on_resume_and_emptied_on_overwrite(train_run, tmp_path):
    flags = ["--save_steps", "2", "--sample_log_steps", "1"]
    out = train_run(tmp_path / "run", "--max_steps", "4", *flags)
    assert _sample_steps(out) == [1, 2, 3, 4]
    # A kill -9 just before the final save: steps 3 and 4 were logged, the last checkpoint is step 2.
    shutil.rmtree(out / "checkpoint-00000004")
    train_run(out, "--max_steps", "4", *flags, "--resume")
    assert _sample_steps(out) == [1, 2, 3, 4]  # each step once
    train_run(out, "--max_steps", "1", *flags, "--overwrite_output_dir")
    assert _sample_steps(out) == [1]


# --- the KL reference of a resumed run is the one it started with ---


def test_resume_keeps_the_reference_the_run_started_with(train_run, tmp_path):
    """The reference is the stage's starting point (--init_from). Resuming must use that exact
    model, whatever --init_from says now: omitted, or a folder that gained a newer checkpoint."""
    sft = train_run(tmp_path / "sft", "--max_steps", "2", stage="sft")
    grpo = ["--beta", "0.04", "--save_steps", "1", "--learning_rate", "1e-2"]
    straight = train_run(tmp_path / "straight", "--max_steps", "4", "--init_from", str(sft), *grpo)
    resumed = train_run(tmp_path / "resumed", "--max_steps", "2", "--init_from", str(sft), *grpo)
    train_run(sft, "--max_steps", "4", "--resume", stage="sft")  # the SFT folder gains checkpoint 4
    train_run(resumed, "--max_steps", "3", "--resume", *grpo)  # no --init_from
    train_run(resumed, "--max_steps", "4", "--resume", "--init_from", str(sft), *grpo)  # sft now means step 4

    expected = [without_timings(r) for r in read_metrics(straight)]
    assert [without_timings(r) for r in read_metrics(resumed)] == expected
    assert expected[3]["kl"] > 0  # the KL term is live, so the match means something

    # Another starting point on the command line: refused, naming both.
    newer = sft / "checkpoint-00000004"
    with pytest.raises(ValueError, match=r"--init_from .*checkpoint-00000004.* but the run started from .*checkpoint-00000002"):
        train_run(resumed, "--max_steps", "5", "--resume", "--init_from", str(newer), *grpo)
    # The recorded reference changed on disk (another run saved over it): refused.
    recorded = sft / "checkpoint-00000002" / "model"
    for weights in recorded.glob("*.safetensors"):
        shutil.copy(newer / "model" / weights.name, weights)
    with pytest.raises(ValueError, match=r"the starting point .*checkpoint-00000002.* has changed since the run started"):
        train_run(resumed, "--max_steps", "5", "--resume", *grpo)
    # ... or is gone: refused.
    shutil.rmtree(sft / "checkpoint-00000002")
    with pytest.raises(ValueError, match=r"the starting point .*checkpoint-00000002.* is gone"):
        train_run(resumed, "--max_steps", "5", "--resume", *grpo)
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
