"""The SGLang engine's payloads and requests, checked with SGLang 0.5.23's own code (tests/sglang_source.py):
its serializer and restricted unpickler, its flattened-bucket loader, its per-rank payload normalisation and
`GenerateReqInput`'s image-data normalisation; the engine's API as its source declares it; and the
weight-update protocol (sessions, one payload per engine TP rank, failures) over real gloo processes."""
import ast
import os
import re
import types

import pytest
import torch

import sglang_source as sgl_src
from megatron_vppo.sync.buckets import iter_buckets, pack_bucket
from megatron_vppo.rollout.engine import RolloutRequest, SamplingParams
from megatron_vppo.rollout.sglang_engine import (
    SGLangRolloutEngine,
    SGLangTPPeer,
    engine_kwargs_for,
    expand_requests,
    without_agent_store,
)
from megatron_vppo.rollout.sglang_weights import bucket_payloads, mem_fraction_static

pytestmark = pytest.mark.skipif(not sgl_src.available(), reason=sgl_src.SKIP_REASON)


def _weights(offset: float = 0.0):
    """Mixed dtypes, a non-contiguous tensor and a 0-d one, as the export stream can yield them."""
    g = torch.Generator().manual_seed(0)
    return [
        ("model.layers.0.self_attn.qkv_proj.weight", torch.randn(6, 4, generator=g) + offset),
        ("model.layers.0.mlp.down_proj.weight", (torch.randn(4, 5, generator=g) + offset).to(torch.bfloat16)),
        ("model.layers.0.input_layernorm.weight", (torch.randn(5, 3, generator=g) + offset).t()),
        ("visual.merger.step", torch.tensor(7 + int(offset))),
        ("lm_head.weight", torch.randn(3, 2, generator=g).to(torch.float16) + offset),
    ]


class _Recorder:
    """The `model.load_weights` SGLang's loader calls: keeps a copy of every tensor it is handed."""

    def __init__(self, into: dict):
        self.into = into

    def load_weights(self, named):
        for name, t in named:
            self.into[name] = t.clone()


class RuleEngine:
    """`sglang.Engine` on CPU: SGLang 0.5.23's weight-update session rules (scheduler_components/
    weight_updater.py: loads only between begin_weight_update() and end_weight_update(), no second begin,
    no end without begin) and, per engine TP rank i, what that rank runs on payload i: SGLang's own
    normalisation, `MultiprocessingSerializer.deserialize` (restricted unpickler) and flattened-bucket loader."""

    def __init__(self, tp: int):
        self.sg = sgl_src.install()
        self.load = sgl_src.flattened_bucket_loader()
        self.tp, self.session, self.log = tp, False, []
        self.loaded = [{} for _ in range(tp)]
        self.fail_on_call: int | None = None

    def begin_weight_update(self, selector: str = "all"):
        self.log.append("begin")
        if self.session:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session = True
        return True, "Success"

    def end_weight_update(self):
        self.log.append("end")
        if not self.session:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session = False
        return True, "Success"

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.log.append("update")
        if not self.session:
            return False, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
        assert load_format == "flattened_bucket"
        if self.fail_on_call is not None and self.log.count("update") == self.fail_on_call:
            return False, "Failed to update parameter online (injected)"
        payloads = self.sg.normalize_payloads(named_tensors)
        for rank in range(self.tp):  # TpModelWorker.deserialize_own_rank: rank i reads payload i only
            data = self.sg.MultiprocessingSerializer.deserialize(payloads[rank])
            model = _Recorder(self.loaded[rank])
            ok, msg = self.load(types.SimpleNamespace(get_model=lambda: model), flattened_tensor_bucket_dict=data)
            assert ok, msg
        return True, "Success"

    def flush_cache(self):
        self.log.append("flush")
        return True

    def release_memory_occupation(self, tags=None):
        self.log.append("release")
        return True, "Success"

    def resume_memory_occupation(self, tags=None):
        self.log.append("resume")
        return True, "Success"

    def generate(self, **kwargs):
        n = len(kwargs["input_ids"])
        return [{"output_ids": [5], "meta_info": {"finish_reason": {"type": "stop"},
                                                  "output_token_logprobs": [(-0.5, 5, None)]}}] * n


