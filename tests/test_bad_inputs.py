"""Bad input found early and named: flags, config files, model paths, output folders, images, rows.

Each case is one a hostile test run found (non-finite flags, a YAML list where a number goes, an
image the Qwen processor rejects only at the step that samples it, a full disk during a save ...).
Each must end in a clear error naming the flag, file or row (exit 2, before the model loads, when
it is the command line's fault) or in a counted skip. docs/troubleshooting.md is the user's side.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_bad_inputs.py -q
"""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import os
import re

import datasets
import pytest
import torch
from conftest import latest_model_dir, load_saved_model, read_metrics, train_argv, without_timings
from PIL import Image
from tolerances import FLOAT64_FORMULA

import eval as eval_script
import train


def _png(size=(56, 56), color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _save_dataset(path, rows: int, *, answers=None, sizes=None) -> str:
    """A save_to_disk counting dataset (image, problem, solution); row i's question ends in "(i)"."""
    sizes = sizes or {}
    columns = {
        "image": [{"bytes": _png(sizes.get(i, (56, 56))), "path": None} for i in range(rows)],
        "problem": [f"How many objects are there in the image? ({i})" for i in range(rows)],
        "solution": [f"<answer> {a} </answer>" for a in (answers or [str(i % 5 + 1) for i in range(rows)])],
    }
    features = {"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")}
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(path))
    return str(path)


