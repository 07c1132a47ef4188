"""From `--dataset` and friends to the datasets the loops and eval.py read.

The held-out part is the same for every command: for the built-in synthetic data it is the
"validation" stream (scenes drawn from a disjoint seed); for any other source it is the last
`--val_fraction` of a seeded `train_test_split`. Training never sees it; eval.py scores it.

Under torchrun every rank loads the same data; only rank 0 shows the `datasets` progress bars
("reading synthetic", "Casting the dataset"), its log messages and the loading warnings.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import datasets
import pyarrow.parquet

from data.collators import filter_long_prompts
from data.sources import DataError, load_examples, train_val_split
from grpo.reward_functions import parse_choice, parse_integer

SYNTHETIC = ("synthetic", "synthetic-shifted")


def _has_no_rows(path: Path) -> bool:
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, "rb") as file:  # up to the first non-blank byte, not the whole file
            return not any(chunk.strip() for chunk in iter(lambda: file.read(1 << 16), b""))
    if path.suffix.lower() == ".parquet":
        return pyarrow.parquet.read_metadata(path).num_rows == 0
    if (path / "state.json").is_file():  # save_to_disk of a Dataset: no data files means no rows
        return not json.loads((path / "state.json").read_text()).get("_data_files")
    if path.is_dir():
        files = [f for f in path.iterdir() if f.suffix.lower() in (".jsonl", ".json", ".parquet")]
        return bool(files) and all(_has_no_rows(f) for f in files)
    return False


def check_not_empty(source: str) -> None:
    """A clear error for a local --dataset without rows. `datasets` fails on one with messages that
    do not say so: StopIteration (empty jsonl), "corresponds to no data" (parquet), IndexError
    (save_to_disk of an empty Dataset)."""
    path = Path(source)
    if path.exists() and _has_no_rows(path):
        raise DataError(f"--dataset {source} holds no rows; point it at a file or folder with examples")


def _load(data_args, *, split: str, seed: int, num_examples: int | None, max_pixels: int | None = None):
    check_not_empty(data_args.dataset)
    kinds = tuple(kind.strip() for kind in data_args.question_kinds.split(",") if kind.strip())
    return load_examples(
        data_args.dataset,
        split=split,
        image_column=data_args.image_column,
        question_column=data_args.question_column,
        answer_column=data_args.answer_column,
        thinking_column=data_args.thinking_column,
        image_root=data_args.image_root,
        num_examples=num_examples,
        seed=seed,
        synthetic_kwargs={
            "question_kinds": kinds,
            "count_range": (data_args.count_min, data_args.count_max),
            "image_size": data_args.image_size,
            # The imperfect demonstrator labels the training part only: held-out parts keep the
            # true answers, so validation and eval.py measure what is really in the image.
            "demonstrator_misses": data_args.demonstrator_misses if split == "train" else None,
            "trace": data_args.synthetic_trace,
            "layout": data_args.synthetic_layout,
        },
        max_pixels=max_pixels,
    )


def check_part(data_args, part: str, *, allow_empty: bool = False) -> None:
    """The parts no loading can give, refused from the flags alone (eval.py calls it before the model
    loads): 'test' of a source other than the synthetic data, 'validation' at --val_fraction 0
    (unless allow_empty, as for _part)."""
    if data_args.dataset in SYNTHETIC:
        return
    if part == "test":
        raise DataError(
            f"--eval_part test is drawn only for the built-in synthetic data; for {data_args.dataset} score "
            "its test split with --split test --eval_part all"
        )
    if part == "validation" and data_args.val_fraction == 0 and not allow_empty:
        raise DataError("--eval_part validation with --val_fraction 0 holds no examples; raise --val_fraction or use --eval_part all")


def _part(
    data_args, *, part: str, seed: int, num_examples: int | None, max_pixels: int | None = None, allow_empty: bool = False
):
    """'train', 'validation', 'test' (synthetic only) or 'all' of the configured source, with its load report.

    allow_empty: an empty part is returned rather than refused (SFT's validation part under
    --val_fraction 0, which only turns the validation loss off)."""
    check_part(data_args, part, allow_empty=allow_empty)
    if data_args.dataset in SYNTHETIC:
        split = part if part in ("validation", "test") else "train"
        return _load(data_args, split=split, seed=seed, num_examples=num_examples, max_pixels=max_pixels)
    dataset, report = _load(data_args, split=data_args.split, seed=seed, num_examples=None, max_pixels=max_pixels)
    if part != "all":
        train, val = train_val_split(dataset, data_args.val_fraction, seed=seed)
        dataset = val if part == "validation" else train
        if len(dataset) == 0 and not allow_empty:
            change = "lower" if part == "train" else "raise"  # the train part shrinks as val_fraction grows
            raise DataError(f"{data_args.dataset}: the {part} part is empty; {change} --val_fraction or add data")
    if num_examples is not None and num_examples < len(dataset):
        dataset = dataset.select(range(num_examples))
    return dataset, report


@contextlib.contextmanager
def quiet_unless_main(is_main: bool):
    """On a rank other than 0: no `datasets` progress bars, its log messages only from errors up,
    no Python warnings (rank 0 loads the same rows and shows them once). Put back afterwards."""
    if is_main:
        yield
        return

    bars_were_on, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def load_prompt_dataset(config, processor, *, is_main: bool = True):
    """GRPO prompts: the training part, with prompts over --max_prompt_length skipped or rejected."""
    with quiet_unless_main(is_main):
        return _load_prompt_dataset(config, processor, is_main=is_main)


def _load_prompt_dataset(config, processor, *, is_main: bool):
    data_args = config.data
    dataset, report = _part(
        data_args, part="train", seed=config.train.seed, num_examples=data_args.num_examples,
        max_pixels=config.model.max_pixels,
    )
    if data_args.max_prompt_length is not None:
        before = len(dataset)
        dataset, skipped = filter_long_prompts(
            dataset, processor, data_args.max_prompt_length, system_prompt=data_args.system_prompt_text
        )
        if skipped and data_args.long_prompts == "error":
            raise DataError(
                f"{skipped} of {before} prompts are longer than --max_prompt_length "
                f"{data_args.max_prompt_length} tokens (images included); raise it, lower --max_pixels, "
                "or pass --long_prompts skip"
            )
        if skipped and is_main:
            print(f"[data] skipped {skipped} of {before} prompts over --max_prompt_length", flush=True)
        report.skipped_long_prompts = skipped
        if len(dataset) == 0:
            raise DataError("every prompt is over --max_prompt_length; raise it or lower --max_pixels")
    check_gold_answers(dataset, config.grpo.reward_function_names, data_args.dataset)
    if is_main:
        print(f"[data] {data_args.dataset}: {len(dataset)} prompts ({report.skipped_images} skipped images)", flush=True)
    return dataset, report


def check_gold_answers(dataset, reward_names: list[str], dataset_name: str = "") -> None:
    """Fail before step 1 when a built-in accuracy reward cannot read a gold answer.

    count_accuracy and choice_accuracy raise on such an answer, but only at the step that first
    samples its prompt (hours into a run); reading the answer column up front is cheap.
    """
    parsers = {"count_accuracy": ("an integer", parse_integer), "choice_accuracy": ("an option letter A-E", parse_choice)}
    answers = None
    for name in reward_names:
        if name not in parsers:
            continue
        answers = list(dataset["answer"]) if answers is None else answers  # the column only, no images
        kind, parse = parsers[name]
        bad = [index for index, answer in enumerate(answers) if parse(str(answer)) is None]
        if bad:
            # Name the row of the file, not the position after the split's shuffle.
            rows = [dataset[index].get("source_row", index) for index in bad[:5]]
            first = bad[0]
            raise DataError(
                f"reward function {name!r}: the gold answer of row {rows[0]} of --dataset {dataset_name} "
                f"({answers[first]!r}, question {dataset[first]['question']!r}; rows counted from 0, so line "
                f"{rows[0] + 1} of a jsonl file) is not {kind}; {len(bad)} of {len(answers)} examples are like "
                f"it (rows {sorted(rows)}{' ...' if len(bad) > 5 else ''}). Fix the data (--answer_column?) or "
                "pick a reward that fits it in --reward_functions"
            )


def load_sft_datasets(config, *, is_main: bool = True):
    """SFT demonstrations: (train, validation, report)."""
    with quiet_unless_main(is_main):
        return _load_sft_datasets(config, is_main=is_main)


def _load_sft_datasets(config, *, is_main: bool):
    data_args, seed = config.data, config.train.seed
    train, report = _part(data_args, part="train", seed=seed, num_examples=data_args.num_examples, max_pixels=config.model.max_pixels)
    val, _ = _part(
        data_args, part="validation", seed=seed, num_examples=config.sft.max_eval_examples,
        max_pixels=config.model.max_pixels, allow_empty=True,  # --val_fraction 0: no validation loss
    )
    if is_main:
        print(f"[data] {data_args.dataset}: {len(train)} train / {len(val)} validation examples", flush=True)
    return train, (val if len(val) else None), report


def load_eval_dataset(data_args, *, part: str, seed: int, max_pixels: int | None = None):
    """What eval.py scores: by default 500 held-out examples."""
    num_examples = data_args.num_examples if data_args.num_examples is not None else 500
    return _part(data_args, part=part, seed=seed, num_examples=num_examples, max_pixels=max_pixels)
