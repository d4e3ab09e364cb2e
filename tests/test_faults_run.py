"""Run-time faults and validation (reliability issue items 3, 4, 7, 10, 11), each reproduced with real
files and real processes: the trainer and `megatron-vppo eval` run as a user runs them, on a tiny
Qwen2.5-VL warm-started so that it answers `\\boxed{1}` / `\\boxed{2}` (rewards vary, updates happen).

Faults are real inputs, not mocks: an out-of-range config value, a config whose entropy coefficient
overflows the loss, Adam moments filled with NaN through the documented test-only hook
(`MEGATRON_VPPO_TEST_CORRUPT_OPTIMIZER`, train/nonfinite.py), a `mathruler` package on PYTHONPATH that
fails to import or raises on some answers, a latin-1 encoded data row, empty and all-bad data files.
Each test asserts what the user sees (exit code, one line, no traceback) and what is kept
(checkpoints, metrics, a resumable run). Mistakes found before anything loads run the CLI in this process
(`conftest.run_cli`: the same `main`, no interpreter start-up).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import launch_env, run_cli

REPO = Path(__file__).resolve().parents[1]
PIXELS = ("3136", "12544")

CONFIG = """\
parallel: {{tp: 1, pp: 1}}
model: {{path: {model}, dtype: fp32, transformer_impl: local}}
algo: {{name: vppo, entropy_coef: 0.06}}
rollout: {{engine: hf, group_size: 4, top_p: 1.0, max_prompt_length: 512, max_response_length: 6,
          max_dynamic_sampling_retries: 1}}
data: {{train: {train}, val: "", min_pixels: {min_px}, max_pixels: {max_px}, shuffle: false}}
optim: {{lr: 2.0e-4, weight_decay: 0.0, use_distributed_optimizer: false}}
train: {{seed: 1, prompts_per_step: 2, mini_batch_prompts: 2, micro_batch_size: 8, total_steps: 3, val_every: 0,
        save_every: 1, keep_last: 5, resume: auto}}
