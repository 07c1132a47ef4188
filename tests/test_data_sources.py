"""Tests for data/sources.py on small local fixtures shaped like the seed datasets.

Each fixture has three good rows and one row whose image is corrupt; the forms are the ones a
real run meets: save_to_disk with an Image feature (decoded on access), parquet with Image structs
(bytes), parquet with a raw binary column, and jsonl + an image folder (relative paths).
Run: python -m pytest tests/test_data_sources.py -q"""

from __future__ import annotations

import io
import json
import warnings

import datasets
import pytest
from PIL import Image

from data import sources
from data.sources import extract_tag, load_examples, resize_to_max_pixels, train_val_split

CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


def _png(color: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = [_png("red"), _png("green"), _png("blue")]


def _r1_rows():  # MMInstruction/Clevr_CoGenT_TrainA_R1: image, problem, thinking, solution
    return {
        "image": [{"bytes": b, "path": None} for b in GOOD] + [{"bytes": CORRUPT, "path": None}],
        "problem": [f"How many items are there in the image? ({i})" for i in range(4)],
        "thinking": [f"<think>\nI see {i} cubes.\n</think>" for i in range(4)],
        "solution": [f"<answer> {i} </answer>" for i in range(4)],
    }


def _complex_rows():  # Clevr_CoGenT_TrainA_70K_Complex: image, problem, solution
    rows = _r1_rows()
    del rows["thinking"]
    return rows


def _lmms_rows():  # lmms-lab/multimodal-open-r1-8k-verified (+ original_question/answer)
    rows = _complex_rows()
    rows["image"] = GOOD + [CORRUPT]  # raw bytes
    rows["solution"] = [f"<think>Step {i}.</think><answer>{'ABCD'[i]}</answer>" for i in range(4)]
    rows["original_question"] = ["q"] * 4
    rows["original_answer"] = ["a"] * 4
    return rows


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "hf_cache")


def _check(dataset, report, *, thinking: bool):
    assert report.skipped_images == 1 and report.num_rows == 4 and report.num_examples == 3
    assert len(dataset) == 3
    assert dataset["answer"] == ["0", "1", "2"]
    assert dataset["question"][1] == "How many items are there in the image? (1)"
    images = dataset[2]["images"]
    assert len(images) == 1 and images[0].size == (40, 30)
    assert images[0].convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    if thinking:
        assert dataset["thinking"] == ["I see 0 cubes.", "I see 1 cubes.", "I see 2 cubes."]
    else:
        assert dataset["thinking"] == [None, None, None]


def test_save_to_disk_with_image_feature(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "thinking": datasets.Value("string"), "solution": datasets.Value("string")})
    datasets.Dataset.from_dict(_r1_rows(), features=features).save_to_disk(str(tmp_path / "r1"))
    with pytest.warns(UserWarning, match="skipped 1 of 4"):
        dataset, report = load_examples(str(tmp_path / "r1"))
    _check(dataset, report, thinking=True)
    assert report.columns == {"image": "image", "question": "problem", "answer": "solution",
                              "thinking": "thinking"}


