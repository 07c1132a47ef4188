"""The pieces the demo is built from, each on its own: the imperfect demonstrator, the count-aloud
trace, SFT's early stopping on validation accuracy, the test part, and the output_dir guard."""

from __future__ import annotations

import json

import pytest
from conftest import read_metrics

from data.synthetic import make_counting_dataset, make_example
from grpo.validation import EarlyStopping


def test_blind_demonstrator_leaves_out_exactly_the_gray_objects_and_keeps_the_scene():
    plain = make_counting_dataset(40, 3, count_range=(1, 6))
    blind = make_counting_dataset(40, 3, count_range=(1, 6), demonstrator_misses="gray")
    wrong = 0
    for a, b in zip(plain, blind, strict=True):
        objects = json.loads(a["objects"])
        gray = sum(o["color"] == "gray" for o in objects)
        assert b["images"][0].tobytes() == a["images"][0].tobytes()  # the same scene, pixel for pixel
        assert b["question"] == a["question"] and b["count"] == a["count"] == len(objects)
        assert int(a["answer"]) == len(objects)
        assert int(b["answer"]) == len(objects) - gray  # the demonstrator's count
        assert ("gray" in b["thinking"]) is False
        wrong += gray > 0
    # With 1-6 objects in 8 colours, a scene holds a gray object with probability
    # mean over n of 1 - (7/8)^n = 0.36: some but not all of 40 demonstrations are wrong.
    assert 0 < wrong < 40


def test_blind_demonstrator_is_checked():
    with pytest.raises(ValueError, match="not a colour"):
        make_counting_dataset(2, demonstrator_misses="grey")
    with pytest.raises(ValueError, match="total"):
        make_counting_dataset(2, question_kinds=("by_color",), demonstrator_misses="gray")


def test_count_aloud_trace_says_one_number_per_object():
    example = make_example(0, 5, count_range=(4, 4), trace="count_aloud")
    assert example["thinking"] == "I count the objects one by one: 1, 2, 3, 4. That makes 4."
    assert example["answer"] == "4"
    assert make_example(0, 5, count_range=(4, 4), trace="none")["thinking"] is None
    with pytest.raises(ValueError, match="trace"):
        make_counting_dataset(1, trace="by_colour")


def test_early_stopping_by_hand():
    # patience 2, min_delta 0.05: 0.20 (best) -> 0.24 (+0.04, not enough: 1) -> 0.30 (+0.10 over
    # 0.20: new best, 0) -> 0.33 (+0.03: 1) -> 0.31 (2: stop).
    stopping = EarlyStopping(patience=2, min_delta=0.05)
    decisions = [stopping.update(step, value) for step, value in
                 [(100, 0.20), (200, 0.24), (300, 0.30), (400, 0.33), (500, 0.31)]]
    assert decisions == [False, False, False, False, True]
    assert stopping.state() == {"best": 0.30, "best_step": 300, "evaluations_since_best": 2}
    # the state round-trips (it travels in the checkpoint), and patience 0 never stops
    resumed = EarlyStopping(2, 0.05, stopping.state())
    assert resumed.update(600, 0.30) is True
    assert not any(EarlyStopping(0, 0.0).update(s, 0.0) for s in range(5))


def test_sft_stops_at_its_plateau_and_says_so(train_run, tmp_path):
    # The untrained tiny model never writes an answer: validation accuracy is 0 at every evaluation,
    # so after the first (the best so far) two more without a rise make the plateau: step 6 of 40.
    out = train_run(
        tmp_path / "sft", "--max_steps", "40", "--eval_steps", "2", "--eval_accuracy_reward", "count_accuracy",
        "--early_stopping_patience", "2", "--save_steps", "0", "--learning_rate", "1e-6", stage="sft",
    )
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["val_accuracy"] for r in records if "val_accuracy" in r] == [0.0, 0.0, 0.0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000006"]


def test_early_stopping_needs_an_accuracy_to_watch(train_run, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        train_run(tmp_path / "sft", "--max_steps", "4", "--early_stopping_patience", "2", stage="sft")
    assert stopped.value.code == 2


def test_the_test_part_is_a_third_stream():
    from data.loading import load_eval_dataset
    from grpo.config import DataArguments

    args = DataArguments(num_examples=3, demonstrator_misses="gray")
    validation, _ = load_eval_dataset(args, part="validation", seed=0)
    test, _ = load_eval_dataset(args, part="test", seed=0)
    assert validation["question"] != test["question"] or validation["objects"] != test["objects"]
    # held-out parts keep the true answers even when the demonstrations are imperfect
    assert all(int(row["answer"]) == row["count"] for row in [*validation, *test])
    with pytest.raises(ValueError, match="synthetic"):
        load_eval_dataset(DataArguments(dataset="some/hub-name"), part="test", seed=0)


def test_demo_refuses_a_folder_it_did_not_create(tmp_path):
    from grpo.demo.pipeline import MARKER, prepare_output_dir

    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as stopped:
        prepare_output_dir(precious)
    assert stopped.value.code == 2
    assert (precious / "notes.txt").read_text() == "keep me"
    # an earlier demo's folder (it has the marker) is emptied and reused
    earlier = tmp_path / "demo"
    prepare_output_dir(earlier)
    (earlier / "old.log").write_text("old")
    prepare_output_dir(earlier)
    assert sorted(p.name for p in earlier.iterdir()) == [MARKER]


def test_an_unknown_eval_accuracy_reward_exits_2_before_the_model_loads(tmp_path, capsys):
    import train

    with pytest.raises(SystemExit) as stopped:
        train.main(["--stage", "sft", "--output_dir", str(tmp_path / "sft"), "--eval_accuracy_reward", "no_such_reward"])
    assert stopped.value.code == 2
    assert "--eval_accuracy_reward" in capsys.readouterr().err
    assert not (tmp_path / "sft").exists()  # nothing was written: the check ran before loading


def test_every_arm_is_chosen_by_its_best_validation_accuracy():
    from grpo.demo.pipeline import best_step

    points = [{"step": 20, "accuracy": 0.70}, {"step": 40, "accuracy": 0.81},
              {"step": 60, "accuracy": 0.81}, {"step": 80, "accuracy": 0.78}]
    assert best_step(points, "accuracy") == 40  # the best; the earliest of a tie (40 and 60)
    assert best_step(points[2:], "accuracy") == 60


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,0"], "--seeds '0,0': a seed is given twice"),  # ran seed 0, then FileExistsError
    (["--output_dir", "{file}"], "is a file, not a folder"),  # NotADirectoryError traceback
    (["--output_dir", ""], "--output_dir is empty"),
    # Each failed a later stage only after the earlier ones had run (--beta nan: after the SFT stage).
    (["--beta", "nan"], "--beta nan must be finite and >= 0"),
    (["--nproc", "0"], "--nproc 0: must be >= 1"),
    (["--sft_eval_steps", "0"], "--sft_eval_steps 0: must be >= 1"),  # range() arg 3 must not be zero
    (["--grpo_prompts", "1", "--num_generations", "5"], "--grpo_prompts 1 x --num_generations 5 must be even"),
    (["--demonstrator_misses", "pink"], "--demonstrator_misses 'pink' is not a colour"),
    (["--count_max", "17"], "--count_max 17: the grid layout holds at most 16 objects"),
])  # fmt: skip
def test_demo_command_line_mistakes_exit_2_before_any_work(tmp_path, capsys, argv, message):
    from grpo.demo.pipeline import parse_args

    (tmp_path / "a-file").write_text("not a folder")
    argv = [arg.format(file=tmp_path / "a-file") for arg in argv]
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
