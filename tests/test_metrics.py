"""JSONL metrics (flushing, crash recovery, resume truncation) and sample blocks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from grpo.runtime.metrics import MetricsLogger, SampleLogger, read_metrics


def test_metrics_logger_writes_one_float_line_per_step(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"  # the folder is created
    logger = MetricsLogger(path)
    logger.log(1, {"loss": torch.tensor(0.5), "reward/total/mean": np.float32(0.25), "count": 3})
    # Flushed on every write: another reader sees the line before close().
    assert json.loads(path.read_text()) == {"step": 1, "loss": 0.5, "reward/total/mean": 0.25, "count": 3.0}
    logger.log(2, {"loss": 0.125, "kl": float("nan")})
    logger.close()
    records = read_metrics(path)
    assert [record["step"] for record in records] == [1, 2]
    assert isinstance(records[0]["count"], float)
    assert math.isnan(records[1]["kl"])


def test_metrics_logger_rejects_non_scalars(tmp_path):
    logger = MetricsLogger(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match=r"metric 'per_token' is a tensor of shape \(2,\)"):
        logger.log(1, {"per_token": torch.ones(2)})
    with pytest.raises(TypeError, match="metric 'name' is a str"):
        logger.log(1, {"name": "x"})
    with pytest.raises(ValueError, match="'step' is reserved"):
        logger.log(1, {"step": 3})
    logger.close()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(2, {"loss": 1.0})


def test_disabled_logger_writes_nothing(tmp_path):
    with MetricsLogger(tmp_path / "m.jsonl", enabled=False) as logger:
        assert logger.log(1, {"loss": 1.0}) == {"step": 1, "loss": 1.0}
        assert logger.truncate_after(0) == 0
    assert not (tmp_path / "m.jsonl").exists()


def test_reopen_appends_and_drops_a_crash_half_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as logger:
        logger.log(1, {"loss": 1.0})
    with open(path, "a") as file:
        file.write('{"step": 2, "lo')  # the process died mid-write
    assert [r["step"] for r in read_metrics(path)] == [1]  # readers skip it too
    with MetricsLogger(path) as logger:  # resuming appends, never truncates
        logger.log(2, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert path.read_text().count("\n") == 2


def test_truncate_after_removes_steps_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as logger:
        for step in range(1, 8):
            logger.log(step, {"loss": float(step)})
    # The run saved checkpoint-5, logged steps 6 and 7, then died. Resuming from 5:
    with MetricsLogger(path) as logger:
        assert logger.truncate_after(5) == 2
        logger.log(6, {"loss": 60.0})
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # no duplicates
    assert records[-1]["loss"] == 60.0
    with MetricsLogger(path) as logger:  # a fresh run (steps from 1) starts from an empty file
        assert logger.truncate_after(0) == 6
    assert path.read_text() == ""


def test_sample_logger_blocks_every_n_steps(tmp_path):
    path = tmp_path / "samples.log"
    samples = SampleLogger(path, every=2)
    kwargs = dict(
        question="How many objects?",
        answer="3",
        completion="<think>one, two, three</think><answer>3</answer>",
        rewards={"format": 1.0, "count_accuracy": torch.tensor(1.0)},
    )
    assert not samples.should_log(1)
    assert samples.maybe_log(1, **kwargs) is None
    text = samples.maybe_log(2, advantage=0.75, **kwargs)
    assert text == (
        "-------------------- step 2 --------------------\n"
        "Question:\nHow many objects?\n"
        "Gold answer:\n3\n"
        "Completion:\n<think>one, two, three</think><answer>3</answer>\n"
        "Extracted:\n3\n"
        "Rewards: format=1.000  count_accuracy=1.000\n"
        "Advantage: 0.750\n\n"
    )
    samples.maybe_log(4, **kwargs)
    assert path.read_text().count("step ") == 2  # steps 2 and 4
    assert not SampleLogger(tmp_path / "off.log", every=0).should_log(10)
    assert SampleLogger(tmp_path / "rank1.log", every=1, enabled=False).maybe_log(1, **kwargs) is None
    assert not (tmp_path / "rank1.log").exists()


def test_sample_logger_truncate_after_keeps_blocks_up_to_the_step(tmp_path):
    """A resumed run rewrites the blocks after its checkpoint; a fresh run (step 0) empties the file."""
    path = tmp_path / "samples.log"
    samples = SampleLogger(path, every=1)
    kwargs = dict(question="q", answer="3", completion="c", rewards={"format": 0.0})
    blocks = [samples.maybe_log(step, **kwargs) for step in (1, 2, 3, 4)]
    assert samples.truncate_after(2) == 2  # blocks 3 and 4 dropped
    assert path.read_text() == blocks[0] + blocks[1]
    samples.maybe_log(3, **kwargs)
    assert path.read_text() == blocks[0] + blocks[1] + blocks[2]  # step 3 once, after step 2
    assert samples.truncate_after(0) == 3
    assert path.read_text() == ""
    assert SampleLogger(tmp_path / "none.log", every=1).truncate_after(5) == 0  # no file: nothing to do
