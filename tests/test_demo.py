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
        for model in ("base", "sft", "grpo", "sft-continued", "rft", "filtered", "answer-only"):
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

        # RFT sampled G = 4 completions of exactly the 2 steps x 2 ranks x 2 prompts GRPO consumed.
        rft_samples = json.loads((run / "eval" / "rft-samples" / "summary.json").read_text())
        assert rft_samples["num_examples"] == 8 and rft_samples["num_samples"] == 4
        assert record["rft"]["samples"] == 32
        rft_summary = json.loads((run / "eval" / "rft-synthetic" / "summary.json").read_text())
        if record["rft"]["kept"]:  # trained on what it kept, from the SFT model, for continued SFT's steps
            assert read_metrics(run / "rft")[-1]["step"] == record["extra_sft_steps"]
            assert f"checkpoint-{record['extra_sft_steps']:08d}" in rft_summary["model"]
        else:  # the quick SFT model rarely writes a right answer: nothing kept, RFT is the SFT model
            assert f"checkpoint-{record['plateau_step']:08d}" in rft_summary["model"]
        # Answer-only SFT: from the SFT model, on the 8 prompts, for continued SFT's steps.
        assert read_metrics(run / "answer-only")[-1]["step"] == record["extra_sft_steps"]
        # Filtered demonstrations: only the right ones, the SFT schedule, checkpoints judged on validation.
        assert 0 < record["filtered"]["kept"] < record["filtered"]["demonstrations"] == 64
        assert [p["step"] for p in record["filtered"]["curve"]] == [2, 4]
        filtered_summary = json.loads((run / "eval" / "filtered-synthetic" / "summary.json").read_text())
        assert f"filtered/checkpoint-{record['filtered']['step']:08d}" in filtered_summary["model"]

    report = (out / "report.md").read_text()
    for text in ("untrained tiny Qwen2.5-VL", "SFT -> GRPO", "SFT continued for GRPO's training time",
                 "SFT -> RFT", "SFT on the correct demonstrations only", "answer-only SFT", "95% t interval",
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


@pytest.mark.slow
def test_sigterm_to_the_demo_stops_its_running_stage_too(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, _descendants, subprocess_env

    out = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-m", "grpo.demo", "--quick", "--output_dir", str(out)], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "seed-0" / "sft.log").exists():  # the SFT stage (train.py) has started
            assert demo.poll() is None and time.monotonic() < deadline, "the demo never reached its SFT stage"
            time.sleep(0.5)
        stages = _descendants(demo.pid)
        assert stages  # train.py runs below the demo
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=120) == 128 + signal.SIGTERM
        alive = [pid for pid in stages if os.path.exists(f"/proc/{pid}") and
                 open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        assert alive == []  # before the fix, train.py lived on, orphaned
    finally:
        for pid in [*_descendants(demo.pid), demo.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