"""


def cli(*args: str, shadow: Path | None = None, timeout: float = 300, nproc: int = 1,
        **env: str) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    res = subprocess.run([sys.executable, *launcher, "-m", "megatron_vppo.cli", *args], cwd=REPO,
                         env=launch_env(*[shadow] if shadow else [], **env), capture_output=True, text=True, timeout=timeout)
    res.out = res.stdout + res.stderr
    return res


def one_line_error(res, prefix: str, torchrun: bool = False) -> str:
    """The error the user sees: exactly one line starting with `prefix` (rank 0's), and no traceback
    (under torchrun: none from our code; the launcher prints its own summary of failed ranks)."""
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, res.out[-4000:]
    if torchrun:
        assert f'File "{REPO / "megatron_vppo"}' not in res.out, res.out[-4000:]
    else:
        assert "Traceback" not in res.out, res.out[-4000:]
    return lines[0]


def metrics(out_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


def complete_checkpoints(out_dir: Path) -> list[str]:
    ck = out_dir / "checkpoints"
    return sorted(p.name for p in ck.iterdir() if (p / "COMPLETE").is_file()) if ck.is_dir() else []


def shadow_mathruler(root: Path, grader_source: str) -> Path:
    """A `mathruler` package that shadows the installed one on PYTHONPATH (a broken environment)."""
    pkg = root / "mathruler"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "grader.py").write_text(grader_source)
    return root


LATIN1_ROW = '{"problem": "<image>Wie viele Kreise? Caf\u00e9", "images": ["%s"], "answer": "1"}\n'


@pytest.fixture(scope="module")
def assets(warm_model_dir, tmp_path_factory):
    from megatron_vppo.data.synthetic_task import write_synthetic_dataset

    root = tmp_path_factory.mktemp("faults_run")
    train, val = write_synthetic_dataset(root / "data", 64, 20, seed=0, tasks=("count",))

    def keep(path):
        return [r for r in map(json.loads, path.read_text().splitlines()) if r["answer"] in ("1", "2")]

    rows, val_rows = keep(train), keep(val)
    clean = root / "data" / "train_clean.jsonl"
    clean.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Training data whose second row is latin-1 encoded (valid JSON, not UTF-8): item 7.
    mixed = root / "data" / "train_latin1.jsonl"
    with open(mixed, "wb") as f:
        f.write((json.dumps(rows[0]) + "\n").encode())
        f.write((LATIN1_ROW % rows[1]["images"][0]).encode("latin-1"))
        f.writelines((json.dumps(r) + "\n").encode() for r in rows[1:])
    valf = root / "data" / "val.jsonl"
    valf.write_text("".join(json.dumps(r) + "\n" for r in val_rows[:4]))
    model = warm_model_dir  # conftest: tiny_model_dir after 60 SFT steps on these clean rows
    config = root / "run.yaml"
    config.write_text(CONFIG.format(model=model, train=mixed, min_px=PIXELS[0], max_px=PIXELS[1]))
    return {"root": root, "model": model, "config": config, "train": mixed, "val": valf, "rows": rows}


def train(assets, out: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
    return cli("train", str(assets["config"]), f"train.output_dir={out}", *overrides, **kw)


def evaluate(assets, *args: str, **kw) -> subprocess.CompletedProcess:
    return cli("eval", "--model", str(assets["model"]), "--k", "2", "--max-new-tokens", "6", "--seed", "1",
               "--min-pixels", PIXELS[0], "--max-pixels", PIXELS[1], *args, **kw)


# ------------------------------------------------------------------------ item 10: numbers at load


def test_every_numeric_field_has_a_range_checked_at_load():
    """Each int/float field of every section has an allowed range; a value outside it (or NaN) is one
    ConfigError line naming the key and the range."""
    import dataclasses
    import typing

    from megatron_vppo.config import RANGES, ConfigError, RunConfig

    from megatron_vppo.run_config import load_config

    numeric = []
    for name, cls in typing.get_type_hints(RunConfig).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if {int, float} & ({hints[f.name]} | set(typing.get_args(hints[f.name]))):
                numeric.append((name, f.name))
    assert sorted(numeric) == sorted(RANGES), set(numeric) ^ set(RANGES)
    load_config(None)  # the defaults are in range
    for key, bad in (("rollout.group_size", 0), ("train.micro_batch_size", 0), ("train.mini_batch_prompts", 0),
                     ("optim.lr", -1e-6), ("rollout.max_response_length", 0), ("train.total_steps", 0),
                     ("optim.lr", ".nan"), ("optim.adam_beta2", 1.0), ("algo.clip_low", 1.0),
                     ("reward.max_error_rate", 2), ("train.max_nonfinite_steps", 0)):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={bad}"])
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{key}=") and "allowed" in msg, msg
    with pytest.raises(ConfigError, match=r"data.min_pixels=20000 > data.max_pixels=10000"):
        load_config(None, ["data.min_pixels=20000", "data.max_pixels=10000"])


def test_cli_rejects_bad_numbers_before_loading_anything(assets, tmp_path, capsys):
    """`optim.lr=1e6` used to train and exit 0 with weights of 1e6 (and `total_steps=0` exited 0 doing
    nothing; the in-process test above covers the other keys). Now: exit 2, one line, nothing loaded,
    no output directory."""
    t0 = time.monotonic()
    res = run_cli(capsys, "train", str(assets["config"]), f"train.output_dir={tmp_path / 'out'}", "optim.lr=1e6")
    assert res.returncode == 2, res.out[-3000:]
    line = one_line_error(res, "megatron-vppo train: config error:")
    assert "optim.lr=1000000.0 is out of range: allowed (0.0, 1.0)" in line
    assert "Loading weights" not in res.out and not (tmp_path / "out").exists()
    print(f"optim.lr=1e6 rejected in {time.monotonic() - t0:.1f}s")


# ------------------------------------------------------------------------ item 11: syntax, data, eval


def test_yaml_syntax_error_is_one_line_with_file_and_line(assets, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  seed: 1\n  total_steps: [3\nrollout: {group_size: 4}\n")
    res = run_cli(capsys, "train", str(bad))
    assert res.returncode == 2
    line = one_line_error(res, "megatron-vppo train: config error:")
    assert f"{bad}:4:8: YAML syntax error" in line, line
    from megatron_vppo.config import ConfigError
    from megatron_vppo.run_config import load_config

    with pytest.raises(ConfigError, match=r"^override 'optim.lr=\[': the value: YAML syntax error: .*; quote it$"):
        load_config(None, ["optim.lr=["])


def test_empty_data_file_is_one_clear_line(assets, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = run_cli(capsys, "train", str(assets["config"]), f"train.output_dir={tmp_path / 'out'}",
                  f"data.train={empty}")
    assert res.returncode == 2, res.out[-3000:]
    assert f"data.train {empty} is empty" in one_line_error(res, "megatron-vppo train: data error:")
    assert "StopIteration" not in res.out and "Loading weights" not in res.out
    from megatron_vppo.data.dataset import DataError, PromptDataset

    with pytest.raises(DataError, match="is empty"):  # what eval and the tools read through
        PromptDataset(empty)


def eval_args(assets, *args: str) -> list[str]:
    return ["--model", str(assets["model"]), "--k", "2", "--max-new-tokens", "6", "--seed", "1",
            "--min-pixels", PIXELS[0], "--max-pixels", PIXELS[1], *args]


def test_eval_limit_zero_and_only_bad_rows_are_errors_never_nan(assets, tmp_path, capsys):
    """`eval --limit 0` evaluated one prompt; an eval over only bad rows printed NaN into its JSON.
    (eval's own `main`, in this process.)"""
    from megatron_vppo.train.evaluate import main as eval_main

    with pytest.raises(SystemExit) as e:
        eval_main(eval_args(assets, "--data", str(assets["val"]), "--limit", "0"))
    assert e.value.code == 2 and "--limit 0: evaluates nothing" in capsys.readouterr().err
    bad = tmp_path / "bad_rows.jsonl"
    bad.write_text("".join(json.dumps({"problem": "<image>How many?", "images": [f"gone{i}.png"], "answer": "1"}) + "\n"
                           for i in range(3)))
    assert eval_main(eval_args(assets, "--data", str(bad))) == 2
    cap = capsys.readouterr()
    assert "NaN" not in cap.out and "accuracy" not in cap.out
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("megatron-vppo eval:")]
    assert len(lines) == 1 and lines[0].startswith("megatron-vppo eval: error: --data")
    assert "no usable rows" in lines[0] and "'missing_image': 3" in lines[0]
    assert eval_main(eval_args(assets, "--data", str(assets["val"]), "--limit", "1", "--json")) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1],
                     parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert out["prompts"] == 1 and 0.0 <= out["accuracy@2"] <= 1.0 and out["grader_errors"] == 0


