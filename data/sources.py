"""Dataset sources: everything `load_examples` turns into the example schema.

    images: list[PIL.Image]   question: str   answer: str (tags stripped)   thinking: str | None
    image_paths: list[str | None]  (each image's path as the source gave it; None if bytes only)

Sources (the `source` argument):
    "synthetic", "synthetic-shifted"          built-in counting scenes (data/synthetic.py)
    a Hugging Face Hub name                    through `datasets.load_dataset` (needs network); the
                                               datasets of the blog post and the TRL recipe have known column names:
        MMInstruction/Clevr_CoGenT_TrainA_R1           image, problem, thinking, solution
        MMInstruction/Clevr_CoGenT_TrainA_70K_Complex  image, problem, solution
        lmms-lab/multimodal-open-r1-8k-verified        image, problem, solution (+ original_*)
    a directory written by `save_to_disk`      `datasets.load_from_disk`
    a parquet file, or a directory of files    `datasets.load_dataset("parquet" / the directory)`
    a .jsonl / .json file                      `datasets.load_dataset("json")`; relative image paths
                                               resolve against `image_root` (default: the file's
                                               directory), as in R1-V's SuperCLEVR counting test
    a `datasets.Dataset` object                used as is

Any other column names are mapped with image_column / question_column / answer_column /
thinking_column (the CLI's --image_column ...). Gold answers wrapped in <answer>...</answer> and
traces wrapped in <think>...</think> are unwrapped. Images may be bytes, {"bytes", "path"} dicts,
file paths, or decoded PIL images; a row whose image fails to decode, or that the Qwen2.5-VL
processor would refuse (an aspect ratio over 200), is skipped with a warning and counted in the
LoadReport, never a crash at the step that samples it. Columns outside the schema are kept as
metadata, and `source_row` holds each example's row number in the source (counted from 0, before
any shuffle), so that errors can name the row of the file.

Run:  python -m data.sources SOURCE [--split train] [--num_examples 5]   (prints a summary)
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from PIL import Image

from data.synthetic import make_counting_dataset

logger = logging.getLogger(__name__)

SCHEMA_COLUMNS = ("images", "question", "answer", "thinking", "image_paths")
SOURCE_ROW = "source_row"  # the example's row in the source, before any shuffle or subset
# Qwen2-VL's smart_resize (transformers) raises for max(h, w) / min(h, w) above this.
MAX_ASPECT_RATIO = 200
DEFAULT_SYNTHETIC_EXAMPLES = 2000

# Column names tried, in order, when a flag does not name the column.
CANDIDATES = {
    "image": ("images", "image", "image_path", "image_paths", "img", "file_name"),
    "question": ("question", "problem", "prompt", "query"),
    "answer": ("answer", "solution", "ground_truth", "label"),
    "thinking": ("thinking", "reasoning", "rationale"),
}
# The datasets of the blog post and the TRL recipe (matched on the part after the owner, case-insensitively).
KNOWN_SOURCES = {
    "clevr_cogent_traina_r1": {"image": "image", "question": "problem", "answer": "solution",
                               "thinking": "thinking"},
    "clevr_cogent_traina_70k_complex": {"image": "image", "question": "problem", "answer": "solution"},
    "multimodal-open-r1-8k-verified": {"image": "image", "question": "problem", "answer": "solution"},
}
# Synthetic splits get disjoint seeds so validation scenes never repeat training scenes.
SYNTHETIC_SPLIT_SEED_OFFSET = {"train": 0, "validation": 1_000_003, "test": 2_000_006}


@dataclass
class LoadReport:
    """What `load_examples` read, kept and skipped."""

    source: str
    split: str
    num_rows: int = 0
    """Rows read (after the `num_examples` subset, before skipping)."""
    num_examples: int = 0
    """Rows in the returned dataset."""
    skipped_images: int = 0
    """Rows dropped because an image was missing, failed to decode, or has an aspect ratio over 200."""
    skipped_long_prompts: int = 0
    """Rows dropped later for a prompt over --max_prompt_length (set by whoever filters them)."""
    columns: dict[str, str | None] = field(default_factory=dict)
    """Schema field -> source column it came from."""

    def summary(self) -> str:
        return (f"{self.source} [{self.split}]: {self.num_examples} examples "
                f"({self.num_rows} read, {self.skipped_images} skipped: undecodable images, "
                f"{self.skipped_long_prompts} skipped: prompts too long); "
                f"columns {self.columns}")


class DataError(ValueError):
    """Bad input data: the message names the --dataset file, row or column and the fix. train.py and
    eval.py report it as `error: ...` and exit 2, without a traceback."""


# --------------------------------------------------------------------------- text helpers

def extract_tag(text, tag: str) -> str:
    """The content of <tag>...</tag> (stripped), or the whole text stripped when untagged."""
    text = "" if text is None else str(text)
    match = re.search(rf"<{tag}>(.*?)(?:</{tag}>|$)", text, flags=re.DOTALL)
    return (match.group(1) if match else text).strip()


def _raise_on_the_bad_json_line(path: Path, error: Exception) -> None:
    """datasets failed to read a .jsonl/.json file: find the line it choked on and name it."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # one JSON document
        try:
            json.loads(text)
        except json.JSONDecodeError as bad:
            raise DataError(f"--dataset {path}: line {bad.lineno} is not valid JSON ({bad.msg}); fix it") from error
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as bad:
            raise DataError(
                f"--dataset {path}: line {number} is not valid JSON ({bad.msg} at column {bad.colno}): "
                f"{line[:120]!r}; fix or delete that line (one JSON object per line)"
            ) from error
        if not isinstance(row, dict):
            raise DataError(
                f"--dataset {path}: line {number} is a JSON {type(row).__name__}, not an object: {line[:120]!r}; "
                "each line must be one object such as {\"image\": ..., \"problem\": ..., \"solution\": ...}"
            ) from error


