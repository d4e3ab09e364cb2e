"""The trainer end to end, as a user runs it: `torchrun ... -m megatron_vppo.cli train CONFIG key=value`.

Real gloo processes on a tiny Qwen2.5-VL, warm-started for a few seconds so it writes `\\boxed{1}` or
`\\boxed{2}` about half the time (rewards vary inside a group, so dynamic sampling keeps groups and the
loss is not trivially zero). Oracles:

* an uninterrupted TP2 run of 4 steps — a run killed after its step-2 checkpoint and resumed
  (`resume=auto`, with half-written checkpoints of later steps planted) must log the same steps 3-4;
* the same TP2 run's step 1 — TP2xPP2, TP2 + sequence parallel and a two-node DP2 launch see the same
  rollouts (same reward) and compute the same loss (the loss reduces globally, design decision 1);
* (bf16 with SP + DP2, and π_old from the engine vs the trainer: test_trainer_e2e_modes.py)
* the trainer's own step-0 validation — `megatron-vppo eval` of the starting model with the run's seed
  must print the same accuracy (one code path for both).

The training data starts with one bad row per skip reason (missing image, corrupt PNG, placeholder /
image count mismatch, empty answer) and is read in order, so step 1 meets all of them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import launch_env
from dist_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
BAD_REASONS = ("missing_image", "corrupt_image", "placeholder_mismatch", "empty_answer")
# Logged every step a policy update happened (the one-line summary reads the same keys).
STEP_KEYS = ("reward/mean", "rollout/attempts", "actor/loss", "actor/pg_loss", "actor/grad_norm",
             "actor/grad_norm_max", "actor/lr",
             "dependency/mean", "tas/alpha_mean", "tgf/kept_token_frac", "response/len_mean", "data/rows_seen",
             "data/rows_skipped", "time/step_s")
PIXELS = ("3136", "12544")  # min/max pixels: 56x56 .. 112x112 images, a handful of image tokens

CONFIG = """\
parallel: {{tp: 1, pp: 1}}
model: {{path: {model}, dtype: fp32, transformer_impl: local}}
algo: {{name: vppo, entropy_coef: 0.06}}
rollout: {{engine: hf, group_size: 4, top_p: 1.0, max_prompt_length: 512, max_response_length: 6,
          max_dynamic_sampling_retries: 1}}
data: {{train: {train}, val: {val}, min_pixels: {min_px}, max_pixels: {max_px}, shuffle: false}}
optim: {{lr: 2.0e-4, weight_decay: 0.0, use_distributed_optimizer: true}}
train: {{seed: 1, prompts_per_step: 2, mini_batch_prompts: 1, micro_batch_size: 4, total_steps: {steps},
        val_every: 2, val_k: 2, save_every: 2, keep_last: 2, resume: auto}}
