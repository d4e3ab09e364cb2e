"""Per-step metrics: `metrics.jsonl` (the record a resumed run must reproduce), TensorBoard, a one-line
summary for the console, and an end-of-run PNG plot.

Only one rank writes (the caller reduces metrics to it first); every other rank gets a logger whose
methods do nothing, so the training loop needs no `if rank == ...` around logging.

Metric names the plot looks for (first present wins) are in `PLOT_PANELS`; the trainer logs
`reward/mean`, `val/accuracy`, and for VPPO `dependency/mean` and `tgf/kept_token_frac` (the names
algo/vppo.py reports). Algorithms that compute no dependency and keep every token (dapo, grpo, gspo) log
neither, and their plot shows the policy loss and clip fraction in those panels instead.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# (panel title, candidate metric keys) for plot_metrics; a panel may list alternatives: the first
# (title, keys) with data is drawn.
PLOT_PANELS: list[list[tuple[str, tuple[str, ...]]]] = [
    [("reward", ("reward/mean", "reward"))],
    [("validation accuracy", ("val/accuracy", "val_accuracy", "val/acc"))],
    [("dependency mean", ("dependency/mean", "vppo/dependency_mean")), ("policy loss", ("actor/pg_loss",))],
    [("kept-token fraction", ("tgf/kept_token_frac", "vppo/kept_token_fraction")),
     ("clip fraction", ("actor/pg_clipfrac",))],
]

# Keys shown first (in this order) by format_step_summary, the trainer's console line; any other
# numeric key follows, up to max_items in all.
SUMMARY_KEYS: list[tuple[str, str]] = [
    ("reward/mean", "reward"),
    ("val/accuracy", "val_acc"),
    ("actor/loss", "loss"),
    ("actor/pg_loss", "pg_loss"),
    ("dependency/mean", "dep"),
    ("tgf/kept_token_frac", "kept"),
    ("actor/pg_clipfrac", "clipfrac"),
    ("actor/grad_norm", "gnorm"),
    ("actor/grad_norm_max", "gnorm_max"),
    ("rollout/attempts", "attempts"),
    ("data/rows_skipped", "bad_rows"),
    ("time/step_s", "s/step"),
    ("actor/lr", "lr"),
]


def _to_number(value: Any) -> Any:
    """Tensors / numpy scalars -> Python numbers; other JSON-able values pass through."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: str | Path) -> list[dict]:
    """All complete JSON lines of a metrics.jsonl (a torn last line, from a crash mid-write, is skipped)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    with p.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: skipping unreadable metrics line", p, lineno)
    return rows


def truncate_metrics(path: str | Path, keep_through_step: int | None) -> int:
    """Keep only lines with step <= keep_through_step (None: keep nothing).

    A resumed run re-executes the steps after its checkpoint, so their old lines must go. When the
    lines to keep are a prefix of the file (always, for a file this logger wrote), the file is cut in
    place — a single truncate that needs no free space, so a run resumes on a full disk; a file with
    nothing to drop is not written at all. Otherwise it is rewritten to a temp name and renamed, so a
    crash never leaves it half-written. Returns the number of lines kept.
    """
    p = Path(path)
    if not p.exists():
        return 0
    data = p.read_bytes()
    kept, cut, pos, prefix = [], None, 0, True
    for raw in data.splitlines(keepends=True):
        start, pos = pos, pos + len(raw)
        line = raw.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None  # a torn line (crash mid-write): dropped
        keep = (row is not None and keep_through_step is not None
                and row.get("step", math.inf) <= keep_through_step)
        if keep:
            kept.append(row)
            prefix = prefix and cut is None
        elif cut is None:
            cut = start
    if cut is None:
        return len(kept)  # nothing to drop
    if prefix:
        with open(p, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        return len(kept)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return len(kept)


def _no_space(e: OSError, path: Path) -> OSError:
    """ENOSPC as one line naming the path and what to do; other errors unchanged."""
    if e.errno != errno.ENOSPC:
        return e
    return OSError(errno.ENOSPC, f"no space left on {path.parent}: writing {path.name} failed; free space "
                                 f"there (or set train.output_dir to a disk with room), then continue with "
                                 f"train.resume=auto")


class MetricsLogger:
    """Append one JSON object per step to `out_dir/metrics.jsonl` and mirror scalars to TensorBoard.

    `resume_step`: the step of the checkpoint this run resumed from (None = fresh run). Lines after
    it are dropped, and TensorBoard events from later steps are purged, so a stopped-and-resumed run
    ends with the same file as an uninterrupted one. A fresh run (resume_step None) starts a new file
    and refuses (FileExistsError) to truncate one that holds another run's lines.
    """

    def __init__(
        self,
        out_dir: str | Path,
        rank: int,
        *,
        writer_rank: int = 0,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.enabled = rank == writer_rank
        self.path = self.out_dir / METRICS_FILE
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None and self.path.is_file() and self.path.stat().st_size > 0:
            raise FileExistsError(
                f"{self.path} holds another run's metrics; a fresh run does not overwrite them. Fix: "
                f"continue that run with train.resume=auto, choose a new train.output_dir, or set "
                f"train.existing_output=move_aside")
        try:
            truncate_metrics(self.path, resume_step)
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise _no_space(e, self.path) from None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:  # tensorboard not installed: jsonl is the record anyway
                logger.info("TensorBoard disabled (%s); metrics.jsonl is still written", e)
            else:
                purge = None if resume_step is None else resume_step + 1
                self._tb_do(lambda: setattr(self, "_tb", SummaryWriter(log_dir=str(self.out_dir / "tensorboard"),
                                                                       purge_step=purge)))

    def _tb_do(self, fn) -> None:
        """TensorBoard is a mirror: a failure there (a full disk included) turns it off with a warning
        instead of stopping the run; metrics.jsonl stays the record."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            logger.warning("TensorBoard disabled (%s); metrics.jsonl is still written", e)
            self._tb = None

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Write one step's metrics (flushed immediately); returns the row as written."""
        row = {"step": int(step)}
        row.update({k: _to_number(v) for k, v in metrics.items() if k != "step"})
        if not self.enabled:
            return row
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            raise _no_space(e, self.path) from None
        if self._tb is not None:
            def mirror():
                for k, v in row.items():
                    if k != "step" and _is_scalar(v):
                        self._tb.add_scalar(k, v, global_step=int(step))
                self._tb.flush()
            self._tb_do(mirror)
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb_do(self._tb.close)
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if v != v or v in (math.inf, -math.inf):
        return str(v)
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.2e}"
    return f"{v:.4f}".rstrip("0").rstrip(".") if a < 1 else f"{v:.3f}"


