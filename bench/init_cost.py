"""Start-up cost of building the trainer's model before loading HF weights, with and without Megatron's
random initialisation (`perform_initialization`; issue 18 item 5).

Qwen2.5-VL-3B widths (hidden 2048, FFN 11008, vocabulary 151936, vision 1280) with fewer layers, one
process on CPU, fp32 parameters (what the trainer holds). Each variant runs in a fresh interpreter and
reports the wall time of build + load and the process's peak RSS (ru_maxrss):

    python bench/init_cost.py [--layers 2] [--vision-layers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_model(out: Path, layers: int, vision_layers: int) -> Path:
    from megatron_vppo.models import MODELS

    cfg = json.loads((REPO / "examples/model_configs/qwen2_5_vl_3b.json").read_text())
    v = cfg["vision_config"]
    return MODELS["qwen2_5_vl"].make_tiny_model(
        out, seed=0, tokenizer="qwen",
        text_config=dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                         num_hidden_layers=layers, num_attention_heads=cfg["num_attention_heads"],
                         num_key_value_heads=cfg["num_key_value_heads"], vocab_size=cfg["vocab_size"],
                         rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"],
                                          "mrope_section": cfg["rope_scaling"]["mrope_section"]}),
        vision_config=dict(depth=vision_layers, hidden_size=v["hidden_size"], num_heads=v["num_heads"],
                           intermediate_size=v["intermediate_size"], out_hidden_size=v["out_hidden_size"],
                           fullatt_block_indexes=[vision_layers - 1]),
    )


def _child(hf_dir: str, init: bool) -> None:
    """Build + load in this process; print one JSON line."""
    import resource
    import time

    import torch

    torch.set_num_threads(1)
    from megatron_vppo.checkpoint.hf_load import load_hf_weights
    from megatron_vppo.checkpoint.model_checkpoint import build_model, model_dims, read_model_config
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed

    cfg = read_model_config(hf_dir)
    dims = init_distributed(ParallelConfig(), **model_dims(cfg))
    t0 = time.perf_counter()
    chunks, adapter = build_model(cfg, ParallelConfig(), dims=dims, init_weights=init)
    t_build = time.perf_counter() - t0
    load_hf_weights(chunks, hf_dir, adapter, dims=dims)
    t_total = time.perf_counter() - t0
    n = sum(p.numel() for c in chunks for p in c.parameters())
    finite = all(bool(torch.isfinite(p).all()) for c in chunks for p in c.parameters())
    print(json.dumps({"init": init, "build_s": round(t_build, 2), "build_load_s": round(t_total, 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                      "params_m": round(n / 1e6, 1), "all_finite": finite}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("HF_DIR", "INIT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a.child[0], a.child[1] == "1")
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29671",
               RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    with tempfile.TemporaryDirectory() as d:
        hf = make_model(Path(d) / "m", a.layers, a.vision_layers)
        rows = []
        for init in (True, False, True, False):  # interleaved: the second pair shows the noise
            p = subprocess.run([sys.executable, __file__, "--child", str(hf), "1" if init else "0"], env=env,
                               capture_output=True, text=True, cwd=REPO)
            if p.returncode:
                sys.stderr.write(p.stderr[-3000:])
                return p.returncode
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
