"""The one prepared device check: what a single-GPU machine can verify, in one run of <= 10 minutes.

    bash scripts/gpu_check.sh            # on the GPU machine (installs the carried wheels, then this)
    python scripts/gpu_check.py --out DIR [--quick]

Checks, each in its own subprocess (a failure in one is recorded and the others still run):
  parity   tools/score.py (the trainer's Megatron model) vs transformers' Qwen2.5-VL on the same
           weights: response log-probs in fp32 (TF32 off; bound 1e-4) and bf16 (bound: the Megatron
           bf16 error against the fp32 oracle is at most 2x transformers' own bf16 error + 0.02);
  rl       the real trainer for 3 VPPO steps (in-process rollout engine, bf16) after the demo's
           warm-start; every step updates, its loss and grad norm are finite, and the weights are synced
           to the engine (trainer-vs-engine log-prob gap reported per step);
  bench    bench/vppo_passes.py pass + step (paired-pass ratio, VPPO/DAPO step ratio) and
           bench/weight_sync.py at TP1 (export + engine update vs a device-to-device copy, GB/s).
SGLang and Transformer Engine are not installed on the check machine (their wheels exceed what a run
may carry), so their paths are not exercised; the summary says so.

Writes DIR/gpu_check.json (one object: environment, each check's numbers and pass/fail) and prints
it as the last line. Without CUDA the same checks run on CPU (--quick: smaller sizes), which is how
tests/test_gpu_check.py exercises this script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FP32_TOL = 1e-4
BF16_SLACK = 0.02  # absolute slack on top of 2x transformers' own bf16 error
NOT_RUN = ("sglang and transformer-engine: not installed on the check machine (wheels too large to carry); "
           "their paths are covered by the CPU contract tests only")

ROWS = [
    {"problem": "<image>What is red here, and <image> what is green?", "images": ["a.png", "b.png"],
     "response": "<think>circle then triangle</think> \\boxed{2}<|im_end|>"},
    {"problem": "Compute 3 + 4.", "images": [], "response": "<think>3+4=7</think> The answer is \\boxed{7}."},
    {"problem": "How many shapes?", "images": ["b.png"], "response": "\\boxed{3}"},
]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        env.pop(k, None)  # each tool starts its own single-process group
    return env


def _run(cmd: list[str], timeout: float, log: Path) -> str:
    """Run a command; its output goes to `log`; a non-zero exit raises with the output's tail."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\n[{time.perf_counter() - t0:.1f}s, exit {p.returncode}]\n{p.stdout}\n{p.stderr}")
    if p.returncode:
        raise RuntimeError(f"{cmd[1]} exited {p.returncode}: {(p.stdout + p.stderr)[-1500:]}")
    return p.stdout


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            out.append(json.loads(line))
    return out


# ------------------------------------------------------------------------------ inputs


def make_inputs(work: Path) -> tuple[Path, Path]:
    """Tiny random Qwen2.5-VL + a scoring JSONL with two images (built once per work dir)."""
    from PIL import Image, ImageDraw

    from megatron_vppo.models.qwen2_5_vl.tiny import make_tiny_model

    model = work / "tiny_model"
    if not (model / "config.json").is_file():
        make_tiny_model(model, seed=0, tokenizer="bpe")
    data = work / "score_in.jsonl"
    a = Image.new("RGB", (84, 56), (255, 255, 255))
    ImageDraw.Draw(a).ellipse((4, 4, 40, 40), fill=(220, 30, 30))
    b = Image.new("RGB", (56, 112), (240, 240, 200))
    ImageDraw.Draw(b).polygon([(28, 4), (52, 50), (4, 50)], fill=(20, 160, 40))
    a.save(work / "a.png")
    b.save(work / "b.png")
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return model, data


