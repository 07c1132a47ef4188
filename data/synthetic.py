"""CLEVR-like counting scenes drawn with pillow: the offline default dataset.

Each example is a scene of 1..10 objects (cubes, spheres, cylinders in eight CLEVR colours, two
sizes, rubber or metal) on a grey floor, a counting question, the integer answer and a short
R1-style reasoning trace. Answers and traces are computed from the scene's metadata (the list of
objects with their attributes, stored as JSON in the "objects" column), never parsed from text.

Question kinds (the CLEVR / CLEVR-CoGenT families the blog post and the TRL recipe train on):
    total     "How many items are there in the image?" (and paraphrases)
    by_color  "How many red objects are there?"
    by_shape  "How many cubes are there?"
    complex   "How many objects are left after removing all red cubes?" (CoGenT style)

`shifted=True` draws an out-of-distribution variant (a different palette, added triangles and
stars, other sizes, a beige background), mirroring train-on-CLEVR / test-on-SuperCLEVR.

`demonstrator_misses="gray"` labels the scenes the way an imperfect demonstrator would: one that
does not see objects of that colour (gray objects on the gray floor, the blind spot of a weak
detector). The image is the same scene; the answer and the reasoning trace count only the objects
the demonstrator sees, so its demonstrations are systematically wrong on every scene that holds
such an object. The true count stays in the "count" column.

`trace` picks how a "total" question's reasoning trace counts: "by_shape" (per-shape counts, then
their sum: "I see 2 cubes and 3 spheres. 2 + 3 = 5.") or "count_aloud" (one number per object:
"I count the objects one by one: 1, 2, 3, 4, 5. That makes 5."), which a tiny model learns from
much faster, since every number is a decision about the image ("is there one more?"), or "none"
(no trace: the target is the answer alone).

Every example is drawn from its own RNG seeded by (seed, index, shifted), so the dataset is
deterministic and `make_counting_dataset(n)` is a prefix of `make_counting_dataset(m > n)`.

Run:  python -m data.synthetic --preview docs/images/synthetic_scenes.png
      python -m data.synthetic --time 2000      # generation speed
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import textwrap
import time
from collections.abc import Sequence
from functools import lru_cache

import datasets
import numpy as np
from PIL import Image, ImageDraw

QUESTION_KINDS = ("total", "by_color", "by_shape", "complex")
TRACES = ("by_shape", "count_aloud", "none")
LAYOUTS = ("scatter", "grid")
# The grid layout's cells per side: 112 px / 4 = 28 px, the side of one merged Qwen2.5-VL image
# token (14 px patches, 2 x 2 merge), so each object sits inside one image token.
GRID_CELLS = 4

# CLEVR's palette (RGB values from the CLEVR generator's properties.json).
PALETTE = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
# The shifted palette shares no colour name with PALETTE.
SHIFTED_PALETTE = {
    "orange": (245, 130, 30), "pink": (240, 110, 170), "lime": (150, 215, 40),
    "navy": (30, 40, 120), "black": (35, 35, 35), "teal": (0, 128, 128),
    "olive": (128, 128, 0), "maroon": (128, 0, 32),
}
SHAPES = ("cube", "sphere", "cylinder")
SHIFTED_SHAPES = ("cube", "sphere", "cylinder", "triangle", "star")
PLURALS = {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders",
           "triangle": "triangles", "star": "stars"}
MATERIALS = ("rubber", "metal")
SIZES = ("small", "large")
# Object radius as a fraction of the image side.
SIZE_FRACTION = {"small": 0.05, "large": 0.08}
SHIFTED_SIZE_FRACTION = {"small": 0.04, "large": 0.095}
# Floor gradient (top colour, bottom colour).
BACKGROUND = ((196, 196, 196), (140, 140, 140))
SHIFTED_BACKGROUND = ((232, 220, 190), (180, 160, 125))

TOTAL_QUESTIONS = (
    "How many items are there in the image?",
    "How many objects are there in the image?",
    "How many objects are in the picture?",
    "Count the objects in the image. How many are there?",
)
COLOR_QUESTIONS = ("How many {color} objects are there?", "How many {color} things are in the image?")
SHAPE_QUESTIONS = ("How many {shapes} are there?", "How many {shapes} are in the image?")
COMPLEX_QUESTIONS = (
    "How many objects are left after removing all {target}?",
    "Subtract all {target}. How many objects are left?",
)
# Attribute combinations a "complex" question may remove.
REMOVAL_FILTERS = (("color", "shape"), ("size", "shape"), ("material", "shape"), ("color",), ("shape",))

SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing


def _style(shifted: bool):
    if shifted:
        return SHIFTED_PALETTE, SHIFTED_SHAPES, SHIFTED_SIZE_FRACTION, SHIFTED_BACKGROUND
    return PALETTE, SHAPES, SIZE_FRACTION, BACKGROUND


# --------------------------------------------------------------------------- scenes (metadata)

def make_scene(rng: random.Random, *, shifted: bool = False, count_range: tuple[int, int] = (1, 10),
               image_size: int = 112, layout: str = "scatter") -> list[dict]:
    """Sample objects (attributes + pixel positions).

    layout "scatter": anywhere on the floor, rejection sampling against overlap (CLEVR's way).
    layout "grid": one object per cell of a GRID_CELLS x GRID_CELLS grid (distinct cells, each
    object jittered inside its cell): no overlap, and every object inside one image token."""
    palette, shapes, size_fraction, _ = _style(shifted)
    low, high = count_range
    if not 1 <= low <= high:
        raise ValueError(f"count_range must satisfy 1 <= low <= high, got {count_range}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if layout == "grid" and high > GRID_CELLS**2:
        raise ValueError(f"the grid layout holds at most {GRID_CELLS**2} objects, got count_range {count_range}")
    count = rng.randint(low, high)
    attributes = [
        {"shape": rng.choice(shapes), "color": rng.choice(list(palette)),
         "size": rng.choice(SIZES), "material": rng.choice(MATERIALS)}
        for _ in range(count)
    ]
    if layout == "grid":
        return _place_on_grid(rng, attributes, size_fraction, image_size)
    # Large objects first: they are the hardest to fit. Two centres must be at least 85% of the
    # summed radii apart (light overlap only); every 100 failed tries relax that a little, and the
    # last try is kept regardless, so `count` is always met (measured: ten objects at 112 px never
    # needed the relaxation in 2,000 scenes).
    order = sorted(range(count), key=lambda i: attributes[i]["size"] != "large")
    placed: list[dict] = []
    for i in order:
        radius = size_fraction[attributes[i]["size"]] * image_size
        for attempt in range(400):
            slack = 0.85 - 0.5 * (attempt // 100) / 4  # 0.85, 0.79, 0.73, 0.66
            x = rng.uniform(radius + 1, image_size - radius - 1)
            y = rng.uniform(0.25 * image_size + radius, image_size - radius - 1)
            if all(math.hypot(x - o["x"], y - o["y"]) >= slack * (radius + o["radius"]) for o in placed):
                break
        placed.append({**attributes[i], "x": round(x, 1), "y": round(y, 1), "radius": round(radius, 2)})
    placed.sort(key=lambda o: o["y"])  # back to front: nearer objects are drawn last
    return placed


def _place_on_grid(rng: random.Random, attributes: list[dict], size_fraction: dict, image_size: int) -> list[dict]:
    cell = image_size / GRID_CELLS
    placed = []
    for attrs, index in zip(attributes, rng.sample(range(GRID_CELLS**2), len(attributes)), strict=True):
        radius = size_fraction[attrs["size"]] * image_size
        row, col = divmod(index, GRID_CELLS)
        # Jitter inside the cell; the shapes' drawings stay within about 1.15 x radius of the centre.
        slack = max(0.0, cell / 2 - 1.15 * radius - 1)
        x = (col + 0.5) * cell + rng.uniform(-slack, slack)
        y = (row + 0.5) * cell + rng.uniform(-slack, slack)
        placed.append({**attrs, "x": round(x, 1), "y": round(y, 1), "radius": round(radius, 2)})
    placed.sort(key=lambda o: o["y"])  # back to front
    return placed


def matches(obj: dict, target: dict) -> bool:
    """True when the object has every attribute named in `target` (e.g. {"color": "red"})."""
    return all(obj[key] == value for key, value in target.items())


def describe(target: dict, n: int) -> str:
    """'red cube' / 'small red cubes' / 'red objects' (singular when n == 1)."""
    shape = target.get("shape")
    noun = (shape if n == 1 else PLURALS[shape]) if shape else ("object" if n == 1 else "objects")
    words = [target[k] for k in ("size", "color", "material") if k in target] + [noun]
    return " ".join(words)


def _enumerate(groups: list[tuple[dict, int]], nothing: str) -> str:
    """'I see 2 red cubes and 1 blue sphere. 2 + 1 = 3.' (the counting part of every trace)."""
    groups = [(t, n) for t, n in groups if n > 0]
    if not groups:
        return f"I see no {nothing}. So there are 0."
    items = [f"{n} {describe(t, n)}" for t, n in groups]
    listing = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    total = sum(n for _, n in groups)
    if len(groups) == 1:
        return f"I see {listing}. That makes {total}."
    return f"I see {listing}. {' + '.join(str(n) for _, n in groups)} = {total}."


def _count_groups(objects: list[dict], keys: Sequence[dict]) -> list[tuple[dict, int]]:
    return [(key, sum(matches(o, key) for o in objects)) for key in keys]


def _count_aloud(n: int) -> str:
    """'I count the objects one by one: 1, 2, 3. That makes 3.'"""
    if n == 0:
        return "I see no objects. So there are 0."
    return f"I count the objects one by one: {', '.join(str(i) for i in range(1, n + 1))}. That makes {n}."


def make_question(rng: random.Random, objects: list[dict], kind: str, *, shifted: bool = False,
                  trace: str = "by_shape") -> tuple[str, int, str]:
    """(question, answer, thinking) for one scene; answer and trace come from the metadata."""
    palette, shapes, _, _ = _style(shifted)
    by_shape = [{"shape": s} for s in shapes]
    if kind == "total":
        answer = len(objects)
        thinking = _count_aloud(answer) if trace == "count_aloud" else _enumerate(_count_groups(objects, by_shape), "objects")
        return rng.choice(TOTAL_QUESTIONS), answer, thinking
    if kind == "by_color":
        # Mostly ask about a colour that is present; sometimes any colour (answer may be 0).
        color = rng.choice(objects)["color"] if rng.random() < 0.8 else rng.choice(list(palette))
        answer = sum(o["color"] == color for o in objects)
        groups = _count_groups(objects, [{"color": color, "shape": s} for s in shapes])
        question = rng.choice(COLOR_QUESTIONS).format(color=color)
        return question, answer, _enumerate(groups, f"{color} objects")
    if kind == "by_shape":
        shape = rng.choice(objects)["shape"] if rng.random() < 0.8 else rng.choice(shapes)
        answer = sum(o["shape"] == shape for o in objects)
        groups = _count_groups(objects, [{"color": c, "shape": shape} for c in palette])
        question = rng.choice(SHAPE_QUESTIONS).format(shapes=PLURALS[shape])
        return question, answer, _enumerate(groups, PLURALS[shape])
    if kind == "complex":
        keys = rng.choice(REMOVAL_FILTERS)
        source = rng.choice(objects) if rng.random() < 0.8 else {
            "shape": rng.choice(shapes), "color": rng.choice(list(palette)),
            "size": rng.choice(SIZES), "material": rng.choice(MATERIALS)}
        target = {k: source[k] for k in keys}
        total, removed = len(objects), sum(matches(o, target) for o in objects)
        answer = total - removed
        question = rng.choice(COMPLEX_QUESTIONS).format(target=describe(target, 2))
        thinking = (f"{_enumerate(_count_groups(objects, by_shape), 'objects')} "
                    f"Removing {removed} {describe(target, removed)} leaves {total} - {removed} = {answer}.")
        return question, answer, thinking
    raise ValueError(f"unknown question kind {kind!r}; choose from {QUESTION_KINDS}")


# --------------------------------------------------------------------------- drawing

@lru_cache(maxsize=8)
def _background(size: int, shifted: bool) -> Image.Image:
    """Floor gradient: lighter at the horizon, darker in front, slightly darker at the sides."""
    top, bottom = np.array(_style(shifted)[3][0], float), np.array(_style(shifted)[3][1], float)
    rows = np.linspace(0.0, 1.0, size)[:, None, None] ** 1.5         # [S, 1, 1]
    cols = np.linspace(-1.0, 1.0, size)[None, :, None]               # [1, S, 1]
    pixels = (top + (bottom - top) * rows) * (1.0 - 0.08 * cols**2)  # [S, S, 3]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    if factor <= 1.0:
        return tuple(int(c * factor) for c in color)
    return tuple(int(c + (255 - c) * (factor - 1.0)) for c in color)  # towards white


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, color: tuple[int, int, int], scale: float):
    x, y, r = obj["x"] * scale, obj["y"] * scale, obj["radius"] * scale
    metal = obj["material"] == "metal"
    dark, light = (0.55, 1.45) if metal else (0.75, 1.15)  # metal: higher contrast
    shape = obj["shape"]
    if shape == "sphere":
        steps = 6
        for k in range(steps):  # concentric discs drifting to the upper-left light
            t = k / steps
            rk, off = r * (1 - 0.75 * t), r * 0.3 * t
            draw.ellipse((x - off - rk, y - off - rk, x - off + rk, y - off + rk),
                         fill=_shade(color, dark + (light - dark) * t))
    elif shape == "cube":
        h, d = 0.8 * r, 0.35 * r  # half side, depth offset
        draw.polygon([(x - h, y - h), (x - h + d, y - h - d), (x + h + d, y - h - d), (x + h, y - h)],
                     fill=_shade(color, light))                                   # top
        draw.polygon([(x + h, y - h), (x + h + d, y - h - d), (x + h + d, y + h - d), (x + h, y + h)],
                     fill=_shade(color, dark))                                    # side
        draw.rectangle((x - h, y - h, x + h, y + h), fill=color)                  # front
    elif shape == "cylinder":
        h, e = 0.75 * r, 0.3 * r  # half width, ellipse half height
        draw.ellipse((x - h, y + h - e, x + h, y + h + e), fill=_shade(color, dark))
        draw.rectangle((x - h, y - h, x + h, y + h), fill=color)
        draw.rectangle((x + 0.4 * h, y - h, x + h, y + h), fill=_shade(color, 0.5 * (1 + dark)))
        draw.ellipse((x - h, y - h - e, x + h, y - h + e), fill=_shade(color, light))
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=color)
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x + 0.25 * r, y + 0.8 * r)],
                     fill=_shade(color, dark))
    elif shape == "star":
        points = [(x + (r if i % 2 == 0 else 0.45 * r) * math.sin(i * math.pi / 5),
                   y - (r if i % 2 == 0 else 0.45 * r) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(points, fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    if metal:  # a specular highlight
        s = 0.22 * r
        hx, hy = x - 0.35 * r, y - 0.4 * r
        draw.ellipse((hx - s, hy - s, hx + s, hy + s), fill=_shade(color, 1.8))


def render_scene(objects: list[dict], *, image_size: int = 112, shifted: bool = False) -> Image.Image:
    """Draw the objects (back to front) with soft shadows on the floor; returns an RGB image."""
    palette = _style(shifted)[0]
    big = image_size * SUPERSAMPLE
    canvas = _background(big, shifted).copy()
    draw = ImageDraw.Draw(canvas)
    floor_shadow = _shade(_style(shifted)[3][1], 0.8)
    for obj in objects:  # shadows first so no shadow darkens an object
        x, y, r = (obj[k] * SUPERSAMPLE for k in ("x", "y", "radius"))
        draw.ellipse((x - 0.6 * r, y + 0.55 * r, x + 1.3 * r, y + 1.0 * r), fill=floor_shadow)
    for obj in objects:
        _draw_object(draw, obj, palette[obj["color"]], SUPERSAMPLE)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


# --------------------------------------------------------------------------- dataset

def make_example(seed: int, index: int, *, shifted: bool = False,
                 question_kinds: Sequence[str] = ("total",), count_range: tuple[int, int] = (1, 10),
                 image_size: int = 112, demonstrator_misses: str | None = None,
                 trace: str = "by_shape", layout: str = "scatter") -> dict:
    """One row of the example schema (+ metadata). Deterministic in (seed, index, shifted).

    demonstrator_misses: a colour the demonstrator does not see (see the module docstring); the
    scene and the question are the same as without it, only the answer and the trace change."""
    # A string seed is hashed with SHA-512 by `random`, so it is stable across processes.
    rng = random.Random(f"counting/{seed}/{index}/{int(shifted)}")
    objects = make_scene(rng, shifted=shifted, count_range=count_range, image_size=image_size, layout=layout)
    kind = rng.choice(list(question_kinds))
    # The demonstrator answers from the objects it sees. Only "total" questions are supported: the
    # other kinds pick their target from the object list, so a smaller list would change the question.
    seen = objects if demonstrator_misses is None else [o for o in objects if o["color"] != demonstrator_misses]
    question, answer, thinking = make_question(rng, seen, kind, shifted=shifted, trace=trace)
    thinking = None if trace == "none" else thinking
    return {
        "images": [render_scene(objects, image_size=image_size, shifted=shifted)],
        "question": question,
        "answer": str(answer),
        "thinking": thinking,
        "count": len(objects),
        "question_kind": kind,
        "objects": json.dumps(objects),
        "source": "synthetic-shifted" if shifted else "synthetic",
    }


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


FEATURES = datasets.Features({
    "images": datasets.List(datasets.Image()),
    "question": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "thinking": datasets.Value("string"),
    "count": datasets.Value("int32"),
    "question_kind": datasets.Value("string"),
    "objects": datasets.Value("string"),
    "source": datasets.Value("string"),
})


def make_counting_dataset(num_examples: int, seed: int = 0, *, shifted: bool = False,
                          question_kinds: Sequence[str] = ("total",),
                          count_range: tuple[int, int] = (1, 10),
                          image_size: int = 112,
                          demonstrator_misses: str | None = None,
                          trace: str = "by_shape", layout: str = "scatter") -> datasets.Dataset:
    """`num_examples` counting scenes in the example schema (+ count, question_kind, objects, source)."""
    unknown = [k for k in question_kinds if k not in QUESTION_KINDS]
    if unknown or not question_kinds:
        raise ValueError(f"question_kinds {list(question_kinds)} must be a non-empty subset of {QUESTION_KINDS}")
    if trace not in TRACES:
        raise ValueError(f"trace {trace!r} is not one of {TRACES}")
    if demonstrator_misses is not None:
        palette = SHIFTED_PALETTE if shifted else PALETTE
        if demonstrator_misses not in palette:
            raise ValueError(f"demonstrator_misses {demonstrator_misses!r} is not a colour of these scenes: {list(palette)}")
        if set(question_kinds) != {"total"}:
            raise ValueError(f"demonstrator_misses works with question_kinds ('total',) only, got {list(question_kinds)}")
    rows = [make_example(seed, i, shifted=shifted, question_kinds=question_kinds, count_range=count_range,
                         image_size=image_size, demonstrator_misses=demonstrator_misses, trace=trace,
                         layout=layout)
            for i in range(num_examples)]
    columns = {name: [row[name] for row in rows] for name in FEATURES}
    # Encode the PNGs ourselves at zlib compression level 1: the fastest level, for files a little
    # larger than datasets' default encode gives (a scene is drawn once per run, so speed wins).
    columns["images"] = [[{"bytes": _png_bytes(image), "path": None} for image in row_images]
                         for row_images in columns["images"]]
    return datasets.Dataset.from_dict(columns, features=FEATURES)


# --------------------------------------------------------------------------- CLI

def save_preview(path: str, per_row: int = 4, seed: int = 0, layout: str = "scatter") -> None:
    """A grid: in-distribution scenes on the top row, shifted scenes below, with Q and A."""
    import matplotlib  # optional: pip install .[plot]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: pip install .[plot]

    fig, axes = plt.subplots(2, per_row, figsize=(2.3 * per_row, 6.0))
    for row, shifted in enumerate((False, True)):
        for col in range(per_row):
            kinds = ("total",) if layout == "grid" else QUESTION_KINDS
            ex = make_example(seed, col, shifted=shifted, question_kinds=kinds, image_size=160 if layout == "scatter" else 112,
                              layout=layout)
            ax = axes[row, col]
            ax.imshow(ex["images"][0])
            ax.set_axis_off()
            title = "\n".join(textwrap.wrap(ex["question"], 30)) + f"\nanswer: {ex['answer']}"
            ax.set_title(title, fontsize=7)
    fig.text(0.01, 0.75, "in distribution", rotation=90, va="center", fontsize=9)
    fig.text(0.01, 0.27, "shifted (OOD)", rotation=90, va="center", fontsize=9)
    fig.tight_layout(rect=(0.03, 0, 1, 1), h_pad=2.0)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preview", metavar="PATH", help="write a PNG grid of example scenes")
    parser.add_argument("--layout", default="scatter", choices=LAYOUTS, help="scene layout of the preview")
    parser.add_argument("--time", type=int, metavar="N", help="time generating N examples")
    args = parser.parse_args()
    if args.preview:
        save_preview(args.preview, layout=args.layout)
        print(f"wrote {args.preview}")
    if args.time:
        start = time.perf_counter()
        dataset = make_counting_dataset(args.time, question_kinds=QUESTION_KINDS)
        seconds = time.perf_counter() - start
        print(f"{len(dataset)} examples in {seconds:.2f} s ({len(dataset) / seconds:.0f}/s)")
    if not (args.preview or args.time):
        parser.print_help()


if __name__ == "__main__":
    main()