# --------------------------------------------------------------------------- image helpers

def resize_to_max_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale (keeping the aspect ratio) so width * height <= max_pixels; never upscale."""
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    new_size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    return image.resize(new_size, Image.Resampling.BICUBIC)


def _image_bytes(value, image_root: Path | None) -> tuple[bytes | None, Image.Image]:
    """(original encoded bytes or None, fully decoded image) for any supported image form."""
    if isinstance(value, Image.Image):
        value.load()
        return None, value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        value = data if data is not None else path
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and image_root is not None:
            path = image_root / path
        value = path.read_bytes()
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    image = Image.open(io.BytesIO(value))
    image.load()  # decodes every pixel: truncated files fail here, not in the collator
    return bytes(value), image


def _image_path(value) -> str | None:
    """The path an image value names, as the source wrote it (reward functions get it), or None."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path")
    return getattr(value, "filename", None) or None  # a PIL image opened from a file


def _encode_image(value, image_root: Path | None, max_pixels: int | None) -> dict:
    """A {"bytes", "path"} dict for datasets' Image feature; re-encodes only when needed."""
    data, image = _image_bytes(value, image_root)
    original = image.size
    if max_pixels is not None and image.width * image.height > max_pixels:
        image, data = resize_to_max_pixels(image.convert("RGB"), max_pixels), None
    # Checked on the image the processor will get: the downscale floors both sides, so a 4000 x 20
    # image (ratio 200) becomes 3620 x 18 (ratio 201.1) under --max_pixels 65536, which the processor
    # would refuse at the step that samples it, on every start and resume.
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        shrunk = f" ({original[0]} x {original[1]} px before --max_pixels shrank it)" if image.size != original else ""
        raise ValueError(
            f"a {width} x {height} px image{shrunk}: its aspect ratio {max(width, height) / min(width, height):.1f} "
            f"is over {MAX_ASPECT_RATIO}, which the Qwen2.5-VL processor refuses"
        )
    if data is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
    return {"bytes": data, "path": None}


# --------------------------------------------------------------------------- conversion