"""


# ------------------------------------------------------------------------------------------ helpers


def _env() -> dict:
    return launch_env(PYTHONFAULTHANDLER="1")  # a hung run's ranks print their stacks (see _dump_stacks_and_kill)


def torchrun(nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra]


def cli(*args: str) -> list[str]:
    return ["-m", "megatron_vppo.cli", *args]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """In its own session, so a hang or a planned crash kills every rank and helper with it."""
    f = open(log, "w")
    try:
        return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        f.close()


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (torchrun starts its ranks in sessions of their own, so the
    launcher's process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill(p: subprocess.Popen) -> None:
    """SIGKILL the launcher and everything it started: a crash, with no chance to clean up.
    The tree is frozen first (SIGSTOP) so nothing forks or writes while it is being collected."""
    frozen: set[int] = set()
    while True:
        new = [pid for pid in [p.pid, *_descendants(p.pid)] if pid not in frozen]
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
            frozen.add(pid)
    for pid in frozen:
        _signal(pid, signal.SIGKILL)
    p.wait()


def _dump_stacks_and_kill(p: subprocess.Popen) -> None:
    """A run that hangs: SIGABRT makes every Python process below the launcher (ranks, checkpoint
    writers) print all its threads' stacks into the log (PYTHONFAULTHANDLER), then kill the tree."""
    for pid in _descendants(p.pid):
        _signal(pid, signal.SIGABRT)
    time.sleep(3)
    _kill(p)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait(p: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _dump_stacks_and_kill(p)
        raise AssertionError(f"timed out after {timeout:.0f}s:\n{log.read_text()[-12000:]}") from None
    return log.read_text()


def run(cmd: list[str], log: Path, timeout: float = 300, expect_rc: int = 0) -> str:
    """Run to the end; the exit code must be `expect_rc`. Returns stdout+stderr."""
    p = _start(cmd, log)
    text = _wait(p, log, timeout)
    assert p.returncode == expect_rc, f"exit code {p.returncode} != {expect_rc}: {' '.join(cmd)}\n{text[-6000:]}"
    return text


def metrics(out_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    assert len(by_step) == len(rows), f"duplicate steps in metrics.jsonl: {[r['step'] for r in rows]}"
    return by_step


def complete_checkpoints(out_dir: Path) -> list[str]:
    ck = out_dir / "checkpoints"
    return sorted(p.name for p in ck.iterdir() if (p / "COMPLETE").is_file() and ".tmp" not in p.name)


def assert_same_rows(a: dict, b: dict, steps, tol: float = 1e-6) -> None:
    """Every logged number of these steps agrees (wall-clock times excepted)."""
    for s in steps:
        ra, rb = a[s], b[s]
        keys = {k for k in ra if not k.startswith("time/")}
        assert keys == {k for k in rb if not k.startswith("time/")}, f"step {s}: keys differ"
        for k in sorted(keys):
            va, vb = ra[k], rb[k]
            if isinstance(va, float) or isinstance(vb, float):
                assert va == pytest.approx(vb, abs=tol, rel=tol), f"step {s} {k}: {va} vs {vb}"
            else:
                assert va == vb, f"step {s} {k}: {va} vs {vb}"


# ------------------------------------------------------------------------------------------ fixtures


def _write_data(root: Path) -> tuple[Path, Path, Path]:
    """Synthetic counting task, kept to answers 1 and 2; returns (clean train, train with bad rows
    first, validation with one bad row)."""
    from megatron_vppo.data.synthetic_task import write_synthetic_dataset

    train, val = write_synthetic_dataset(root, 64, 20, seed=0, tasks=("count",))

    def keep(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [r for r in rows if r["answer"] in ("1", "2")]

    good_train, good_val = keep(train), keep(val)
    ok_image = good_train[0]["images"][0]
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00not a png" * 20)
    bad = [
        {"problem": "<image>How many red circles?", "images": ["images/does_not_exist.png"], "answer": "1"},
        {"problem": "<image>How many red circles?", "images": ["images/corrupt.png"], "answer": "2"},
        {"problem": "<image> and <image>: how many?", "images": [ok_image], "answer": "1"},
        {"problem": "<image>How many red circles?", "images": [ok_image], "answer": "  "},
    ]

    def write(name, rows):
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return (write("train_clean.jsonl", good_train), write("train_with_bad.jsonl", bad + good_train),
            write("val_with_bad.jsonl", bad[:1] + good_val))


@pytest.fixture(scope="module")
def assets(warm_model_dir, tmp_path_factory):
    """The warm-started tiny model (conftest), the data and a config file, shared by every run of this module."""
    root = tmp_path_factory.mktemp("trainer_e2e")
    clean, train, val = _write_data(root / "data")
    model = warm_model_dir
    config = root / "run.yaml"
    config.write_text(CONFIG.format(model=model, train=train, val=val, min_px=PIXELS[0], max_px=PIXELS[1],
                                    steps=STEPS))
    return {"root": root, "model": model, "train": train, "val": val, "config": config}


@pytest.fixture(scope="module")
def tp2_run(assets):
    """The uninterrupted run: TP2, 4 steps, checkpoints at steps 2 and 4."""
    out = assets["root"] / "tp2"
    log = assets["root"] / "tp2.log"
    text = run(torchrun(2) + cli("train", str(assets["config"]), f"train.output_dir={out}", "parallel.tp=2"), log)
    return {"out": out, "log": text, "metrics": metrics(out)}


# ------------------------------------------------------------------------------------------ tests


def _check_run(out: Path, rows: dict, steps: int, layout: dict) -> None:
    assert sorted(rows) == list(range(steps + 1)), sorted(rows)
    assert set(rows[0]) == {"step", "val/accuracy"}
    for s in range(1, steps + 1):
        missing = [k for k in STEP_KEYS if k not in rows[s]]
        assert not missing, f"step {s} lacks {missing}"
        assert rows[s]["response/trajectories"] > 0 and "actor/skipped" not in rows[s]
        # mean and max over the step's two mini-batches (mini_batch_prompts 1 of prompts_per_step 2)
        assert 0.0 < rows[s]["actor/grad_norm"] <= rows[s]["actor/grad_norm_max"]
        assert all(isinstance(v, (int, float)) for k, v in rows[s].items() if k != "step")
    assert all("val/accuracy" in rows[s] for s in range(2, steps + 1, 2))
    assert 0.0 < rows[1]["reward/mean"] < 1.0  # the warm start makes some, not all, answers right
    last = f"step_{steps:07d}"
    assert last in complete_checkpoints(out)
    meta = json.loads((out / "checkpoints" / last / "meta.json").read_text())
    assert meta["step"] == steps and meta["complete"] is True
    assert {k: meta["layout"][k] for k in layout} == layout
    assert meta["optimizer"]["distributed"] is True
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp" in p.name]
    assert (out / "metrics.png").is_file()


def test_tp2_trains_end_to_end(assets, tp2_run):
    _check_run(tp2_run["out"], tp2_run["metrics"], STEPS, {"tp": 2, "pp": 1, "dp": 1, "world_size": 2})
    # the resolved config saved at start (issue 19): the run's settings, every key
    from megatron_vppo.config import to_dict
    from megatron_vppo.run_config import load_config

    run_cfg = load_config(assets["config"], [f"train.output_dir={tp2_run['out']}", "parallel.tp=2"])
    assert to_dict(load_config(tp2_run["out"] / "config.yaml")) == to_dict(run_cfg)
    # log noise (issue 19), counted in the captured run: the in-process engines load their model once at
    # start (no weight-loading bar with the steps), no Megatron parameter list, no per-rank deprecation notices
    lines = tp2_run["log"].splitlines()
    first_step = next(i for i, ln in enumerate(lines) if "step 1/" in ln)
    assert not [ln for ln in lines[first_step:] if "Loading weights" in ln]
    assert sum("Loading weights: 100%" in ln for ln in lines) <= 2  # one per rank at most
    assert not [ln for ln in lines if "Params for bucket" in ln or "DTensor" in ln]
    assert complete_checkpoints(tp2_run["out"]) == ["step_0000002", "step_0000004"]  # keep_last 2
    assert "step 4/4 | reward" in tp2_run["log"]  # the one-line summary


def test_tp2_pp2_trains_two_steps_and_matches_tp2_step_one(assets, tp2_run):
    out = assets["root"] / "tp2pp2"
    run(torchrun(4) + cli("train", str(assets["config"]), f"train.output_dir={out}", "parallel.tp=2",
                          "parallel.pp=2", "train.total_steps=2"), assets["root"] / "tp2pp2.log", timeout=400)
    rows = metrics(out)
    _check_run(out, rows, 2, {"tp": 2, "pp": 2, "dp": 1, "world_size": 4})
    ref = tp2_run["metrics"]
    assert rows[0]["val/accuracy"] == ref[0]["val/accuracy"]
    # Same weights -> same rollouts; the pipeline split does not change the loss beyond rounding.
    assert rows[1]["reward/mean"] == ref[1]["reward/mean"]
    assert rows[1]["response/trajectories"] == ref[1]["response/trajectories"]
    for k in ("actor/loss", "actor/pg_loss", "dependency/mean", "tgf/kept_token_frac"):
        assert rows[1][k] == pytest.approx(ref[1][k], abs=1e-5, rel=1e-4), k


def test_killed_run_resumes_like_uninterrupted_and_ignores_half_written_checkpoints(assets, tp2_run):
    """Kill the TP2 run once step 2's checkpoint is complete; plant a crashed save of step 3 (a
    `.tmp-*` directory) and a step-4 directory without its COMPLETE marker; resume=auto must continue
    from step 2 and log steps 3-4 exactly as the uninterrupted run did."""
    out = assets["root"] / "resumed"
    ck = out / "checkpoints"
    args = cli("train", str(assets["config"]), f"train.output_dir={out}", "parallel.tp=2")
    log1 = assets["root"] / "killed.log"
    p = _start(torchrun(2) + args, log1)
    deadline = time.monotonic() + 300
    while not (ck / "step_0000002" / "COMPLETE").is_file():
        if (rc := p.poll()) is not None or time.monotonic() > deadline:
            _dump_stacks_and_kill(p)
            why = f"exited with {rc}" if rc is not None else "still running after 300 s"
            raise AssertionError(f"no step-2 checkpoint ({why}):\n{log1.read_text()[-12000:]}")
        time.sleep(0.05)
    _kill(p)  # SIGKILL to every rank: a crash, not a clean exit

    # Whatever the run reached after step 2 is now a half-written save.
    for later in [d for d in ck.iterdir() if d.name != "step_0000002"]:
        shutil.rmtree(later)
    shutil.copytree(ck / "step_0000002", ck / "step_0000003.tmp-0badc0de")
    half = ck / "step_0000004"
    shutil.copytree(ck / "step_0000002", half)
    (half / "COMPLETE").unlink()
    meta = json.loads((half / "meta.json").read_text())
    (half / "meta.json").write_text(json.dumps({**meta, "step": 4}))
    # ... and the crashed run had logged a step 3 of its own and was cut off writing step 4.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "reward/mean": -1.0}) + "\n" + '{"step": 4, "rew')

    text = run(torchrun(2) + args, assets["root"] / "resume.log")
    assert "resumed from" in text and "step_0000002 at step 2" in text, text[-4000:]
    rows, ref = metrics(out), tp2_run["metrics"]
    assert sorted(rows) == list(range(STEPS + 1))  # lines the crashed run wrote past step 2 are gone
    assert_same_rows(rows, ref, range(0, STEPS + 1), tol=1e-6)
    for s in (3, 4):  # the two quantities the issue names, spelled out
        assert abs(rows[s]["actor/loss"] - ref[s]["actor/loss"]) <= 1e-6
        assert abs(rows[s]["reward/mean"] - ref[s]["reward/mean"]) <= 1e-6
    # The re-saved step 4 replaced the half-written one; the crashed step-3 save was cleaned up.
    assert complete_checkpoints(out) == ["step_0000002", "step_0000004"]
    assert not [d for d in ck.iterdir() if ".tmp" in d.name]
    assert json.loads((ck / "step_0000004" / "meta.json").read_text())["step"] == 4


def test_two_node_launch_on_localhost(assets, tp2_run):
    """Two torchrun agents (one process each) meet through a c10d rendezvous: DP2 over 'two nodes'."""
    out = assets["root"] / "two_node"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=vppo-e2e", *cli("train", str(assets["config"]), f"train.output_dir={out}",
                                           "train.total_steps=1", "train.val_every=0")]
        log = assets["root"] / f"node{node}.log"
        procs.append((_start(cmd, log), log))
    try:
        for p, log in procs:
            _wait(p, log, 300)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                _kill(p)
    for p, log in procs:
        assert p.returncode == 0, log.read_text()[-6000:]
    rows = metrics(out)
    assert sorted(rows) == [1]
    meta = json.loads((out / "checkpoints" / "step_0000001" / "meta.json").read_text())
    assert meta["layout"]["dp"] == 2 and meta["layout"]["world_size"] == 2
    # DP2 splits the passes and the update, not the result (global token denominator).
    ref = tp2_run["metrics"][1]
    assert rows[1]["reward/mean"] == ref["reward/mean"]
    for k in ("actor/loss", "actor/pg_loss", "dependency/mean"):
        assert rows[1][k] == pytest.approx(ref[k], abs=1e-5, rel=1e-4), k


def test_bad_rows_are_skipped_counted_and_logged(tp2_run):
    rows = tp2_run["metrics"]
    for s in range(1, STEPS + 1):
        assert {r: rows[s].get(f"data/skipped/{r}") for r in BAD_REASONS} == dict.fromkeys(BAD_REASONS, 1)
        assert rows[s]["data/rows_skipped"] == len(BAD_REASONS)
    assert rows[STEPS]["data/rows_seen"] > rows[1]["data/rows_seen"]  # training went on past them
    warning = next(line for line in tp2_run["log"].splitlines() if "skipped 4 bad data row(s)" in line)
    assert all(r in warning for r in BAD_REASONS)


def test_eval_cli_prints_table_and_json_matching_trainer_validation(assets, tp2_run):
    """`megatron-vppo eval --config RUN.yaml` on the starting model reproduces the trainer's step-0
    validation accuracy (same prompts, seeds, sampling settings and grading: all read from the run config)."""
    text = run([sys.executable, *cli("eval", "--model", str(assets["model"]), "--data", str(assets["val"]),
                                     "--config", str(assets["config"]))],
               assets["root"] / "eval.log", timeout=200)
    lines = text.strip().splitlines()
    res = json.loads(lines[-1])
    n_val = len(assets["val"].read_text().splitlines()) - 1  # one bad row
    assert res["k"] == 2 and res["prompts"] == n_val
    assert res["skipped_rows"] == {"missing_image": 1}
    assert res["accuracy@2"] == pytest.approx(tp2_run["metrics"][0]["val/accuracy"], abs=1e-12)
    table = {ln.split()[0]: ln.split()[1] for ln in lines[:-1] if ln.split() and ln.split()[0] in res}
    assert float(table["accuracy@2"]) == pytest.approx(res["accuracy@2"], abs=1e-4)
    assert int(table["prompts"]) == n_val


def test_eval_of_a_trainer_checkpoint_names_the_conversion(assets, tp2_run, capsys):
    """`eval --model <a trainer step dir>` (or the run's directory): one line naming `convert mcore-to-hf`
    with that step, not "no config.json" (issue 19)."""
    from megatron_vppo.train.evaluate import main as eval_main

    step = tp2_run["out"] / "checkpoints" / f"step_{STEPS:07d}"
    for model in (step, tp2_run["out"]):
        capsys.readouterr()
        assert eval_main(["--model", str(model), "--data", str(assets["val"])]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "is a Megatron checkpoint" in err, err
        assert f"megatron-vppo convert mcore-to-hf --ckpt {step} --out HF_DIR" in err, err
    from megatron_vppo.train.startup import model_dir_problem  # the trainer's model.path check says the same

    problem = model_dir_problem(str(step), "model.path")
    assert problem.startswith(f"model.path='{step}' is a Megatron checkpoint") and "mcore-to-hf" in problem


def test_tp2_sequence_parallel_matches_tp2(assets, tp2_run):
    """parallel.sp=true with the distributed optimizer (the config's): activations split over the
    sequence between the TP ranks must not change the rollouts or the loss of the TP2 run."""
    out = assets["root"] / "tp2sp"
    run(torchrun(2) + cli("train", str(assets["config"]), f"train.output_dir={out}", "parallel.tp=2",
                          "parallel.sp=true", "train.total_steps=2"), assets["root"] / "tp2sp.log")
    rows = metrics(out)
    _check_run(out, rows, 2, {"tp": 2, "pp": 1, "dp": 1, "world_size": 2})
    meta = json.loads((out / "checkpoints" / "step_0000002" / "meta.json").read_text())
    assert meta["config"]["parallel"]["sp"] is True
    ref = tp2_run["metrics"]
    assert rows[0]["val/accuracy"] == ref[0]["val/accuracy"]
    assert rows[1]["reward/mean"] == ref[1]["reward/mean"]
    assert rows[1]["response/trajectories"] == ref[1]["response/trajectories"]
    for k in ("actor/loss", "actor/pg_loss", "actor/grad_norm", "dependency/mean", "tgf/kept_token_frac"):
        assert rows[1][k] == pytest.approx(ref[1][k], abs=1e-5, rel=1e-4), k