@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading a model fail the test: the error under test must come before it."""
    import eval as eval_cli
    import grpo.runtime.policy
    import models.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    # load_policy, in its module and where train.py (through the policy) and eval.py call it
    for module in (models.loading, grpo.runtime.policy, eval_cli):
        monkeypatch.setattr(module, "load_policy", refuse)


def _exit_2(argv, capsys, main=train.main) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --- item 9: non-finite and out-of-range numbers ---

BAD_NUMBERS = [
    (["--beta", "nan"], "--beta nan"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--learning_rate", "inf"], "--learning_rate inf"),
    (["--epsilon_high", "inf"], "--epsilon_high inf"),
    (["--top_p", "nan"], "--top_p nan"),
    (["--adam_beta2", "nan"], "--adam_beta2 nan"),
    (["--lora_alpha", "inf"], "--lora_alpha inf"),
    (["--val_fraction", "nan"], "--val_fraction"),
    (["--reward_functions", "format,count_accuracy", "--reward_weights", "nan,1"], "--reward_weights"),
    (["--reward_functions", "format,count_accuracy", "--reward_weights", "a,b"], "--reward_weights 'a,b'"),
    (["--max_grad_norm", "-1"], "--max_grad_norm -1"),
    (["--max_grad_norm", "nan"], "--max_grad_norm nan"),
    (["--weight_decay", "-1"], "--weight_decay -1"),
    (["--warmup_steps", "10", "--max_steps", "5"], "--warmup_steps 10"),
    (["--image_size", "0"], "--image_size 0"),
    (["--num_examples", "0"], "--num_examples 0"),
    (["--adam_epsilon", "0"], "--adam_epsilon 0"),
    (["--sample_log_steps", "-1"], "--sample_log_steps -1: must be >= 0"),  # was read as 0, without a word
    (["--synthetic_layout", "spiral"], "--synthetic_layout 'spiral': use one of scatter, grid"),
    (["--synthetic_layout", "grid", "--count_max", "17"], "--count_max 17: the grid layout holds at most 16 objects"),
    (["--delta", "0.5"], "--delta 0.5"),
    (["--off_policy_mask_threshold", "-1"], "--off_policy_mask_threshold -1"),
    (["--loss_type", "sapo", "--sapo_temperature_pos", "0"], "--sapo_temperature_pos 0"),
    (["--loss_type", "vespo", "--vespo_lambda_pos", "nan"], "--vespo_lambda_pos nan"),
    (["--sampler_correction", "token_mask", "--sampler_correction_min", "5"], "--sampler_correction_min 5"),
]


@pytest.mark.parametrize("flags, message", BAD_NUMBERS, ids=[" ".join(flags[-2:]) for flags, _ in BAD_NUMBERS])
def test_bad_numbers_exit_2_naming_the_flag(tmp_path, capsys, no_model_load, flags, message):
    err = _exit_2(train_argv(tmp_path / "run", *flags), capsys)
    assert message in err
    assert not (tmp_path / "run").exists()


def test_a_non_finite_logit_stops_the_sampler_with_a_message_that_says_so():
    from grpo.engine.sampling import sample_next_token

    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]])  # [R=2, V=3], row 1 broken
    for method in ("inverse_cdf", "multinomial"):
        with pytest.raises(FloatingPointError, match=r"non-finite logits \(NaN or inf\) in 1 of 2 rows"):
            sample_next_token(logits, temperature=1.0, top_p=1.0, top_k=0, generator=torch.Generator(), method=method)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        sample_next_token(logits, temperature=0.0, top_p=1.0, top_k=0, generator=None)


# --- item 10: config files ---


@pytest.mark.parametrize(
    "text, suffix, message",
    [
        ("beta: [1, 2]\n", ".yaml", "--config {path}: beta: expected a float, got the list [1, 2]"),
        ("per_device_prompts: 2.5\n", ".yaml", "--config {path}: per_device_prompts: expected an integer, got 2.5"),
        ("beta: 0.1\n  oops: [\n", ".yaml", "--config {path}: not valid YAML"),
        ('{"beta": 0.1,', ".json", "--config {path}: not valid JSON"),
        ("- 1\n- 2\n", ".yaml", "--config {path}: expected a mapping of flag names to values"),
        ("resume: maybe\n", ".yaml", "--config {path}: resume: expected true or false, got 'maybe'"),
    ],
    ids=["list-for-float", "float-for-int", "bad-yaml", "bad-json", "not-a-mapping", "bad-bool"],
)
def test_a_malformed_config_file_names_the_file_and_field(tmp_path, capsys, no_model_load, text, suffix, message):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    err = _exit_2([*train_argv(tmp_path / "run"), "--config", str(path)], capsys)
    assert message.format(path=path) in err


def test_a_missing_config_file_is_named(tmp_path, capsys, no_model_load):
    err = _exit_2([*train_argv(tmp_path / "run"), "--config", str(tmp_path / "nope.yaml")], capsys)
    assert f"--config {tmp_path / 'nope.yaml'}: no such file" in err
    err = _exit_2([*train_argv(tmp_path / "run"), "--config", ""], capsys)  # was skipped: a run on the defaults
    assert "--config is empty (an unset shell variable?)" in err


def test_config_file_values_of_the_right_type_still_parse(tmp_path):
    from grpo.config import parse_config

    path = tmp_path / "run.yaml"
    # An int where a float goes is fine (YAML writes 1 for 1.0); null for an optional field too.
    path.write_text("beta: 1\nper_device_prompts: 2\nnum_generations: 4\nmicro_batch_size: 8\nmax_prompt_length: null\n")
    config = parse_config(["--config", str(path)])
    assert config.grpo.beta == 1.0 and isinstance(config.grpo.beta, float)
    assert config.grpo.per_device_prompts == 2 and config.data.max_prompt_length is None


# --- item 10: reward specs, model paths and the output folder, all before the model loads ---


@pytest.mark.parametrize(
    "spec, message",
    [
        ("reward_fns:nope", "module 'reward_fns' has no attribute 'nope'"),
        ("no_such_module:reward", "cannot import module 'no_such_module'"),
        ("counting", "unknown reward 'counting'"),
    ],
)
def test_reward_spec_errors_exit_2_before_the_model_loads(tmp_path, capsys, no_model_load, spec, message):
    err = _exit_2(train_argv(tmp_path / "run", "--reward_functions", spec), capsys)
    assert "--reward_functions" in err and message in err


def test_a_model_path_that_does_not_exist_says_so(tmp_path, capsys, no_model_load):
    err = _exit_2(train_argv(tmp_path / "run", "--model", str(tmp_path / "nonexistent")), capsys)
    assert f"--model {tmp_path / 'nonexistent'}: no such directory" in err
    err = _exit_2(train_argv(tmp_path / "run", "--init_from", str(tmp_path / "nonexistent")), capsys)
    assert f"--init_from {tmp_path / 'nonexistent'}: no such directory" in err
    err = _exit_2(["--model", str(tmp_path / "nonexistent"), "--output_dir", str(tmp_path / "e")], capsys, eval_script.main)
    assert "no such directory" in err


@pytest.mark.parametrize("flag", ["--model", "--init_from"])
def test_a_folder_that_holds_no_qwen2_5_vl_exits_2_before_the_model_loads(tmp_path, capsys, no_model_load, flag):
    # Each was a traceback from the loader, after --output_dir was made (and it said --model for --init_from).
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{oops")
    (tmp_path / "empty").mkdir()
    err = _exit_2(train_argv(tmp_path / "run", flag, str(tmp_path / "bert")), capsys)
    assert f"{flag} {tmp_path / 'bert'}: {tmp_path / 'bert' / 'config.json'} has model_type 'bert', but this trainer expects a Qwen2.5-VL" in err
    err = _exit_2(train_argv(tmp_path / "run", flag, str(tmp_path / "broken")), capsys)
    assert f"{flag} {tmp_path / 'broken'}: cannot read {tmp_path / 'broken' / 'config.json'}" in err
    err = _exit_2(train_argv(tmp_path / "run", flag, str(tmp_path / "empty")), capsys)
    assert f"{flag} {tmp_path / 'empty'} holds no model: expected config.json" in err
    assert not (tmp_path / "run").exists()


def test_a_hub_id_that_cannot_be_reached_offline_says_so(tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    err = _exit_2(train_argv(tmp_path / "run", "--model", "someone/not-cached-model"), capsys)
    assert "--model someone/not-cached-model" in err and "offline" in err and "not in the local cache" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_found_before_the_model_loads(tmp_path, capsys, no_model_load):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        err = _exit_2(train_argv(parent / "run"), capsys)
        assert f"--output_dir {parent / 'run'}: cannot write in {parent}" in err
    finally:
        parent.chmod(0o755)


def test_an_output_dir_under_a_file_is_found_before_the_model_loads(tmp_path, capsys, no_model_load):
    # Runs as root too (root ignores folder permissions): a file where a folder must be.
    (tmp_path / "taken").write_text("a file")
    err = _exit_2(train_argv(tmp_path / "taken" / "run"), capsys)
    assert f"--output_dir {tmp_path / 'taken' / 'run'}: {tmp_path / 'taken'} is a file, not a folder" in err


def test_a_full_disk_during_a_save_names_the_output_dir_and_what_was_kept(tmp_path, train_run, monkeypatch):
    import grpo.runtime.checkpoint

    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        if not isinstance(path, io.BytesIO):  # in-memory saves (the loadability check) use no disk
            calls.append(path)
        if len(calls) >= 2:  # the second checkpoint's trainer state does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(grpo.runtime.checkpoint.torch, "save", save_until_the_disk_fills)
    out = tmp_path / "run"
    with pytest.raises(OSError, match=r"no space left on the device of --output_dir .*run while saving step 2") as error:
        train_run(out, "--max_steps", "3", "--save_steps", "1")
    assert "checkpoint-00000001 (step 1) is kept" in str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]  # the half-written save is gone
    load_saved_model(latest_model_dir(out))  # and the kept one loads


# --- item 10: the gold-answer check names rows of the file ---


def test_the_gold_answer_check_names_the_row_of_the_file(tmp_path, train_run, capsys):
    answers = [str(i % 5 + 1) for i in range(20)]
    answers[2] = answers[13] = "blue"  # rows 2 and 13 of the file
    source = _save_dataset(tmp_path / "data", rows=20, answers=answers)
    # The default --val_fraction shuffles before splitting: positions no longer match rows.
    # A bad row is the input's fault: exit 2 with the message, no traceback (data.sources.DataError).
    message = _exit_2(train_argv(tmp_path / "run", "--dataset", source, "--reward_functions", "count_accuracy"), capsys)
    assert "the gold answer of row" in message
    row = int(re.search(r"row (\d+) of --dataset", message).group(1))
    assert row in (2, 13)
    assert f"question 'How many objects are there in the image? ({row})'" in message  # that row's question


# --- item 5: images the Qwen processor rejects ---


def test_an_image_with_an_aspect_ratio_over_200_is_skipped_and_counted(tmp_path, train_run):
    from data.sources import load_examples

    # 1000 x 4 px decodes, but Qwen's smart_resize refuses aspect ratios over 200 (here 250).
    source = _save_dataset(tmp_path / "data", rows=12, sizes={3: (1000, 4), 7: (4, 1000)})
    with pytest.warns(UserWarning, match=r"skipped 2 of 12 rows .*aspect ratio"):
        dataset, report = load_examples(source)
    assert report.skipped_images == 2 and len(dataset) == 10
    assert 3 not in dataset["source_row"] and 7 not in dataset["source_row"]
    with pytest.warns(UserWarning, match="skipped 2 of 12 rows"):
        out = train_run(tmp_path / "run", "--dataset", source, "--max_steps", "2")
    assert [r["skipped_images"] for r in read_metrics(out)] == [2, 2]


def test_an_image_that_max_pixels_shrinks_past_ratio_200_is_skipped_at_load(tmp_path, train_run):
    """4000 x 20 (ratio 200) passes the check as it is, but --max_pixels 65536 shrinks it by
    sqrt(65536 / 80000) = 0.905 to floor(3620.4) x floor(18.1) = 3620 x 18, ratio 201.1, which the
    processor refuses: every start failed in the pre-flight, every resume at the same step."""
    from data.sources import load_examples

    source = _save_dataset(tmp_path / "data", rows=12, sizes={5: (4000, 20)})
    with pytest.warns(UserWarning, match=r"skipped 1 of 12 rows"):
        dataset, report = load_examples(source, max_pixels=65536)
    assert report.skipped_images == 1 and 5 not in dataset["source_row"]
    _, report = load_examples(source)  # without the downscale the processor takes it (ratio 200)
    assert report.skipped_images == 0
    with pytest.warns(UserWarning, match="skipped 1 of 12 rows"):
        out = train_run(tmp_path / "run", "--dataset", source, "--max_steps", "1", "--max_pixels", "65536")
    assert [r["skipped_images"] for r in read_metrics(out)] == [1]


def test_an_image_the_processor_rejects_during_a_step_names_its_row():
    from data.collators import GRPOCollator, SFTCollator
    from models.loading import load_policy

    _, processor = load_policy("tiny")
    good = {"images": [Image.new("RGB", (56, 56))], "question": "How many?", "answer": "3", "thinking": None, "source_row": 4}
    bad = {**good, "images": [Image.new("RGB", (1000, 4))], "source_row": 17}
    for collator in (GRPOCollator(processor), SFTCollator(processor)):
        with pytest.raises(ValueError, match=r"dataset row 17 .*absolute aspect ratio must be smaller than 200"):
            collator([good, bad])


# --- item 8: eval.py's intervals and pass@k ---


def test_eval_k_samples_gives_accuracy_and_pass_at_k_their_own_intervals(grpo_run_dir, tmp_path, capsys):
    from eval import clustered_wilson_interval, wilson_interval

    out = tmp_path / "eval"
    eval_script.main([
        "--model", str(grpo_run_dir), "--output_dir", str(out), "--num_samples", "2", "--num_examples", "6",
        "--batch_size", "4", "--max_completion_length", "8", "--progress_bar", "false",
        "--accuracy_reward", "reward_fns:even_parity",
    ])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    per_prompt = [sum(sample["correct"]) for sample in samples]
    passed = sum(count > 0 for count in per_prompt)
    assert summary["accuracy"] == pytest.approx(sum(per_prompt) / 12, rel=0, abs=FLOAT64_FORMULA)
    assert summary["accuracy_ci95"] == pytest.approx(list(clustered_wilson_interval(per_prompt, 2)), rel=0, abs=FLOAT64_FORMULA)
    assert summary["pass@2_ci95"] == pytest.approx(list(wilson_interval(passed, 6)), rel=0, abs=FLOAT64_FORMULA)
    assert summary["accuracy_ci95"][0] <= summary["accuracy"] <= summary["accuracy_ci95"][1]
    printed = capsys.readouterr().out
    low, high = summary["pass@2_ci95"]
    assert f"pass@2 {passed / 6:.3f} (95% CI {low:.3f}-{high:.3f})" in printed


def test_clustered_wilson_interval_by_hand():
    from eval import clustered_wilson_interval, wilson_interval

    # k = 1: the prompts are the samples, so it is the plain Wilson interval.
    assert clustered_wilson_interval([1, 0, 1, 1], 1) == pytest.approx(wilson_interval(3, 4), rel=0, abs=FLOAT64_FORMULA)
    # Every prompt all right or all wrong (samples of a prompt perfectly correlated): the k
    # samples carry one prompt's information, so n_eff = n = 4 prompts, p = 0.5.
    assert clustered_wilson_interval([2, 0, 2, 0], 2) == pytest.approx(wilson_interval(2, 4), rel=0, abs=FLOAT64_FORMULA)
    # Each prompt exactly half right: per-prompt fractions [0.5, 0.5, 0.5, 0.5] have variance 0,
    # no sign of correlation, so n_eff = n * k = 8 samples with p = 0.5 (4 of 8).
    assert clustered_wilson_interval([1, 1, 1, 1], 2) == pytest.approx(wilson_interval(4, 8), rel=0, abs=FLOAT64_FORMULA)
    # In between: fractions [1, 0.5, 0.5, 0] -> p = 0.5, sample variance (ddof 1)
    # ((0.5^2 + 0 + 0 + 0.5^2) / 3) = 1/6; var of the mean = 1/6 / 4 = 1/24;
    # n_eff = p(1-p) / var = 0.25 * 24 = 6 (between n = 4 and n*k = 8): Wilson at 3 of 6.
    assert clustered_wilson_interval([2, 1, 1, 0], 2) == pytest.approx(wilson_interval(3, 6), rel=0, abs=FLOAT64_FORMULA)


def test_eval_refuses_k_greedy_copies(tmp_path, capsys, no_model_load):
    err = _exit_2(["--num_samples", "8", "--temperature", "0", "--output_dir", str(tmp_path / "e")], capsys, eval_script.main)
    assert "--num_samples 8 with --temperature 0" in err


# --- pre-flight ---


def test_preflight_does_not_change_the_training(tmp_path, train_run, capsys):
    flags = ("--max_steps", "3", "--save_steps", "0", "--beta", "0.04", "--lora_dropout", "0.0")
    with_preflight = train_run(tmp_path / "with", *flags)
    assert "[preflight]" in capsys.readouterr().out
    without = train_run(tmp_path / "without", *flags, "--skip_preflight")
    assert "[preflight]" not in capsys.readouterr().out
    assert [without_timings(r) for r in read_metrics(with_preflight)] == [without_timings(r) for r in read_metrics(without)]
    first, second = load_saved_model(latest_model_dir(with_preflight)), load_saved_model(latest_model_dir(without))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_sft_preflight_does_not_change_the_training(tmp_path, train_run):
    flags = ("--max_steps", "2", "--save_steps", "0")
    with_preflight = train_run(tmp_path / "with", *flags, stage="sft")
    without = train_run(tmp_path / "without", *flags, "--skip_preflight", stage="sft")
    assert [without_timings(r) for r in read_metrics(with_preflight)] == [without_timings(r) for r in read_metrics(without)]


def test_preflight_that_runs_out_of_memory_names_the_figure_and_the_flags(tmp_path, train_run, monkeypatch):
    import grpo.runtime.preflight

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(grpo.runtime.preflight, "_forward_backward", out_of_memory)
    with pytest.raises(RuntimeError, match=r"pre-flight: one micro-batch .* does not fit .*--micro_batch_size.*--skip_preflight"):
        train_run(tmp_path / "run", "--max_steps", "1")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or read_metrics(tmp_path / "run") == []


def test_longest_prompt_is_found_without_running_the_processor_on_every_row():
    from data.collators import longest_example, prompt_lengths
    from data.sources import load_examples
    from models.loading import load_policy

    _, processor = load_policy("tiny")
    raw = datasets.Dataset.from_dict({
        "image": [{"bytes": _png(size), "path": None} for size in [(56, 56), (112, 84), (60, 200), (56, 56)]],
        "problem": ["How many?", "How many?", "How many?", "How many objects are there, counting every one?"],
        "solution": ["1", "2", "3", "4"],
    }, features=datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")}))  # fmt: skip
    dataset, _ = load_examples(raw)
    exact = prompt_lengths(processor, list(dataset))
    index, length = longest_example(dataset, processor)
    assert length == max(exact) and index == exact.index(max(exact))


# --- round two, data loss: what --overwrite_output_dir and an empty --output_dir must not do ---


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished one-step SFT run (checkpoint-00000001): a model a GRPO run can start from."""
    out = tmp_path_factory.mktemp("start") / "sft"
    train.main(train_argv(out, "--max_steps", "1", stage="sft"))
    return out