def test_dataset_dict_on_disk_picks_the_split(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string")})
    part = datasets.Dataset.from_dict(_complex_rows(), features=features)
    datasets.DatasetDict({"train": part, "test": part.select([0])}).save_to_disk(str(tmp_path / "dd"))
    dataset, report = load_examples(str(tmp_path / "dd"), split="test")
    assert len(dataset) == 1 and report.skipped_images == 0
    with pytest.raises(ValueError, match="splits"):
        load_examples(str(tmp_path / "dd"), split="validation")


def test_parquet_with_image_structs(tmp_path, cache_dir):
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string")})
    path = tmp_path / "complex.parquet"
    datasets.Dataset.from_dict(_complex_rows(), features=features).to_parquet(str(path))
    with pytest.warns(UserWarning):
        dataset, report = load_examples(str(path), cache_dir=cache_dir)
    _check(dataset, report, thinking=False)


def test_parquet_with_raw_bytes_keeps_metadata_and_reads_tagged_thinking(tmp_path, cache_dir):
    path = tmp_path / "lmms" / "train-00000.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_dict(_lmms_rows()).to_parquet(str(path))
    with pytest.warns(UserWarning):
        dataset, report = load_examples(str(path.parent), cache_dir=cache_dir)  # a directory
    assert report.skipped_images == 1
    assert dataset["answer"] == ["A", "B", "C"]
    assert dataset["thinking"] == ["Step 0.", "Step 1.", "Step 2."]  # from the tagged solution
    assert dataset["original_question"] == ["q"] * 3  # metadata kept


def test_jsonl_with_relative_image_paths(tmp_path, cache_dir):
    # R1-V's SuperCLEVR counting file: {"image_path", "question", "ground_truth"} per line.
    (tmp_path / "images").mkdir()
    lines = []
    for i, data in enumerate(GOOD + [CORRUPT]):
        (tmp_path / "images" / f"{i}.png").write_bytes(data)
        lines.append({"image_path": f"images/{i}.png", "question": f"How many items are there in the image? ({i})",
                      "ground_truth": i})
    lines.append({"image_path": "images/missing.png", "question": "?", "ground_truth": 9})
    path = tmp_path / "superclevr.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.warns(UserWarning, match="skipped 2 of 5"):
        dataset, report = load_examples(str(path), cache_dir=cache_dir)
    assert report.skipped_images == 2 and report.num_examples == 3
    assert dataset["answer"] == ["0", "1", "2"]
    # An explicit image_root elsewhere breaks the relative paths: every row is skipped -> error.
    with pytest.raises(ValueError, match="no usable examples"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_examples(str(path), image_root=str(tmp_path / "elsewhere"), cache_dir=cache_dir)


def test_in_memory_dataset_with_decoded_images_and_column_flags():
    rows = {"pic": [Image.new("RGB", (20, 20), "white")] * 2, "q": ["Q1", "Q2"], "a": [1, 2],
            "trace": ["<think> </think>", "two"]}
    raw = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"pic": datasets.Image(), "q": datasets.Value("string"), "a": datasets.Value("int64"),
         "trace": datasets.Value("string")}))
    dataset, report = load_examples(raw, image_column="pic", question_column="q", answer_column="a",
                                    thinking_column="trace")
    assert dataset["answer"] == ["1", "2"] and report.columns["image"] == "pic"
    assert dataset["thinking"] == [None, "two"]  # an empty trace is no trace
    assert dataset[0]["images"][0].size == (20, 20)


def test_multi_image_rows():
    raw = datasets.Dataset.from_dict(
        {"images": [[{"bytes": GOOD[0], "path": None}, {"bytes": GOOD[1], "path": None}],
                    [{"bytes": GOOD[2], "path": None}, {"bytes": CORRUPT, "path": None}]],
         "question": ["a", "b"], "answer": ["1", "2"]},
        features=datasets.Features({"images": datasets.List(datasets.Image()),
                                    "question": datasets.Value("string"), "answer": datasets.Value("string")}))
    with pytest.warns(UserWarning):
        dataset, report = load_examples(raw)
    assert report.skipped_images == 1 and len(dataset[0]["images"]) == 2


def test_missing_column_names_the_columns_found_and_the_flag():
    raw = datasets.Dataset.from_dict({"image": GOOD, "text": ["x"] * 3, "solution": ["1"] * 3})
    with pytest.raises(ValueError, match=r"--question_column") as error:
        load_examples(raw)
    assert "['image', 'text', 'solution']" in str(error.value)
    with pytest.raises(ValueError, match=r"--answer_column"):
        load_examples(raw, question_column="text", answer_column="gold")
    with pytest.raises(ValueError, match=r"--thinking_column"):
        load_examples(raw, question_column="text", thinking_column="trace")


