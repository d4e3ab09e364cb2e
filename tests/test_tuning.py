"""Parallelism tuner: known facts about Qwen2.5-VL-7B/32B, clear errors, and the memory estimate
against the measured peak memory of real CPU training steps (project model, optimizer, loss) at
TP1, TP2, PP2 (plus SP and full recomputation), for the tiny and a small model."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vppo.config import RolloutConfig
from megatron_vppo.parallel_layout import Layout
from megatron_vppo.tuning import KERNELS, Precision, Workload, estimate_memory, load_model_spec, spec_from_dict, tune
from megatron_vppo.tuning.search import precision_for
from megatron_vppo.tuning.cli import run as cli_run
from megatron_vppo.tuning.memory import SGLANG_RUNTIME_GIB
from megatron_vppo.sync.buckets import DEFAULT_BUCKET_BYTES
from megatron_vppo.tuning.memory import GIB
from megatron_vppo.tuning.model_spec import ModelSpecError
from megatron_vppo.tuning.search import TuningError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "model_configs"
SPEC_7B = CONFIGS / "qwen2_5_vl_7b.json"
SPEC_32B = CONFIGS / "qwen2_5_vl_32b.json"
PAPER_7B = Workload(seq_len=4096 + 2048)  # spec §7: max prompt 4096 + max response 2048
PAPER_32B = Workload(seq_len=4096 + 4096)


# ----------------------------------------------------------------------------- model facts


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b", "qwen2_5_vl_72b"])
def test_param_count_matches_hf_model(name):
    """The tuner's parameter count equals HF transformers' own model built from the same config."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg))
    hf = sum(p.numel() for p in model.parameters())  # a tied lm_head is one parameter
    assert load_model_spec(CONFIGS / f"{name}.json").total_params() == hf


def test_7b_paper_lengths_fit_on_8x80():
    cands = tune(load_model_spec(SPEC_7B), 8, 80.0, PAPER_7B)
    fits = [c for c in cands if c.fits]
    assert fits, "Qwen2.5-VL-7B at prompt 4096 + response 2048 should fit on 8 x 80 GiB"
    assert fits[0].mem_gib <= 80.0 and fits[0].throughput.tokens_per_s_per_gpu > 0


@pytest.mark.parametrize("recompute", ["auto", "full"])
def test_32b_does_not_fit_on_8x24(recompute):
    cands = tune(load_model_spec(SPEC_32B), 8, 24.0, PAPER_32B, recompute=recompute)
    assert cands and not any(c.fits for c in cands)
    # Not a near miss: even the static state (weights, grads, sharded Adam) alone exceeds 24 GiB.
    assert min(c.memory.worst.static / GIB for c in cands) > 24.0


def test_32b_fits_on_32x80():
    assert any(c.fits for c in tune(load_model_spec(SPEC_32B), 32, 80.0, PAPER_32B))


@pytest.mark.parametrize("path", [SPEC_7B, SPEC_32B])
def test_raising_tp_lowers_weight_memory(path):
    spec = load_model_spec(path)
    tps = [t for t in (1, 2, 4, 8) if spec.kv_heads % t == 0 and spec.heads % t == 0]
    weights = [estimate_memory(spec, Layout(tp=t), PAPER_7B).worst.weights for t in tps]
    assert len(tps) >= 3 and all(a > b for a, b in zip(weights, weights[1:]))
    # Sharded parts shrink as 1/tp; only norms and a few biases stay replicated.
    assert weights[0] / weights[-1] == pytest.approx(tps[-1], rel=0.02)


def test_sequence_parallel_and_recompute_lower_activations():
    spec = load_model_spec(SPEC_7B)
    act = lambda **kw: estimate_memory(spec, Layout(tp=2, sp=kw.pop("sp", False)), PAPER_7B, **kw).worst.activations
    assert act(sp=True) < act(sp=False)
    assert act(recompute="full") < act() / 10


# ----------------------------------------------------------------------------- errors


def test_missing_fields_are_named(tmp_path):
    cfg = json.loads(SPEC_7B.read_text())
    del cfg["num_key_value_heads"], cfg["vision_config"]["patch_size"]
    with pytest.raises(ModelSpecError, match="num_key_value_heads.*vision_config.patch_size"):
        spec_from_dict(cfg)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    code, msg = cli_run(["--model", str(tmp_path), "--gpus", "8", "--gpu-mem-gib", "80"])
    assert code == 2 and "num_key_value_heads" in msg and str(p) in msg


