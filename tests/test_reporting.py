"""What a run shows while it trains: the --logging_steps line, --report_to tensorboard / wandb,
data loading output on rank 0 only, and `python -m grpo.plot RUN_DIR`.

The line is checked character by character on a hand-made record; the backends on real 2-step
runs of the tiny model, read back with TensorBoard's own EventAccumulator (and, for W&B in offline
mode, from the run file it writes). The 2-rank torchrun check is slow (tests/test_torchrun.py has
the others): OMP_NUM_THREADS=1 python -m pytest tests/test_reporting.py -q [-m slow]
"""

from __future__ import annotations

import pytest
from conftest import TORCHRUN, read_metrics, run_command, train_argv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# TensorBoard stores scalars as float32: rounding to nearest changes a value by at most 2^-24 of it.
FLOAT32_REL = 2.0**-24


def _event_accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})  # 0: keep all
    accumulator.Reload()
    return accumulator


def _metric_lines(text: str, stage: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"[{stage}] step ")]


# --- the metrics line ---


def test_the_metrics_line_of_a_grpo_record_by_hand():
    from grpo.runtime.reporting import metrics_line

    record = {
        "step": 20, "loss": 0.01234, "kl": 0.00314, "clip_frac_low": 0.0, "clip_frac_high": 0.0125,
        "entropy": 1.8744, "grad_norm": 0.5, "lr": 1e-5, "completion_length_mean": 31.25,
        "completion_length_max": 64.0, "rollout_tokens_per_second": 2210.4,
        "reward/format/mean": 0.5, "reward/format/std": 0.1, "reward/count_accuracy/mean": 0.4125,
        "reward/count_accuracy/std": 0.2, "reward/total/mean": 0.9125, "reward/total/std": 0.3,
    }  # fmt: skip
    # 1.4249 s/step -> "1.42"; 31.25 -> "31.2" (round half to even); the stds and grad_norm are
    # not on a GRPO line; the functions in the record's order.
    assert metrics_line("grpo", 20, 100, record, 1.4249) == (
        "[grpo] step 20/100 | reward 0.912 | format 0.500 | count_accuracy 0.412 | loss 0.0123 | kl 0.0031 | "
        "clip 0.000/0.013 | entropy 1.874 | length 31.2 (max 64) | 1.42 s/step | sampler 2210 tok/s"
    )


def test_the_metrics_line_of_an_sft_record_by_hand():
    from grpo.runtime.reporting import metrics_line

    record = {"step": 3, "loss": 6.8312, "grad_norm": 1.25, "lr": 3e-4, "tokens": 1200.0, "step_seconds": 0.5, "val_loss": float("nan")}
    # tokens / step_seconds = 1200 / 0.5 = 2400 tok/s; a NaN is printed as nan, not hidden.
    assert metrics_line("sft", 3, 10, record, None) == (
        "[sft] step 3/10 | loss 6.8312 | val_loss nan | grad_norm 1.250 | lr 3.00e-04 | 2400 tok/s"
    )


# --- the loops: the line every N steps, TensorBoard ---


def test_grpo_prints_a_line_per_step_and_tensorboard_reads_back_every_scalar(train_run, tmp_path, capsys):
    out = train_run(
        tmp_path / "grpo", "--max_steps", "2", "--beta", "0.04", "--save_steps", "0",
        "--report_to", "tensorboard", "--logging_steps", "1", "--sample_log_steps", "1",
    )  # fmt: skip
    lines = _metric_lines(capsys.readouterr().out, "grpo")
    assert [line.split(" | ")[0] for line in lines] == ["[grpo] step 1/2", "[grpo] step 2/2"]
    records = read_metrics(out)
    accumulator = _event_accumulator(out / "tensorboard")
    names = set(records[0]) - {"step"}
    assert set(accumulator.Tags()["scalars"]) == names  # the names of metrics.jsonl, all of them
    for name in names:
        events = accumulator.Scalars(name)
        assert [event.step for event in events] == [1, 2], name
        for event, record in zip(events, records, strict=True):
            assert event.value == pytest.approx(record[name], rel=FLOAT32_REL, abs=1e-45), name
    assert records[1]["kl"] > 0  # so the comparison above covers a value that is not 0
    # The samples.log blocks as text at each sample step, and the run config once.
    tensors = accumulator.Tags()["tensors"]
    assert "samples/text_summary" in tensors and "config/text_summary" in tensors
    assert [event.step for event in accumulator.Tensors("samples/text_summary")] == [1, 2]
    sample = accumulator.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "Completion:" in sample and "step 1" in sample
    # The config as hyperparameters: the HParams plugin's session start info holds every flag.
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["grpo/beta"].number_value == pytest.approx(0.04) and hparams["train/stage"].string_value == "grpo"  # TensorBoard's hparams hold float64; 0.04 round-trips to within an ulp