def test_error_messages_name_options_that_exist(capsys):
    """Every option an error message suggests is a real config key (or eval flag)."""
    import re

    from megatron_vppo.config import RunConfig

    from megatron_vppo.run_config import load_config
    from megatron_vppo.train.evaluate import main as eval_main  # noqa: F401  (its flags are checked below)

    sources = [REPO / "megatron_vppo" / p for p in ("data/dataset.py", "train/nonfinite.py", "reward/grade.py",
                                                   "train/build.py", "train/startup.py", "train/output_lock.py")]
    sources += sorted((REPO / "megatron_vppo" / "checkpoint" / "dist_checkpoint").glob("*.py"))
    text = "\n".join(p.read_text() for p in sources)
    assert "load_optimizer=False" not in text and "problem_key=/" not in text and "position afresh\"" not in text
    keys = set(re.findall(r"(?<![\w.])((?:train|data|optim|reward|vppo|rollout)\.[a-z_0-9]+)\b", text))
    assert {"train.load_optimizer", "data.problem_key", "data.resume_position", "train.max_nonfinite_steps",
            "reward.max_error_rate"} <= keys
    cfg = load_config(None)
    for key in keys:
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), f"an error message suggests {key}, which is not a config key"
    assert isinstance(RunConfig().data.problem_key, str)
    help_text = run_cli(capsys, "eval", "--help").stdout
    for flag in ("--problem-key", "--answer-key", "--max-grader-error-rate"):
        assert flag in help_text


