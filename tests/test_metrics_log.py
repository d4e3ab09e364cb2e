"""metrics.jsonl / TensorBoard / summary line / plot (megatron_vppo.train.metrics_log) and progress bars."""
from __future__ import annotations

import json

import pytest

from megatron_vppo.train.metrics_log import (
    MetricsLogger,
    format_step_summary,
    plot_metrics,
    read_metrics,
)


def _metrics(step: int) -> dict:
    # Deterministic per step, like a resumed run that reproduces the same numbers.
    return {
        "reward/mean": 0.1 * step,
        "val/accuracy": 0.05 * step if step % 2 == 0 else None,
        "dependency/mean": 0.01 * step,
        "tgf/kept_token_frac": 0.4,
        "actor/lr": 1e-6,
        "rollout/num_prompts": 8,
    }


def _tb_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_resume_truncates_to_checkpoint_step(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    with MetricsLogger(straight, rank=0) as log:
        for s in range(1, 6):
            log.log(s, _metrics(s))

    # Run stopped during step 4 (checkpoint at step 2): lines 3, 4 exist, the last one torn.
    with MetricsLogger(stopped, rank=0) as log:
        for s in range(1, 5):
            log.log(s, _metrics(s) if s < 4 else {"reward/mean": 123.0})
    with open(stopped / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "reward/me')  # crash mid-write
    with MetricsLogger(stopped, rank=0, resume_step=2) as log:
        for s in range(3, 6):
            log.log(s, _metrics(s))

    a = (straight / "metrics.jsonl").read_text().splitlines()
    b = (stopped / "metrics.jsonl").read_text().splitlines()
    assert a == b and len(a) == 5
    assert [r["step"] for r in read_metrics(stopped / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    # TensorBoard: events after the resume step are purged, so each step appears once.
    want = [(s, round(0.1 * s, 6)) for s in range(1, 6)]
    assert _tb_scalars(straight / "tensorboard", "reward/mean") == want
    assert _tb_scalars(stopped / "tensorboard", "reward/mean") == want


def test_fresh_run_never_overwrites_and_other_ranks_write_nothing(tmp_path):
    with MetricsLogger(tmp_path, rank=0) as log:
        log.log(1, {"x": 1.0})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="another run's metrics") as err:
        MetricsLogger(tmp_path, rank=0)  # a fresh run in the same dir must not truncate the old run
    assert str(tmp_path / "metrics.jsonl") in str(err.value) and "train.existing_output=move_aside" in str(err.value)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    other = tmp_path / "rank1"
    with MetricsLogger(other, rank=1) as log:
        row = log.log(1, {"x": 3.0})
    assert row == {"step": 1, "x": 3.0} and not other.exists()


def test_values_are_plain_json(tmp_path):
    import numpy as np
    import torch

    with MetricsLogger(tmp_path, rank=0, tensorboard=False) as log:
        log.log(7, {"t": torch.tensor(0.5), "n": np.float32(0.25), "i": np.int64(3), "s": "ok"})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 7, "t": 0.5, "n": 0.25, "i": 3, "s": "ok"}


def test_summary_line():
    line = format_step_summary(3, 200, {**_metrics(3), "actor/pg_loss": -0.01234, "time/step_s": 12.5})
    assert line.startswith("step 3/200 | reward 0.3 | ")
    assert "pg_loss -0.0123" in line and "dep 0.03" in line and "kept 0.4" in line
    assert "lr 1.00e-06" in line and "s/step 12.500" in line and "rollout/num_prompts 8" in line
    assert "\n" not in line


def test_plot_png(tmp_path):
    with MetricsLogger(tmp_path, rank=0, tensorboard=False) as log:
        for s in range(1, 6):
            log.log(s, _metrics(s))
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots" / "metrics.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # Missing metrics give a "no data" panel, not an error.
    (tmp_path / "empty.jsonl").write_text('{"step": 1}\n')
    assert plot_metrics(tmp_path / "empty.jsonl", tmp_path / "empty.png").stat().st_size > 0


def test_plot_adds_the_algorithms_panels(tmp_path):
    """`Algorithm.panels` (algo/registry.py) add rows below the four common panels."""
    from PIL import Image

    from megatron_vppo.algo.registry import ALGORITHMS

    with MetricsLogger(tmp_path, rank=0, tensorboard=False) as log:
        for s in range(1, 4):
            log.log(s, {**_metrics(s), "vepo/jsd_mean": 0.1 * s, "vepo/entropy_gap_mean": 0.2})
    plain = Image.open(plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "a.png")).size
    assert len(ALGORITHMS["vepo"].panels) == 2 and ALGORITHMS["vppo"].panels == ()
    vepo = Image.open(plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "b.png",
                                   extra_panels=ALGORITHMS["vepo"].panels)).size
    assert vepo[0] == plain[0] and vepo[1] == plain[1] * 3 // 2  # 3 rows of panels instead of 2


def test_progress_bar_only_on_last_rank(monkeypatch):
    from megatron_vppo.train import progress as pr

    monkeypatch.setenv("WORLD_SIZE", "4")
    try:
        pr.set_progress_enabled(True)
        monkeypatch.setenv("RANK", "3")
        assert pr.bars_enabled() and not pr.progress(range(3)).disable
        monkeypatch.setenv("RANK", "0")
        assert not pr.bars_enabled() and pr.bars_enabled(prefer="first")
        bar = pr.progress(range(3), desc="rollout")
        assert bar.disable and list(bar) == [0, 1, 2]  # a disabled bar still iterates
        pr.set_progress_enabled(False)
        monkeypatch.setenv("RANK", "3")
        assert not pr.bars_enabled()
        pr.set_progress_enabled(None)  # auto: off when stderr is not a terminal (pytest captures it)
        assert pr.bars_enabled() is False
    finally:
        pr.set_progress_enabled(None)
    with pytest.raises(ValueError, match="prefer"):
        pr.progress_rank("middle")


def test_step_line_and_plot_show_what_the_algorithm_computes(tmp_path):
    """dapo/grpo/gspo log no dependency / kept fraction (issue 19): the step line shows the clip fraction and
    the grad norm's mean and max instead, and the plot's last two panels the policy loss and clip fraction."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from megatron_vppo.train import metrics_log

    dapo = {"reward/mean": 0.5, "actor/loss": 0.1, "actor/pg_loss": 0.09, "actor/pg_clipfrac": 0.02,
            "actor/grad_norm": 0.8, "actor/grad_norm_max": 1.5, "rollout/attempts": 2}
    line = format_step_summary(3, 10, dapo)
    assert "dep " not in line and "kept " not in line
    assert "clipfrac 0.02" in line and "gnorm 0.8" in line and "gnorm_max 1.5" in line, line
    with MetricsLogger(tmp_path, rank=0, tensorboard=False) as log:
        for s in (1, 2):
            log.log(s, dapo)
    titles = []
    real = plt.subplots

    def spy(*a, **k):
        fig, axes = real(*a, **k)
        titles.append(axes)
        return fig, axes

    import unittest.mock

    with unittest.mock.patch.object(plt, "subplots", spy):
        metrics_log.plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png")
    assert [ax.get_title() for ax in titles[0].flat] == ["reward", "validation accuracy", "policy loss",
                                                         "clip fraction"]
    assert [ax.get_ylabel() for ax in titles[0].flat][2:] == ["actor/pg_loss", "actor/pg_clipfrac"]