@pytest.mark.parametrize("flag, argument", [
    ("--init_from", "{out}"),                                   # the run folder: its latest checkpoint
    ("--init_from", "{out}/checkpoint-00000001/model"),          # one checkpoint's model/ folder
    ("--model", "{out}/checkpoint-00000001"),                   # a checkpoint folder, as --model
])  # fmt: skip
def test_overwrite_never_deletes_the_model_the_run_starts_from(sft_run, capsys, no_model_load, flag, argument):
    argument = argument.format(out=sft_run)
    before = sorted(path.name for path in sft_run.iterdir())
    err = _exit_2(train_argv(sft_run, flag, argument, "--overwrite_output_dir"), capsys)
    assert f"{flag} {argument} is " in err and f"inside --output_dir {sft_run}" in err
    assert "would delete it before it loads; write the new run to another --output_dir" in err
    assert sorted(path.name for path in sft_run.iterdir()) == before  # nothing deleted
    assert (latest_model_dir(sft_run) / "config.json").is_file()


def test_overwrite_into_another_folder_still_starts_from_the_model(sft_run, tmp_path, capsys):
    """The check refuses only a start inside output_dir: --init_from a run into a new folder trains."""
    out = tmp_path / "grpo"
    out.mkdir()
    train.main(train_argv(out, "--init_from", str(sft_run), "--overwrite_output_dir", "--max_steps", "1"))
    assert [r["step"] for r in read_metrics(out)] == [1]


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_output_dir_is_refused_naming_the_flag(tmp_path, capsys, no_model_load, monkeypatch, value):
    monkeypatch.chdir(tmp_path)  # where Path("") would have written
    err = _exit_2(train_argv(value), capsys)
    assert "--output_dir is empty (an unset shell variable" in err
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no metrics.jsonl in the working directory
    err = _exit_2(["--model", "tiny", "--output_dir", value], capsys, eval_script.main)
    assert "--output_dir is empty" in err
    err = _exit_2(["--model", value, "--output_dir", str(tmp_path / "e")], capsys, eval_script.main)
    assert "--model is empty (an unset shell variable?)" in err  # it said '--model . holds no model'