def _sglang_serializer():
    sg = sgl_src.install()

    def serialize(payload: dict) -> bytes:  # serialize_payload without the CUDA-only torch-reduction patch
        metas = [sg.FlattenedTensorMetadata(**m) for m in payload["metadata"]]
        return sg.MultiprocessingSerializer.serialize({"flattened_tensor": payload["flattened_tensor"], "metadata": metas})

    return serialize


# ----------------------------------------------------------------------------- payloads


@pytest.mark.parametrize("as_str", [False, True])
def test_payload_round_trips_through_sglangs_serializer_and_loader(as_str):
    sg = sgl_src.install()
    load = sgl_src.flattened_bucket_loader()
    src = _weights()
    got: dict = {}
    payloads = bucket_payloads(pack_bucket(src), sg.FlattenedTensorMetadata)
    assert len(payloads) == 4 and all(p["flattened_tensor"].dtype == torch.uint8 for p in payloads)  # one per dtype
    for p in payloads:
        wire = sg.MultiprocessingSerializer.serialize(p, output_str=as_str)  # base64 str or raw bytes: both accepted
        data = sg.MultiprocessingSerializer.deserialize(sg.normalize_payloads([wire])[0])
        model = _Recorder(got)
        assert load(types.SimpleNamespace(get_model=lambda: model), flattened_tensor_bucket_dict=data) == (True, "Success")
    assert set(got) == {n for n, _ in src}
    for name, t in src:
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


def test_sglang_refuses_other_payload_shapes():
    """Why the payload is exactly this: SGLang's unpickler blocks our own classes, and its loader reads
    metadata attributes (plain dicts fail)."""
    sg = sgl_src.install()
    load = sgl_src.flattened_bucket_loader()
    bucket = pack_bucket(_weights())
    with pytest.raises(RuntimeError, match="Blocked unsafe global"):
        sg.MultiprocessingSerializer.deserialize(sg.MultiprocessingSerializer.serialize({"metas": bucket.metas}))
    as_dicts = bucket_payloads(bucket, dict)[0]
    data = sg.MultiprocessingSerializer.deserialize(sg.MultiprocessingSerializer.serialize(as_dicts))
    with pytest.raises(AttributeError):
        load(types.SimpleNamespace(get_model=lambda: _Recorder({})), flattened_tensor_bucket_dict=data)


def test_sglangs_own_bucket_agrees_with_ours():
    """SGLang's FlattenedTensorBucket built from the same tensors records the same byte layout."""
    sg = sgl_src.install()
    src = [(n, t) for n, t in _weights() if t.dtype == torch.float32]
    theirs = sg.FlattenedTensorBucket(named_tensors=src)
    (ours,) = bucket_payloads(pack_bucket(src), sg.FlattenedTensorMetadata)
    assert [vars(m) for m in ours["metadata"]] == [vars(m) for m in theirs.get_metadata()]
    assert torch.equal(ours["flattened_tensor"], theirs.get_flattened_tensor())


# ----------------------------------------------------------------------------- requests


def _normalised_image_data(image_data, batch_size, parallel_sample_num=1):
    fn = sgl_src.class_method("sglang/srt/managers/io_struct.py", "GenerateReqInput", "_normalize_image_data")
    obj = types.SimpleNamespace(image_data=image_data, batch_size=batch_size,
                                parallel_sample_num=parallel_sample_num, modalities=None)
    fn(obj, batch_size * parallel_sample_num)
    return obj