# ------------------------------------------------------------------------ item 3: non-finite values


def test_nonfinite_check_agrees_with_elementwise_isfinite():
    """The guard's fast test (a sum per tensor, exact check only where the sum is not finite) gives
    torch.isfinite's verdict, including finite values whose sum overflows and Inf - Inf."""
    import torch

    from megatron_vppo.train.nonfinite import _any_nonfinite

    gen = torch.Generator().manual_seed(0)
    cases = [[torch.randn(1000, generator=gen)], [torch.full((1000,), 3e38)],
             [torch.tensor([float("inf"), -float("inf")])], [torch.zeros(0), torch.arange(3)],
             [torch.randn(64, generator=gen).bfloat16()]]
    for dtype, bad in ((torch.float32, float("nan")), (torch.bfloat16, float("inf")), (torch.float64, -float("inf"))):
        t = torch.randn(5000, generator=gen).to(dtype)
        t[4321] = bad
        cases.append([torch.randn(10, generator=gen), t])
    for tensors in cases:
        truth = any(not torch.isfinite(t).all() for t in tensors if t.is_floating_point())
        assert _any_nonfinite(tensors) == truth, tensors



def test_nan_optimizer_state_stops_before_save_and_the_run_resumes(assets, tmp_path):
    """NaN Adam moments at step 2 (the issue's repro), on data-parallel rank 1 only of a DP2 run: the
    update makes that rank's weights NaN, and both ranks stop (one all-reduced flag, no hang) with one
    line before saving step 2 or pushing it to the engine; step 1's checkpoint is intact and
    `resume=auto` continues from it to the end."""
    out = tmp_path / "nan"
    res = train(assets, out, nproc=2, MEGATRON_VPPO_TEST_CORRUPT_OPTIMIZER="2@1")
    assert res.returncode != 0, res.out[-4000:]
    assert res.out.count("filled") == 1 and "(test-only fault hook)" in res.out  # rank 1 only
    line = one_line_error(res, "megatron-vppo train: error:", torchrun=True)
    assert "step 2: the optimizer update made the weights non-finite" in line
    assert complete_checkpoints(out) == ["step_0000001"]
    assert "saved checkpoint" in res.out and "step_0000002" not in res.out
    res = train(assets, out)  # no fault this time
    assert res.returncode == 0, res.out[-4000:]
    assert "resumed from" in res.out and "step_0000001 at step 1" in res.out
    rows = metrics(out)
    assert sorted(rows) == [1, 2, 3]
    assert all(math.isfinite(v) for r in rows.values() for k, v in r.items() if isinstance(v, float))
    assert complete_checkpoints(out) == ["step_0000001", "step_0000002", "step_0000003"]
    # item 7 on the way: the latin-1 row was skipped and counted (step 1 read it), never mangled
    assert rows[2]["data/skipped/non_utf8_text"] == 1 and rows[2]["data/rows_skipped"] == 1


