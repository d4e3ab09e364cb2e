"""ViRL39K-schema loader: formats, bad rows counted by reason, deterministic resumable batches."""

import io
import json
import logging
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from megatron_vppo.data.dataset import SKIP_REASONS, PromptBatches, PromptDataset, SkipStats


def _png(w, h, colour) -> bytes:
    img = Image.new("RGB", (w, h), (255, 255, 255))
    ImageDraw.Draw(img).rectangle([0, 0, w // 2, h // 2], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


GOOD = [  # (problem, [(w, h, colour)], answer)
    ("<image>How many red squares?", [(56, 56, (220, 30, 30))], "1"),
    ("<image>Left <image>right: which is bigger?", [(84, 56, (30, 30, 220)), (56, 84, (30, 160, 30))], "B"),
    ("What colour is the square?", [(56, 56, (30, 160, 30))], "green"),  # no placeholder: images follow
    ("Text only: what is 2+2?", [], "4"),
    ("<image>Area?", [(112, 56, (140, 60, 180))], "\\frac{1}{2}"),
    ("<image>Value?", [(56, 112, (240, 140, 30))], "6"),
]


@pytest.fixture(scope="module")
def good_rows():
    return [(p, [_png(*spec) for spec in specs], a) for p, specs, a in GOOD]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _write_all_formats(root, good_rows):
    """The same rows as jsonl (relative paths), parquet (raw bytes), parquet (HF dicts), arrow / saved
    dataset (HF Image feature, PIL in, bytes stored), arrow IPC file (absolute paths)."""
    img_dir = root / "imgs"
    img_dir.mkdir(parents=True)
    path_rows, abs_rows, byte_rows, dict_rows, pil_rows = [], [], [], [], []
    for i, (problem, pngs, answer) in enumerate(good_rows):
        rels = []
        for j, data in enumerate(pngs):
            (img_dir / f"{i}_{j}.png").write_bytes(data)
            rels.append(f"imgs/{i}_{j}.png")
        path_rows.append({"problem": problem, "images": rels, "answer": answer})
        abs_rows.append({"problem": problem, "images": [str(root / r) for r in rels], "answer": answer})
        byte_rows.append({"problem": problem, "images": pngs, "answer": answer})
        dict_rows.append({"problem": problem, "images": [{"bytes": d, "path": None} for d in pngs], "answer": answer})
        pil_rows.append({"problem": problem, "images": [Image.open(io.BytesIO(d)) for d in pngs], "answer": answer})
    paths = {}
    _write_jsonl(root / "rows.jsonl", path_rows)
    paths["jsonl"] = root / "rows.jsonl"
    pq.write_table(pa.Table.from_pylist(byte_rows), root / "bytes.parquet")
    paths["parquet_bytes"] = root / "bytes.parquet"
    features = datasets.Features({
        "problem": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
        "answer": datasets.Value("string"),
    })
    hf = datasets.Dataset.from_list(pil_rows, features=features)
    hf.to_parquet(str(root / "hf.parquet"))
    paths["parquet_hf"] = root / "hf.parquet"
    hf.save_to_disk(str(root / "saved"))
    paths["saved_dir"] = root / "saved"
    arrows = sorted((root / "saved").glob("*.arrow"))
    assert len(arrows) == 1
    paths["arrow_stream"] = arrows[0]
    with pa.OSFile(str(root / "ipc.arrow"), "wb") as sink:
        table = pa.Table.from_pylist(abs_rows)
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    paths["arrow_ipc_file"] = root / "ipc.arrow"
    pq.write_table(pa.Table.from_pylist(dict_rows), root / "dicts.parquet")
    paths["parquet_dicts"] = root / "dicts.parquet"
    return paths


def _as_comparable(rec):
    return (rec["index"], rec["problem"], rec["answer"], [np.asarray(im).tobytes() for im in rec["images"]],
            [im.size for im in rec["images"]])


def test_all_formats_load_the_same_records(tmp_path, good_rows):
    paths = _write_all_formats(tmp_path, good_rows)
    results = {}
    for name, path in paths.items():
        ds = PromptDataset(path)
        assert len(ds) == len(GOOD), name
        recs = [ds[i] for i in range(len(ds))]
        for r in recs:
            assert all(im.mode == "RGB" for im in r["images"])
        results[name] = [_as_comparable(r) for r in recs]
    reference = results.pop("jsonl")
    for name, got in results.items():
        assert got == reference, name
    # and they are the images that were written
    for (problem, pngs, answer), rec in zip(good_rows, reference):
        assert rec[1] == problem and rec[2] == answer
        assert rec[3] == [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")).tobytes() for d in pngs]


def test_dataset_dict_directory_needs_a_split(tmp_path, good_rows):
    rows = [{"problem": p, "images": [], "answer": a} for p, _, a in good_rows]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                               "validation": datasets.Dataset.from_list(rows[4:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="split"):
        PromptDataset(tmp_path / "dd")
    assert len(PromptDataset(tmp_path / "dd", split="validation")) == 2


def _bad_rows(tmp_path, good_rows):
    """Good rows plus one or more rows of every skip reason; returns (rows, expected Counter)."""
    (tmp_path / "ok.png").write_bytes(good_rows[0][1][0])
    (tmp_path / "garbage.png").write_bytes(b"definitely not a png")
    (tmp_path / "truncated.png").write_bytes(good_rows[4][1][0][:60])
    (tmp_path / "thin.png").write_bytes(_png(2, 450, (0, 0, 0)))
    rows = [{"problem": p, "images": [f"good_{i}_{j}.png" for j in range(len(pngs))], "answer": a}
            for i, (p, pngs, a) in enumerate(good_rows)]
    for i, (_, pngs, _) in enumerate(good_rows):
        for j, d in enumerate(pngs):
            (tmp_path / f"good_{i}_{j}.png").write_bytes(d)
    bad = [
        ({"problem": "<image>q", "images": ["nowhere.png"], "answer": "1"}, "missing_image"),
        ({"problem": "<image>q", "images": [None], "answer": "1"}, "missing_image"),
        ({"problem": "<image>q", "images": ["garbage.png"], "answer": "1"}, "corrupt_image"),
        ({"problem": "<image>q", "images": ["truncated.png"], "answer": "1"}, "corrupt_image"),
        ({"problem": "<image>q", "images": ["thin.png"], "answer": "1"}, "extreme_aspect_ratio"),
        ({"problem": "<image><image>q", "images": ["ok.png"], "answer": "1"}, "placeholder_mismatch"),
        ({"problem": "<image>q", "images": ["ok.png", "ok.png"], "answer": "1"}, "placeholder_mismatch"),
        ({"problem": "<image>q", "images": ["ok.png"], "answer": ""}, "empty_answer"),
        ({"problem": "<image>q", "images": ["ok.png"], "answer": "   "}, "empty_answer"),
        ({"problem": "<image>q", "images": ["ok.png"], "answer": None}, "empty_answer"),
        ({"problem": "<image>q", "images": ["ok.png"]}, "empty_answer"),  # key missing in this row
        ({"problem": "", "images": ["ok.png"], "answer": "1"}, "empty_problem"),
        ({"problem": "<image>" + "long " * 200, "images": ["ok.png"], "answer": "1"}, "overlong_prompt"),
        ({"problem": "<image>EXPLODE", "images": ["ok.png"], "answer": "1"}, "prompt_count_error"),
        ({"problem": "<image>q", "images": 7, "answer": "1"}, "bad_images_field"),
    ]
    rows += [r for r, _ in bad]
    rows.insert(3, rows.pop())  # interleave good and bad rows
    expected = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    return rows, expected


def count_tokens(problem, images):
    """A stand-in for the processor: words + one token per 28x28 merged patch."""
    if "EXPLODE" in problem:
        raise RuntimeError("processor failed")
    return len(problem.split()) + sum((im.width // 28) * (im.height // 28) for im in images)


def test_bad_rows_are_skipped_and_counted(tmp_path, good_rows, caplog):
    rows, expected = _bad_rows(tmp_path, good_rows)
    _write_jsonl(tmp_path / "rows.jsonl", rows)
    with open(tmp_path / "rows.jsonl", "ab") as f:  # a latin-1 encoded row: valid JSON, not UTF-8
        f.write('{"problem": "<image>Caf\u00e9?", "images": ["ok.png"], "answer": "1"}\n'.encode("latin-1"))
    rows.append(None)
    expected["non_utf8_text"] = 1
    ds = PromptDataset(tmp_path / "rows.jsonl", count_prompt_tokens=count_tokens, max_prompt_length=100)
    batches = PromptBatches(ds, batch_size=4, max_epochs=1, shuffle=False)
    with caplog.at_level(logging.INFO, logger="megatron_vppo.data.dataset"):
        got = [r for batch in batches for r in batch]
    assert [r["problem"] for r in got] == [p for p, _, _ in GOOD]
    stats = batches.last_pass_stats
    assert dict(stats.skipped) == expected
    assert stats.kept == len(GOOD) and stats.seen == len(rows)
    assert set(expected) <= set(SKIP_REASONS) and set(expected) == set(SKIP_REASONS) - {"bad_json_line"}
    summaries = [r.getMessage() for r in caplog.records if "data pass" in r.getMessage()]
    assert len(summaries) == 1  # logged once, at the end of the pass
    for reason, n in expected.items():
        assert f"{reason}={n}" in summaries[0]
    # scan() validates the whole table up front with the same verdicts
    assert dict(ds.scan().skipped) == expected
    # __getitem__ on a bad row is a clear error, get() is not
    bad_index = next(i for i in range(len(ds)) if ds.get(i)[0] is None)
    with pytest.raises(ValueError, match="unusable"):
        ds[bad_index]


def test_bad_json_lines_are_counted(tmp_path, good_rows):
    (tmp_path / "a.png").write_bytes(good_rows[0][1][0])
    lines = [json.dumps({"problem": "<image>q", "images": ["a.png"], "answer": "1"}), "{not json", "[1, 2]",
             json.dumps({"problem": "<image>r", "images": ["a.png"], "answer": 2})]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    ds = PromptDataset(tmp_path / "rows.jsonl")
    assert dict(ds.load_skipped) == {"bad_json_line": 2}
    assert [ds[i]["answer"] for i in range(len(ds))] == ["1", "2"]


def test_all_rows_bad_is_a_clear_error(tmp_path):
    _write_jsonl(tmp_path / "rows.jsonl", [{"problem": "<image>q", "images": ["gone.png"], "answer": "1"}] * 3)
    batches = PromptBatches(PromptDataset(tmp_path / "rows.jsonl"), batch_size=2)
    with pytest.raises(RuntimeError, match="no usable rows.*missing_image=3"):
        next(batches)


def test_missing_columns_are_a_clear_error(tmp_path):
    _write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "images": [], "answer": "1"}])
    with pytest.raises(ValueError, match="problem"):
        PromptDataset(tmp_path / "rows.jsonl")
    with pytest.raises(FileNotFoundError):
        PromptDataset(tmp_path / "nope.parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="format"):
        PromptDataset(tmp_path / "x.csv")


@pytest.fixture
def mixed_dataset(tmp_path, good_rows):
    rows, _ = _bad_rows(tmp_path, good_rows)
    _write_jsonl(tmp_path / "rows.jsonl", rows)
    return PromptDataset(tmp_path / "rows.jsonl", count_prompt_tokens=count_tokens, max_prompt_length=100)


def _indices(batches, n):
    return [[r["index"] for r in next(batches)] for _ in range(n)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_reproduces_the_batch_sequence(mixed_dataset, drop_last):
    ref = _indices(PromptBatches(mixed_dataset, 4, seed=5, drop_last=drop_last), 9)  # > 4 epochs
    for stop in (1, 2, 5):
        first = PromptBatches(mixed_dataset, 4, seed=5, drop_last=drop_last)
        head = _indices(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint round trip
        second = PromptBatches(mixed_dataset, 4, seed=5, drop_last=drop_last)
        second.load_state_dict(state)
        assert head + _indices(second, 9 - stop) == ref
    if drop_last:
        assert all(len(b) == 4 for b in ref)


def test_resumed_pass_reports_whole_pass_counts(mixed_dataset):
    full = PromptBatches(mixed_dataset, 2, seed=1, max_epochs=1)
    list(full)
    first = PromptBatches(mixed_dataset, 2, seed=1, max_epochs=1)
    next(first)
    second = PromptBatches(mixed_dataset, 2, seed=1, max_epochs=1)
    second.load_state_dict(first.state_dict())
    list(second)
    assert second.last_pass_stats == full.last_pass_stats


def test_shuffle_is_seeded_per_epoch(mixed_dataset):
    good = sorted(i for i in range(len(mixed_dataset)) if mixed_dataset.get(i)[0] is not None)
    epochs = []
    b = PromptBatches(mixed_dataset, len(good), seed=3, drop_last=True)
    for _ in range(3):
        epochs.append([r["index"] for r in next(b)])
    for e in epochs:
        assert sorted(e) == good  # each epoch visits every usable row exactly once
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    again = PromptBatches(mixed_dataset, len(good), seed=3, drop_last=True)
    assert [r["index"] for r in next(again)] == epochs[0]
    other = PromptBatches(mixed_dataset, len(good), seed=4, drop_last=True)
    assert [r["index"] for r in next(other)] != epochs[0]
    plain = PromptBatches(mixed_dataset, len(good), shuffle=False, drop_last=True)
    assert [r["index"] for r in next(plain)] == good


def test_mismatched_resume_state_is_refused(mixed_dataset):
    state = PromptBatches(mixed_dataset, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PromptBatches(mixed_dataset, 2, seed=2).load_state_dict(state)


def test_skip_stats_round_trip():
    s = SkipStats()
    s.add_kept()
    s.add_skip("corrupt_image")
    s.add_skip("corrupt_image")
    assert SkipStats.from_state_dict(s.state_dict()) == s
    assert "corrupt_image=2" in s.summary() and s.n_skipped == 2


@pytest.mark.timeout(60)
def test_drop_last_with_less_than_one_batch_is_a_clear_error(mixed_dataset):
    """6 usable rows, batch 8, drop_last: every epoch's only batch would be dropped, forever."""
    batches = PromptBatches(mixed_dataset, 8, seed=1, drop_last=True)
    with pytest.raises(RuntimeError, match="6 usable rows, fewer than one batch of 8"):
        next(batches)
    assert len(next(PromptBatches(mixed_dataset, 8, seed=1, drop_last=False))) == 8  # spans the epoch boundary
