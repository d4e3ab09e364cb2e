"""The JSONL the generation and scoring tools read and write (one definition, so both accept the
same rows and fail on the same bad ones — on every rank alike, before any rank starts work)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class InputRowError(ValueError):
    """A malformed input row; the message names file, line and the fix."""


def read_rows(path, fields=("problem",), one_of: dict | None = None) -> list[dict]:
    """Rows {"problem", "images": [paths], ...}: `fields` must be strings; relative image paths
    resolve against the working directory, then the data file's folder, and must exist. `one_of`
    {key: "str" | "ids"}: each row holds exactly one of these keys, a string or a list of token ids."""
    rows = []
    base = Path(path).resolve().parent
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputRowError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise InputRowError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in fields if not isinstance(row.get(k), str)]
            if missing:
                quoted = lambda ks: ", ".join(f'"{k}"' for k in ks)  # noqa: E731
                raise InputRowError(f"{path}:{lineno}: missing {quoted(missing)} (a string); each line needs "
                                    f'{{{quoted(fields)}, "images": [paths]}}')
            images = []
            for p in row.get("images") or []:
                q = Path(p)
                if not q.is_absolute() and not q.exists():
                    q = base / q
                if not q.exists():
                    raise InputRowError(f"{path}:{lineno}: image {p!r} not found (also tried {base / p})")
                images.append(str(q))
            alt = {}
            if one_of:
                present = [k for k in one_of if k in row]
                if len(present) != 1:
                    names = " or ".join(f'"{k}"' for k in one_of)
                    raise InputRowError(f"{path}:{lineno}: needs exactly one of {names}, got "
                                        f"{', '.join(present) or 'none'}")
                key = present[0]
                value = row[key]
                ok = (isinstance(value, str) if one_of[key] == "str" else isinstance(value, list) and all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value))
                if not ok:
                    want = "a string" if one_of[key] == "str" else "a list of token ids (non-negative integers)"
                    raise InputRowError(f'{path}:{lineno}: "{key}" must be {want}')
                alt[key] = value
            rows.append({**{k: row[k] for k in fields}, **alt, "images": images})
    return rows


def write_jsonl_atomic(path, records) -> None:
    """One JSON line per record, into a temporary sibling that replaces `path` only once complete and
    on disk: a crash leaves the previous file (or none), never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
