"""A run's life in its output directory (issue 22, issue 19 items 2, 8, 9, 10), with real trainer
processes, files and signals:

* one run per `train.output_dir`: a second trainer on the directory exits 2 at once naming the first
  (host, pid); a SIGKILLed run's lock is taken over by the next run with a warning (22.1);
* SIGINT between steps finishes the step, saves and exits 130 — with `train.save_every=0` (22.6);
* lineage: each checkpoint records its parent; a branch moves the old line's newer checkpoints to
  previous_runs/ and `resume=auto` then follows the new line (22.3);
* a run that never completed a step is not "another run": the retry starts (19.2); `resume=auto` on a
  finished run says it is complete and builds nothing (19.8);
* a model of another structure is refused before anything loads, by the trainer and by tools/score.py
  (22.2);
* graders that return a non-bool or hang are counted against reward.max_error_rate (22.4, 22.5);
* start-up mistakes are one line, exit 2, before the model is built (22.8, 19.10); bad rows are named (19.9).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import launch_env
from test_faults_run import REPO, cli, complete_checkpoints, one_line_error, shadow_mathruler

PIXELS = ("3136", "12544")
CONFIG = """\
parallel: {{tp: 1, pp: 1}}
model: {{path: {model}, dtype: fp32, transformer_impl: local}}
algo: {{name: grpo}}
rollout: {{engine: hf, group_size: 2, top_p: 1.0, max_prompt_length: 512, max_response_length: 4}}
data: {{train: {train}, val: "", min_pixels: {min_px}, max_pixels: {max_px}, shuffle: false}}
optim: {{lr: 1.0e-4, weight_decay: 0.0, use_distributed_optimizer: false}}
train: {{seed: 1, prompts_per_step: 2, mini_batch_prompts: 2, micro_batch_size: 4, total_steps: 3, val_every: 0,
        save_every: 1, keep_last: 20, resume: auto}}