def _convert_batch(batch: dict, *, columns: dict, extras: list[str], image_root: Path | None,
                   max_pixels: int | None, source: str = "--dataset") -> dict:
    """Batched map: schema columns from source columns; rows with a bad image are dropped."""
    out = {name: [] for name in (*SCHEMA_COLUMNS, *extras)}
    for i in range(len(batch[columns["image"]])):
        raw_images = batch[columns["image"]][i]
        if not isinstance(raw_images, (list, tuple)):
            raw_images = [raw_images]
        try:
            if not raw_images or any(v is None for v in raw_images):
                raise ValueError("no image")
            images = [_encode_image(v, image_root, max_pixels) for v in raw_images]
        except Exception as error:  # any decoding failure: skip the row, counted by the caller
            logger.warning("skipping row %s, whose image failed to decode or is refused: %s", batch[SOURCE_ROW][i], error)
            continue
        raw_answer = batch[columns["answer"]][i]
        for kind, value in (("question", batch[columns["question"]][i]), ("answer", raw_answer)):
            if value is None:  # str(None) would make "None" the question or the gold answer
                raise DataError(
                    f"{source}: row {batch[SOURCE_ROW][i]}: its {kind} ({columns[kind]!r}) is null; fill it in or drop the row"
                )
        thinking = batch[columns["thinking"]][i] if columns["thinking"] else None
        if thinking is None and "<think>" in str(raw_answer):
            thinking = raw_answer  # some gold fields carry "<think>..</think><answer>..</answer>"
        out["images"].append(images)
        out["image_paths"].append([_image_path(v) for v in raw_images])
        out["question"].append(str(batch[columns["question"]][i]).strip())
        out["answer"].append(extract_tag(raw_answer, "answer"))
        thinking = None if thinking is None else extract_tag(thinking, "think")
        out["thinking"].append(thinking or None)  # an empty trace is no trace
        for name in extras:
            out[name].append(batch[name][i])
    return out


def _pick_column(dataset: datasets.Dataset, field_name: str, explicit: str | None,
                 known: dict, source: str, required: bool) -> str | None:
    found = dataset.column_names
    if explicit is not None:
        candidates = (explicit,)
    elif field_name in known:
        candidates = (known[field_name],)
    else:
        candidates = CANDIDATES[field_name]
    for name in candidates:
        if name in found:
            return name
    if not required and explicit is None:
        return None
    raise DataError(
        f"{source}: no {field_name} column (looked for {list(candidates)}); the columns found are "
        f"{found}. Name the right one with --{field_name}_column (the {field_name}_column argument).")


def _known_columns(source: str) -> dict:
    return KNOWN_SOURCES.get(source.rstrip("/").split("/")[-1].lower(), {})


def _read_source(source, split: str, seed: int, num_examples: int | None,
                 synthetic_kwargs: dict | None, cache_dir: str | None):
    """(raw dataset, default image root) for any supported source."""
    if isinstance(source, datasets.Dataset):
        return source, None
    if source in ("synthetic", "synthetic-shifted"):
        offset = SYNTHETIC_SPLIT_SEED_OFFSET.get(split)
        if offset is None:
            raise DataError(f"synthetic splits are {list(SYNTHETIC_SPLIT_SEED_OFFSET)}, got {split!r}")
        count = DEFAULT_SYNTHETIC_EXAMPLES if num_examples is None else num_examples
        kwargs = dict(synthetic_kwargs or {})
        kwargs.setdefault("shifted", source == "synthetic-shifted")
        return make_counting_dataset(count, seed + offset, **kwargs), None
    path = Path(source)
    if path.is_dir() and any((path / name).exists() for name in
                             ("dataset_info.json", "state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{source} has splits {list(loaded)}, not {split!r} (--split)")
            loaded = loaded[split]
        return loaded, path
    if path.is_file():
        builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{source}: unsupported file type {path.suffix!r} (parquet, jsonl, json)")
        try:
            loaded = datasets.load_dataset(builder, data_files={split: str(path)}, split=split,
                                           cache_dir=cache_dir)
        except Exception as error:  # datasets' DatasetGenerationError names no line
            if builder == "json":
                _raise_on_the_bad_json_line(path, error)
            raise
        return loaded, path.parent
    if path.is_dir():  # a folder of parquet / jsonl files; datasets infers splits from names
        return datasets.load_dataset(str(path), split=split, cache_dir=cache_dir), path
    looks_local = path.suffix.lower() in (".parquet", ".jsonl", ".json", ".arrow")
    if looks_local or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"{source}: no such file or directory, and not a Hub name (owner/name)")
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir), None
    except Exception as error:
        raise RuntimeError(
            f"could not load the Hub dataset {source!r} (split {split!r}): {type(error).__name__}: "
            f"{error}. This machine may be offline: download it elsewhere and pass the local "
            f"save_to_disk directory, parquet or jsonl file instead.") from error


