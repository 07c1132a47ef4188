"""From `--dataset` and friends to the datasets the loops and eval.py read.

The held-out part is the same for every command: for the built-in synthetic data it is the
"validation" stream (scenes drawn from a disjoint seed); for any other source it is the last
`--val_fraction` of a seeded `train_test_split`. Training never sees it; eval.py scores it.
"""

from __future__ import annotations

from data.sources import load_examples, train_val_split

SYNTHETIC = ("synthetic", "synthetic-shifted")


def _load(data_args, *, split: str, seed: int, num_examples: int | None, max_pixels: int | None = None):
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
        },
        max_pixels=max_pixels,
    )


def _part(data_args, *, part: str, seed: int, num_examples: int | None, max_pixels: int | None = None):
    """'train', 'validation' or 'all' of the configured source, with its load report."""
    if data_args.dataset in SYNTHETIC:
        split = "validation" if part == "validation" else "train"
        return _load(data_args, split=split, seed=seed, num_examples=num_examples, max_pixels=max_pixels)
    dataset, report = _load(data_args, split=data_args.split, seed=seed, num_examples=None, max_pixels=max_pixels)
    if part != "all":
        train, val = train_val_split(dataset, data_args.val_fraction, seed=seed)
        dataset = val if part == "validation" else train
        if len(dataset) == 0:
            raise ValueError(f"{data_args.dataset}: the {part} part is empty; raise --val_fraction or add data")
    if num_examples is not None and num_examples < len(dataset):
        dataset = dataset.select(range(num_examples))
    return dataset, report


def load_prompt_dataset(config, processor, *, is_main: bool = True):
    """GRPO prompts: the training part, with prompts over --max_prompt_length skipped or rejected."""
    data_args = config.data
    dataset, report = _part(
        data_args, part="train", seed=config.train.seed, num_examples=data_args.num_examples,
        max_pixels=config.model.max_pixels,
    )
    if data_args.max_prompt_length is not None:
        from data.collators import filter_long_prompts

        before = len(dataset)
        dataset, skipped = filter_long_prompts(
            dataset, processor, data_args.max_prompt_length, system_prompt=data_args.system_prompt_text
        )
        if skipped and data_args.long_prompts == "error":
            raise ValueError(
                f"{skipped} of {before} prompts are longer than --max_prompt_length "
                f"{data_args.max_prompt_length} tokens (images included); raise it, lower --max_pixels, "
                "or pass --long_prompts skip"
            )
        if skipped and is_main:
            print(f"[data] skipped {skipped} of {before} prompts over --max_prompt_length", flush=True)
        report.skipped_long_prompts = skipped
        if len(dataset) == 0:
            raise ValueError("every prompt is over --max_prompt_length; raise it or lower --max_pixels")
    if is_main:
        print(f"[data] {data_args.dataset}: {len(dataset)} prompts ({report.skipped_images} skipped images)", flush=True)
    return dataset, report


def load_sft_datasets(config, *, is_main: bool = True):
    """SFT demonstrations: (train, validation, report)."""
    data_args, seed = config.data, config.train.seed
    train, report = _part(data_args, part="train", seed=seed, num_examples=data_args.num_examples, max_pixels=config.model.max_pixels)
    val, _ = _part(data_args, part="validation", seed=seed, num_examples=config.sft.max_eval_examples, max_pixels=config.model.max_pixels)
    if is_main:
        print(f"[data] {data_args.dataset}: {len(train)} train / {len(val)} validation examples", flush=True)
    return train, (val if len(val) else None), report


def load_eval_dataset(data_args, *, part: str, seed: int, max_pixels: int | None = None):
    """What eval.py scores: by default 500 held-out examples."""
    num_examples = data_args.num_examples if data_args.num_examples is not None else 500
    return _part(data_args, part=part, seed=seed, num_examples=num_examples, max_pixels=max_pixels)