def test_known_hub_name_goes_through_load_dataset(monkeypatch):
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "thinking": datasets.Value("string"), "solution": datasets.Value("string")})
    fake_hub = datasets.Dataset.from_dict(_r1_rows(), features=features)
    calls = []

    def fake_load_dataset(name, split=None, cache_dir=None):
        calls.append((name, split))
        return fake_hub

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    with pytest.warns(UserWarning):
        dataset, report = load_examples("MMInstruction/Clevr_CoGenT_TrainA_R1")
    assert calls == [("MMInstruction/Clevr_CoGenT_TrainA_R1", "train")]
    _check(dataset, report, thinking=True)


def test_hub_failure_says_offline_and_which_name(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(sources.datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"offline") as error:
        load_examples("MMInstruction/Clevr_CoGenT_TrainA_70K_Complex")
    assert "MMInstruction/Clevr_CoGenT_TrainA_70K_Complex" in str(error.value)
    with pytest.raises(FileNotFoundError):
        load_examples("./no/such/file.jsonl")


def test_extract_tag():
    assert extract_tag("<answer> 3 </answer>", "answer") == "3"
    assert extract_tag(" 3\n", "answer") == "3"
    assert extract_tag(3, "answer") == "3"
    assert extract_tag("<think>\na\nb\n</think><answer>B</answer>", "think") == "a\nb"
    assert extract_tag("<think>x</think>\n<answer>\\frac{1}{2}</answer>", "answer") == "\\frac{1}{2}"


def test_resize_to_max_pixels_keeps_aspect_and_never_upscales():
    image = Image.new("RGB", (400, 200))
    resized = resize_to_max_pixels(image, 100 * 100)
    # scale = sqrt(10000 / 80000) = 0.3536 -> 141 x 70 = 9870 pixels <= 10000
    assert resized.size == (141, 70)
    small = Image.new("RGB", (50, 50))
    assert resize_to_max_pixels(small, 100 * 100) is small


def test_max_pixels_applies_through_load_examples():
    raw = datasets.Dataset.from_dict({"image": [_png("red", (200, 100))], "question": ["q"],
                                      "answer": ["1"]})
    dataset, _ = load_examples(raw, max_pixels=50 * 50)
    width, height = dataset[0]["images"][0].size
    assert width * height <= 2500 and width == 2 * height


def test_num_examples_subset_is_deterministic():
    raw = datasets.Dataset.from_dict({"image": [GOOD[0]] * 20, "question": [str(i) for i in range(20)],
                                      "answer": ["1"] * 20})
    first, _ = load_examples(raw, num_examples=5, seed=3)
    again, _ = load_examples(raw, num_examples=5, seed=3)
    other, _ = load_examples(raw, num_examples=5, seed=4)
    assert first["question"] == again["question"] != other["question"]
    assert len(first) == 5


def test_synthetic_sources_and_their_splits():
    train, report = load_examples("synthetic", num_examples=4)
    validation, _ = load_examples("synthetic", split="validation", num_examples=4)
    shifted, _ = load_examples("synthetic-shifted", num_examples=4,
                               synthetic_kwargs={"question_kinds": ("complex",)})
    assert report.num_examples == 4 and report.skipped_images == 0
    assert train["objects"] != validation["objects"]
    assert set(shifted["source"]) == {"synthetic-shifted"}
    assert set(shifted["question_kind"]) == {"complex"}


def test_train_val_split_is_deterministic_and_disjoint():
    dataset = datasets.Dataset.from_dict({"id": list(range(50))})
    train, val = train_val_split(dataset, val_fraction=0.2, seed=0)
    train2, val2 = train_val_split(dataset, val_fraction=0.2, seed=0)
    _, val_other = train_val_split(dataset, val_fraction=0.2, seed=1)
    assert len(train) == 40 and len(val) == 10
    assert val["id"] == val2["id"] and train["id"] == train2["id"]
    assert set(train["id"]).isdisjoint(val["id"])
    assert val["id"] != val_other["id"]
    assert len(train_val_split(dataset, val_fraction=0.0)[1]) == 0