"""


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    from megatron_vppo.data.synthetic_task import write_synthetic_dataset

    root = tmp_path_factory.mktemp("lifecycle")
    train, _ = write_synthetic_dataset(root / "data", 16, 4, seed=0, tasks=("count",))
    config = root / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir, train=train, min_px=PIXELS[0], max_px=PIXELS[1]))
    return {"root": root, "config": config, "model": Path(tiny_model_dir), "train": Path(train)}


def run(setup, out: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
    return cli("train", str(setup["config"]), f"train.output_dir={out}", *overrides, **kw)


class Trainer:
    """A trainer process in the background whose stderr is collected as it comes."""

    def __init__(self, setup, out: Path, *overrides: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_vppo.cli", "train", str(setup["config"]), f"train.output_dir={out}",
             *overrides], cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while text not in self.out:
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {text!r}:\n{self.out[-4000:]}"
            assert time.monotonic() < end, f"no {text!r} in {timeout}s:\n{self.out[-4000:]}"
            time.sleep(0.2)

    def wait(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        time.sleep(0.3)  # the reader thread drains the pipe
        return rc


def metric_steps(out: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def meta(out: Path, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step_{step:07d}" / "meta.json").read_text())


def test_one_run_per_dir_signals_lineage_stale_lock_and_structure(setup, tiny_model_dir_tied, tmp_path):
    out = tmp_path / "run"
    # 19.2: the leftovers of a start that never completed a step (step 0 metrics, a plot, TensorBoard)
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "val/accuracy": 0.0}) + "\n")
    (out / "metrics.png").write_bytes(b"png")
    (out / "tensorboard").mkdir()

    # 22.1 + 22.6: A runs with no scheduled saves; B on the same directory is refused at once
    # far more steps than the test lets it run: the SIGINT below must arrive between steps, never after the
    # last one, however long refusing B takes on a loaded machine
    a = Trainer(setup, out, "train.total_steps=100000", "train.save_every=0")
    a.wait_for("step 1/100000")
    assert "removed the leftovers of a run that never completed a step" in a.out
    t0 = time.monotonic()
    b = run(setup, out)
    assert b.returncode == 2, b.out[-3000:]
    line = one_line_error(b, "megatron-vppo train: config error:")
    assert f"is in use by another run (host {os.uname().nodename}, pid {a.proc.pid}, started " in line, line
    assert "Loading weights" not in b.out
    print(f"second run refused in {time.monotonic() - t0:.1f}s")

    # 22.6: SIGINT between steps: the step finishes, a checkpoint is saved although save_every=0, exit 130
    a.wait_for("step 2/100000")
    a.proc.send_signal(signal.SIGINT)
    assert a.wait() == 130, a.out[-4000:]
    stop = [ln for ln in a.out.splitlines() if ln.startswith("megatron-vppo train: interrupted: SIGINT: stopped after")]
    assert len(stop) == 1, a.out[-3000:]
    k = int(stop[0].split("stopped after step ")[1].split()[0])
    assert k >= 2 and complete_checkpoints(out) == [f"step_{k:07d}"], (k, complete_checkpoints(out))
    assert metric_steps(out) == list(range(1, k + 1))
    assert meta(out, k)["parent"] is None and meta(out, k)["model"]["vocab_size"] > 0

    # lineage: C continues the line two steps; each checkpoint names its parent
    c = run(setup, out, f"train.total_steps={k + 2}")
    assert c.returncode == 0, c.out[-4000:]
    assert meta(out, k + 1)["parent"] == f"step_{k:07d}" and meta(out, k + 2)["parent"] == f"step_{k + 1:07d}"

    # 22.3: a branch from step k moves the old line's step k+1, k+2 aside; D is then SIGKILLed (22.1)
    d = Trainer(setup, out, f"train.resume={out / 'checkpoints' / f'step_{k:07d}'}", "optim.lr=3.0e-4",
                f"train.total_steps={k + 4}")
    d.wait_for(f"step {k + 2}/{k + 4}")
    assert "moved the old line's 2 newer checkpoint(s)" in d.out, d.out[-3000:]
    d.proc.kill()
    d.wait()
    moved = sorted((out / "previous_runs").glob("*/checkpoints/step_*"))
    assert [p.name for p in moved] == [f"step_{k + 1:07d}", f"step_{k + 2:07d}"]
    assert meta(out, k + 1)["parent"] == f"step_{k:07d}" and meta(out, k + 1)["config"]["optim"]["lr"] == 3.0e-4

    # E: resume=auto takes over D's lock with a warning and follows the new line (lr 3e-4), not the old one
    e = run(setup, out, f"train.total_steps={k + 4}", "optim.lr=3.0e-4")
    assert e.returncode == 0, e.out[-4000:]
    assert f"taking over the lock of a run that is no longer running (host {os.uname().nodename}, pid " \
           f"{d.proc.pid}," in e.out, e.out[-3000:]
    assert metric_steps(out) == list(range(1, k + 5))
    chain, step = [], k + 4
    while step is not None:
        chain.append(step)
        parent = meta(out, step)["parent"]
        step = int(parent.split("_")[1]) if parent else None
    assert chain == list(range(k + 4, k - 1, -1)), chain
    assert all(meta(out, s)["config"]["optim"]["lr"] == 3.0e-4 for s in range(k + 1, k + 5))

    # 19.8: resume=auto on the finished run says so and builds nothing
    f = run(setup, out, f"train.total_steps={k + 4}", "optim.lr=3.0e-4")
    assert f.returncode == 0 and "this run is already complete" in f.out and "Loading weights" not in f.out, f.out

    # 22.2: a model of another structure (tied embeddings) is refused before anything loads
    g = run(setup, out, f"model.path={tiny_model_dir_tied}", f"train.total_steps={k + 6}")
    assert g.returncode == 2, g.out[-3000:]
    line = one_line_error(g, "megatron-vppo train: config error:")
    assert "tie_word_embeddings: False -> True" in line and f"set model.path to the model the run was trained " \
           f"from ({setup['model']})" in line, line
    assert "Loading weights" not in g.out
    # ... and by tools/score.py --model <step dir> --hf-config <another model>
    data = tmp_path / "score_in.jsonl"
    data.write_text(json.dumps({"problem": "1+1?", "images": [], "response": "2"}) + "\n")
    s = subprocess.run([sys.executable, str(REPO / "tools" / "score.py"), "--model",
                        str(out / "checkpoints" / f"step_{k + 4:07d}"), "--hf-config", str(tiny_model_dir_tied),
                        "--data", str(data), "--out", str(tmp_path / "score_out.jsonl")],
                       cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert s.returncode != 0 and "tie_word_embeddings: False -> True" in s.stderr, s.stderr[-3000:]
    assert "Traceback" not in s.stderr


# ------------------------------------------------------------------------ start-up checks, in-process


def _train_cli(setup, capsys, *overrides: str) -> tuple[int, str]:
    from megatron_vppo.cli import main

    rc = main(["train", str(setup["config"]), *overrides])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("megatron-vppo train:")]
    assert len(lines) == 1, err[-3000:]
    return rc, lines[0]


def test_startup_mistakes_are_one_line_before_the_model(setup, tmp_path, capsys, tmpfs):
    """22.8 / 19.10 / 19.9: each mistake is exit 2 and one line, found before any model is built."""
    import megatron_vppo.train.build as build

    def no_model(*a, **k):
        raise AssertionError("the model was built before the start-up checks")

    orig, build.build_policy = build.build_policy, no_model
    try:
        out = f"train.output_dir={tmp_path / 'out'}"
        rc, line = _train_cli(setup, capsys, "train.output_dir=")
        assert rc == 2 and "train.output_dir is empty" in line, line
        rc, line = _train_cli(setup, capsys, out, "model.transformer_impl=transformer_engine")
        assert rc == 2 and "needs a GPU" in line and "model.transformer_impl=local" in line, line
        rc, line = _train_cli(setup, capsys, out, "model.fp8=hybrid")
        assert rc == 2 and "model.fp8=hybrid needs a GPU" in line, line
        other = tmp_path / "llama"
        other.mkdir()
        (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
        rc, line = _train_cli(setup, capsys, out, f"model.path={other}")
        assert rc == 2 and "model_type 'llama' not in MODELS (known: qwen2_5_vl" in line, line
        from megatron_vppo.train.evaluate import main as eval_main

        assert eval_main(["--model", str(other), "--data", str(setup["train"])]) == 2  # eval: one line too
        err = capsys.readouterr().err
        assert err.startswith(f"megatron-vppo eval: error: --model {other}: model_type 'llama' not in MODELS"), err
        sys.path.insert(0, str(REPO / "tools"))
        try:
            import generate
        finally:
            sys.path.remove(str(REPO / "tools"))
        assert generate.main(["--model", str(other), "--data", str(setup["train"]), "--out", str(tmp_path / "g")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"generate.py: error: --model {other}: model_type 'llama' not in MODELS"), err
        rc, line = _train_cli(setup, capsys, out, f"data.train={setup['train'].parent}")
        assert rc == 2 and "is a directory but not one written by Dataset.save_to_disk" in line, line
        rc, line = _train_cli(setup, capsys, out, f"data.train={tmp_path / 'no_such_dir'}")
        assert rc == 2 and "does not exist" in line, line
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join(json.dumps({"problem": "<image>How many?", "images": [f"gone{i}.png"], "answer": "1"})
                               + "\n" for i in range(4)) + json.dumps({"problem": "", "answer": "1"}) + "\n")
        rc, line = _train_cli(setup, capsys, out, f"data.train={bad}")
        assert rc == 2 and "every row is invalid (5 rows: empty_problem=1, missing_image=4; first: row 0: " \
                           "missing_image" in line, line
        ro = _read_only_dir(tmp_path, tmpfs)
        rc, line = _train_cli(setup, capsys, f"train.output_dir={ro / 'run'}")
        assert rc == 2 and f"train.output_dir={ro / 'run'} is not writable" in line, line

        def interrupted_build(*a, **k):  # a real Ctrl-C while the model is being built
            # raise_signal sends it to this (the main) thread: os.kill may hand it to another thread an
            # earlier test left in this worker, and then the main thread's sleep is not interrupted
            signal.raise_signal(signal.SIGINT)
            time.sleep(30)
            raise AssertionError("SIGINT did not interrupt the build")

        build.build_policy = interrupted_build
        rc, line = _train_cli(setup, capsys, out)  # 19.8: a real reason, not "interrupted: "
        assert rc == 130 and "interrupted: SIGINT (Ctrl-C) before the first training step" in line, line
        assert "continue with train.resume=auto" in line.lower()
        from megatron_vppo.train import output_lock

        assert not output_lock.held(tmp_path / "out")  # released on the way out
    finally:
        build.build_policy = orig


def test_signals_between_steps_second_one_stops_at_once():
    """22.6: the first SIGINT / SIGTERM (real signals to this process) is recorded as a stop request; a
    second raises RunInterrupted at once; handlers are restored afterwards."""
    from megatron_vppo.train.run import RunInterrupted, stop_between_steps

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as e:
        with stop_between_steps() as stop:
            stop["step"] = 7
            signal.raise_signal(signal.SIGTERM)  # to this (main) thread, whatever threads the worker has
            time.sleep(0.1)
            assert stop["signum"] == signal.SIGTERM
            signal.raise_signal(signal.SIGINT)
            time.sleep(5)
    assert e.value.signum == signal.SIGINT and "second SIGINT: stopped at once, during step 7" in str(e.value)
    assert signal.getsignal(signal.SIGTERM) is before


def _read_only_dir(tmp_path: Path, tmpfs) -> Path:
    """A read-only filesystem (root ignores file modes); a directory without write permission otherwise."""
    if os.geteuid() != 0:
        point = tmp_path / "ro"
        point.mkdir()
        point.chmod(0o555)
        return point
    return tmpfs("ro", "ro,size=64k")


def test_converter_on_a_full_disk_is_one_line(tiny_model_dir, tmpfs):
    """19.10: `convert hf-to-mcore` onto a full disk (a 256 KiB tmpfs): exit 1, one line saying so, no
    traceback, nothing half-written left."""
    disk = tmpfs("small", "size=256k")
    res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "hf-to-mcore", "--hf",
                          str(tiny_model_dir), "--out", str(disk / "mcore")], cwd=REPO, env=launch_env(),
                         capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("convert_checkpoint.py hf-to-mcore: error:")]
    assert res.returncode == 1 and len(lines) == 1, res.stderr[-3000:]
    assert "no space left" in lines[0].lower(), lines[0]
    assert "Traceback" not in res.stderr and list(disk.iterdir()) == [], list(disk.iterdir())


def test_skipped_rows_are_named_at_info(setup, tmp_path, caplog):
    """19.9: the first rows of each skip reason are logged at INFO with their index and the file."""
    import logging

    from megatron_vppo.data.dataset import LOG_FIRST_SKIPS, PromptDataset

    rows = [{"problem": "", "answer": "1"}] * 5 + [{"problem": "<image>x", "images": ["gone.png"], "answer": "1"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = PromptDataset(path)
    with caplog.at_level(logging.INFO, logger="megatron_vppo.data.dataset"):
        for i in range(len(ds)):
            ds.get(i)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "skipping row" in r.getMessage()]
    assert info[:LOG_FIRST_SKIPS] == [f"data {path}: skipping row {i}: empty_problem" +
                                      (" (later empty_problem rows are only counted)" if i == LOG_FIRST_SKIPS - 1
                                       else "") for i in range(LOG_FIRST_SKIPS)]
    assert len(info) == LOG_FIRST_SKIPS + 1 and info[-1].startswith(f"data {path}: skipping row 5: missing_image")


# ------------------------------------------------------------------------ graders that lie or hang


LIES = """\
import math, time
def grade_answer(pred, gt):
    return {"nan": math.nan, "str": "False", "half": 0.5, "none": None, "one": 1, "zero": 0,
            "true": True}.get(pred, False) if pred != "hang" else time.sleep(60)
