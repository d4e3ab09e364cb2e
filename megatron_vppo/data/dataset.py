"""Prompt data in the ViRL39K schema: `problem` (with `<image>` placeholders), `images` (list), `answer`.

`PromptDataset` reads a local parquet, jsonl/json, arrow file or a `save_to_disk` directory with `datasets`
and turns row i into a record {problem, images: [PIL RGB], answer, index}. Images may be paths (relative
ones resolve against the data file's directory), raw bytes, HF Image dicts {"bytes", "path"} or PIL
images. Image decoding is ours, not `datasets`' (Image features are read with decode=False), so one corrupt
image is one skipped row rather than an exception in the middle of an epoch.

A row that cannot be used is skipped and counted by reason (`SKIP_REASONS`); each pass logs its counts
once at the end and keeps them in `PromptBatches.last_pass_stats`. Overlong prompts are filtered when the
caller supplies `count_prompt_tokens(problem, images) -> int` (the processor knows how many image tokens
an image becomes after its min/max-pixel resize) and `max_prompt_length`.

`PromptBatches` walks a seeded per-epoch permutation and yields lists of records; its position
(epoch, offset into that epoch's permutation) is a `state_dict`, so a resumed run sees the same batches.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_PLACEHOLDER",
    "SKIP_REASONS",
    "SkipStats",
    "DataError",
    "check_data_file",
    "load_table",
    "PromptDataset",
    "PromptBatches",
]

log = logging.getLogger(__name__)
LOG_FIRST_SKIPS = 3  # skipped rows named (index, file, reason) at INFO per reason; later ones are counted

IMAGE_PLACEHOLDER = "<image>"
MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses anything more elongated
SKIP_REASONS = (
    "bad_json_line",  # a .jsonl line that is not a JSON object (counted once, when the file is read)
    "non_utf8_text",  # a text field (or .jsonl line) that is not valid UTF-8, e.g. latin-1: skipped, never mangled
    "empty_problem",  # problem missing, not a string, or blank
    "empty_answer",  # answer missing, blank, or not a scalar
    "bad_images_field",  # `images` is not a list of images
    "missing_image",  # image path does not exist, or the entry is empty
    "corrupt_image",  # bytes/file that PIL cannot decode
    "extreme_aspect_ratio",  # longer side > 200 x shorter side
    "placeholder_mismatch",  # problem has <image> placeholders but not one per image
    "overlong_prompt",  # count_prompt_tokens(...) > max_prompt_length
    "prompt_count_error",  # count_prompt_tokens raised
)

CountTokens = Callable[[str, list], int]


class DataError(ValueError):
    """The data file as a whole cannot be used (missing, empty, unreadable): one line naming it."""


class MissingDataError(DataError, FileNotFoundError):
    """The data path does not exist."""


class NoUsableRows(DataError, RuntimeError):
    """A whole pass over the data kept no row."""


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class SkipStats:
    """Rows seen / kept / skipped by reason in one pass over the data."""

    seen: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def add_kept(self) -> None:
        self.seen += 1
        self.kept += 1

    def add_skip(self, reason: str) -> None:
        self.seen += 1
        self.skipped[reason] += 1

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"rows={self.seen} kept={self.kept} skipped={self.n_skipped} ({reasons})"

    def state_dict(self) -> dict:
        return {"seen": self.seen, "kept": self.kept, "skipped": dict(self.skipped)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "SkipStats":
        return cls(int(state["seen"]), int(state["kept"]), Counter({k: int(v) for k, v in state["skipped"].items()}))


# --------------------------------------------------------------------------------------------------------
# Reading the table


def check_data_file(path: str | os.PathLike, option: str = "data path") -> None:
    """Fail in one line, before any work, when `path` cannot hold rows: missing, or an empty file."""
    p = Path(path)
    if not p.exists():
        raise MissingDataError(f"{option} {p} does not exist: pass a .parquet/.jsonl/.json/.arrow file or a "
                        f"directory written by Dataset.save_to_disk")
    if p.is_dir() and not any((p / n).is_file() for n in ("state.json", "dataset_dict.json", "dataset_info.json")):
        files = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in (".parquet", ".jsonl", ".json", ".arrow"))
        raise DataError(f"{option} {p} is a directory but not one written by Dataset.save_to_disk (no state.json "
                        f"or dataset_dict.json); point {option} at a .parquet/.jsonl/.json/.arrow file"
                        + (f" (e.g. {files[0]})" if files else ""))
    if p.is_file() and (p.stat().st_size == 0 or (p.suffix.lower() in (".jsonl", ".json")
                                                  and not p.read_bytes().strip())):
        raise DataError(f"{option} {p} is empty (no rows); point it at a file with rows")


def load_table(path: str | os.PathLike, split: str | None = None):
    """A `datasets.Dataset` from a local file or saved directory.

    Returns (dataset, base_dir that relative image paths resolve against, Counter of rows dropped while
    reading — only JSON lines that do not parse, reason "bad_json_line").
    """
    import datasets

    load_skipped: Counter = Counter()
    p = Path(path)
    check_data_file(p)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds.keys())
            if split is None:
                if len(names) != 1:
                    raise DataError(f"{p} holds splits {names}: point the data option at one split's directory "
                                    f"(e.g. {p / names[0]})")
                split = names[0]
            if split not in ds:
                raise ValueError(f"{p} has no split {split!r}; it has {names}")
            ds = ds[split]
        base = p
    else:
        suffix = "".join(p.suffixes[-1:]).lower()
        readers = {".parquet": lambda: (datasets.Dataset.from_parquet(str(p)), Counter()),
                   ".jsonl": lambda: _from_json(p), ".json": lambda: _from_json(p),
                   ".arrow": lambda: (_from_arrow(p), Counter())}
        if suffix not in readers:
            raise DataError(f"{p}: unknown data format {suffix!r}; use .parquet, .jsonl, .json, .arrow or a "
                            f"save_to_disk directory")
        try:
            ds, load_skipped = readers[suffix]()
        except (DataError, FileNotFoundError):
            raise
        except Exception as exc:  # pyarrow / datasets raise many types for a damaged file
            raise DataError(f"{p}: cannot read it as {suffix[1:]} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); check the file") from None
        if len(ds) == 0:
            raise DataError(f"{p} holds no rows; point the data option at a file with rows")
        base = p.parent
    return _no_image_decoding(ds), base, load_skipped


def _from_json(p: Path):
    """`Dataset.from_json`; if some lines are not JSON objects, read the others and count the bad ones."""
    import tempfile

    import datasets

    try:
        return datasets.Dataset.from_json(str(p)), Counter()
    except (datasets.exceptions.DatasetGenerationError, ValueError):  # bad JSON or bytes that are not UTF-8
        if p.suffix.lower() != ".jsonl":
            raise DataError(f"{p} is not valid JSON (a .json file must parse as a whole; "
                            f"use one object per line in a .jsonl file)") from None
    good, bad = [], Counter()
    with open(p, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:  # strict: a latin-1 line is skipped and counted, never decoded into replacement characters
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad["non_utf8_text"] += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                good.append(json.dumps(obj))
            else:
                bad["bad_json_line"] += 1
    log.warning("data %s: %s line(s) were skipped while reading", p, dict(bad))
    if not good:
        raise DataError(f"{p}: no line is a usable JSON object ({dict(bad)}); fix the file")
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "rows.jsonl"
        clean.write_text("\n".join(good) + "\n", encoding="utf-8")
        ds = datasets.Dataset.from_json(str(clean), cache_dir=str(Path(tmp) / "cache"), keep_in_memory=True)
    return ds, bad


def _from_arrow(p: Path):
    import datasets
    import pyarrow as pa

    try:  # the streaming IPC format that `datasets` itself writes
        return datasets.Dataset.from_file(str(p))
    except (pa.ArrowInvalid, OSError):
        with pa.memory_map(str(p)) as src:  # the random-access IPC file format (pyarrow.ipc.new_file)
            table = pa.ipc.open_file(src).read_all()
        return datasets.Dataset(table)


def _no_image_decoding(ds):
    """Turn off `datasets`' own Image decoding (anywhere in the features), so we decode and count errors."""
    import datasets

    def visit(feat):
        if isinstance(feat, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(feat, (datasets.List, datasets.LargeList)):
            return type(feat)(visit(feat.feature))
        if isinstance(feat, datasets.Sequence):
            return datasets.Sequence(visit(feat.feature))
        if isinstance(feat, dict):
            return {k: visit(v) for k, v in feat.items()}
        return feat

    new = datasets.Features({k: visit(v) for k, v in ds.features.items()})
    return ds.cast(new) if new != ds.features else ds


# --------------------------------------------------------------------------------------------------------
# Rows to records


def _decode_image(item: Any, base: Path) -> Image.Image:
    if isinstance(item, Image.Image):
        img = item
    else:
        data, path = None, None
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
        elif isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        elif isinstance(item, (str, os.PathLike)):
            path = item
        elif item is not None:
            raise _Skip("bad_images_field", f"image entry of type {type(item).__name__}")
        if data:
            src: Any = io.BytesIO(data)
        elif path:
            full = Path(path) if os.path.isabs(path) else base / path
            if not full.is_file():
                raise _Skip("missing_image", str(full))
            src = full
        else:
            raise _Skip("missing_image", "empty image entry")
        try:
            img = Image.open(src)
            img.load()  # decode now: truncated files fail here, not later in the processor
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
            raise _Skip("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    try:
        img = img.convert("RGB")
    except Exception as exc:
        raise _Skip("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    w, h = img.size
    if min(w, h) <= 0 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise _Skip("extreme_aspect_ratio", f"{w}x{h}")
    return img


def _answer_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        raise _Skip("empty_answer")
    if isinstance(value, (int, np.integer)):
        text = str(int(value))
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise _Skip("empty_answer")
        text = repr(float(value))
    elif isinstance(value, str):
        text = value
    else:
        raise _Skip("empty_answer", f"answer of type {type(value).__name__}")
    text = text.strip()
    if not text:
        raise _Skip("empty_answer")
    return text


def _images_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):  # a JSON-encoded list, as some exports write it, or one path
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                raise _Skip("bad_images_field", "unparseable JSON list") from None
        else:
            return [value]
    if isinstance(value, (dict, bytes, bytearray, Image.Image)):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    raise _Skip("bad_images_field", f"images of type {type(value).__name__}")


class PromptDataset:
    """Rows of a ViRL39K-schema table, validated and decoded on access (`get(i)`)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split: str | None = None,
        count_prompt_tokens: CountTokens | None = None,
        max_prompt_length: int | None = None,
        problem_key: str = "problem",
        images_key: str = "images",
        answer_key: str = "answer",
    ) -> None:
        self.path = Path(path)
        self.table, self.base_dir, self.load_skipped = load_table(path, split)
        self._skips_logged: dict[str, int] = {}  # rows logged at INFO per skip reason
        missing = [k for k in (problem_key, answer_key) if k not in self.table.column_names]
        if missing:
            raise DataError(f"{self.path} lacks column(s) {missing}; it has {self.table.column_names}. "
                            f"ViRL39K rows need `problem`, `images`, `answer`; name yours with "
                            f"data.problem_key / data.answer_key (eval: --problem-key / --answer-key)")
        if images_key not in self.table.column_names:
            log.warning("%s has no %r column: every row is read as text-only", self.path, images_key)
        if self.load_skipped:
            log.warning("data %s: dropped while reading: %s", self.path, dict(self.load_skipped))
        self.keys = (problem_key, images_key, answer_key)
        self.count_prompt_tokens = count_prompt_tokens
        self.max_prompt_length = max_prompt_length
        if max_prompt_length is not None and count_prompt_tokens is None:
            log.warning("max_prompt_length=%s given without count_prompt_tokens: prompts are not length-filtered",
                        max_prompt_length)

    def __len__(self) -> int:
        return len(self.table)

    def get(self, index: int) -> tuple[dict | None, str | None]:
        """(record, None) for a usable row, (None, reason) otherwise. Never raises on row content."""
        try:
            return self._record(int(index)), None
        except _Skip as s:
            self._log_skip(index, s)
            return None, s.reason

    def _log_skip(self, index: int, s: "_Skip") -> None:
        """The first LOG_FIRST_SKIPS rows of each reason at INFO, with their index and the file (so a bad
        row can be found); later ones at DEBUG (the pass summary counts them all)."""
        n = self._skips_logged[s.reason] = self._skips_logged.get(s.reason, 0) + 1
        level = logging.INFO if n <= LOG_FIRST_SKIPS else logging.DEBUG
        later = f" (later {s.reason} rows are only counted)" if n == LOG_FIRST_SKIPS else ""
        log.log(level, "data %s: skipping row %d: %s%s%s", self.path, index, s.reason,
                f" ({s.detail})" if s.detail else "", later)

    def __getitem__(self, index: int) -> dict:
        rec, reason = self.get(index)
        if rec is None:
            raise ValueError(f"row {index} of {self.path} is unusable: {reason}")
        return rec

    def _record(self, index: int) -> dict:
        pk, ik, ak = self.keys
        try:
            row = self.table[index]
        except UnicodeDecodeError as exc:  # arrow stores the bytes as read; decoding a row checks them
            raise _Skip("non_utf8_text", f"byte 0x{exc.object[exc.start]:02x} at {exc.start}") from None
        problem = row.get(pk)
        if not isinstance(problem, str) or not problem.strip():
            raise _Skip("empty_problem")
        answer = _answer_text(row.get(ak))
        raw = _images_list(row.get(ik))
        n_holders = problem.count(IMAGE_PLACEHOLDER)
        if n_holders and n_holders != len(raw):
            raise _Skip("placeholder_mismatch", f"{n_holders} placeholders, {len(raw)} images")
        images = [_decode_image(item, self.base_dir) for item in raw]
        if self.count_prompt_tokens is not None and self.max_prompt_length is not None:
            try:
                n_tokens = int(self.count_prompt_tokens(problem, images))
            except Exception as exc:
                raise _Skip("prompt_count_error", f"{type(exc).__name__}: {exc}") from None
            if n_tokens > self.max_prompt_length:
                raise _Skip("overlong_prompt", f"{n_tokens} > {self.max_prompt_length}")
        return {"problem": problem, "images": images, "answer": answer, "index": index}

    def scan(self) -> SkipStats:
        """Validate every row once (decodes all images): counts to report before training (lines
        dropped while reading the file included)."""
        stats = SkipStats(seen=sum(self.load_skipped.values()), skipped=Counter(self.load_skipped))
        for i in range(len(self)):
            rec, reason = self.get(i)
            stats.add_kept() if rec is not None else stats.add_skip(reason)
        log.info("data %s: %s", self.path, stats.summary())
        return stats


# --------------------------------------------------------------------------------------------------------
# Batches with a resumable position


class PromptBatches:
    """Endless (or `max_epochs`-long) iterator of prompt batches: lists of `batch_size` records.

    Epoch e visits rows in `permutation(seed, e)` order (identity when shuffle=False), skipping bad rows.
    With drop_last=False a batch may span an epoch boundary; with drop_last=True the short tail of an
    epoch is dropped. `state_dict()` after a batch, loaded into a fresh instance over the same data, makes
    it yield exactly the batches the original would have yielded next.
    """

    def __init__(
        self,
        dataset: PromptDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        max_epochs: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if len(dataset) == 0:
            raise ValueError(f"{dataset.path} has no rows")
        self.dataset, self.batch_size = dataset, batch_size
        self.seed, self.shuffle, self.drop_last, self.max_epochs = seed, shuffle, drop_last, max_epochs
        self.epoch, self.offset = 0, 0
        self.pass_stats = self._fresh_stats()  # the pass in progress
        self.last_pass_stats: SkipStats | None = None  # the last completed pass
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _fresh_stats(self) -> SkipStats:
        """A new pass's counts start with the lines dropped while reading the file (bad JSON, not
        UTF-8): every pass skips them, so every pass reports them like any other bad row."""
        dropped = Counter(getattr(self.dataset, "load_skipped", None) or {})
        return SkipStats(seen=sum(dropped.values()), skipped=dropped)

    def order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.dataset)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "shuffle": self.shuffle,
                "num_rows": len(self.dataset), "pass_stats": self.pass_stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("num_rows", len(self.dataset))):
            if key in state and state[key] != mine:
                raise ValueError(f"data position was saved with {key}={state[key]!r} but this run has {key}={mine!r}; "
                                 f"resume with the same data and train.seed, or set data.resume_position=false to "
                                 f"start the data order afresh")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.pass_stats = SkipStats.from_state_dict(state.get("pass_stats", SkipStats().state_dict()))

    def _end_pass(self) -> None:
        stats = self.pass_stats
        log.info("data pass %d over %s: %s", self.epoch, self.dataset.path, stats.summary())
        if stats.kept == 0:
            hint = " (or raise rollout.max_prompt_length)" if stats.skipped.get("overlong_prompt") else ""
            raise NoUsableRows(f"no usable rows in {self.dataset.path}: {stats.summary()}. Fix the data{hint} — "
                               f"every row was skipped")
        self.last_pass_stats = stats
        self.pass_stats = self._fresh_stats()
        self.epoch, self.offset = self.epoch + 1, 0

    def _exhausted(self) -> bool:
        return self.max_epochs is not None and self.epoch >= self.max_epochs

    def __iter__(self) -> Iterator[list[dict]]:
        return self

    def __next__(self) -> list[dict]:
        batch: list[dict] = []
        n = len(self.dataset)
        # The position advances row by row, so state_dict() taken after a batch is "between batches".
        try:
            while len(batch) < self.batch_size:
                if self._exhausted():
                    raise StopIteration
                if self.offset >= n:
                    self._end_pass()
                    if self.drop_last:
                        if self.last_pass_stats.kept < self.batch_size:  # every epoch's only batch is short
                            raise RuntimeError(
                                f"{self.dataset.path} has {self.last_pass_stats.kept} usable rows, fewer than one "
                                f"batch of {self.batch_size}, and drop_last=True drops it every epoch; use a "
                                f"smaller batch, more data, or drop_last=False")
                        batch = []
                    continue
                idx = int(self.order(self.epoch)[self.offset])
                self.offset += 1
                rec, reason = self.dataset.get(idx)
                if rec is None:
                    self.pass_stats.add_skip(reason)
                else:
                    self.pass_stats.add_kept()
                    batch.append(rec)
        except StopIteration:
            if batch and not self.drop_last:
                return batch  # the last, short batch of the final epoch
            raise
        return batch
