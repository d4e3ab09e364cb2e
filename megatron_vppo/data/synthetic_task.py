"""An offline visual task whose answers are in the image, not in the text.

Three kinds of problem, each a small PIL drawing (sides 56–112 px, multiples of 28 so Qwen2.5-VL's
14-px patches and 2×2 merge windows tile it exactly) with an integer answer in 1..6:

- count: coloured circles / squares / triangles on a white canvas; "How many red shapes ...?"
- bars:  a bar chart with a tick per unit; "What is the value of the tallest bar?"
- area:  two labelled rectangles on a grid of unit squares; "What is the area of the rectangle labelled A?"

Problem texts hold no digits and every template is asked with several answers, so only the image tells
which. Drawing is not anti-aliased (the label font is PIL's built-in bitmap font), so each sample's answer
can be re-derived from its pixels; `meta` records what was drawn for such checks.

Deterministic: sample `i` of split `s` under seed `k` always renders the same pixels (a per-sample
`random.Random` keyed by (k, s, i)). Rows follow the ViRL39K schema: `problem` (with an `<image>`
placeholder), `images` (PNG paths relative to the data file), `answer` (string), plus `task` and `meta`
(JSON string).

CLI: python -m megatron_vppo.data.synthetic_task --out DIR --train N --val M --seed S [--format jsonl|parquet]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["TASKS", "COLOURS", "Sample", "make_sample", "write_synthetic_dataset", "main"]

TASKS = ("count", "bars", "area")
MAX_ANSWER = 6
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
GRID = (200, 200, 200)
# Fill colours: far apart, and none equal to BACKGROUND / INK / GRID, so pixels identify them exactly.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")


@dataclass
class Sample:
    problem: str  # begins with the `<image>` placeholder
    image: Image.Image
    answer: str
    task: str
    meta: dict = field(default_factory=dict)


def _sample_rng(seed: int, split: str, index: int) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`: stable across processes and Python versions.
    return random.Random(f"vppo-synthetic:{seed}:{split}:{index}")


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _count(rng: random.Random) -> Sample:
    """Shapes in distinct 28-px cells (so they never touch); ask for one colour, or one colour and kind."""
    w, h = rng.choice([(84, 84), (112, 112), (112, 84), (84, 112)])
    cells = [(cx, cy) for cy in range(h // 28) for cx in range(w // 28)]
    target = rng.choice(list(COLOURS))
    by_kind = rng.random() < 0.5
    kind = rng.choice(SHAPES)
    answer = rng.randint(1, MAX_ANSWER)
    n_distract = rng.randint(0, min(3, len(cells) - answer))
    shapes = []
    for _ in range(answer):
        shapes.append((kind if by_kind else rng.choice(SHAPES), target))
    for _ in range(n_distract):
        if by_kind and rng.random() < 0.5:  # same colour, other kind: only the kind tells them apart
            shapes.append((rng.choice([s for s in SHAPES if s != kind]), target))
        else:
            shapes.append((rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != target])))
    rng.shuffle(shapes)
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    drawn = []
    for (shape, colour), (cx, cy) in zip(shapes, rng.sample(cells, len(shapes))):
        size = rng.randint(12, 22)
        x0 = cx * 28 + 1 + rng.randint(0, 26 - size)  # stays inside the cell with a 1-px margin
        y0 = cy * 28 + 1 + rng.randint(0, 26 - size)
        box = (x0, y0, x0 + size - 1, y0 + size - 1)
        _draw_shape(draw, shape, box, COLOURS[colour])
        drawn.append({"kind": shape, "colour": colour, "box": list(box)})
    if by_kind:
        question = f"How many {target} {kind}s are in the image?"
    else:
        question = f"How many {target} shapes are in the image?"
    meta = {"target_colour": target, "target_kind": kind if by_kind else None, "shapes": drawn}
    return Sample(f"<image>{question}", img, str(answer), "count", meta)


def _bars(rng: random.Random) -> Sample:
    """Bars on a y-axis with one tick and a light grid line per unit (unit = `unit_px` pixels)."""
    w, h = rng.choice([(84, 84), (112, 84), (112, 112), (84, 112)])
    n = rng.randint(3, 4 if w == 84 else 5)
    mode = rng.choice(["tallest", "shortest", "colour"])
    while True:
        values = [rng.randint(1, MAX_ANSWER) for _ in range(n)]
        if mode == "colour" or values.count(max(values) if mode == "tallest" else min(values)) == 1:
            break
    colours = rng.sample(list(COLOURS), n)
    left, top, bottom = 10, 6, 6
    unit = (h - top - bottom) // MAX_ANSWER
    base = top + unit * MAX_ANSWER  # first row below the bars
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for v in range(1, MAX_ANSWER + 1):
        y = base - v * unit
        draw.line([(left + 1, y), (w - 2, y)], fill=GRID)
        draw.line([(left - 3, y), (left - 1, y)], fill=INK)
    draw.line([(left, top - 2), (left, base)], fill=INK)
    draw.line([(left, base), (w - 2, base)], fill=INK)
    slot = (w - left - 4) // n
    bar_w = max(6, slot - 4)
    bars = []
    for i, (v, c) in enumerate(zip(values, colours)):
        x0 = left + 3 + i * slot
        draw.rectangle([x0, base - v * unit, x0 + bar_w - 1, base - 1], fill=COLOURS[c])
        bars.append({"colour": c, "value": v, "x0": x0, "x1": x0 + bar_w - 1})
    if mode == "tallest":
        question, answer = "What is the value of the tallest bar?", max(values)
    elif mode == "shortest":
        question, answer = "What is the value of the shortest bar?", min(values)
    else:
        pick = rng.randrange(n)
        question, answer = f"What is the value of the {colours[pick]} bar?", values[pick]
    question += " Each tick on the vertical axis is one unit."
    meta = {"mode": mode, "unit_px": unit, "base_y": base, "bars": bars}
    return Sample(f"<image>{question}", img, str(answer), "bars", meta)


def _area(rng: random.Random) -> Sample:
    """Rectangles A and B (different areas, a cell apart) on a 14-px unit grid; ask for one's area."""
    w, h = rng.choice([(84, 84), (112, 112), (112, 84), (84, 112)])
    cell = 14
    gw, gh = w // cell, h // cell
    dims = [(a, b) for a in range(1, 7) for b in range(1, 7) if a * b <= MAX_ANSWER and a <= gw and b <= gh]
    while True:
        (wa, ha), (wb, hb) = rng.choice(dims), rng.choice(dims)
        if wa * ha == wb * hb:
            continue
        ax, ay = rng.randint(0, gw - wa), rng.randint(0, gh - ha)
        bx, by = rng.randint(0, gw - wb), rng.randint(0, gh - hb)
        apart = ax + wa < bx or bx + wb < ax or ay + ha < by or by + hb < ay  # at least one cell of gap
        if apart:
            break
    ca, cb = rng.sample(list(COLOURS), 2)
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for gx in range(gw + 1):
        draw.line([(gx * cell, 0), (gx * cell, h - 1)], fill=GRID)
    for gy in range(gh + 1):
        draw.line([(0, gy * cell), (w - 1, gy * cell)], fill=GRID)
    font = ImageFont.load_default_imagefont()  # bitmap: identical pixels everywhere, no FreeType
    rects = {}
    for label, (x, y, rw, rh), colour in (("A", (ax, ay, wa, ha), ca), ("B", (bx, by, wb, hb), cb)):
        px0, py0 = x * cell, y * cell
        draw.rectangle([px0, py0, px0 + rw * cell - 1, py0 + rh * cell - 1], fill=COLOURS[colour])
        draw.text((px0 + 4, py0 + 1), label, fill=INK, font=font)
        rects[label] = {"colour": colour, "cells": [x, y, rw, rh], "area": rw * rh}
    ask = rng.choice(["A", "B"])
    question = (
        "The rectangles are drawn on a grid of unit squares. "
        f"What is the area of the rectangle labelled {ask}?"
    )
    meta = {"ask": ask, "cell_px": cell, "rects": rects}
    return Sample(f"<image>{question}", img, str(rects[ask]["area"]), "area", meta)