def test_generate_request_survives_sglangs_image_normalisation():
    """A batch whose first request is text-only: every image request must still reach SGLang as a list
    holding its one processor-output dict."""
    pv, grid = torch.randn(24, 1176), torch.tensor([[1, 4, 6]])
    reqs = [RolloutRequest([1, 2]), RolloutRequest([3, 4, 5], pv, grid), RolloutRequest([6]),
            RolloutRequest([7, 8], pv * 2, grid)]
    kw = expand_requests(reqs, 2, SamplingParams())
    obj = _normalised_image_data(kw["image_data"], len(kw["input_ids"]))
    assert len(obj.image_data) == 8
    for i, r in enumerate(reqs):
        for j in range(2):
            entry, modality = obj.image_data[2 * i + j], obj.modalities[2 * i + j]
            if r.pixel_values is None:
                assert modality is None and not entry
            else:
                assert modality == "image" and len(entry) == 1 and entry[0]["format"] == "processor_output"
                assert entry[0]["pixel_values"] is r.pixel_values
    # the shape the engine used to send (None first) is mangled by the same code: a list inside a list
    old = [None if not x else x for x in kw["image_data"]]
    assert isinstance(_normalised_image_data(old, 8).image_data[2][0], list)


def test_score_request_is_a_prefill_only_request_sglang_accepts():
    """old_logp_source=engine with SGLang: prompt + response in, no new tokens, input log-probs from the
    response on; images survive SGLang's normalisation; the result's ids are checked against the response."""
    from megatron_vppo.rollout.sglang_engine import parse_score_output, score_request

    pv, grid = torch.randn(24, 1176), torch.tensor([[1, 4, 6]])
    items = [(RolloutRequest([1, 2, 3]), [7, 8]), (RolloutRequest([4, 5], pv, grid), [9])]
    kw = score_request(items)
    assert kw["input_ids"] == [[1, 2, 3, 7, 8], [4, 5, 9]] and kw["logprob_start_len"] == [3, 2]
    assert all(p == {"max_new_tokens": 0} for p in kw["sampling_params"]) and kw["return_logprob"] is True
    obj = _normalised_image_data(kw["image_data"], 2)
    assert obj.modalities[0] is None and obj.image_data[1][0]["pixel_values"] is pv
    engine = sgl_src.method_params("sglang/srt/entrypoints/engine.py", "Engine")
    assert set(kw) <= set(engine["generate"]), set(kw) - set(engine["generate"])
    io = sgl_src.read("sglang/srt/managers/io_struct.py")
    assert "logprob_start_len: Optional[Union[List[int], int]]" in io  # a per-request list is allowed
    # SGLang's input_token_logprobs entries: (logprob, token_id, text), one per position from the start
    out = {"meta_info": {"input_token_logprobs": [(-0.5, 7, None), (-1.25, 8, None)]}}
    assert parse_score_output(out, [7, 8]) == [-0.5, -1.25]
    with pytest.raises(RuntimeError, match="do not cover"):
        parse_score_output(out, [7, 9])
    with pytest.raises(RuntimeError, match="do not cover"):
        parse_score_output({"meta_info": {"input_token_logprobs": [(None, 8, None)]}}, [8])


def test_sglang_scoring_refuses_a_temperature_it_does_not_apply():
    with pytest.raises(ValueError, match="rollout.temperature=1.0 or train.old_logp_source=trainer"):
        _engine().score([(RolloutRequest([1, 2]), [3])], temperature=0.7)


# ----------------------------------------------------------------------------- the engine's API