def load_examples(source, *, split: str = "train", image_column: str | None = None,
                  question_column: str | None = None, answer_column: str | None = None,
                  thinking_column: str | None = None, image_root: str | None = None,
                  num_examples: int | None = None, seed: int = 0,
                  synthetic_kwargs: dict | None = None, max_pixels: int | None = None,
                  cache_dir: str | None = None, num_proc: int | None = None
                  ) -> tuple[datasets.Dataset, LoadReport]:
    """Load `source` into the example schema; returns (dataset, report).

    num_examples: for synthetic sources, how many scenes to draw (default 2000); otherwise a
    random subset (shuffled with `seed`) of that many rows, taken before undecodable rows are
    dropped. max_pixels: downscale larger images (keeping the aspect ratio). cache_dir: where
    `datasets` caches files it reads (default ~/.cache/huggingface/datasets). num_proc: processes
    for the decode-and-check pass (worth it for the 70k-row sets).
    """
    name = source if isinstance(source, str) else "<dataset>"
    raw, default_root = _read_source(source, split, seed, num_examples,
                                     synthetic_kwargs, cache_dir)
    root = Path(image_root) if image_root is not None else default_root
    known = _known_columns(name)
    columns = {
        "image": _pick_column(raw, "image", image_column, known, name, required=True),
        "question": _pick_column(raw, "question", question_column, known, name, required=True),
        "answer": _pick_column(raw, "answer", answer_column, known, name, required=True),
        "thinking": _pick_column(raw, "thinking", thinking_column, known, name, required=False),
    }
    if SOURCE_ROW not in raw.column_names:  # numbered before the subset shuffle below
        raw = raw.add_column(SOURCE_ROW, list(range(len(raw))))
    if num_examples is not None and not name.startswith("synthetic") and num_examples < len(raw):
        raw = raw.shuffle(seed=seed).select(range(num_examples))
    # Read images as raw bytes so a corrupt one can be caught here rather than crash later.
    image_feature = raw.features[columns["image"]]
    if isinstance(image_feature, datasets.Image):
        raw = raw.cast_column(columns["image"], datasets.Image(decode=False))
    elif isinstance(image_feature, datasets.List) and isinstance(
            getattr(image_feature, "feature", None), datasets.Image):
        raw = raw.cast_column(columns["image"], datasets.List(datasets.Image(decode=False)))
    used = set(columns.values())
    extras = [c for c in raw.column_names if c not in used and c not in SCHEMA_COLUMNS]
    features = datasets.Features({
        "images": datasets.List(datasets.Image()), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "thinking": datasets.Value("string"),
        "image_paths": datasets.List(datasets.Value("string")), **{c: raw.features[c] for c in extras},
    })
    convert = functools.partial(_convert_batch, columns=columns, extras=extras, image_root=root,
                                max_pixels=max_pixels, source=name)
    dataset = raw.map(convert, batched=True, batch_size=256, remove_columns=raw.column_names,
                      features=features, num_proc=num_proc, desc=f"reading {name}")
    report = LoadReport(source=name, split=split, num_rows=len(raw), num_examples=len(dataset),
                        skipped_images=len(raw) - len(dataset), columns=columns)
    if report.skipped_images:
        warnings.warn(f"{name}: skipped {report.skipped_images} of {len(raw)} rows whose images "
                      f"failed to decode or have an aspect ratio over {MAX_ASPECT_RATIO}", stacklevel=2)
    if len(dataset) == 0:
        raise DataError(f"{name} [{split}]: no usable examples ({len(raw)} rows read, "
                         f"{report.skipped_images} skipped because their images failed to decode "
                         f"or have an aspect ratio over {MAX_ASPECT_RATIO})")
    return dataset, report


def describe_row(example: dict) -> str:
    """'dataset row N' for an error message: the row of the source file (from 0), when known."""
    row = example.get(SOURCE_ROW)
    return f"dataset row {row}" if row is not None else "a dataset row"


def train_val_split(dataset: datasets.Dataset, val_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A deterministic (train, val) split via `Dataset.train_test_split` with a seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return dataset, dataset.select([])
    parts = dataset.train_test_split(test_size=val_fraction, seed=seed)
    return parts["train"], parts["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description="Load a source and print a summary.")
    parser.add_argument("source")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_examples", type=int, default=5)
    args = parser.parse_args()
    dataset, report = load_examples(args.source, split=args.split, num_examples=args.num_examples)
    print(report.summary())
    for row in dataset.select(range(min(3, len(dataset)))):
        print({"images": [im.size for im in row["images"]], "question": row["question"],
               "answer": row["answer"], "thinking": row["thinking"]})


if __name__ == "__main__":
    main()
