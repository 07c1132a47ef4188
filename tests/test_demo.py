"""The offline demo end to end on a tiny budget (`python -m grpo.demo --quick`).

The full-budget numbers are a benchmark recorded in the README and docs/demo.md, not a test: here we
only check that every stage ran through the real entry points and that the report, the plot and
demo.json were written from what the runs logged.
"""

from __future__ import annotations

import json

import pytest
from conftest import read_metrics, run_script


@pytest.mark.slow
def test_quick_demo_runs_every_stage_for_two_seeds(tmp_path):
    out = tmp_path / "demo"
    result = run_script(["-m", "grpo.demo", "--quick", "--seeds", "0,1", "--output_dir", str(out)], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torch.distributed.run" in result.stdout  # GRPO went through torchrun's launcher

    for seed in (0, 1):
        run = out / f"seed-{seed}"
        # eval.py ran for every model on both test sets, and pass@k for SFT and GRPO
        for model in ("base", "sft", "grpo", "sft-continued"):
            for dataset in ("synthetic", "synthetic-shifted"):
                summary = json.loads((run / "eval" / f"{model}-{dataset}" / "summary.json").read_text())
                assert summary["num_examples"] == 16 and summary["eval_part"] == "test"
                assert 0.0 <= summary["accuracy"] <= 1.0
        for model in ("sft", "grpo"):
            assert json.loads((run / "eval" / f"{model}-pass2" / "summary.json").read_text())["num_samples"] == 2

        # SFT logged validation accuracy and stopped at its plateau (patience 1 of the quick budget,
        # an untrained model's accuracy never rises: it stops at the second evaluation, step 4).
        sft = read_metrics(run / "sft")
        assert [m["step"] for m in sft if "val_accuracy" in m] == [2, 4]
        record = json.loads((run / "demo.json").read_text())
        # The baseline resumed from the SFT model (the best checkpoint) and went past it.
        continued = read_metrics(run / "sft-continued")
        assert [m["step"] for m in continued][: record["plateau_step"]] == list(range(1, record["plateau_step"] + 1))
        assert continued[-1]["step"] == record["plateau_step"] + record["extra_sft_steps"]
        # GRPO logged its reward at every step, and its checkpoints were evaluated for the curve.
        grpo = read_metrics(run / "grpo")
        assert [m["step"] for m in grpo] == [1, 2]
        assert all("reward/count_accuracy/mean" in m for m in grpo)
        assert [p["step"] for p in record["grpo_curve"]] == [1, 2]
        # GRPO and continued SFT are judged at their last step, and that is what the test scenes ran on.
        assert record["grpo_step"] == 2
        assert record["continued_step"] == record["plateau_step"] + record["extra_sft_steps"]
        grpo_summary = json.loads((run / "eval" / "grpo-synthetic" / "summary.json").read_text())
        assert f"checkpoint-{record['grpo_step']:08d}" in grpo_summary["model"]

    report = (out / "report.md").read_text()
    for text in ("untrained tiny Qwen2.5-VL", "SFT -> GRPO", "SFT continued for GRPO's training time",
                 "## Over the seeds", "| seed 0 | seed 1 |", "Machine:", "commit"):
        assert text in report
    assert (out / "demo_curves.png").stat().st_size > 10_000
    for seed in (0, 1):  # each GRPO run's diagnostics, drawn by grpo/plot.py
        assert (out / f"seed-{seed}" / "grpo_curves.png").stat().st_size > 10_000
    assert "## Per seed" in result.stdout  # the report was printed at the end


def test_demo_refuses_a_foreign_output_dir_before_any_work(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep")
    result = run_script(["-m", "grpo.demo", "--quick", "--output_dir", str(foreign)], timeout=120)
    assert result.returncode == 2
    assert "not an earlier demo's output" in result.stderr
    assert (foreign / "data.txt").read_text() == "keep"
    assert sorted(p.name for p in foreign.iterdir()) == ["data.txt"]