# --- round two: tracebacks where a named error belongs ---

NAMED_AT_START = [
    # The sampler divided by 1e-40 after its finite check: logits inf, "index 927 is out of bounds".
    (["--temperature", "1e-40"], "--temperature 1e-40: below 0.01 logits / temperature can overflow to inf"),
    # A scene of 0 objects failed in the data generator, after the model had loaded.
    (["--count_min", "0", "--count_max", "0"], "--count_min 0 / --count_max 0: need 1 <= --count_min <= --count_max"),
    # CUDA graphs on the CPU failed in the first rollout, after metrics.jsonl was created.
    (["--decode", "cuda_graph", "--device", "cpu"], "--decode cuda_graph needs CUDA, but this run is on the CPU (--device cpu"),
    # Round three (an outside sweep of every entry point): each was a traceback after the model loaded...
    (["--max_pixels", "-1"], "--max_pixels -1: must be >= 784"),
    (["--min_pixels", "100000", "--max_pixels", "1000"], "--min_pixels 100000 is above --max_pixels 1000"),
    (["--attn_implementation", "flash"], "--attn_implementation 'flash': use one of sdpa, eager, flash_attention_2"),
    (["--freeze_policy", "lora", "--lora_targets", ""], "--lora_targets '': give a comma list of Qwen2.5-VL's"),
    (["--question_kinds", "sizes"], "--question_kinds 'sizes': give a comma list of total, by_color, by_shape, complex"),
    (["--synthetic_trace", "aloud"], "--synthetic_trace 'aloud': use one of by_shape, count_aloud, none"),
    (["--demonstrator_misses", "gray", "--question_kinds", "total,by_color"], "--demonstrator_misses works with --question_kinds total"),
    (["--reward_functions", "reward_fns:completions_only"], "completions_only(completions) cannot be called as"),
    # ...or no error at all: q_proj trained and zzz_proj was dropped without a word; the colour of
    # another palette, or any --dataset but the synthetic one, relabelled nothing.
    (["--freeze_policy", "lora", "--lora_targets", "q_proj,zzz_proj"], "--lora_targets 'q_proj,zzz_proj': give a comma list"),
    (["--demonstrator_misses", "pink"], "--demonstrator_misses 'pink' is not a colour of synthetic's scenes"),
    (["--dataset", "data.jsonl", "--demonstrator_misses", "gray"], "--demonstrator_misses relabels the built-in synthetic scenes"),
    (["--split", "test"], "--split 'test': the built-in synthetic data has no splits to pick"),  # trained on train
    (["--init_from", ""], "--init_from is empty (an unset shell variable"),  # started from --model instead
    (["--model", ""], "--model is empty"),
]