def test_nonfinite_loss_steps_are_skipped_counted_and_stop_after_n_in_a_row(assets, tmp_path):
    """An entropy coefficient of 1e38 overflows the loss to inf: each such optimizer step is skipped
    (weights untouched, warning, `actor/nonfinite_skipped`), and the second in a row stops the run."""
    out = tmp_path / "inf"
    res = train(assets, out, "algo.entropy_coef=1e38", "train.max_nonfinite_steps=2", "train.total_steps=4")
    assert res.returncode == 1, res.out[-4000:]
    line = one_line_error(res, "megatron-vppo train: error:")
    assert "2 optimizer steps in a row had a non-finite loss or gradient (train.max_nonfinite_steps=2)" in line
    assert res.out.count("optimizer step skipped") == 2
    rows = metrics(out)
    assert rows[1]["actor/nonfinite_skipped"] == 1 and rows[1]["actor/nonfinite_skipped_total"] == 1
    assert "actor/grad_norm" not in rows[1] and "actor/loss" not in rows[1]  # no NaN logged as a number
    # The skipped step left the weights as they were: step 1's checkpoint exported to HF equals the
    # starting model exactly.
    hf = tmp_path / "hf"
    conv = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "mcore-to-hf", "--ckpt",
                           str(out / "checkpoints" / "step_0000001"), "--out", str(hf), "--hf-config",
                           str(assets["model"])], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, (conv.stdout + conv.stderr)[-3000:]
    from safetensors.torch import load_file

    def weights(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    start, saved = weights(assets["model"]), weights(hf)
    assert saved.keys() == start.keys()
    assert all((saved[k] == start[k]).all() for k in start)


# ------------------------------------------------------------------------ item 4: the grader


BROKEN_IMPORT = "raise ModuleNotFoundError(\"No module named 'pylatexenc'\", name='pylatexenc')\n"
RAISES = "def grade_answer(pred, gt):\n    raise RuntimeError('grader broke on ' + pred)\n"


def test_grader_that_cannot_import_stops_train_and_eval_at_start(assets, tmp_path):
    shadow = shadow_mathruler(tmp_path / "shadow", BROKEN_IMPORT)
    res = train(assets, tmp_path / "out", shadow=shadow)
    assert res.returncode == 1, res.out[-3000:]
    line = one_line_error(res, "megatron-vppo train: error:")
    assert "reward.method=mathruler: cannot import mathruler.grader" in line and "pylatexenc" in line
    assert "Loading weights" not in res.out  # before the model loads
    res = evaluate(assets, "--data", str(assets["val"]), shadow=shadow)
    assert res.returncode == 1, res.out[-3000:]
    assert "cannot import mathruler.grader" in one_line_error(res, "megatron-vppo eval: error:")
    assert "accuracy" not in res.stdout


def test_grader_exceptions_are_counted_logged_and_stop_above_the_rate(assets, tmp_path):
    shadow = shadow_mathruler(tmp_path / "shadow", RAISES)
    # eval under a permissive rate: the errors are counted in the JSON, the first few logged with the answer
    res = evaluate(assets, "--data", str(assets["val"]), "--max-grader-error-rate", "1", "--json", shadow=shadow)
    assert res.returncode == 0, res.out[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    logged = [ln for ln in res.stderr.splitlines() if "raised RuntimeError: grader broke on" in ln]
    assert out["grader_errors"] >= 1 and len(logged) == min(out["grader_errors"], 5), res.stderr[-3000:]
    assert all("pred=" in ln and "answer=" in ln for ln in logged)
    assert out["accuracy@2"] == 0.0  # what used to be reported silently
    # training (default reward.max_error_rate=0.05) stops at step 1, before any update or save
    out_dir = tmp_path / "train"
    res = train(assets, out_dir, shadow=shadow)
    assert res.returncode == 1, res.out[-3000:]
    line = one_line_error(res, "megatron-vppo train: error:")
    assert line.startswith("megatron-vppo train: error: step 1: the reward grader raised on"), line
    assert "reward.max_error_rate=0.05" in line and "RuntimeError: grader broke on" in line and "answer=" in line
    assert complete_checkpoints(out_dir) == []
