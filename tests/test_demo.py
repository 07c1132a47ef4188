"""The offline demo end to end on a tiny budget (`python -m grpo.demo --quick`).

The full-budget numbers are a benchmark recorded in the README, not a test: here we only check that
every stage ran through the real entry points and that the table, plot and report were written
from what the runs logged.
"""

from __future__ import annotations

import json

import pytest
from conftest import read_metrics, run_script


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = run_script(["-m", "grpo.demo", "--quick", "--output_dir", str(out)], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # GRPO went through torchrun's launcher (the real distributed entry point), and eval.py ran for
    # every model on both the in-distribution and the shifted set.
    assert "torch.distributed.run" in result.stdout
    for model in ("base", "sft", "grpo", "sft-continued"):
        for dataset in ("synthetic", "synthetic-shifted"):
            summary = json.loads((out / "eval" / f"{model}-{dataset}" / "summary.json").read_text())
            assert summary["num_examples"] == 16
            assert 0.0 <= summary["accuracy"] <= 1.0

    # The continued-SFT baseline resumed the SFT run and went past its last step.
    sft_steps = [m["step"] for m in read_metrics(out / "sft")]
    continued_steps = [m["step"] for m in read_metrics(out / "sft-continued")]
    assert continued_steps[: len(sft_steps)] == sft_steps
    assert continued_steps[-1] > sft_steps[-1]

    # The GRPO stage logged its reward for every step it ran.
    grpo_metrics = read_metrics(out / "grpo")
    assert [m["step"] for m in grpo_metrics] == [1, 2]
    assert all("reward/total/mean" in m and "reward/count_accuracy/mean" in m for m in grpo_metrics)

    report = (out / "report.md").read_text()
    for row in ("untrained tiny Qwen2.5-VL", "SFT -> GRPO", "SFT continued for GRPO's training time", "| total |"):
        assert row in report
    assert (out / "grpo_curves.png").stat().st_size > 10_000
    assert "| model |" in result.stdout  # the table was printed at the end