@pytest.mark.parametrize("flags, message", NAMED_AT_START, ids=[flags[0] for flags, _ in NAMED_AT_START])
def test_settings_that_failed_with_a_traceback_exit_2_naming_the_flag(tmp_path, capsys, no_model_load, flags, message):
    err = _exit_2(train_argv(tmp_path / "run", *flags), capsys)
    assert message in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_device_cuda_without_cuda_exits_2_before_the_model_loads(tmp_path, capsys, no_model_load):
    err = _exit_2(train_argv(tmp_path / "run", "--device", "cuda"), capsys)  # was a RuntimeError traceback
    assert "--device cuda: no CUDA device is visible here; use --device cpu or auto" in err
    err = _exit_2(["--device", "cuda", "--output_dir", str(tmp_path / "e")], capsys, eval_script.main)
    assert "--device cuda: no CUDA device is visible here" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "e").exists()


def test_a_reward_module_with_a_syntax_error_exits_2_naming_it(tmp_path, capsys, no_model_load, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("def reward(completions, answers, **columns:\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = _exit_2(train_argv(tmp_path / "run", "--reward_functions", "broken_rewards:reward"), capsys)  # was a SyntaxError traceback
    assert "--reward_functions 'broken_rewards:reward': cannot import module 'broken_rewards'" in err and "line 1" in err


def test_a_bad_eval_accuracy_reward_is_named_by_its_own_flag(tmp_path, capsys, no_model_load):
    err = _exit_2(train_argv(tmp_path / "run", "--eval_accuracy_reward", "no_such_module:f", stage="sft"), capsys)
    assert "--eval_accuracy_reward 'no_such_module:f': cannot import module" in err
    assert "--reward_functions" not in err  # it named the GRPO flag this SFT run does not have


def test_more_trainable_layers_than_the_model_has_exits_2_naming_the_flag(tmp_path, capsys):
    # Only the loaded model knows its layer count: a ValueError traceback, now exit 2 (nothing saved).
    flags = ("--freeze_policy", "projector_embeddings_first_layers", "--num_trainable_layers", "1000")
    err = _exit_2(train_argv(tmp_path / "run", *flags), capsys)
    assert "--num_trainable_layers 1000 is outside [0, 2]" in err
    assert not list((tmp_path / "run").glob("checkpoint-*"))


BAD_EVAL_FLAGS = [
    (["--dtype", "int8"], "--dtype 'int8': use auto, float32, bfloat16, float16 or float64"),
    (["--device", "tpu"], "--device 'tpu': use auto, cpu or cuda"),
    (["--top_k", "-1"], "--top_k -1: must be >= 0"),
    (["--attn_implementation", "flash"], "--attn_implementation 'flash': use one of"),
    (["--max_pixels", "-1"], "--max_pixels -1: must be >= 784"),
    (["--accuracy_reward", "reward_fns:completions_only"], "--accuracy_reward 'reward_fns:completions_only': completions_only"),
]


def test_an_eval_part_a_jsonl_file_cannot_have_exits_2_before_the_model_loads(tmp_path, capsys, no_model_load):
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "a.png", "problem": "How many?", "solution": "1"}) + "\n")
    flags = ["--dataset", str(tmp_path / "data.jsonl"), "--output_dir", str(tmp_path / "e")]
    err = _exit_2([*flags, "--eval_part", "test"], capsys, eval_script.main)  # ValueError traceback once loaded
    assert "--eval_part test is drawn only for the built-in synthetic data" in err
    err = _exit_2([*flags, "--val_fraction", "0"], capsys, eval_script.main)
    assert "--eval_part validation with --val_fraction 0 holds no examples" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("flags, message", BAD_EVAL_FLAGS, ids=[flags[0] for flags, _ in BAD_EVAL_FLAGS])
