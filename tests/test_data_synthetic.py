"""Tests for data/synthetic.py: determinism, answers checked against the scene metadata, count
range, the shifted variant. Run: python -m pytest tests/test_data_synthetic.py -q"""

from __future__ import annotations

import json
import re

import datasets
import numpy as np
import pytest

from data import synthetic
from data.synthetic import QUESTION_KINDS, make_counting_dataset, make_example, render_scene


def _raw(dataset: datasets.Dataset) -> list[dict]:
    """Rows with images as encoded bytes (to compare pixels exactly without decoding)."""
    return list(dataset.cast_column("images", datasets.List(datasets.Image(decode=False))))


def _answer_from_metadata(question: str, objects: list[dict]) -> int:
    """Count from the metadata what the question asks, reading the question's words only.

    Independent of make_question: the filter is recovered from the text by vocabulary lookup.
    """
    words = re.findall(r"[a-z]+", question.lower())
    vocab = {
        "color": set(synthetic.PALETTE) | set(synthetic.SHIFTED_PALETTE),
        "size": set(synthetic.SIZES),
        "material": set(synthetic.MATERIALS),
        "shape": {plural: shape for shape, plural in synthetic.PLURALS.items()},
    }
    wanted = {}
    for word in words:
        for attribute, values in vocab.items():
            if word in values:
                wanted[attribute] = values[word] if isinstance(values, dict) else word
    matching = sum(all(o[k] == v for k, v in wanted.items()) for o in objects)
    if "left" in words:  # "How many objects are left after removing all ..."
        return len(objects) - matching
    return matching  # with no attribute words this counts every object


@pytest.mark.parametrize("shifted", [False, True])
def test_answers_match_the_scene_metadata(shifted):
    dataset = make_counting_dataset(120, seed=5, shifted=shifted, question_kinds=QUESTION_KINDS)
    kinds = set()
    for row in dataset:
        objects = json.loads(row["objects"])
        kinds.add(row["question_kind"])
        assert row["count"] == len(objects)
        assert int(row["answer"]) == _answer_from_metadata(row["question"], objects), row
        # The trace ends with the answer: "... 3 + 2 = 5." / "That makes 5." / "leaves 6 - 1 = 5."
        assert re.search(rf"(= |makes |are ){row['answer']}\.$", row["thinking"]), row["thinking"]
    assert kinds == set(QUESTION_KINDS)


def test_traces_are_short_and_templated():
    row = make_example(0, 0, question_kinds=("total",), count_range=(4, 4))
    objects = json.loads(row["objects"])
    shapes = [o["shape"] for o in objects]
    # e.g. "I see 2 cubes and 2 spheres. 2 + 2 = 4."
    assert row["thinking"].startswith("I see ")
    for shape in set(shapes):
        n = shapes.count(shape)
        assert f"{n} {shape if n == 1 else synthetic.PLURALS[shape]}" in row["thinking"]
    assert len(row["thinking"]) < 120


def test_same_seed_same_data_different_seed_different_data():
    first, again = _raw(make_counting_dataset(6, seed=1)), _raw(make_counting_dataset(6, seed=1))
    other = _raw(make_counting_dataset(6, seed=2))
    assert first == again
    assert [r["images"][0]["bytes"] for r in first] != [r["images"][0]["bytes"] for r in other]
    assert [r["objects"] for r in first] != [r["objects"] for r in other]


def test_smaller_dataset_is_a_prefix_of_a_larger_one():
    small, large = _raw(make_counting_dataset(3, seed=4)), _raw(make_counting_dataset(7, seed=4))
    assert small == large[:3]


def test_count_range_and_image_size_respected():
    dataset = make_counting_dataset(40, seed=0, count_range=(3, 5), image_size=96)
    counts = dataset["count"]
    assert min(counts) >= 3 and max(counts) <= 5 and len(set(counts)) == 3
    assert all(row["images"][0].size == (96, 96) for row in dataset.select(range(3)))
    # The crowded end is always met: ten objects placed, all inside the image.
    crowded = make_counting_dataset(10, seed=0, count_range=(10, 10))
    for row in crowded:
        objects = json.loads(row["objects"])
        assert len(objects) == 10
        assert all(o["radius"] <= o["x"] <= 112 - o["radius"] for o in objects)


