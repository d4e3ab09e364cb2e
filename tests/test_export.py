"""The HF-layout export stream (megatron_vppo.sync: plan, stream, engine push, HF writer) from a TP/PP-sharded model.

Oracle: the safetensors state dict the model was loaded from. The stream must reproduce it bit for
bit — names, shapes, dtypes, values — at TP2×PP2 and TP2, with buckets of 1 KiB, 1 MiB and unbounded,
for tied and untied embeddings, and at every destination rank that asked for it.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dist_helpers import run_distributed

BUCKETS = (1024, 1024 * 1024, None)


def _load(hf_dir, tp, pp, vpp=None):
    from megatron_vppo.checkpoint.model_checkpoint import load_model, model_dims, read_model_config
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed

    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    dims = init_distributed(parallel, **model_dims(read_model_config(hf_dir)))
    return load_model(hf_dir, parallel, dims=dims)


def _export_worker(rank, world, hf_dir, tp, pp):
    from megatron_vppo.sync.stream import drain, export_hf_buckets, export_hf_weights
    from megatron_vppo.sync.buckets import iter_named_tensors

    m = _load(hf_dir, tp, pp)
    out = {"buckets": {}}
    for b in BUCKETS:
        buckets = list(export_hf_buckets(m.chunks, m.adapter, b, dims=m.dims))
        out["buckets"][b] = (
            [x.nbytes for x in buckets],
            [(n, t.clone()) for n, t in iter_named_tensors(buckets)],
        )
    # every rank receives with dst="all"; dst="replica" feeds the replica's first rank only
    out["all"] = {n: t.clone() for n, t in export_hf_weights(m.chunks, m.adapter, dst="all", dims=m.dims)}
    out["replica_count"] = drain(export_hf_weights(m.chunks, m.adapter, dst="replica", dims=m.dims))
    return out


def _check_equal(got: list, ref: dict, what: str):
    names = [n for n, _ in got]
    assert len(names) == len(set(names)), f"{what}: duplicate names"
    assert set(names) == set(ref), f"{what}: missing {set(ref) - set(names)}, extra {set(names) - set(ref)}"
    for n, t in got:
        assert t.dtype == ref[n].dtype and t.shape == ref[n].shape, (what, n)
        assert torch.equal(t, ref[n]), f"{what}: {n} differs"


@pytest.mark.parametrize("tp,pp,tied", [(2, 2, False), (2, 1, False), (2, 2, True)])
def test_export_stream_equals_loaded_hf_state(tiny_model_dir, tiny_model_dir_tied, tp, pp, tied):
    hf_dir = tiny_model_dir_tied if tied else tiny_model_dir
    ref = load_file(str(hf_dir / "model.safetensors"))
    assert ("lm_head.weight" in ref) != tied
    results = run_distributed(_export_worker, tp * pp, str(hf_dir), tp, pp)

    rank0 = results[0]
    streams = {b: rank0["buckets"][b][1] for b in BUCKETS}
    for b, got in streams.items():
        _check_equal(got, ref, f"tp{tp} pp{pp} bucket={b}")
    # same order for every bucket size
    orders = {tuple(n for n, _ in got) for got in streams.values()}
    assert len(orders) == 1
    sizes_1k, sizes_1m, sizes_inf = (rank0["buckets"][b][0] for b in BUCKETS)
    assert len(sizes_inf) == 1 and len(sizes_1k) > len(sizes_1m) >= 1
    largest = max(t.numel() * t.element_size() for t in ref.values())
    assert all(s <= max(1024, largest) for s in sizes_1k)

    for r, res in enumerate(results):
        _check_equal(list(res["all"].items()), ref, f"dst=all rank {r}")
        if r != 0:
            assert all(not res["buckets"][b][1] for b in BUCKETS), "non-destination ranks yield nothing"
        assert res["replica_count"] == (len(ref) if r == 0 else 0)


def _vpp_worker(rank, world, hf_dir):
    from megatron_vppo.sync.stream import export_hf_weights

    m = _load(hf_dir, 1, 2, vpp=2)
    assert len(m.chunks) == 2
    return [(n, t.clone()) for n, t in export_hf_weights(m.chunks, m.adapter, dims=m.dims)]


def test_export_stream_with_virtual_pipeline(tiny_model_dir_4layers):
    """PP2 × VPP2 on a 4-layer model: every chunk of every stage contributes, in layer order."""
    hf_dir = tiny_model_dir_4layers
    ref = load_file(str(hf_dir / "model.safetensors"))
    got, rest = run_distributed(_vpp_worker, 2, str(hf_dir))
    assert rest == []
    _check_equal(got, ref, "pp2 vpp2")
    layers = [int(n.split(".")[2]) for n, _ in got if n.startswith("model.layers.")]
    assert layers == sorted(layers)


class _FailingEngine:
    in_process = False  # takes buckets

    def __init__(self, after):
        self.after = after

    def update_weights(self, stream, expected=None):
        from megatron_vppo.sync.buckets import iter_named_tensors

        for i, _ in enumerate(iter_named_tensors(stream)):
            if i == self.after:
                raise RuntimeError("engine broke mid-stream")


def _failing_push_worker(rank, world, hf_dir):
    from megatron_vppo.sync.engine_push import push_to_engine
    from megatron_vppo.sync.plan import export_manifest

    m = _load(hf_dir, 2, 1)
    manifest = export_manifest(m.chunks, m.adapter, dims=m.dims)
    try:
        push_to_engine(m.chunks, m.adapter, _FailingEngine(3) if rank == 0 else None, bucket_bytes=1024, dims=m.dims)
    except Exception as e:  # noqa: BLE001
        return manifest, f"{type(e).__name__}: {e}"
    return manifest, None


def test_engine_error_mid_stream_raises_everywhere_without_hanging(tiny_model_dir):
    ref = load_file(str(tiny_model_dir / "model.safetensors"))
    (manifest, err0), (manifest1, err1) = run_distributed(_failing_push_worker, 2, str(tiny_model_dir))
    assert "engine broke mid-stream" in err0 and "failed on another rank" in err1
    assert manifest == manifest1
    assert {n: (tuple(t.shape), t.dtype) for n, t in ref.items()} == {n: (s, d) for n, s, d in manifest}


class _AdapterFailingOnData:
    """The model's adapter, except that converting real (not meta) tensors fails from the `after`-th
    group on: the meta-tensor plan passes, the stream breaks on the destination rank only."""

    def __init__(self, adapter, after):
        self._adapter, self._after, self._calls = adapter, after, 0

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def mcore_to_hf(self, tensors):
        if any(t.device.type != "meta" for t in tensors.values()):
            self._calls += 1
            if self._calls > self._after:
                raise MemoryError("cast ran out of memory (simulated)")
        return self._adapter.mcore_to_hf(tensors)


def _failing_conversion_worker(rank, world, hf_dir, tp, pp):
    from megatron_vppo.sync.engine_push import push_to_engine

    m = _load(hf_dir, tp, pp)
    adapter = _AdapterFailingOnData(m.adapter, after=2)
    engine = _FailingEngine(after=10**9) if rank == 0 else None  # consumes everything it is given
    try:
        push_to_engine(m.chunks, adapter, engine, bucket_bytes=1024, dims=m.dims)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_conversion_error_mid_stream_raises_everywhere_without_hanging(tiny_model_dir, tp, pp):
    """Only the destination converts; its failure must not leave the other ranks in a gather / recv."""
    errs = run_distributed(_failing_conversion_worker, tp * pp, str(tiny_model_dir), tp, pp, timeout=180)
    assert "out of memory (simulated)" in errs[0] and "run to its end" in errs[0]
    assert all(e is not None and "failed on another rank" in e for e in errs[1:]), errs


def test_save_hf_checkpoint_shards_and_is_atomic(tiny_model_dir, tmp_path):
    from megatron_vppo.sync.hf_writer import save_hf_checkpoint
    from megatron_vppo.checkpoint.hf_load import SafetensorsDir
    from megatron_vppo.sync.buckets import iter_buckets

    ref = load_file(str(tiny_model_dir / "model.safetensors"))
    out = save_hf_checkpoint(iter_buckets(ref.items(), 4096), tmp_path / "sharded", tiny_model_dir,
                             tiny_model_dir, max_shard_bytes=64 * 1024)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2 and (out / "model.safetensors.index.json").exists()
    back = SafetensorsDir(out)
    assert set(back.where) == set(ref) and all(torch.equal(back.get(k), v) for k, v in ref.items())
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()

    def broken():
        yield from list(ref.items())[:5]
        raise RuntimeError("stream died")

    with pytest.raises(RuntimeError, match="stream died"):
        save_hf_checkpoint(broken(), tmp_path / "half", tiny_model_dir, max_shard_bytes=1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"], "nothing half-written is left"


# ----------------------------------------------------------------------------- push_to_engine -> HFRolloutEngine


class _BreakingEngine:
    """An in-process engine whose incoming stream dies after `after` tensors (a trainer crash)."""

    in_process = True

    def __init__(self, engine, after):
        self.engine, self.after = engine, after

    def update_weights(self, stream, **kw):
        from megatron_vppo.sync.buckets import iter_named_tensors

        def dying():
            for i, item in enumerate(iter_named_tensors(stream)):
                if i == self.after:
                    raise RuntimeError("stream died mid-update")
                yield item

        self.engine.update_weights(dying(), **kw)


def _push_worker(rank, world, hf_dir, other_dir, tp, pp):
    from megatron_vppo.sync.engine_push import push_to_engine
    from megatron_vppo.sync.plan import export_plan
    from megatron_vppo.rollout.hf_engine import HFRolloutEngine

    m = _load(hf_dir, tp, pp)
    # the engine starts on other weights; the trainer's sync (default: in place, unbucketed) replaces them
    engine = HFRolloutEngine.from_pretrained(other_dir) if rank == 0 else None
    ptrs = {n: p.data_ptr() for n, p in engine.model.named_parameters()} if engine else None
    assert export_plan(m.chunks, m.adapter, dims=m.dims) is export_plan(m.chunks, m.adapter, dims=m.dims)  # reused, every stage agrees
    push_to_engine(m.chunks, m.adapter, engine, dst="replica", dims=m.dims)
    out = {}
    if engine:
        out["first"] = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
        out["ptrs_same"] = ptrs == {n: p.data_ptr() for n, p in engine.model.named_parameters()}
        out["version"] = engine.weight_version
    try:
        push_to_engine(m.chunks, m.adapter, _BreakingEngine(engine, 5) if engine else None, dst="replica", dims=m.dims)
    except Exception as e:  # noqa: BLE001
        out["err"] = f"{type(e).__name__}: {e}"
    if engine:
        try:
            engine.score([])  # usability check without a request
        except RuntimeError as e:
            out["unusable"] = str(e)
    push_to_engine(m.chunks, m.adapter, engine, dst="replica", mode="staged" if tp > 1 else None, dims=m.dims)
    if engine:
        engine.score([])
        out["version_after"] = engine.weight_version
    return out


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_push_to_engine_in_place_equals_checkpoint(tiny_model_dir, tiny_model_dir_seed1, tp, pp):
    """The trainer's sync path into the in-process engine: the engine ends up with exactly the
    checkpoint's weights, on its own storage; a stream that dies mid-update makes every rank raise
    and the engine refuse to generate until the next complete sync."""
    from megatron_vppo.rollout.hf_engine import canonical_param_name

    other = tiny_model_dir_seed1
    ref = {canonical_param_name(k): v for k, v in load_file(str(tiny_model_dir / "model.safetensors")).items()}
    results = run_distributed(_push_worker, tp * pp, str(tiny_model_dir), str(other), tp, pp)
    r0 = results[0]
    assert r0["ptrs_same"] and r0["version"] == 1
    assert set(r0["first"]) == set(ref) and all(torch.equal(r0["first"][k], v) for k, v in ref.items())
    assert "stream died mid-update" in r0["err"]
    assert all("failed on another rank" in r["err"] for r in results[1:])
    assert "incomplete" in r0["unusable"] and "complete update_weights" in r0["unusable"]
    assert r0["version_after"] == 2


def test_publish_failure_keeps_the_previous_directory(tmp_path, monkeypatch):
    """overwrite=True moves the old directory aside first; if the new one cannot take its place, the
    old one must come back under its own name."""
    import os
    from pathlib import Path

    from megatron_vppo.checkpoint import atomic_dir

    out, tmp = tmp_path / "out", tmp_path / ".out.tmp-1"
    for d, text in ((out, "old"), (tmp, "new")):
        d.mkdir()
        (d / "model.safetensors").write_text(text)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == tmp:
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic_dir.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        atomic_dir.publish(tmp, out, overwrite=True)
    assert (out / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-1", "out"]


# ----------------------------------------------------------------------------- export after a DP2 step


def _main_params(optimizer, chunks, adapter) -> dict:
    """{canonical name: FULL fp32 tensor} rebuilt from the distributed optimizer's main-param shards
    of every DP rank (each element owned exactly once) — the weights the step produced."""
    from megatron.core import parallel_state as ps

    from megatron_vppo.checkpoint.hf_load import global_param_names

    names = {p: adapter.canonical_mcore_name(n) for c in chunks for n, p in global_param_names(c).items()}
    full = {n: torch.zeros(p.numel(), dtype=torch.float32) for p, n in names.items()}
    owners = {n: torch.zeros(p.numel(), dtype=torch.float32) for p, n in names.items()}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        pairs = [*zip(opt.shard_fp32_groups, opt.model_fp32_groups),
                 *zip(opt.shard_fp32_from_float16_groups, opt.model_float16_groups)]
        for shards, params in pairs:
            for shard, p in zip(shards, params):
                r = opt._get_model_param_range_map(p)["param"]
                full[names[p]][r.start:r.end] = shard.detach().float().view(-1)
                owners[names[p]][r.start:r.end] += 1
    group = ps.get_data_parallel_group()
    for n in full:
        torch.distributed.all_reduce(full[n], group=group)
        torch.distributed.all_reduce(owners[n], group=group)
        assert bool((owners[n] == 1).all()), f"{n}: main-param shards do not cover it exactly once"
    return {n: full[n].view(p.shape) for p, n in names.items()}


def _dp2_step_export_worker(rank, world, model_dir, trajs, dtype, overlap, pp=1, vpp=None):
    from test_vppo_layout_invariance import build_trainer, run_config

    from megatron_vppo.sync.stream import export_hf_weights
    from megatron_vppo.checkpoint.hf_load import gather_full_state
    from megatron_vppo.config import OptimConfig
    from megatron_vppo import distributed as dist_mod
    from megatron_vppo.train import loop

    cfg = run_config(4)
    cfg.model.dtype = dtype
    cfg.optim = OptimConfig(lr=1e-3, use_distributed_optimizer=True)
    forced = []
    real_sync = dist_mod.force_param_sync
    dist_mod.force_param_sync = lambda chunks: forced.append(real_sync(chunks)) or forced[-1]
    if pp > 1:  # interleaved: every DP rank's micro-batches must split into groups of pp
        cfg.train.micro_batch_size = 1
    trainer, proxy = build_trainer(model_dir, 1, pp, cfg, overlap=overlap, vpp=vpp)
    chunks, adapter = trainer.model_chunks, trainer.adapter
    scored = loop.score_step_batch(trainer, trajs)
    per_traj, minibatches, _ = loop.shape_step(trainer, trajs, scored)
    rounds = []
    for _ in range(2):  # the second round's forwards start from the forced sync's state
        loop.update_policy(trainer, trajs, per_traj, minibatches)  # two optimizer steps
        main = _main_params(proxy._opt, chunks, adapter)
        live = gather_full_state(chunks, adapter, tp_group=trainer.dims.tp_group)  # what the parameters hold before the export
        stale = max(float((live[n].float() - main[n]).abs().max()) for n in main)
        n_forced = len(forced)
        exported = {n: t.clone() for n, t in export_hf_weights(chunks, adapter, dst="all", dims=trainer.dims)}
        expected = adapter.mcore_to_hf({n: main[n].to(live[n].dtype) for n in main})  # this stage's
        rounds.append(dict(stale=stale, forced=forced[n_forced:], exported=exported, expected=expected))
    config = chunks[0].module.config
    return dict(deferred=chunks[0].ddp_config.overlap_param_gather, rounds=rounds,
                aligned=chunks[0].ddp_config.align_param_gather, param_sync_func=config.param_sync_func is not None)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_after_dp2_step_sees_the_updated_params(tiny_model_dir, dtype):
    """DP2, distributed optimizer, overlap_param_gather on (gloo allows it): a step leaves each rank's
    parameters updated only in its own shard — the other shard's all-gather is deferred to the next
    forward — yet the export that follows (the trainer's weight sync / HF export) must stream exactly
    the optimizer's updated main params (cast to the model dtype), on both ranks, twice in a row."""
    from test_vppo_layout_invariance import make_trajectories

    trajs = make_trajectories(tiny_model_dir)
    results = run_distributed(_dp2_step_export_worker, 2, str(tiny_model_dir), trajs, dtype, True)
    for rank, res in enumerate(results):
        assert res["deferred"], "overlap_param_gather should be on"
        for i, rnd in enumerate(res["rounds"]):
            # Without the forced sync the export would read these stale shards.
            assert rnd["stale"] > 0, f"rank {rank} round {i}: the step did not leave stale shards"
            _check_equal(list(rnd["exported"].items()), rnd["expected"], f"{dtype} rank {rank} round {i}")
            assert rnd["forced"] == [True], f"rank {rank} round {i}: export must force the param sync once"
    # Both replicas stream the same weights.
    for i in range(2):
        _check_equal(list(results[1]["rounds"][i]["exported"].items()), results[0]["rounds"][i]["exported"],
                     f"{dtype} round {i} rank 1 vs rank 0")


def test_export_after_dp2_step_with_interleaved_pipeline(tiny_model_dir_4layers):
    """PP2 x VPP2 x DP2 with overlapped param gathers: the interleaved schedule launches the chunks'
    all-gathers itself (align_param_gather + param_sync_func, as Megatron-LM pairs them); after the
    steps every stage still exports exactly its optimizer's main params."""
    from test_vppo_layout_invariance import make_trajectories

    hf_dir = tiny_model_dir_4layers
    # one mini-batch of two whole GRPO groups: 2 trajectories, 2 micro-batches per DP rank
    all_trajs = make_trajectories(hf_dir)
    trajs = [all_trajs[i] for i in (0, 1, 3, 4)]
    results = run_distributed(_dp2_step_export_worker, 4, str(hf_dir), trajs, "fp32", True, 2, 2)
    ref = load_file(str(hf_dir / "model.safetensors"))
    for rank, res in enumerate(results):
        assert res["deferred"] and res["aligned"] and res["param_sync_func"]
        for i, rnd in enumerate(res["rounds"]):
            assert rnd["stale"] > 0, f"rank {rank} round {i}: the step did not leave stale shards"
            assert set(rnd["exported"]) == set(ref)
            got = [(n, rnd["exported"][n]) for n in rnd["expected"]]  # this stage's tensors
            _check_equal(got, rnd["expected"], f"pp2 vpp2 rank {rank} round {i}")
            assert rnd["forced"] == [True]
    assert set().union(*(r["rounds"][0]["expected"] for r in results)) == set(ref)