def test_bad_eval_flags_exit_2_before_the_model_loads(tmp_path, capsys, no_model_load, flags, message):
    # Each was a traceback once the model had loaded, or (--top_k -1) read as "off" without a word.
    err = _exit_2([*flags, "--output_dir", str(tmp_path / "e")], capsys, eval_script.main)
    assert message in err
    assert not (tmp_path / "e").exists()


def test_a_relative_model_path_that_does_not_exist_is_not_sent_to_the_hub(tmp_path, capsys, no_model_load, monkeypatch):
    # runs/nothere has the owner/name shape of a Hub id: it went to the Hub (33 s of retries, a traceback).
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online: the case that used to reach the Hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "runs").mkdir()
    err = _exit_2(train_argv(tmp_path / "out", "--model", "runs/nothere"), capsys)
    assert "--model runs/nothere: no such directory (./runs exists, so it reads as a local path" in err
    err = _exit_2(train_argv(tmp_path / "out", "--init_from", "runs/nothere"), capsys)
    assert "--init_from runs/nothere: no such directory" in err


def test_a_missing_dataset_or_image_root_exits_2_before_the_model_loads(tmp_path, capsys, no_model_load):
    # A FileNotFoundError traceback from the data loader, after the model had loaded.
    missing = tmp_path / "nope.jsonl"
    err = _exit_2(train_argv(tmp_path / "run", "--dataset", str(missing)), capsys)
    assert f"--dataset {missing}: no such file or folder, and not a Hub dataset (owner/name)" in err
    err = _exit_2(["--dataset", str(missing), "--output_dir", str(tmp_path / "e")], capsys, eval_script.main)
    assert f"--dataset {missing}: no such file or folder" in err
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "a.png", "problem": "How many?", "solution": "1"}) + "\n")
    flags = ("--dataset", str(tmp_path / "data.jsonl"), "--image_root", str(tmp_path / "images"))
    err = _exit_2(train_argv(tmp_path / "run", *flags), capsys)
    assert f"--image_root {tmp_path / 'images'}: no such folder" in err
    (tmp_path / "data.txt").write_text("How many?\n")
    err = _exit_2(train_argv(tmp_path / "run", "--dataset", str(tmp_path / "data.txt")), capsys)
    assert f"--dataset {tmp_path / 'data.txt'}: a .txt file; give a .parquet, .jsonl, .json file" in err
    (tmp_path / "empty").mkdir()  # datasets' EmptyDatasetError traceback
    err = _exit_2(train_argv(tmp_path / "run", "--dataset", str(tmp_path / "empty")), capsys)
    assert f"--dataset {tmp_path / 'empty'}: a folder with no save_to_disk dataset" in err
    (tmp_path / "empty.jsonl").write_text("\n")  # a ValueError traceback once the model had loaded
    err = _exit_2(train_argv(tmp_path / "run", "--dataset", str(tmp_path / "empty.jsonl")), capsys)
    assert f"--dataset {tmp_path / 'empty.jsonl'} holds no rows" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("column", ["problem", "solution"])