def test_schema_and_features():
    dataset = make_counting_dataset(2, seed=0)
    assert {"images", "question", "answer", "thinking", "count", "question_kind", "objects",
            "source"} == set(dataset.column_names)
    assert isinstance(dataset.features["images"], datasets.List)
    row = dataset[0]
    assert row["images"][0].mode == "RGB" and row["answer"].isdigit()
    assert row["question_kind"] == "total" and row["source"] == "synthetic"


def test_shifted_variant_differs_in_palette_shapes_and_background():
    normal = [json.loads(o) for o in make_counting_dataset(60, seed=0)["objects"]]
    shifted = [json.loads(o) for o in make_counting_dataset(60, seed=0, shifted=True)["objects"]]
    normal_colors = {o["color"] for scene in normal for o in scene}
    shifted_colors = {o["color"] for scene in shifted for o in scene}
    assert normal_colors <= set(synthetic.PALETTE)
    assert shifted_colors <= set(synthetic.SHIFTED_PALETTE)
    assert not normal_colors & shifted_colors
    assert {o["shape"] for scene in normal for o in scene} == set(synthetic.SHAPES)
    assert {"triangle", "star"} <= {o["shape"] for scene in shifted for o in scene}
    # Sizes differ: the same size word has another radius.
    assert {o["radius"] for scene in normal for o in scene}.isdisjoint(
        {o["radius"] for scene in shifted for o in scene})
    corner_normal = np.asarray(render_scene([], shifted=False))[0, 0]
    corner_shifted = np.asarray(render_scene([], shifted=True))[0, 0]
    assert np.abs(corner_normal.astype(int) - corner_shifted.astype(int)).sum() > 30


def test_objects_are_drawn_where_the_metadata_says():
    for index in range(5):
        row = make_example(3, index, count_range=(1, 1))
        (obj,) = json.loads(row["objects"])
        scene = np.asarray(row["images"][0]).astype(int)        # [S, S, 3]
        floor = np.asarray(render_scene([])).astype(int)        # [S, S, 3]
        x, y = round(obj["x"]), round(obj["y"])
        assert np.abs(scene[y, x] - floor[y, x]).sum() > 40, obj


def test_unknown_question_kind_is_rejected():
    with pytest.raises(ValueError, match="question_kinds"):
        make_counting_dataset(1, question_kinds=("colour",))


@pytest.mark.parametrize("shifted", [False, True])
def test_grid_layout_puts_each_object_in_its_own_image_token(shifted):
    # Grid cells are 112 / 4 = 28 px, one merged Qwen2.5-VL image token each; the drawing of an
    # object stays within 1.15 x radius of its centre (the cube's depth offset is the widest).
    cell = 112 / synthetic.GRID_CELLS
    dataset = make_counting_dataset(40, seed=1, shifted=shifted, layout="grid", count_range=(1, 16))
    assert max(dataset["count"]) > 10
    for row in dataset:
        objects = json.loads(row["objects"])
        cells = [(int(o["y"] // cell), int(o["x"] // cell)) for o in objects]
        assert len(set(cells)) == len(objects)  # distinct cells
        for o, (r, c) in zip(objects, cells, strict=True):
            reach = 1.15 * o["radius"]
            assert c * cell <= o["x"] - reach and o["x"] + reach <= (c + 1) * cell, o
            assert r * cell <= o["y"] - reach and o["y"] + reach <= (r + 1) * cell, o
    with pytest.raises(ValueError, match="at most 16"):
        make_counting_dataset(1, layout="grid", count_range=(1, 17))
    with pytest.raises(ValueError, match="layout"):
        make_counting_dataset(1, layout="rows")
