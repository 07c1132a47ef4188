"""eval.py on a checkpoint train.py saved: summary.json, samples.jsonl, greedy accuracy and pass@k.

The tiny model never answers a counting question, so "correct" is decided by
`reward_fns:even_parity` (an even number of characters): a deterministic, mixed outcome that lets
the tests recount the summary from samples.jsonl.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_eval_cli.py -q
"""

from __future__ import annotations

import json

import pytest
from conftest import latest_model_dir, run_script
from tolerances import FLOAT64_FORMULA

import eval as eval_script
from eval import wilson_interval

TINY_EVAL = [
    "--num_examples", "6", "--batch_size", "4", "--max_completion_length", "8", "--progress_bar", "false",
    "--accuracy_reward", "reward_fns:even_parity",
]  # fmt: skip


def _read(out):
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return summary, samples


def test_greedy_eval_of_a_saved_checkpoint(grpo_run_dir, tmp_path):
    out = tmp_path / "eval"
    eval_script.main(["--model", str(grpo_run_dir), "--output_dir", str(out), *TINY_EVAL])
    summary, samples = _read(out)
    assert summary["model"] == str(latest_model_dir(grpo_run_dir))  # a run dir means its latest checkpoint
    assert summary["num_examples"] == 6 and len(samples) == 6  # one line per example, batches of 4 + 2
    assert summary["num_samples"] == 1 and summary["decoding"] == "greedy"
    for sample in samples:
        assert set(sample) == {"question", "gold", "outputs", "extracted", "correct"}
        assert len(sample["outputs"]) == len(sample["correct"]) == 1
        assert sample["correct"] == [(len(sample["outputs"][0]) + int(sample["gold"])) % 2 == 0]
    correct = sum(sample["correct"][0] for sample in samples)
    assert 0 < correct < 6  # a mixed outcome, so the counts below are tested
    assert summary["accuracy"] == pytest.approx(correct / 6, rel=0, abs=FLOAT64_FORMULA)
    assert summary["accuracy_ci95"] == pytest.approx(list(wilson_interval(correct, 6)), rel=0, abs=FLOAT64_FORMULA)
    assert summary["accuracy_ci95"][0] <= summary["accuracy"] <= summary["accuracy_ci95"][1]
    assert summary["format_rate"] == 0.0  # random text never has the <think>/<answer> format
    assert summary["pass@1"] == pytest.approx(summary["accuracy"], rel=0, abs=FLOAT64_FORMULA)

    # Greedy decoding is deterministic: the checkpoint folder and its model/ give the same outputs.
    again = tmp_path / "again"
    eval_script.main(["--model", str(latest_model_dir(grpo_run_dir).parent), "--output_dir", str(again), *TINY_EVAL])
    assert _read(again)[1] == samples


def test_pass_at_two_with_sampling(grpo_run_dir, tmp_path):
    out = tmp_path / "eval"
    eval_script.main(["--model", str(grpo_run_dir), "--output_dir", str(out), "--num_samples", "2", *TINY_EVAL])
    summary, samples = _read(out)
    assert summary["num_samples"] == 2 and summary["num_examples"] == 6 and len(samples) == 6
    assert summary["decoding"].startswith("sampling (temperature 1.0")
    assert all(len(s["outputs"]) == len(s["correct"]) == len(s["extracted"]) == 2 for s in samples)
    passed = sum(any(s["correct"]) for s in samples)
    correct = sum(sum(s["correct"]) for s in samples)
    assert summary["pass@2"] == pytest.approx(passed / 6, rel=0, abs=FLOAT64_FORMULA)
    assert summary["accuracy"] == pytest.approx(correct / 12, rel=0, abs=FLOAT64_FORMULA)  # per sample, not per prompt
    # Each number has its own interval: pass@2's over the 6 prompts, accuracy's over its samples.
    assert summary["pass@2_ci95"] == pytest.approx(list(wilson_interval(passed, 6)), rel=0, abs=FLOAT64_FORMULA)
    per_prompt = [sum(s["correct"]) for s in samples]
    assert summary["accuracy_ci95"] == pytest.approx(list(eval_script.clustered_wilson_interval(per_prompt, 2)), rel=0, abs=FLOAT64_FORMULA)
    assert summary["pass@2"] >= summary["accuracy"] - 1e-12
    assert "pass@1" not in summary


def test_python_eval_py_entry_point(grpo_run_dir, tmp_path):
    out = tmp_path / "eval"
    ok = run_script(["eval.py", "--model", str(latest_model_dir(grpo_run_dir)), "--output_dir", str(out), *TINY_EVAL])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "accuracy" in ok.stdout and json.loads((out / "summary.json").read_text())["num_examples"] == 6


def test_a_bad_eval_flag_exits_2_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(["--eval_part", "holdout", "--output_dir", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    assert "eval.py: error: --eval_part 'holdout': use validation, test, train or all" in capsys.readouterr().err


def test_wilson_interval_holds_its_estimate_at_the_edges():
    # p = 6/6 = 1: the upper bound is 1 exactly (rounding used to give 0.9999999999999999)
    assert wilson_interval(6, 6)[1] == 1.0
    assert wilson_interval(0, 6)[0] == 0.0
    for correct in range(7):
        low, high = wilson_interval(correct, 6)
        assert low <= correct / 6 <= high


def test_eval_of_a_folder_without_a_model_says_what_it_expected(tmp_path, capsys):
    # Found before the model loads (it was a FileNotFoundError traceback from the loader).
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(["--model", str(tmp_path), "--output_dir", str(tmp_path / "eval"), *TINY_EVAL])
    assert exit_info.value.code == 2
    assert f"--model {tmp_path} holds no model: expected config.json" in capsys.readouterr().err


@pytest.mark.parametrize("function, error, message", [
    # NaN used to count as wrong (an accuracy below the truth), all-None as 0.000, a short list an IndexError.
    ("nan_for_the_second", ValueError, r"reward function 'nan_for_the_second' returned nan for completion 1; every reward must be a finite"),
    ("always_none", ValueError, r"--accuracy_reward always_none: returned None for every one of the 4 completions of examples 0-3"),
    ("wrong_length", ValueError, r"reward function 'wrong_length' returned 3 values for 4 completions"),
])  # fmt: skip
def test_eval_checks_the_accuracy_reward_as_training_does(tmp_path, function, error, message):
    argv = ["--model", "tiny", "--output_dir", str(tmp_path / "e"), *TINY_EVAL, "--accuracy_reward", f"reward_fns:{function}"]
    with pytest.raises(error, match=message):
        eval_script.main(argv)
    assert not (tmp_path / "e" / "summary.json").exists()  # no made-up accuracy written
