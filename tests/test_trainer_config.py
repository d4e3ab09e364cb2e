"""The trainer's front door, cheaply: CLI mistakes give one clear line and exit code 2 before any
process group could hang (mostly the CLI in this process, `conftest.run_cli`; a `python -m megatron_vppo.cli`
and a torchrun launch cover the entry point itself); bad data rows are counted per reason and logged once;
the SGLang branch refuses what it cannot run. (The runs themselves are in test_trainer_e2e.py.)"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import launch_env, run_cli

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, launcher: tuple[str, ...] = (), timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, "-m", "megatron_vppo.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"problem": "What is 1+1?", "images": [], "answer": "2"}) + "\n")
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{path: {tiny_model_dir}, transformer_impl: local}}\n"
                    f"data: {{train: {data}}}\n"
                    f"train: {{output_dir: {tmp_path / 'out'}, total_steps: 1, prompts_per_step: 1}}\n")
    return path


def test_unknown_key_names_the_nearest_valid_key(config, capsys):
    res = run_cli(capsys, "train", str(config), "train.totl_steps=3")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "unknown config key 'train.totl_steps'" in res.stderr and "'total_steps'" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli(capsys, "train", str(config), "rollot.group_size=4")  # a misspelt section
    assert res.returncode == 2 and "'rollot'" in res.stderr and "'rollout'" in res.stderr


def test_missing_config_file_and_bad_value(tmp_path, config, capsys):
    res = run_cli(capsys, "train", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "nope.yaml not found" in res.stderr
    res = run_cli(capsys, "train", str(config), "algo.name=ppo")
    assert res.returncode == 2 and "algo.name='ppo'" in res.stderr


def test_missing_model_dir_is_a_clear_error(tmp_path, config, capsys):
    res = run_cli(capsys, "train", str(config), f"model.path={tmp_path / 'no_model'}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"model.path='{tmp_path / 'no_model'}' does not exist" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli(capsys, "train", str(config), f"data.train={tmp_path / 'missing.parquet'}")
    assert res.returncode == 2 and "data.train=" in res.stderr and "does not exist" in res.stderr


def test_bad_parallel_sizes_fail_fast_on_every_rank(config):
    """tp=4 on 2 processes: both ranks stop at the layout check, before init_process_group — a run
    that reached the rendezvous with a wrong world size would hang, not exit."""
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    res = _cli("train", str(config), "parallel.tp=4", launcher=launcher, timeout=150)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "parallel layout error: world size 2 is not divisible by tp*pp*cp = 4*1*1 = 4" in out, out[-3000:]
    assert out.count("parallel layout error") == 1  # rank 0 prints it, once
    assert f'File "{REPO / "megatron_vppo"}' not in out  # no traceback from our code (torchrun prints its own)


def test_layout_rules_of_the_model_are_checked_before_any_process_group(monkeypatch):
    """The rules that depend on the model (layers, KV groups) fire before rendezvous: WORLD_SIZE says
    3 (or 4) processes and none of the others exists, so reaching init_process_group would hang."""
    import torch.distributed as dist

    from dist_helpers import free_port
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.parallel_layout import LayoutError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    model = dict(num_attention_heads=4, num_query_groups=2, num_layers=2, vision_num_heads=2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(LayoutError, match=r"pp=3 > num_layers=2"):
        init_distributed(ParallelConfig(pp=3), **model)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(LayoutError, match=r"tp=4 > num_key_value_heads=2"):
        init_distributed(ParallelConfig(tp=4), **model)
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------- bad rows


def _table_with_bad_rows(root: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (56, 56), (200, 30, 30)).save(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    rows = [
        {"problem": "<image>How many?", "images": ["ok.png"], "answer": "1"},
        {"problem": "<image>How many?", "images": ["gone.png"], "answer": "1"},  # missing_image
        {"problem": "<image>How many?", "images": ["corrupt.png"], "answer": "1"},  # corrupt_image
        {"problem": "<image><image>How many?", "images": ["ok.png"], "answer": "1"},  # placeholder_mismatch
        {"problem": "<image>How many?", "images": ["ok.png"], "answer": ""},  # empty_answer
        {"problem": "<image>How many now?", "images": ["ok.png"], "answer": "2"},
        {"problem": "<image>And now?", "images": ["ok.png"], "answer": "3"},
    ]
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_metrics_count_each_reason_and_log_new_skips_once(tmp_path, caplog):
    from megatron_vppo.data.dataset import PromptBatches, PromptDataset
    from megatron_vppo.train.loop import data_metrics

    batches = PromptBatches(PromptDataset(_table_with_bad_rows(tmp_path)), 2, shuffle=False)
    logged: dict = {}
    with caplog.at_level(logging.WARNING, logger="megatron_vppo.train"):
        first = next(batches)  # rows 0, 5 (1-4 skipped)
        m1 = data_metrics(batches, 1, logged)
        next(batches)  # rows 6, then a new pass: 0
        m2 = data_metrics(batches, 2, logged)
    assert [r["answer"] for r in first] == ["1", "2"]
    reasons = ("missing_image", "corrupt_image", "placeholder_mismatch", "empty_answer")
    assert {r: m1[f"data/skipped/{r}"] for r in reasons} == dict.fromkeys(reasons, 1)
    assert m1["data/rows_skipped"] == 4 and m1["data/rows_seen"] == 6 and m1["data/epoch"] == 0
    assert m2["data/epoch"] == 1 and m2["data/rows_skipped"] == 0 and m2["data/rows_seen"] == 1
    warnings = [r.getMessage() for r in caplog.records if "bad data row" in r.getMessage()]
    assert len(warnings) == 1 and "step 1: skipped 4 bad data row(s)" in warnings[0]
    assert all(r in warnings[0] for r in reasons)


# ---------------------------------------------------------------------------------------- engine


def test_sglang_engine_branch_refuses_what_it_cannot_run(tmp_path, monkeypatch):
    from megatron_vppo.config import ConfigError, RunConfig
    from megatron_vppo.run_config import load_config
    from megatron_vppo.train.build import build_engine

    # SGLang runs colocated only: the disaggregated choice is gone until the trainer can drive servers.
    with pytest.raises(ConfigError, match="sglang_mode"):
        load_config(None, ["rollout.sglang_mode=disaggregated"])
    with pytest.raises(ConfigError, match="engine_gpu_share"):
        load_config(None, ["rollout.engine_gpu_share=1.0"])
    from megatron_vppo.distributed import ParallelDims

    cfg = RunConfig()
    cfg.rollout.engine = "sglang"
    with pytest.raises(ConfigError, match="needs a GPU"):
        build_engine(cfg, tmp_path, ParallelDims.single(torch.device("cpu")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SGLang's colocated engine needs a GPU (and sglang)")
def test_sglang_engine_is_constructed_for_colocated_mode(tiny_model_dir):
    pytest.importorskip("sglang")
    import torch.distributed as dist

    from megatron_vppo.config import RunConfig
    from megatron_vppo.rollout.sglang_engine import SGLangRolloutEngine
    from megatron_vppo.train.build import _single_process_rendezvous, build_engine, build_policy

    _single_process_rendezvous()
    cfg = RunConfig()
    cfg.model.path = str(tiny_model_dir)
    cfg.rollout.engine, cfg.model.dtype, cfg.rollout.engine_gpu_share = "sglang", "bf16", 0.3
    policy = build_policy(cfg, Path(tiny_model_dir))  # process groups, as the trainer has them
    engine = build_engine(cfg, Path(tiny_model_dir), policy.dims)
    try:
        assert isinstance(engine, SGLangRolloutEngine) and engine.tp_size == 1
    finally:
        engine.shutdown()
        dist.destroy_process_group()


def test_eval_cli_bad_paths(tmp_path, tiny_model_dir, capsys):
    res = run_cli(capsys, "eval", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"))
    assert res.returncode == 2 and f"--model {tmp_path} has no config.json" in res.stderr
    res = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "x.jsonl"))
    assert res.returncode == 2 and "x.jsonl does not exist" in res.stderr


def test_reward_config_selects_the_grader_and_rejects_unknown_methods():
    from megatron_vppo.config import ConfigError
    from megatron_vppo.run_config import load_config

    cfg = load_config(None, ["reward.method=math_verify", "reward.timeout_s=3"])
    assert (cfg.reward.method, cfg.reward.timeout_s, cfg.reward.extraction) == ("math_verify", 3.0, "lenient")
    with pytest.raises(ConfigError, match="reward.method"):
        load_config(None, ["reward.method=exact_match"])
    with pytest.raises(ConfigError, match="did you mean 'method'"):
        load_config(None, ["reward.methd=mathruler"])


# --------------------------------------------------------------------------- issue 19: the first hour


def test_print_config_prints_the_resolved_yaml_before_loading_anything(tmp_path, config, monkeypatch, capsys):
    """`train ... --print-config`: exit 0, every key (defaults included) as YAML that loads back to the
    same config; nothing is built (the model path need not even exist)."""
    from megatron_vppo import cli
    from megatron_vppo.config import to_dict
    from megatron_vppo.run_config import load_config

    def boom(*a, **k):
        raise AssertionError("--print-config built the run")

    monkeypatch.setattr("megatron_vppo.train.run.train", boom)
    args = [str(config), f"model.path={tmp_path / 'not_there'}", "rollout.engine=vllm",
            "rollout.engine_args.kv_cache_gib=2", "algo.name=dapo"]
    assert cli.main(["train", *args, "--print-config"]) == 0
    text = capsys.readouterr().out
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    assert to_dict(load_config(printed)) == to_dict(load_config(args[0], args[1:]))
    assert "engine_args:\n    kv_cache_gib: 2" in text and "top_p:" in text  # overrides and defaults alike


def test_save_config_writes_config_yaml_or_names_the_directory(tmp_path):
    from megatron_vppo.config import ConfigError, save_config, to_dict
    from megatron_vppo.run_config import load_config

    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "optim.lr=3e-4"])
    path = save_config(cfg)
    assert path == tmp_path / "run" / "config.yaml" and to_dict(load_config(path)) == to_dict(cfg)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"train.output_dir=.*file/run.*cannot write config.yaml"):
        save_config(cfg, tmp_path / "file" / "run")


def test_vllm_with_a_head_dim_it_cannot_run_is_one_line_at_start(tmp_path, config, tiny_model_dir, capsys):
    """The tiny model (head_dim 16) with rollout.engine=vllm on CPU: refused before the model loads (it used to
    build the engine and die at the first generate after a 184-line log), by train, eval and generate."""
    from megatron_vppo.config import ConfigError
    from megatron_vppo.rollout import check_engine_model
    from megatron_vppo.rollout.vllm_engine import check_model

    with pytest.raises(ConfigError) as e:
        check_engine_model("vllm", tiny_model_dir)
    msg = str(e.value)
    assert "\n" not in msg and "head_dim is 16" in msg and "rollout.engine=hf" in msg, msg
    check_engine_model("hf", tiny_model_dir)  # the in-process engine takes any model
    check_model(tiny_model_dir, cuda=True)  # GPU backends: no CPU restriction
    res = _cli("train", str(config), "rollout.engine=vllm")
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("megatron-vppo train: config error:")]
    assert len(lines) == 1 and "head_dim is 16" in lines[0] and "rollout.engine=hf" in lines[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Loading weights" not in res.stdout + res.stderr
    from megatron_vppo.train.evaluate import main as eval_main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1?", "images": [], "answer": "2"}) + "\n")
    capsys.readouterr()
    assert eval_main(["--model", str(tiny_model_dir), "--data", str(data), "--engine", "vllm"]) == 2
    assert "head_dim is 16" in capsys.readouterr().err
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import generate
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert generate.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o.jsonl"),
                          "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "generate.py: error:" in err and "head_dim is 16" in err