def test_sft_prints_every_nth_step_and_writes_tensorboard(train_run, tmp_path, capsys):
    out = train_run(
        tmp_path / "sft", "--max_steps", "3", "--save_steps", "0", "--report_to", "tensorboard",
        "--logging_steps", "2", stage="sft",
    )  # fmt: skip
    lines = _metric_lines(capsys.readouterr().out, "sft")
    assert len(lines) == 1 and lines[0].startswith("[sft] step 2/3 | loss ")  # 3 steps, every 2nd
    losses = [event.value for event in _event_accumulator(out / "tensorboard").Scalars("loss")]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(out)], rel=FLOAT32_REL)


def test_logging_steps_0_prints_no_line(train_run, tmp_path, capsys):
    train_run(tmp_path / "sft", "--max_steps", "1", "--save_steps", "0", "--logging_steps", "0", stage="sft")
    assert _metric_lines(capsys.readouterr().out, "sft") == []


def test_wandb_offline_writes_its_run_folder(train_run, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # in the dev extra; skipped only where it was not installed
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = train_run(tmp_path / "run", "--max_steps", "2", "--save_steps", "0", "--report_to", "wandb", "--sample_log_steps", "1")
    run_files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, sorted(p.name for p in (out / "wandb").iterdir())
    data = run_files[0].read_bytes()  # protobuf records: metric names and config keys are plain bytes
    assert b"reward/total/mean" in data and b"max_completion_length" in data


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--report_to", "tensorbord"], "--report_to 'tensorbord': use none, or a comma list of tensorboard, wandb"),
        (["--report_to", "none,wandb"], "--report_to 'none,wandb': use none"),
        (["--logging_steps", "-1"], "--logging_steps -1: must be >= 0"),
    ],
)
def test_bad_reporting_flags_exit_2_naming_the_flag(tmp_path, capsys, flags, message):
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(train_argv(tmp_path / "run", *flags))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_backend_package_exits_2_with_the_pip_command(tmp_path, capsys, monkeypatch):
    import importlib.util

    import train

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_argv(tmp_path / "run", "--report_to", "tensorboard,wandb"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--report_to wandb needs the wandb package" in err and "pip install -e '.[logging]'" in err
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


# --- data loading output: rank 0 only ---


def test_only_the_main_rank_shows_the_data_loading_bars(capfd):
    import datasets

    from data.loading import load_sft_datasets
    from grpo.config import parse_config

    config = parse_config(["--stage", "sft", "--num_examples", "8", "--max_eval_examples", "4"])
    load_sft_datasets(config, is_main=False)
    quiet = capfd.readouterr()
    load_sft_datasets(config, is_main=True)
    shown = capfd.readouterr()
    assert "reading synthetic" in shown.err and "[data] synthetic: 8 train / 4 validation" in shown.out
    assert "reading synthetic" not in quiet.err and quiet.out == ""
    assert datasets.is_progress_bar_enabled()  # put back for whatever this process loads next


# --- python -m grpo.plot ---


def test_training_seconds_by_hand():
    from grpo.plot import moving_average, training_seconds

    # GRPO, two optimizer steps per generation batch: within a batch rollout_seconds repeats and
    # update_seconds grows. Batch 1 ends at 2 + 1.5 = 3.5 s; batch 2 adds 3 + 0.7 and 3 + 1.2.
    grpo = [
        {"rollout_seconds": 2.0, "update_seconds": 1.0}, {"rollout_seconds": 2.0, "update_seconds": 1.5},
        {"rollout_seconds": 3.0, "update_seconds": 0.7}, {"rollout_seconds": 3.0, "update_seconds": 1.2},
    ]  # fmt: skip
    assert training_seconds(grpo) == pytest.approx([3.0, 3.5, 7.2, 7.7])  # float64 sums of a few logged seconds: a few ulps; approx's rel 1e-6 is far above
    assert training_seconds([{"step_seconds": 0.5}, {"step_seconds": 0.25}]) == [0.5, 0.75]  # SFT: running sum
    assert training_seconds([{"loss": 1.0}]) is None
    # window 2: [1], [1, 2], [2, 3], [3, 6] -> 1, 1.5, 2.5, 4.5
    assert moving_average([1.0, 2.0, 3.0, 6.0], 2) == [1.0, 1.5, 2.5, 4.5]


def test_plot_command_draws_a_runs_curves(grpo_run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the plot extra, which CI installs
    from grpo.plot import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_bytes((grpo_run_dir / "metrics.jsonl").read_bytes())
    written = main([str(run_dir)])
    assert written == run_dir / "curves.png"
    data = written.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000  # 7 panels x 2 axes, not a blank image
    assert "wrote" in capsys.readouterr().out


def test_plot_command_names_the_missing_metrics_file(tmp_path, capsys):
    from grpo.plot import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'metrics.jsonl'} not found" in capsys.readouterr().err


@pytest.mark.parametrize("metrics, output, message", [
    # Each was a traceback (JSONDecodeError, TypeError, FileNotFoundError after drawing, matplotlib's
    # ValueError), or (a folder, no suffix) 'wrote X' while matplotlib had written X.png.
    ('not json\n{"step": 1}\n', "curves.png", "metrics.jsonl: line 1 is not valid JSON"),
    ('{"step": 1, "loss": "x"}\n', "curves.png", "is not a metrics file train.py wrote (TypeError"),
    ('{"step": 1, "loss": 0.5}\n', "nodir/curves.png", "no folder {tmp}/nodir"),
    ('{"step": 1, "loss": 0.5}\n', "curves.txt", "--output {tmp}/curves.txt: give an image file name ending in .png"),
    ('{"step": 1, "loss": 0.5}\n', "curves", "--output {tmp}/curves: give an image file name"),
    ('{"step": 1, "loss": 0.5}\n', "run", "--output {tmp}/run: give an image file name"),  # the run folder itself
])  # fmt: skip
def test_plot_command_line_mistakes_exit_2_naming_the_problem(tmp_path, capsys, metrics, output, message):
    pytest.importorskip("matplotlib")  # the TypeError comes from drawing
    from grpo.plot import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(metrics)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "run"), "--output", str(tmp_path / output)])
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]  # nothing drawn anywhere


