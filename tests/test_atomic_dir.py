"""checkpoint/atomic_dir.py: a directory is published whole or not at all."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_vppo.checkpoint import atomic_dir
from megatron_vppo.checkpoint.atomic_dir import atomic_dir as write_atomically


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writer_that_raises_midway_leaves_the_old_directory_and_no_temp(tmp_path):
    out = tmp_path / "model"
    with write_atomically(out) as d:
        (d / "a.txt").write_text("old a")
        (d / "sub").mkdir()
        (d / "sub" / "b.txt").write_text("old b")
    before = _tree(out)
    assert before == {"a.txt": "old a", "sub/b.txt": "old b"}

    with pytest.raises(RuntimeError, match="disk hiccup"):
        with write_atomically(out, overwrite=True) as d:
            (d / "a.txt").write_text("new a")  # half of the new directory is written ...
            raise RuntimeError("disk hiccup")  # ... then the writer dies
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "a temporary directory was left behind"


def test_overwrite_replaces_and_refusal_keeps(tmp_path):
    out = tmp_path / "model"
    with write_atomically(out) as d:
        (d / "w").write_text("1")
    with pytest.raises(FileExistsError, match="already exists"):
        with write_atomically(out) as d:
            (d / "w").write_text("2")
    assert (out / "w").read_text() == "1"
    with write_atomically(out, overwrite=True) as d:
        (d / "w").write_text("3")
    assert _tree(out) == {"w": "3"}  # the new directory only: nothing of the old one survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    out = tmp_path / "model"
    with write_atomically(out) as d:
        (d / "w").write_text("old")
    real = os.rename

    def rename(src, dst):
        if Path(dst) == out and ".tmp-replaced-" not in Path(src).name:
            raise OSError("rename failed (simulated)")
        return real(src, dst)

    monkeypatch.setattr(atomic_dir.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        with write_atomically(out, overwrite=True) as d:
            (d / "w").write_text("new")
    assert _tree(out) == {"w": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_temp_names(tmp_path):
    out = tmp_path / "step_0000003"
    assert atomic_dir.temp_sibling(out, "ab12", hidden=False).name == "step_0000003.tmp-ab12"
    assert atomic_dir.temp_sibling(out, "ab12").name == ".step_0000003.tmp-ab12"
