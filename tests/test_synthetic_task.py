"""The synthetic visual task: deterministic, answers readable from pixels, not from the text."""

import json
import os
import re
from collections import Counter, defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from megatron_vppo.data.synthetic_task import COLOURS, TASKS, main, make_sample, write_synthetic_dataset

N = 240  # samples per property check: ~80 of each task


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask (independent of the generator's geometry)."""
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
        comps.append(np.array(pix))
    return comps


def _kind_from_pixels(pix: np.ndarray) -> str:
    """Classify a filled shape by how much of its bounding box it covers."""
    ys, xs = pix[:, 0], pix[:, 1]
    fill = len(pix) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"


def _colour_mask(arr: np.ndarray, colour: str) -> np.ndarray:
    return np.all(arr == np.array(COLOURS[colour], dtype=arr.dtype), axis=-1)


def _answer_from_image(sample) -> int:
    """Re-derive the answer from pixels; `meta` only tells which colour/label the question names."""
    arr = np.asarray(sample.image)
    meta = sample.meta
    if sample.task == "count":
        comps = _components(_colour_mask(arr, meta["target_colour"]))
        if meta["target_kind"] is None:
            return len(comps)
        return sum(_kind_from_pixels(c) == meta["target_kind"] for c in comps)
    if sample.task == "bars":
        unit = meta["unit_px"]
        # the axis ticks (black pixels just left of the axis) are `unit` px apart
        tick_rows = np.nonzero(np.all(arr[:, 8] == 0, axis=-1))[0]
        assert set(np.diff(tick_rows)) == {unit}
        heights = {}
        for c in COLOURS:
            rows = np.nonzero(_colour_mask(arr, c).any(axis=1))[0]
            if len(rows):
                assert len(rows) % unit == 0
                heights[c] = len(rows) // unit
        q = sample.problem
        if "tallest" in q:
            return max(heights.values())
        if "shortest" in q:
            return min(heights.values())
        colour = re.search(r"the (\w+) bar", q).group(1)
        return heights[colour]
    assert sample.task == "area"
    cell = meta["cell_px"]
    rect = meta["rects"][meta["ask"]]
    ys, xs = np.nonzero(_colour_mask(arr, rect["colour"]))
    w_px, h_px = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    assert w_px % cell == 0 and h_px % cell == 0
    # the label is drawn inside that rectangle in black
    inside = arr[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert np.all(inside == 0, axis=-1).any()
    return (w_px // cell) * (h_px // cell)


@pytest.fixture(scope="module")
def samples():
    return [make_sample(7, "train", i) for i in range(N)]


def test_deterministic_by_seed():
    for i in range(12):
        a, b = make_sample(3, "train", i), make_sample(3, "train", i)
        assert (a.problem, a.answer, a.task, a.meta) == (b.problem, b.answer, b.task, b.meta)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    other = [make_sample(4, "train", i) for i in range(12)]
    assert any(not np.array_equal(np.asarray(make_sample(3, "train", i).image), np.asarray(o.image))
               for i, o in enumerate(other))
    val = [make_sample(3, "validation", i) for i in range(12)]
    assert any(v.meta != make_sample(3, "train", i).meta for i, v in enumerate(val))


def test_written_dataset_is_deterministic(tmp_path):
    a_train, a_val = write_synthetic_dataset(tmp_path / "a", 20, 5, seed=11)
    b_train, b_val = write_synthetic_dataset(tmp_path / "b", 20, 5, seed=11)
    assert a_train.read_text() == b_train.read_text()
    assert a_val.read_text() == b_val.read_text()
    for row in map(json.loads, a_train.read_text().splitlines()):
        rel = row["images"][0]
        assert not os.path.isabs(rel)
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_shapes_and_schema(samples):
    assert {s.task for s in samples} == set(TASKS)
    for s in samples:
        w, h = s.image.size
        assert s.image.mode == "RGB"
        assert w % 28 == 0 and h % 28 == 0 and 56 <= min(w, h) and max(w, h) <= 112
        assert s.problem.startswith("<image>") and s.problem.count("<image>") == 1
        assert s.answer in {str(k) for k in range(1, 7)}


@pytest.mark.parametrize("task", TASKS)
def test_answer_is_in_the_image(samples, task):
    mine = [s for s in samples if s.task == task]
    assert len(mine) > 40
    for s in mine:
        assert _answer_from_image(s) == int(s.answer), (s.problem, s.meta)


def test_answer_is_not_in_the_text(samples):
    for s in samples:
        assert not re.search(r"\d", s.problem), s.problem  # no digits at all in any problem
    by_text = defaultdict(list)
    for s in samples:
        by_text[s.problem].append(s.answer)
    # Every frequent question is asked with several answers ...
    for text, answers in by_text.items():
        if len(answers) >= 6:
            assert len(set(answers)) >= 2, text
    # ... so the best text-only guess (majority answer per exact text) is far from perfect.
    text_only = sum(Counter(a).most_common(1)[0][1] for a in by_text.values()) / len(samples)
    assert text_only < 0.6
    # Answers are spread over the whole range in every task.
    for task in TASKS:
        assert len({s.answer for s in samples if s.task == task}) == 6


def test_cli_and_loader(tmp_path, capsys):
    from megatron_vppo.data.dataset import PromptBatches, PromptDataset

    main(["--out", str(tmp_path), "--train", "9", "--val", "4", "--seed", "2", "--format", "parquet"])
    assert "train=" in capsys.readouterr().out
    ds = PromptDataset(tmp_path / "train.parquet")
    assert len(ds) == 9
    batches = PromptBatches(ds, 9, max_epochs=1)
    batch = next(batches)
    assert len(batch) == 9 and batches.pass_stats.n_skipped == 0
    rec = min(batch, key=lambda r: r["index"])
    first = make_sample(2, "train", 0)
    assert rec["answer"] == first.answer and rec["problem"] == first.problem
    assert np.array_equal(np.asarray(rec["images"][0]), np.asarray(first.image))


def test_task_subset_and_errors(tmp_path):
    assert {make_sample(0, "train", i, tasks=("bars",)).task for i in range(10)} == {"bars"}
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_sample(0, "train", 0, tasks=("maze",))
    with pytest.raises(ValueError, match="no synthetic task selected"):
        make_sample(0, "train", 0, tasks=())
    with pytest.raises(ValueError, match="fmt"):
        write_synthetic_dataset(tmp_path, 1, 1, fmt="csv")