def test_a_null_question_or_answer_is_named_by_its_row(tmp_path, column):
    from data.sources import load_examples

    Image.new("RGB", (56, 56), "red").save(tmp_path / "a.png")
    rows = [{"image": "a.png", "problem": "How many?", "solution": "1"} for _ in range(4)]
    rows[2][column] = None  # was read as the text "None": a question, or a gold answer, of "None"
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    kind = {"problem": "question", "solution": "answer"}[column]
    with pytest.raises(ValueError, match=rf"data.jsonl: row 2: its {kind} \('{column}'\) is null; fill it in or drop the row"):
        load_examples(str(tmp_path / "data.jsonl"), image_root=str(tmp_path))


def test_a_malformed_jsonl_line_is_named_by_its_number(tmp_path):
    from data.sources import load_examples

    Image.new("RGB", (56, 56), "red").save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "problem": "How many?", "solution": "1"})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([good, good, '{"image": "a.png", "problem": "How many?", "solution": ', good]) + "\n")
    # datasets said only DatasetGenerationError, naming no line.
    with pytest.raises(ValueError, match=r"--dataset .*data.jsonl: line 3 is not valid JSON \(Expecting value at column \d+\)"):
        load_examples(str(path), image_root=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_flash_attn_exits_2_and_leaves_no_output_dir(tmp_path, capsys, no_model_load):
    err = _exit_2(train_argv(tmp_path / "run", "--attn_implementation", "flash_attention_2"), capsys)
    assert "--attn_implementation flash_attention_2 needs the flash-attn package, which is not installed" in err
    assert not (tmp_path / "run").exists()  # it used to leave an empty output_dir behind
    err = _exit_2(["--attn_implementation", "flash_attention_2", "--output_dir", str(tmp_path / "e")], capsys, eval_script.main)
    assert "needs the flash-attn package" in err