@pytest.mark.parametrize(
    "args, match",
    [
        (["--gpus", "0", "--gpu-mem-gib", "80"], "--gpus=0 must be positive"),
        (["--gpus", "8", "--gpu-mem-gib", "-1"], "--gpu-mem-gib"),
        (["--gpus", "8", "--gpu-mem-gib", "80", "--seq-len", "0"], "--seq-len"),
        (["--gpus", "8", "--gpu-mem-gib", "80", "--micro-batch", "3"], "not a multiple of --micro-batch"),
        (["--gpus", "8", "--gpu-mem-gib", "80", "--rollout-share", "1.2"], "rollout-share"),
        # 6 GPUs: tp 3/6 do not divide 28 heads, pp 3/6 do not divide 28 layers, dp 3/6 do not divide 1024.
        (["--gpus", "6", "--gpu-mem-gib", "80"], "no parallel layout .* exactly 6 GPUs"),
    ],
)
def test_impossible_requests(args, match):
    code, msg = cli_run(["--model", str(SPEC_7B), *args])
    assert code == 2 and msg.startswith("error: ")
    assert re.search(match, msg), msg
    if "--gpus" in args and args[args.index("--gpus") + 1] == "6":
        with pytest.raises(TuningError):
            tune(load_model_spec(SPEC_7B), 6, 80.0, PAPER_7B)