def test_calls_match_sglangs_declared_api():
    engine = sgl_src.method_params("sglang/srt/entrypoints/engine.py", "Engine")
    assert {"named_tensors", "load_format", "flush_cache"} <= set(engine["update_weights_from_tensor"])
    assert {"input_ids", "sampling_params", "image_data", "return_logprob"} <= set(engine["generate"])
    for name in ("begin_weight_update", "end_weight_update", "flush_cache", "release_memory_occupation",
                 "resume_memory_occupation", "shutdown"):
        assert name in engine, name
    # the server arguments SGLangRolloutEngine.launch passes
    fields = set()
    for f in sgl_src.FILES:
        if "/arg_groups/fields/" in f:
            tree = ast.parse(sgl_src.read(f))
            fields |= {n.target.id for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
                       for n in c.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    launched = {"model_path", "tp_size", "mem_fraction_static", "dtype", "base_gpu_id", "random_seed",
                "enable_memory_saver", "enable_weights_cpu_backup", "skip_tokenizer_init", "attention_backend"}
    assert launched <= fields, launched - fields
    # per-rank payloads: each scheduler rank deserializes the entry at its TP rank
    worker = sgl_src.read("sglang/srt/managers/tp_worker.py")
    assert "serialized_named_tensors[get_parallel().tp_rank]" in worker
    # the server engine's routes
    routes = set(re.findall(r'@app\.(?:post|api_route)\(\s*"(/[a-z_]+)"', sgl_src.read("sglang/srt/entrypoints/http_server.py")))
    assert {"/generate", "/begin_weight_update", "/end_weight_update", "/init_weights_update_group",
            "/update_weights_from_distributed", "/flush_cache", "/pause_generation", "/continue_generation",
            "/release_memory_occupation", "/resume_memory_occupation"} <= routes


def test_fp32_engines_get_triton_attention():
    assert engine_kwargs_for("float32", {})["attention_backend"] == "triton"
    assert engine_kwargs_for("float32", {"attention_backend": "torch_native"})["attention_backend"] == "torch_native"
    assert "attention_backend" not in engine_kwargs_for("bfloat16", {})


def test_mem_fraction_static_is_the_share_of_free_memory():
    gib = 2**30
    frac = mem_fraction_static(0.5, 80 * gib, 48 * gib)
    assert frac * 48 * gib == pytest.approx(0.5 * 80 * gib, rel=1e-3)  # SGLang's budget = fraction x free
    with pytest.raises(ValueError, match="engine_gpu_share.*only 30.0 GiB are free"):
        mem_fraction_static(0.5, 80 * gib, 30 * gib)
    with pytest.raises(ValueError, match="must be in"):
        mem_fraction_static(1.0, 80 * gib, 80 * gib)


def test_agent_store_is_cleared_for_sglangs_rendezvous(monkeypatch):
    """Under torchrun the env says an agent serves the store; SGLang's rendezvous must not believe it."""
    import importlib

    rdzv = importlib.import_module("torch.distributed.rendezvous")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert rdzv._torchelastic_use_agent_store()
    with without_agent_store():
        assert "TORCHELASTIC_USE_AGENT_STORE" not in os.environ and not rdzv._torchelastic_use_agent_store()
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"


# ----------------------------------------------------------------------------- protocol, one process


def _engine(tp=1, **kw):
    return SGLangRolloutEngine(RuleEngine(tp), tp_size=tp, serialize=_sglang_serializer(), bucket_bytes=256, **kw)


def test_update_is_one_session_and_generate_waits_for_weights_after_a_release():
    eng = _engine()
    src = _weights()
    eng.update_weights(iter_buckets(iter(src), 128))
    rule = eng._engine
    n_updates = rule.log.count("update")
    assert n_updates >= 3 and rule.log == ["begin"] + ["update"] * n_updates + ["end", "flush"]
    assert all(torch.equal(rule.loaded[0][n], t) for n, t in src) and eng.weight_version == 1
    req, sp = [RolloutRequest([1, 2])], SamplingParams(max_new_tokens=4)
    assert eng.generate(req, 1, sp)[0][0].token_ids == [5]
    eng.release_memory()
    with pytest.raises(RuntimeError, match="resume_memory"):
        eng.generate(req, 1, sp)
    eng.resume_memory()
    with pytest.raises(RuntimeError, match="weights were dropped.*update_weights"):
        eng.generate(req, 1, sp)
    eng.update_weights(iter(src))
    assert eng.generate(req, 1, sp)[0][0].token_ids == [5] and eng.weight_version == 2
    kept = _engine(weights_cpu_backup=True)
    kept.release_memory()
    kept.resume_memory()
    assert kept.generate(req, 1, sp)[0][0].token_ids == [5]


def test_a_failed_load_closes_the_session_and_marks_the_engine():
    eng = _engine()
    eng._engine.fail_on_call = 2
    with pytest.raises(RuntimeError, match="injected"):
        eng.update_weights(iter(_weights()))
    assert eng._engine.log[-1] == "end" and not eng._engine.session  # closed: the next begin works
    with pytest.raises(RuntimeError, match="failed midway"):
        eng.generate([RolloutRequest([1])], 1, SamplingParams())
    eng._engine.fail_on_call = None
    eng.update_weights(iter(_weights()))  # a complete update makes it usable again
    assert eng.generate([RolloutRequest([1])], 1, SamplingParams())[0][0].finish_reason == "stop"


# ----------------------------------------------------------------------------- protocol, TP 2 over gloo


def _tp_worker(rank, world_size, mode):
    """Rank 0 is the engine's first rank, rank 1 the trainer rank on the engine's second GPU. Each packs
    its own copy of the weights (offset by its rank, to see whose copy each engine rank loads)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    group = dist.new_group([0, 1], backend="gloo")
    src = _weights(offset=float(rank))
    if mode == "short" and rank == 1:
        src = src[:2]

    def stream():
        for i, item in enumerate(src):
            if mode == "raise" and rank == 1 and i == 3:
                raise ValueError("conversion failed on this rank")
            yield item

    out = {}
    try:
        if rank == 0:
            eng = SGLangRolloutEngine(RuleEngine(2), tp_size=2, weight_group=group, weight_src=0,
                                      serialize=_sglang_serializer(), bucket_bytes=64)
            try:
                eng.update_weights(stream())
            except RuntimeError as e:
                out["error"] = str(e)
            out["log"] = eng._engine.log
            out["loaded"] = eng._engine.loaded
            out["broken"] = eng._broken is not None
        else:
            peer = SGLangTPPeer(group, 0, bucket_bytes=64, serialize=_sglang_serializer())
            try:
                peer.update_weights(stream())
            except RuntimeError as e:
                out["error"] = str(e)
    finally:
        dist.destroy_process_group()
    return out


def _src_env() -> dict:
    return {"SGLANG_SRC": os.environ["SGLANG_SRC"]} if "SGLANG_SRC" in os.environ else {}


def test_each_engine_rank_loads_the_payload_from_its_own_gpu():
    from dist_helpers import run_distributed

    engine, peer = run_distributed(_tp_worker, 2, "ok", timeout=300, env=_src_env())
    assert "error" not in engine and "error" not in peer
    log = engine["log"]
    assert log[0] == "begin" and log[-2:] == ["end", "flush"] and log.count("begin") == 1
    for rank in (0, 1):
        for name, t in _weights(offset=float(rank)):
            assert torch.equal(engine["loaded"][rank][name], t), (rank, name)


@pytest.mark.parametrize("mode", ["raise", "short"])
def test_a_rank_whose_stream_breaks_fails_every_rank_without_a_hang(mode):
    from dist_helpers import run_distributed

    engine, peer = run_distributed(_tp_worker, 2, mode, timeout=300, env=_src_env())
    want = "engine TP rank 1: ValueError: conversion failed" if mode == "raise" else "ended early on engine TP ranks"
    assert want in engine["error"] and want in peer["error"]
    assert engine["broken"] and engine["log"][-1] == "end"  # the session was closed



def test_sglangs_torch_reduction_patch_is_scoped_to_serialization():
    """SGLang's producer-side patch breaks CPU tensor pickling process-wide; the engine applies it only
    while it serializes, so the trainer's own torch.multiprocessing users keep working."""
    import io
    from multiprocessing.reduction import ForkingPickler

    from megatron_vppo.rollout.sglang_engine import uuid_cuda_reductions
    from torch.multiprocessing import reductions

    patch = sgl_src.torch_reduction_patch()

    def pickle_cpu_tensor():
        ForkingPickler(io.BytesIO()).dump(torch.zeros(2))

    pickle_cpu_tensor()
    original = reductions.reduce_tensor
    with uuid_cuda_reductions(patch):
        assert reductions.reduce_tensor is not original
        with pytest.raises(IndexError):
            pickle_cpu_tensor()
    assert reductions.reduce_tensor is original and not hasattr(reductions, "_reduce_tensor_original")
    pickle_cpu_tensor()
    with uuid_cuda_reductions(patch):  # applies again after being undone
        assert reductions.reduce_tensor is not original
    assert reductions.reduce_tensor is original


# ----------------------------------------------------------------------------- banned tokens and log-probs


@pytest.mark.skipif(not sgl_src.available(sgl_src.LOGPROB_FILES), reason=sgl_src.SKIP_REASON)
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_logit_bias_leaves_the_banned_tokens_out_of_sglangs_log_probs_and_rescoring_is_the_convention(temperature):
    """SGLang's own ModelRunner._preprocess_logits and SamplingBatchInfo.apply_logits_bias add our banned
    tokens' -1e9 bias to the logits in place; its sampler then takes log-probs of those logits
    (layers/sampler.py: greedy `log_softmax(logits)`, else `logits.div_(temperatures)` then
    `log(softmax)`). So they differ from the convention by -log(1 - p_banned) on every allowed token;
    the engine's re-score (prefill, no bias, T = 1 / unscaled) is the convention."""
    from megatron_vppo.rollout.sglang_engine import (
        banned_logprob_rescore,
        to_sglang_sampling_params,
        with_scored_log_probs,
    )
    from megatron_vppo.rollout.engine import RolloutOutput

    mr, sbi = "sglang/srt/model_executor/model_runner.py", "sglang/srt/sampling/sampling_batch_info.py"
    sampler_src = sgl_src.read("sglang/srt/layers/sampler.py")
    for step in ("torch.argmax(logits, -1)", "logits.div_(sampling_info.temperatures)", "torch.log(probs)"):
        assert step in sampler_src, f"SGLang's sampler no longer has {step!r}: re-read layers/sampler.py"
    preprocess = sgl_src.class_method(mr, "ModelRunner", "_preprocess_logits")
    banned = (3, 7)
    sampling = SamplingParams(max_new_tokens=4, temperature=temperature, banned_token_ids=banned)
    bias_map = to_sglang_sampling_params(sampling)["logit_bias"]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 11, generator=g) * 2
    z[:, 3] += 3.0  # give the banned tokens real mass
    bias = torch.zeros_like(z)  # SamplingBatchInfo.from_schedule_batch: row i, column int(key) = value
    for i in range(z.shape[0]):
        for key, value in bias_map.items():
            bias[i, int(key)] = value
    info = types.SimpleNamespace(grammars=None, grammar_mask=None, acc_additive_penalties=None,
                                 acc_scaling_penalties=None, penalizer_orchestrator=None, logit_bias=bias)
    for m in ("update_regex_vocab_mask", "apply_logits_bias", "_apply_pre_grammar_logits_transforms",
              "_apply_post_grammar_logits_transforms"):
        setattr(info, m, types.MethodType(sgl_src.class_method(sbi, "SamplingBatchInfo", m), info))
    out = types.SimpleNamespace(next_token_logits=z.clone())
    preprocess(None, out, info)
    logits = out.next_token_logits
    if temperature == 0.0:  # greedy path
        sglang_lp = torch.log_softmax(logits, -1)
        convention = torch.log_softmax(z, -1)
    else:
        sglang_lp = torch.log(torch.softmax(logits / temperature, -1))
        convention = torch.log_softmax(z / temperature, -1)
    allowed = [t for t in range(z.shape[1]) if t not in banned]
    p_banned = convention.exp()[:, list(banned)].sum(-1, keepdim=True)
    assert p_banned.min() > 0.05
    shift = sglang_lp[:, allowed] - convention[:, allowed]
    torch.testing.assert_close(shift, (-torch.log1p(-p_banned)).expand_as(shift), rtol=1e-5, atol=1e-5)
    # the engine re-scores whenever tokens are banned; the prefill score (no bias) replaces the log-probs
    assert banned_logprob_rescore(sampling)
    assert not banned_logprob_rescore(SamplingParams(max_new_tokens=4, temperature=0.7))
    tokens = [[allowed[0], allowed[3]], [allowed[5]]]
    outputs = [[RolloutOutput(token_ids=tokens[0], log_probs=[float(sglang_lp[0, t]) for t in tokens[0]],
                              finish_reason="stop")],
               [RolloutOutput(token_ids=tokens[1], log_probs=[float(sglang_lp[1, t]) for t in tokens[1]],
                              finish_reason="length")]]
    scores = [[float(convention[0, t]) for t in tokens[0]], [float(convention[1, t]) for t in tokens[1]]]
    fixed = with_scored_log_probs(outputs, scores)
    assert [[o.token_ids for o in grp] for grp in fixed] == [[tokens[0]], [tokens[1]]]
    assert fixed[1][0].finish_reason == "length"
    assert fixed[0][0].log_probs == scores[0] and fixed[1][0].log_probs == scores[1]
    assert fixed[0][0].log_probs != outputs[0][0].log_probs
    with pytest.raises(RuntimeError, match="log-probs for"):
        with_scored_log_probs(outputs, [scores[0], scores[0]])


