"""examples/: every config loads, the paper-scale configs pick a layout the trainer accepts and the tuner
says fits, and the torchrun launcher keeps the caller's directory (relative paths mean what they say)."""
import os
import subprocess
from pathlib import Path

import pytest

from megatron_vppo.run_config import load_config
from megatron_vppo.distributed import layout_from_config
from megatron_vppo.parallel_layout import validate_layout
from megatron_vppo.tuning import KERNELS, Workload, estimate_memory, load_model_spec
from megatron_vppo.tuning.memory import EXACT_KL_FP32_TEMPORARIES
from megatron_vppo.tuning.search import precision_for, workload_rule

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("path", sorted((EXAMPLES / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_loads(path):
    load_config(path)


# (config, model config, GPUs its launch script starts)
PAPER_RUNS = [
    ("qwen2_5_vl_7b_vppo.yaml", "qwen2_5_vl_7b.json", 8),
    ("qwen2_5_vl_32b_vppo.yaml", "qwen2_5_vl_32b.json", 32),
    ("qwen3_vl_8b_vppo.yaml", "qwen3_vl_8b.json", 8),
    ("qwen3_vl_32b_vppo.yaml", "qwen3_vl_32b.json", 32),
]


@pytest.mark.parametrize("config, model, gpus", PAPER_RUNS)
def test_paper_config_layout_is_legal_and_fits_80gib(config, model, gpus):
    cfg = load_config(EXAMPLES / "configs" / config)
    spec = load_model_spec(EXAMPLES / "model_configs" / model)
    layout = layout_from_config(cfg.parallel, gpus)
    validate_layout(layout, world_size=gpus, num_attention_heads=spec.heads, num_query_groups=spec.kv_heads,
                    num_layers=spec.layers, vision_num_heads=spec.vision_heads,
                    te_available=cfg.model.transformer_impl != "local")
    wl = Workload(
        seq_len=cfg.rollout.max_prompt_length + cfg.rollout.max_response_length,
        micro_batch=cfg.train.micro_batch_size,
        global_batch=cfg.train.mini_batch_prompts * cfg.rollout.group_size,
        max_pixels=cfg.data.max_pixels,
        nograd_fp32_temporaries=EXACT_KL_FP32_TEMPORARIES if cfg.algo.dependency_estimator == "exact_kl" else 0,
    )
    assert workload_rule(layout, wl) is None
    prec = precision_for(cfg.model.dtype, cfg.model.fp8 is not None, cfg.optim.use_distributed_optimizer)
    # The colocated SGLang engine releases its memory while the trainer runs and takes its share of the GPU
    # while it generates: both phases must fit, and the share must hold the engine's weights + KV cache.
    assert cfg.rollout.engine == "sglang"
    est = estimate_memory(spec, layout, wl, prec=prec, kernels=KERNELS["te"],
                          recompute="full" if cfg.model.recompute else "none", gpu_mem_gib=80.0,
                          rollout_share=cfg.rollout.engine_gpu_share)
    assert est.total_gib <= 80.0, f"{config}: {layout} needs {est.total_gib:.1f} GiB per GPU by the tuner"
    first = est.stages[0]
    assert first.rollout > 0 and first.rollout_fits, f"{config}: the engine's share leaves no KV cache"
    assert first.kv_cache >= 8 * first.min_kv, f"{config}: KV cache for under 8 full-length sequences per engine rank"


def test_launcher_keeps_the_callers_directory(tmp_path):
    """A fake torchrun records its cwd and argv: the config path and overrides arrive as typed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record.txt"
    fake = bin_dir / "torchrun"
    fake.write_text(f'#!/usr/bin/env bash\n{{ pwd; echo "$PYTHONPATH"; printf "%s\\n" "$@"; }} > "{record}"\n'
                    f'echo "$NCCL_CUMEM_ENABLE $NCCL_NVLS_ENABLE" > "{record}.env"\n')
    fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NCCL_")},
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "NNODES": "2", "NODE_RANK": "1"}
    subprocess.run([str(EXAMPLES / "launch_torchrun.sh"), "my.yaml", "data.train=d/train.parquet"],
                   cwd=work, env=env, check=True, timeout=60)
    cwd, pythonpath, *argv = record.read_text().splitlines()
    assert Path(cwd) == work
    assert str(ROOT) in pythonpath.split(os.pathsep)
    assert argv[-5:] == ["-m", "megatron_vppo.cli", "train", "my.yaml", "data.train=d/train.parquet"]
    assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node-rank") + 1] == "1"
    # SGLang sets these in its engine ranks only; every rank must agree (docs/sglang.md)
    assert (tmp_path / "record.txt.env").read_text().split() == ["0", "0"]

    subprocess.run([str(EXAMPLES / "train_vppo_7b.sh"), "train.total_steps=1"], cwd=work, env=env, check=True,
                   timeout=60)
    argv = record.read_text().splitlines()[2:]
    config = Path(argv[argv.index("train") + 1])
    assert config.resolve() == (EXAMPLES / "configs" / "qwen2_5_vl_7b_vppo.yaml").resolve()
    assert argv[-1] == "train.total_steps=1"