# --- the whole thing on two ranks ---


@pytest.mark.slow
def test_two_ranks_print_lines_and_write_events_from_rank_0_only(tmp_path):
    """torchrun with --redirects 3 keeps each rank's stdout and stderr in its own file."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    argv = train_argv(
        out, "--max_steps", "2", "--device", "cpu", "--save_steps", "0", "--report_to", "tensorboard",
        "--logging_steps", "1", "--no_progress_bar",
    )  # fmt: skip
    command = [*TORCHRUN, "--nproc_per_node", "2", "--standalone", "--log-dir", str(logs), "--redirects", "3", "train.py", *argv]
    # run_command: on a hang it stops the ranks too (subprocess.run would leave them loading the
    # machine); 900 s is a hang guard, not a speed check, as for the other torchrun tests.
    result = run_command(command, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    def rank_output(rank: int, stream: str) -> str:
        (path,) = logs.glob(f"*/attempt_0/{rank}/{stream}.log")
        return path.read_text()

    lines = _metric_lines(rank_output(0, "stdout"), "grpo")
    assert [line.split(" | ")[0] for line in lines] == ["[grpo] step 1/2", "[grpo] step 2/2"]
    assert _metric_lines(rank_output(1, "stdout"), "grpo") == []
    assert "reading synthetic" in rank_output(0, "stderr")
    assert "reading synthetic" not in rank_output(1, "stderr")
    (event_file,) = (out / "tensorboard").glob("events.out.tfevents.*")  # one writer: rank 0's
    kl = [event.value for event in _event_accumulator(out / "tensorboard").Scalars("kl")]
    assert kl == pytest.approx([r["kl"] for r in read_metrics(out)], rel=FLOAT32_REL)