def test_banned_tokens_at_other_temperatures_are_refused_with_the_fix():
    from megatron_vppo.rollout.sglang_engine import banned_logprob_rescore

    with pytest.raises(ValueError, match=r"rollout\.temperature=1\.0, or rollout\.engine=vllm"):
        banned_logprob_rescore(SamplingParams(max_new_tokens=4, temperature=0.7, banned_token_ids=(3,)))


def test_update_names_are_checked_against_the_checkpoint_before_any_payload(tiny_model_dir):
    """SGLang's qwen2_5_vl load_weights `continue`s on a name it does not know: a renamed tensor would
    update nothing. The engine refuses such a manifest inside the first round, before the session."""
    from safetensors import safe_open

    from megatron_vppo.rollout.sglang_engine import checkpoint_names

    ckpt = {}
    for f in sorted(tiny_model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for n in h.keys():
                ckpt[n] = h.get_tensor(n)
    assert checkpoint_names(tiny_model_dir)
    good = [(n, tuple(t.shape), t.dtype) for n, t in ckpt.items()]
    first = next(iter(ckpt))
    renamed = [(n.replace("weight", "weigth") if n == first else n, s, d) for n, s, d in good]
    dropped = good[1:]
    for bad, words in ((renamed, "it does not have"), (dropped, "keep stale")):
        rule = RuleEngine(tp=1)
        eng = SGLangRolloutEngine(rule, serialize=_sglang_serializer(), model_dir=str(tiny_model_dir))
        stream = [(n.replace("weight", "weigth") if n == first and bad is renamed else n, t)
                  for n, t in ckpt.items() if bad is renamed or n != first]
        with pytest.raises(RuntimeError, match=words):
            eng.update_weights(iter(stream), expected=bad)
        assert rule.log == [] and eng._broken is None and eng.weight_version == 0  # nothing reached SGLang
    rule = RuleEngine(tp=1)
    eng = SGLangRolloutEngine(rule, serialize=_sglang_serializer(), model_dir=str(tiny_model_dir))
    eng.update_weights(iter(list(ckpt.items())), expected=good)
    assert rule.log[0] == "begin" and "end" in rule.log and eng.weight_version == 1
    assert set(rule.loaded[0]) == set(ckpt)