def hf_log_probs(model_dir: Path, data: Path, dtype, device) -> list[list[float]]:
    """transformers' log softmax of each response token, one sample at a time (no padding)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vppo.data.processor import VLProcessor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    proc = VLProcessor.from_pretrained(model_dir)
    out = []
    for r in (json.loads(x) for x in data.read_text().splitlines()):
        enc = proc.encode(r["problem"], [str(data.parent / p) for p in r["images"]], response=r["response"])
        ids = enc["input_ids"][None].to(device)
        pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=enc["mm_token_type_ids"][None].long().to(device),
                                            image_grid_thw=_to(enc["image_grid_thw"], device),
                                            attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=pos, pixel_values=_to(enc["pixel_values"], device, dtype),
                           image_grid_thw=_to(enc["image_grid_thw"], device)).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        start = enc["response_start"]
        tgt = ids[0, start:]
        out.append(logp[start - 1:-1].gather(-1, tgt[:, None]).squeeze(-1).cpu().tolist())
    del model
    return out


def _to(t, device, dtype=None):
    if t is None:
        return None
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def _max_abs(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b], "different response lengths"
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


# ------------------------------------------------------------------------------ checks


def check_parity(work: Path, quick: bool) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # fp32 means fp32: no TF32 in the oracle (the trainer sets its own flags)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model, data = make_inputs(work)
    ref32 = hf_log_probs(model, data, torch.float32, device)
    ref16 = hf_log_probs(model, data, torch.bfloat16, device)
    res = {"device": device, "tokens": sum(len(r) for r in ref32)}
    for dtype in ("fp32", "bf16"):
        out = work / f"score_{dtype}.jsonl"
        _run([sys.executable, "tools/score.py", "--model", str(model), "--data", str(data), "--out", str(out),
              "--dtype", dtype], 300, work / f"score_{dtype}.log")
        mine = [json.loads(x)["log_probs"] for x in out.read_text().splitlines()]
        res[f"megatron_{dtype}_vs_hf_fp32"] = _max_abs(mine, ref32)
    res["hf_bf16_vs_hf_fp32"] = _max_abs(ref16, ref32)
    res["fp32_ok"] = res["megatron_fp32_vs_hf_fp32"] <= FP32_TOL
    res["bf16_bound"] = 2 * res["hf_bf16_vs_hf_fp32"] + BF16_SLACK
    res["bf16_ok"] = res["megatron_bf16_vs_hf_fp32"] <= res["bf16_bound"]
    res["ok"] = res["fp32_ok"] and res["bf16_ok"]
    return res


def check_rl(work: Path, quick: bool) -> dict:
    """3 steps through the real trainer (`megatron-vppo demo` with overrides), bf16 on the GPU.

    Full: VPPO after the demo's 30-step warm-start, the demo's batch (8 prompts x 8 samples), so groups
    with mixed rewards survive dynamic sampling and every step updates and syncs. --quick (the CPU test
    of this script): 4 warm-start steps leave every reward 0, so it runs GRPO (no dynamic sampling),
    which still updates and syncs every step."""
    import torch

    out = work / "rl_demo"
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    steps = 3
    cmd = [sys.executable, "-m", "megatron_vppo.cli", "demo", "--out", str(out),
           "--sft-steps", "4" if quick else "30", "--train-rows", "128", "--val-rows", "8",
           f"train.total_steps={steps}", f"train.val_every={steps}", "train.save_every=1000",
           f"model.dtype={dtype}", "model.transformer_impl=auto", "train.val_k=1"]
    if quick:
        # grpo reads no entropy_coef: the demo config's vppo setting goes back to its default (an unread
        # key set away from its default is a config error)
        cmd += ["algo.name=grpo", "algo.entropy_coef=0.06", "train.prompts_per_step=4", "train.mini_batch_prompts=4",
                "rollout.group_size=2"]
    t0 = time.perf_counter()
    _run(cmd, 420, work / "rl.log")
    rows = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "time/sync_s" in r]
    finite = all(math.isfinite(float(r[k])) for r in step_rows for k in ("actor/loss", "actor/grad_norm") if k in r)
    return {"dtype": dtype, "steps": steps, "algorithm": "grpo" if quick else "vppo", "wall_s": round(time.perf_counter() - t0, 1),
            "synced_steps": sorted(r["step"] for r in step_rows), "finite": finite,
            "trainer_vs_engine_logp_abs_diff_max": [r.get("rollout/logp_abs_diff_max") for r in step_rows],
            # the placement: an engine on every rank, so a 1-GPU run has exactly one
            "engines": [r.get("rollout/engines") for r in step_rows],
            "last": {k: v for k, v in (rows[-1] if rows else {}).items() if isinstance(v, (int, float))},
            "ok": finite and len(step_rows) == steps and all(r.get("rollout/engines") == 1 for r in step_rows)}


def check_bench(work: Path, quick: bool) -> dict:
    res = {}
    size = ["--hidden", "128", "--layers", "2", "--repeats", "1"] if quick else ["--repeats", "5"]
    text = _run([sys.executable, "bench/vppo_passes.py", "pass", *size,
                 "--work-dir", str(work / "bench_passes")], 300, work / "bench_pass.log")
    text += _run([sys.executable, "bench/vppo_passes.py", "step", *size, "--work-dir", str(work / "bench_passes")],
                 300, work / "bench_step.log")
    for r in _json_lines(text):
        key = "paired_pass_over_original" if r["bench"].startswith("paired") else "vppo_step_over_dapo"
        res[key] = {"ratio": r["median_ratio"], "median_a_s": r["median_a_s"], "median_b_s": r["median_b_s"]}
    sync = _run([sys.executable, "bench/weight_sync.py", "--layouts", "TP1", "--layers", "2" if quick else "12",
                 "--repeats", "1" if quick else "5"], 300, work / "bench_sync.log")
    for line in sync.splitlines():
        if line.startswith("TP1 {"):
            r = json.loads(line[4:])
            gb = r["bytes"] / 1e9
            res["weight_sync_tp1"] = {"bytes": r["bytes"], "device": r.get("device"),
                                      "sync_gb_s": gb / r["sync"], "export_gb_s": gb / r["export"],
                                      "copy_gb_s": gb / r["memcpy"], "sync_over_copy": r["memcpy"] / r["sync"]}
    res["ok"] = {"paired_pass_over_original", "vppo_step_over_dapo", "weight_sync_tp1"} <= set(res)
    return res


CHECKS = {"parity": check_parity, "rl": check_rl, "bench": check_bench}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and the logs of each check")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (the CPU test of this script)")
    ap.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - set(CHECKS)
    if unknown:
        ap.error(f"--only: unknown check(s) {sorted(unknown)}; choose from {','.join(CHECKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    summary = {"env": {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                       "quick": args.quick},
               "not_run": NOT_RUN, "checks": {}}
    try:
        import megatron.core
        import transformers

        summary["env"].update(transformers=transformers.__version__, megatron_core=megatron.core.__version__)
    except ImportError as e:
        summary["env"]["import_error"] = str(e)
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            res = CHECKS[name](work, args.quick)
        except Exception as e:  # recorded; the remaining checks still run
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        summary["checks"][name] = res
        print(f"gpu_check: {name}: {'ok' if res.get('ok') else 'FAILED'} ({res['wall_s']}s)", flush=True)
        summary["ok"] = all(c.get("ok") for c in summary["checks"].values())
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))  # after each: a time-out keeps the rest
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