def format_step_summary(
    step: int,
    total_steps: int | None,
    metrics: Mapping[str, Any],
    keys: Iterable[tuple[str, str]] | None = None,
    max_items: int = 10,
) -> str:
    """One console line: `step 3/200 | reward 0.53 | val_acc 0.4 | dep 0.012 | ...`.

    `keys`: (metric key, short label) pairs shown first; remaining scalar metrics follow by name,
    up to `max_items` in all.
    """
    keys = list(keys) if keys is not None else SUMMARY_KEYS
    head = f"step {step}" + (f"/{total_steps}" if total_steps else "")
    parts, seen = [], {"step"}
    for key, label in keys:
        if key in metrics and len(parts) < max_items:
            parts.append(f"{label} {_fmt(_to_number(metrics[key]))}")
            seen.add(key)
    for key in sorted(metrics):
        if key in seen or len(parts) >= max_items:
            continue
        v = _to_number(metrics[key])
        if _is_scalar(v):
            parts.append(f"{key} {_fmt(v)}")
    return " | ".join([head, *parts])


def plot_metrics(metrics_jsonl: str | Path, out_png: str | Path,
                 extra_panels: Iterable[tuple[str, tuple[str, ...]]] = ()) -> Path:
    """Plot reward, validation accuracy, dependency mean and kept-token fraction (otherwise policy loss and
    clip fraction) over steps (PNG), then `extra_panels` (the algorithm's own: `Algorithm.panels` in
    algo/registry.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_jsonl)
    panels = list(PLOT_PANELS) + [[panel] for panel in extra_panels]
    nrows = -(-len(panels) // 2)
    fig, axes = plt.subplots(nrows, 2, figsize=(10, 3.5 * nrows), constrained_layout=True, squeeze=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)

    def has(k):
        return any(_is_scalar(r.get(k)) for r in rows)

    for ax, options in zip(axes.flat, panels):
        title, candidates = next(((t, c) for t, c in options if any(map(has, c))), options[0])
        key = next((k for k in candidates if has(k)), None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if key is None:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        pts = [(r["step"], r[key]) for r in rows if _is_scalar(r.get(key)) and "step" in r]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