def test_tool_json_and_exit_codes(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "tune_parallelism.py"), "--model", str(SPEC_7B), "--gpu-mem-gib", "80"]
    ok = subprocess.run(tool + ["--gpus", "8", "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    rows = json.loads(ok.stdout)
    for key in ("tp", "pp", "vpp", "sp", "dp", "fits", "mem_gib", "tokens_per_s_per_gpu", "breakdown_gib"):
        assert all(key in r for r in rows)
    assert all(r["tp"] * r["pp"] * r["dp"] * r["cp"] == 8 for r in rows)
    fit = [r for r in rows if r["fits"]]
    assert fit and [r["tokens_per_s_per_gpu"] for r in fit] == sorted((r["tokens_per_s_per_gpu"] for r in fit), reverse=True)
    b = rows[0]["breakdown_gib"]
    static = b["weights"] + b["grads"] + b["optimizer"]
    dyn = max(b["activations"] + b["vision_act"] + b["bwd_peak"], b["nograd"])
    # the larger of the training phase and the rollout phase (the engine's share, on stage 0)
    train = static + dyn + b["overhead"]
    assert b["rollout"] == pytest.approx(RolloutConfig().engine_gpu_share * 80, abs=0.01)  # one default
    fixed = KERNELS["te"].fixed_overhead_gib
    # the engine's share holds weights + KV only: SGLang's runtime and the sync bucket come on top
    assert b["engine_runtime"] == SGLANG_RUNTIME_GIB and b["sync_buffers"] == DEFAULT_BUCKET_BYTES / 2**30
    rollout = static + fixed + b["rollout"] + b["engine_runtime"] + b["sync_buffers"]
    assert rows[0]["mem_gib"] == pytest.approx(max(train, rollout), abs=0.01)
    assert b["kv_cache"] == pytest.approx(b["rollout"] - b["engine_weights"], abs=0.01)
    bad = subprocess.run(tool + ["--gpus", "6"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_tuner_offers_no_context_parallel_layouts():
    """The trainer refuses cp > 1 (nothing splits sequences over CP ranks yet), so the tuner must not
    recommend one; every layout it offers passes the trainer's own validation."""
    from megatron_vppo.parallel_layout import validate_layout

    spec = load_model_spec(SPEC_32B)
    cands = tune(spec, 32, 80.0, PAPER_32B)
    assert cands and all(c.layout.cp == 1 for c in cands)
    for c in cands:
        validate_layout(c.layout, world_size=32, num_attention_heads=spec.heads, num_query_groups=spec.kv_heads,
                        num_layers=spec.layers, vision_num_heads=spec.vision_heads, te_available=True)


def test_rollout_share_must_hold_the_engines_weights_and_a_sequence():
    """The colocated engines (TP = the trainer's, one engine TP rank on every GPU of every stage) hold the
    HF model / TP in bf16 inside their share; a share smaller than that cannot fit, whatever the trainer
    needs. `engine_tp` sizes the engine independently of the trainer's TP."""
    spec = load_model_spec(SPEC_32B)
    prec = Precision()  # bf16
    for tp, share, ok in [(2, 0.35, False), (2, 0.45, True), (4, 0.25, True), (4, 0.19, False)]:
        est = estimate_memory(spec, Layout(tp=tp, pp=4, dp=32 // (4 * tp)), PAPER_32B, prec=prec, gpu_mem_gib=80.0,
                              rollout_share=share)
        first = est.stages[0]
        assert first.engine_weights == pytest.approx(spec.total_params() * 2 / tp)
        assert first.min_kv == pytest.approx(PAPER_32B.seq_len * spec.layers * 2 * (spec.kv_heads // tp) * spec.hd * 2)
        assert first.rollout_fits is ok, (tp, share, first.kv_cache / GIB)
        # every stage hosts engine TP ranks (world / tp engines): the same share, weights and KV on each
        assert all((s.rollout, s.engine_weights, s.min_kv) == (first.rollout, first.engine_weights, first.min_kv)
                   for s in est.stages[1:])
        assert est.total_gib * GIB >= max(s.static + s.rollout for s in est.stages)
    wide = estimate_memory(spec, Layout(tp=2, pp=4, dp=4), PAPER_32B, prec=prec, gpu_mem_gib=80.0,
                           rollout_share=0.45, engine_tp=4)
    assert wide.stages[2].engine_weights == pytest.approx(spec.total_params() * 2 / 4)
    row = tune(spec, 32, 79.6, PAPER_32B, prec=precision_for("bf16", fp8=True), rollout_share=0.5)[0].as_dict()
    assert (row["engines"], row["engine_tp"]) == (32 // row["tp"], row["tp"])  # all 32 GPUs generate


def test_no_fit_says_which_constraint_fails_and_what_fits():
    """72B on 32 x 80 GiB at the default --rollout-share 0.5: "0 of 131 layouts fit" used to be all it said
    (issue 19). Now the closest layout's first failing constraint (the rollout phase: the trainer's resident
    state plus the engine's share), the shares that fit on these GPUs and the GPU count that fits at this
    share, each checked against the tuner itself."""
    from megatron_vppo.tuning.search import HINT_GPU_FACTORS, HINT_SHARES, explain_no_fit

    spec = load_model_spec(CONFIGS / "qwen2_5_vl_72b.json")
    share = RolloutConfig().engine_gpu_share
    cands = tune(spec, 32, 80.0, Workload(), rollout_share=share)
    assert cands and not any(c.fits for c in cands)
    hint = explain_no_fit(cands, spec, 32, 80.0, Workload(), rollout_share=share)
    s0 = hint.closest.memory.stages[0]
    assert hint.closest.mem_gib == min(c.mem_gib for c in cands)
    assert s0.rollout_phase / GIB > 80.0 and "rollout phase" in hint.constraint
    assert f"{s0.rollout_phase / GIB:.1f} GiB" in hint.constraint
    fitting = [sh for sh in HINT_SHARES if any(c.fits for c in tune(spec, 32, 80.0, Workload(), rollout_share=sh))]
    assert [sh for sh, _ in hint.shares] == fitting and fitting and share not in fitting
    assert all(c.fits for _, c in hint.shares)
    n, best = hint.gpus
    assert n > 32 and best.fits and best.layout.world_size == n
    for smaller in (32 * f for f in HINT_GPU_FACTORS if 32 * f < n):  # the smallest count that fits
        assert not any(c.fits for c in tune(spec, smaller, 80.0, Workload(), rollout_share=share))
    text = hint.text()
    assert f"--rollout-share {fitting[0]:g}" in text and f"Fits on {n} GPUs" in text
    code, out = cli_run(["--model", str(CONFIGS / "qwen2_5_vl_72b.json"), "--gpus", "32", "--gpu-mem-gib", "80",
                         "--top", "1"])
    assert code == 0 and out.endswith(text), out[-2000:]
    # the training phase itself too big (no colocated engine, 8 GPUs): named as such
    cands = tune(spec, 8, 80.0, Workload(), rollout_share=0.0)
    hint = explain_no_fit(cands, spec, 8, 80.0, Workload(), rollout_share=0.0)
    assert hint.constraint.startswith("the training phase needs") and not hint.shares


def test_megatron_vppo_tune_needs_no_tools_dir(monkeypatch, tmp_path, capsys):
    """`megatron-vppo tune` runs the package's tuner, so an installed wheel (no tools/) has it too."""
    from megatron_vppo import cli

    monkeypatch.setattr(cli, "_TOOLS", tmp_path / "no_tools_here")
    assert cli.main(["tune", "--model", str(SPEC_7B), "--gpus", "8", "--gpu-mem-gib", "80", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["tp"] * r["pp"] * r["dp"] * r["cp"] == 8 for r in rows)
    assert cli.main(["tune", "--model", str(SPEC_7B), "--gpus", "6", "--gpu-mem-gib", "80"]) == 2
    assert "error: no parallel layout" in capsys.readouterr().err


# ----------------------------------------------------------------------------- measured memory
#
# Each rank: warm up the runtime with a throwaway step of a minimal model (thread pools, allocator
# arenas, lazily-initialised kernels: the CPU analogue of a CUDA context), take the RSS baseline,
# then per case: reset the peak-RSS mark (/proc/self/clear_refs), build the project's Qwen2.5-VL
# (Megatron-Core, local layers), Megatron DDP + distributed Adam, run 2 training steps with the
# project's vocab-parallel log-prob + VPPO loss, read the peak; reset again and run the paired
# no-grad pass (2 views per micro-batch), read its peak. glibc is told to mmap every allocation
# >= 64 KiB, so freed tensors leave RSS and the peak mark follows live memory.

SPECIAL_BASE = {"tiny": 1000, "small": 16000}


def _hf_config(size: str) -> dict:
    from megatron_vppo.models.qwen2_5_vl.tiny import QWEN_SPECIAL_TOKENS, tiny_config_dict

    base = SPECIAL_BASE[size]
    ids = {t: base + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    vocab = base + 32
    if size == "tiny":  # the project's tiny architecture (tiny.py): hidden 64, 2 layers
        return tiny_config_dict(vocab, ids)
    text = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                intermediate_size=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
    return tiny_config_dict(vocab, ids, text_config=text)


# (size, seq_len, micro_batch, recompute, sequence_parallel)
CASES = {
    "tp1": [("tiny", 2048, 4, False, False), ("small", 512, 1, False, False), ("small", 512, 2, True, False)],
    "tp2": [("tiny", 2048, 4, False, False), ("small", 512, 1, False, False), ("small", 512, 1, False, True)],
    "pp2": [("tiny", 2048, 2, False, False), ("small", 512, 1, False, False)],
}
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
MICRO_BATCHES = {"tp1": 1, "tp2": 1, "pp2": 2}  # PP2: two in flight on the first stage


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _release() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _one_case(hf_cfg, tp, pp, seq, mb, n_micro, recompute, sp, base_rss):
    import functools

    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vppo.algo.loss import vppo_policy_loss
    from megatron_vppo.algo.vocab_parallel import vocab_parallel_log_prob
    from megatron_vppo.config import ModelConfig, OptimConfig, ParallelConfig
    from megatron_vppo.distributed import ParallelDims
    from megatron_vppo.models.qwen2_5_vl.model import build_model_chunks
    from megatron_vppo.train.optimizer import attach_to_model_config, build_optimizer

    vocab = hf_cfg["text_config"]["vocab_size"]
    special = hf_cfg["text_config"]["bos_token_id"]  # <|endoftext|>, the first special id
    gen = torch.Generator().manual_seed(0)
    tp_group = ps.get_tensor_model_parallel_group()

    def batches(rows):
        while True:
            yield torch.randint(0, special, (rows, seq), generator=gen)

    def train_loss(tok, logits):
        logp = vocab_parallel_log_prob(logits, torch.roll(tok, -1, 1), tp_group, 1.0, vocab)
        ones = torch.ones_like(logp)
        loss, _ = vppo_policy_loss(logp, logp.detach() - 0.01, torch.ones(tok.shape[0]), ones, ones,
                                   entropy_coef=0.06)
        return loss, {"loss": loss.detach()}

    def nograd_loss(tok, logits):
        logp = vocab_parallel_log_prob(logits, torch.roll(tok, -1, 1), tp_group, 1.0, vocab)
        return logits.new_zeros(()), {"old": logp[: tok.shape[0] // 2].sum(), "aug": logp[tok.shape[0] // 2:].sum()}

    def step(loss_fn, it, model):
        tok = next(it)
        return model(input_ids=tok), functools.partial(loss_fn, tok)

    par = ParallelConfig(tp=tp, pp=pp, sp=sp)
    dims = ParallelDims.from_megatron(sp=sp)  # the layout init_distributed made, with this case's sp
    chunks = build_model_chunks(hf_cfg, ModelConfig(dtype="fp32", recompute=recompute), par, dims=dims)
    ddp, opt, _ = build_optimizer(chunks, OptimConfig(), "fp32", total_steps=10)
    attach_to_model_config(ddp, opt)
    fb = get_forward_backward_func()
    it = batches(mb)
    for _ in range(2):  # step 2 is the steady state: Adam's m and v exist from step 1 on
        for c in ddp:
            c.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=functools.partial(step, train_loss), data_iterator=it, model=ddp[0],
           num_microbatches=n_micro, seq_length=seq, micro_batch_size=mb, forward_only=False)
        opt.step()
    train_peak = _status_bytes("VmHWM") - base_rss
    _reset_peak()
    with torch.no_grad():
        fb(forward_step_func=functools.partial(step, nograd_loss), data_iterator=batches(2 * mb), model=ddp[0],
           num_microbatches=n_micro, seq_length=seq, micro_batch_size=2 * mb, forward_only=True)
    nograd_peak = _status_bytes("VmHWM") - base_rss
    n_params = sum(p.numel() for p in chunks[0].parameters())
    del chunks, ddp, opt, fb
    return dict(train=train_peak, nograd=nograd_peak, params=n_params)


def _measure(rank, world, layout_name):
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixed: also stops glibc's dynamic raising)
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD

    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import destroy_distributed, init_distributed

    tp, pp = LAYOUTS[layout_name]
    tiny = _hf_config("tiny")
    init_distributed(ParallelConfig(tp=tp, pp=pp), num_attention_heads=4, num_query_groups=2, num_layers=2)
    _one_case(tiny, tp, pp, 16, 1, 1, False, False, 0)  # warm-up
    out = []
    for size, seq, mb, recompute, sp in CASES[layout_name]:
        _release()
        base = _status_bytes("VmRSS")
        _reset_peak()
        res = _one_case(_hf_config(size), tp, pp, seq, mb, MICRO_BATCHES[layout_name], recompute, sp, base)
        out.append(res)
    destroy_distributed()
    return out


def _estimate(size, layout_name, seq, mb, recompute, sp, rank):
    tp, pp = LAYOUTS[layout_name]
    spec = spec_from_dict(_hf_config(size), size)
    wl = Workload(seq_len=seq, micro_batch=mb, global_batch=mb * MICRO_BATCHES[layout_name],
                  images_per_sample=0)  # the vision tower is built (its params count) but gets no image
    est = estimate_memory(spec, Layout(tp=tp, pp=pp, sp=sp), wl, prec=Precision.fp32(), kernels=KERNELS["local"],
                          recompute="full" if recompute else "none")
    st = est.stages[rank // tp]  # Megatron's rank order: TP fastest, then PP
    return st, dict(train=st.static + st.train_dynamic, nograd=st.static + st.nograd)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout_name", ["tp1", "tp2", "pp2"])
def test_memory_estimate_matches_measured_cpu_peak(layout_name):
    from dist_helpers import run_distributed

    tp, pp = LAYOUTS[layout_name]
    results = run_distributed(_measure, tp * pp, layout_name)
    report = []
    for rank, per_case in enumerate(results):
        for (size, seq, mb, recompute, sp), meas in zip(CASES[layout_name], per_case):
            st, est = _estimate(size, layout_name, seq, mb, recompute, sp, rank)
            assert meas["params"] == st.params, (size, layout_name, rank)  # the model is the one estimated
            for phase in ("train", "nograd"):
                if phase == "nograd" and st.nograd == 0:
                    continue  # not the last stage: no logits
                ratio = est[phase] / meas[phase]
                report.append(f"rank{rank} {size} seq{seq} mb{mb} rc={recompute} sp={sp} {phase}: "
                              f"est {est[phase] / 2**20:.1f} MiB, measured {meas[phase] / 2**20:.1f} MiB, ratio {ratio:.3f}")
    print("\n".join(report))
    bad = [r for r in report if not 0.75 <= float(r.rsplit(" ", 1)[1]) <= 1.25]
    assert report and not bad, "estimate off by more than 25 %:\n" + "\n".join(bad) + "\n\nall:\n" + "\n".join(report)


def test_grad_accum_fusion_is_what_the_model_config_sets():
    """The tuner's kernels count the output layer's weight-grad temp unless wgrad accumulation is fused;
    both presets must say what the model config builds (it sets gradient_accumulation_fusion=False)."""
    from megatron_vppo.models.qwen2_5_vl.config import lm_transformer_config

    hf = json.loads((Path(__file__).resolve().parents[1] / "examples/model_configs/qwen2_5_vl_3b.json").read_text())
    hf = dict(hf, num_hidden_layers=1)
    fused = lm_transformer_config(hf).gradient_accumulation_fusion
    assert KERNELS["te"].grad_accum_fusion == KERNELS["local"].grad_accum_fusion == fused