_MAKERS = {"count": _count, "bars": _bars, "area": _area}


def make_sample(seed: int, split: str, index: int, tasks: tuple[str, ...] = TASKS) -> Sample:
    """Sample `index` of `split`; the same arguments always give the same image, text and answer."""
    if not tasks:
        raise ValueError(f"no synthetic task selected; choose one or more of {TASKS}")
    for t in tasks:
        if t not in _MAKERS:
            raise ValueError(f"unknown synthetic task {t!r}; choose from {TASKS}")
    rng = _sample_rng(seed, split, index)
    return _MAKERS[rng.choice(tuple(tasks))](rng)


def _write_split(out: Path, split: str, n: int, seed: int, fmt: str, tasks) -> Path:
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        s = make_sample(seed, split, i, tasks)
        rel = f"images/{split}/{i:06d}.png"
        s.image.save(out / rel, format="PNG")
        rows.append({
            "problem": s.problem,
            "images": [rel],
            "answer": s.answer,
            "task": s.task,
            "meta": json.dumps(s.meta, sort_keys=True),
        })
    if fmt == "jsonl":
        path = out / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_synthetic_dataset(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    seed: int = 0,
    fmt: str = "jsonl",
    tasks: tuple[str, ...] = TASKS,
) -> tuple[Path, Path]:
    """Render both splits under `out_dir` (PNGs in images/<split>/); returns (train_path, val_path)."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt={fmt!r}: choose 'jsonl' or 'parquet'")
    if n_train < 0 or n_val < 0:
        raise ValueError(f"n_train={n_train}, n_val={n_val}: sizes must be >= 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return (_write_split(out, "train", n_train, seed, fmt, tasks),
            _write_split(out, "validation", n_val, seed, fmt, tasks))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train", type=int, default=1000, help="training rows")
    p.add_argument("--val", type=int, default=200, help="validation rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    a = p.parse_args(argv)
    tasks = tuple(t.strip() for t in a.tasks.split(",") if t.strip())
    train, val = write_synthetic_dataset(a.out, a.train, a.val, a.seed, a.format, tasks)
    print(f"synthetic task: train={train} ({a.train} rows) val={val} ({a.val} rows)")


if __name__ == "__main__":
    main()