"""


def test_grader_results_must_be_bools_and_timeouts_count(tmp_path, monkeypatch):
    """22.4 / 22.5: in a real grader worker process, a NaN, "False", 0.5 or None result is a grader error
    (scored 0, counted), 1 / 0 / True are grades; a hanging call is a counted timeout; both are held to
    reward.max_error_rate."""
    from megatron_vppo.reward.grade import Grader, GraderFailure, check_error_rate

    shadow = shadow_mathruler(tmp_path / "shadow", LIES)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shadow), str(REPO), os.environ.get("PYTHONPATH", "")]))
    with Grader("mathruler", timeout_s=3.0) as g:
        scores = {p: g.score(f"\\boxed{{{p}}}", "1") for p in ("nan", "str", "half", "none", "one", "zero", "true")}
        assert scores == {"nan": 0.0, "str": 0.0, "half": 0.0, "none": 0.0, "one": 1.0, "zero": 0.0, "true": 1.0}
        assert g.errors == 4 and "not a bool or 0/1" in g.last_error and g.timeouts == 0
        assert g.score("\\boxed{hang}", "1") == 0.0 and g.timeouts == 1
    assert check_error_rate(0, 100, 0.05, "x", timeouts=5) == 0.05
    with pytest.raises(GraderFailure, match=r"timed out \(past reward.timeout_s\) on 1 of 8 answers .*raise "
                                            r"reward.timeout_s"):
        check_error_rate(0, 8, 0.05, "step 1", timeouts=1, timeout_example="pred='hang'")
    assert math.isclose(check_error_rate(1, 40, 0.05, "x", timeouts=1), 0.05)


def test_eval_timeout_flag(capsys):
    """22.5: eval takes the grading deadline as --timeout-s (the trainer's reward.timeout_s) and refuses a
    negative one; its grading is the trainer's (`generate_and_grade` + `grading_errors`), timeouts counted."""
    from megatron_vppo.train.evaluate import main as eval_main

    with pytest.raises(SystemExit) as e:
        eval_main(["--model", "m", "--data", "d", "--timeout-s", "-1"])
    assert e.value.code == 2 and "--timeout-s -1.0: must be >= 0" in capsys.readouterr().err


# ------------------------------------------------------------------------ resume notices


def test_resume_notices_only_keys_the_algorithm_reads():
    """22.7: vppo -> grpo on resume does not report algo.entropy_coef (grpo does not read it) as taking effect."""
    from megatron_vppo.config import to_dict
    from megatron_vppo.run_config import load_config
    from megatron_vppo.train.resume import config_changes

    saved = to_dict(load_config(None, ["algo.name=vppo", "algo.entropy_coef=0.06", "optim.lr=1e-5"]))
    now = load_config(None, ["algo.name=grpo", "optim.lr=2e-5"])
    keys = {c.key for c in config_changes(saved, now)}
    assert "algo.name" in keys and "optim.lr" in keys and "algo.entropy_coef" not in keys, keys


def test_structure_differences_name_every_field(tiny_model_dir, tmp_path):
    """22.2: vocabulary, tokenizer files, layers, widths, heads and the vision tower are each named (the
    trainer test above covers tied embeddings end to end)."""
    import shutil

    from megatron_vppo.checkpoint.model_structure import model_structure, structure_differences

    saved = model_structure(tiny_model_dir)
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    text["vocab_size"] = 152064
    text["num_hidden_layers"] = text.get("num_hidden_layers", 2) + 1
    text["num_attention_heads"] = text.get("num_attention_heads", 2) * 2
    cfg["vision_config"]["depth"] = cfg["vision_config"].get("depth", 1) + 1
    (other / "config.json").write_text(json.dumps(cfg))
    tok = other / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|endoftext|>"', '"<|end|>"', 1))
    diffs = structure_differences(saved, model_structure(other))
    assert [d.split(":")[0].split(" (")[0] for d in diffs] == [
        "num_attention_heads", "num_hidden_layers", "tokenizer", "vision.depth", "vocab_size"], diffs
    assert f"vocab_size: {saved['vocab_size']} -> 152064" in diffs
    assert structure_differences(saved, model_structure(tiny_model_dir)) == []
    assert structure_differences(None, saved) == []  # a checkpoint from before the record: nothing compared
