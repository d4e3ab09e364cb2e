"""In-process rollout engine against transformers' own no-cache forward (the oracle).

The batch always mixes two images of different sizes with a text-only prompt, so prompts have
different lengths (left padding) and different M-RoPE deltas.
"""
import pytest
import torch
from safetensors.torch import load_file

from megatron_vppo.sync.buckets import iter_buckets
from megatron_vppo.rollout.engine import RolloutEngine, RolloutRequest, SamplingParams
from megatron_vppo.rollout.hf_engine import (
    HFRolloutEngine,
    canonical_param_name,
    sample_tokens,
    token_log_probs,
)

TOL = 1e-5


def _load(model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return _load(tiny_model_dir)


@pytest.fixture(scope="module")
def requests_(tiny_model_dir):
    from conftest import make_test_images
    from megatron_vppo.data.processor import VLProcessor

    proc = VLProcessor.from_pretrained(tiny_model_dir)
    a, b = make_test_images()
    encs = [
        proc.encode("How many red circles are in the image?", [a]),
        proc.encode("What is 3 + 4?"),
        proc.encode("<image> Find the area of the square.", [b]),
    ]
    reqs = [RolloutRequest(e["input_ids"].tolist(), e["pixel_values"], e["image_grid_thw"]) for e in encs]
    assert len({len(r.prompt_ids) for r in reqs}) == 3  # really left-padded
    assert reqs[0].image_grid_thw.tolist() != reqs[2].image_grid_thw.tolist()
    return reqs


SAMPLING = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_new_tokens=8, seed=11)


@torch.no_grad()
def _oracle_logits(model, req, response):
    """transformers' full forward, no cache; it computes M-RoPE itself from mm_token_type_ids."""
    ids = torch.tensor([list(req.prompt_ids) + list(response)])
    kw = {}
    if req.pixel_values is not None:
        kw = dict(pixel_values=req.pixel_values, image_grid_thw=req.image_grid_thw)
    mm = (ids == model.config.image_token_id).int()
    logits = model(input_ids=ids, mm_token_type_ids=mm, **kw).logits[0]
    p = len(req.prompt_ids)
    return logits[p - 1 : p - 1 + len(response)]


def test_engine_satisfies_protocol(hf_model):
    assert isinstance(HFRolloutEngine(hf_model), RolloutEngine)


def test_kv_cached_generation_matches_full_forward(hf_model, requests_):
    eng = HFRolloutEngine(hf_model, record_logits=True)
    outs = eng.generate(requests_, n=2, sampling=SAMPLING)
    assert [len(s) for s in outs] == [2, 2, 2]
    for req, samples in zip(requests_, outs):
        for o in samples:
            assert len(o.token_ids) == len(o.log_probs) == o.logits.shape[0] >= 1
            ref = _oracle_logits(hf_model, req, o.token_ids)
            assert (o.logits - ref).abs().max() <= TOL
            ref_lp = torch.log_softmax(ref / SAMPLING.temperature, -1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
            assert (torch.tensor(o.log_probs) - ref_lp).abs().max() <= TOL
    # the n samples of one request differ (own generators), the log-probs are real (< 0)
    assert outs[0][0].token_ids != outs[0][1].token_ids
    assert all(lp < 0 for s in outs for o in s for lp in o.log_probs)


def test_generated_log_probs_equal_rescore(hf_model, requests_):
    eng = HFRolloutEngine(hf_model)
    outs = eng.generate(requests_, n=2, sampling=SAMPLING)
    items = [(r, o.token_ids) for r, s in zip(requests_, outs) for o in s]
    scored = eng.score(items, temperature=SAMPLING.temperature)
    for (_, _), o, s in zip(items, [o for s in outs for o in s], scored):
        assert len(s) == len(o.log_probs)
        assert max(abs(a - b) for a, b in zip(s, o.log_probs)) <= TOL
    # micro-batched scoring gives the same numbers
    eng1 = HFRolloutEngine(hf_model, max_batch_size=1)
    scored1 = eng1.score(items, temperature=SAMPLING.temperature)
    for a, b in zip(scored, scored1):
        assert max(abs(x - y) for x, y in zip(a, b)) <= TOL


def test_seeded_reproducible_and_independent_of_batch(hf_model, requests_):
    eng = HFRolloutEngine(hf_model)
    a = eng.generate(requests_, 2, SAMPLING)
    b = eng.generate(requests_, 2, SAMPLING)
    assert [[o.token_ids for o in s] for s in a] == [[o.token_ids for o in s] for s in b]

    # explicit per-request seeds: each request alone, or one sequence at a time, gives the same samples
    seeded = [RolloutRequest(r.prompt_ids, r.pixel_values, r.image_grid_thw, seed=100 + i) for i, r in enumerate(requests_)]
    together = eng.generate(seeded, 2, SAMPLING)
    alone = [eng.generate([r], 2, SAMPLING)[0] for r in seeded]
    one_at_a_time = HFRolloutEngine(hf_model, max_batch_size=1).generate(seeded[::-1], 2, SAMPLING)[::-1]
    for t, al, one in zip(together, alone, one_at_a_time):
        assert [o.token_ids for o in t] == [o.token_ids for o in al] == [o.token_ids for o in one]
        for x, y in zip(t, al):
            assert max(abs(p - q) for p, q in zip(x.log_probs, y.log_probs)) <= TOL

    # default seeds follow the request index: a prefix of the batch keeps its samples
    prefix = eng.generate(requests_[:2], 2, SAMPLING)
    assert [[o.token_ids for o in s] for s in prefix] == [[o.token_ids for o in s] for s in a[:2]]
    other = eng.generate(requests_, 2, SamplingParams(**{**SAMPLING.__dict__, "seed": 12}))
    assert [[o.token_ids for o in s] for s in other] != [[o.token_ids for o in s] for s in a]


def test_stop_and_length(hf_model, requests_):
    eng = HFRolloutEngine(hf_model)
    sp = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    free = eng.generate(requests_, 1, sp)
    assert all(s[0].finish_reason == "length" and len(s[0].token_ids) == 6 for s in free)
    stop = free[0][0].token_ids[2]
    stopped = eng.generate(requests_, 1, SamplingParams(**{**sp.__dict__, "stop_token_ids": (stop,)}))
    o = stopped[0][0]
    first = free[0][0].token_ids.index(stop)
    assert o.finish_reason == "stop" and o.token_ids == free[0][0].token_ids[: first + 1]
    assert o.token_ids[-1] == stop and len(o.log_probs) == len(o.token_ids)
    # the other rows are unaffected by row 0 leaving the batch early (or stop where they hit it)
    for s_free, s_stop in zip(free[1:], stopped[1:]):
        t = s_free[0].token_ids
        cut = t.index(stop) + 1 if stop in t else len(t)
        assert s_stop[0].token_ids == t[:cut]


def test_greedy_and_top_k_one(hf_model, requests_):
    eng = HFRolloutEngine(hf_model, record_logits=True)
    greedy = eng.generate(requests_, 1, SamplingParams(temperature=0.0, max_new_tokens=5))
    for s in greedy:
        o = s[0]
        assert o.token_ids == o.logits.argmax(-1).tolist()
        lp = torch.log_softmax(o.logits, -1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
        assert (lp - torch.tensor(o.log_probs)).abs().max() <= TOL
    topk1 = eng.generate(requests_, 2, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=5, seed=5))
    assert all(o.token_ids == g[0].token_ids for s, g in zip(topk1, greedy) for o in s)


def test_sampling_filters_pure():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    top3 = logits.topk(3, dim=-1).indices
    for u in torch.linspace(0.0, 0.999999, 41):
        tok = sample_tokens(logits, SamplingParams(top_k=3), torch.full((4,), float(u)))
        assert all(tok[i] in top3[i] for i in range(4))
    # top_p: the kept set is the smallest prefix reaching p
    probs = torch.softmax(logits, -1)
    sp = SamplingParams(top_p=0.5)
    for i in range(4):
        sorted_p, order = probs[i].sort(descending=True)
        k = int((sorted_p.cumsum(0) < 0.5).sum()) + 1
        allowed = set(order[:k].tolist())
        for u in torch.linspace(0.0, 0.999999, 41):
            tok = sample_tokens(logits[i : i + 1], sp, torch.tensor([float(u)]))
            assert int(tok) in allowed
    # log-probs are of the temperature-scaled, unfiltered softmax
    tok = torch.tensor([1, 2, 3, 4])
    lp = token_log_probs(logits, tok, 0.7)
    ref = torch.log_softmax(logits / 0.7, -1)[torch.arange(4), tok]
    assert torch.allclose(lp, ref)


def test_name_spellings():
    assert canonical_param_name("model.layers.0.mlp.up_proj.weight") == "model.language_model.layers.0.mlp.up_proj.weight"
    assert canonical_param_name("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert canonical_param_name("visual.blocks.1.attn.qkv.bias") == "model.visual.blocks.1.attn.qkv.bias"
    assert canonical_param_name("model.visual.merger.mlp.0.weight") == "model.visual.merger.mlp.0.weight"
    assert canonical_param_name("lm_head.weight") == "lm_head.weight"


# ----------------------------------------------------------------------------- weight updates


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir_seed1):
    return tiny_model_dir_seed1


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spelling", ["checkpoint", "modules", "buckets_1KiB", "buckets_1MiB", "one_bucket"])
def test_update_weights_in_place_equals_loaded_model(tiny_model_dir, other_model_dir, requests_, spelling):
    engine = HFRolloutEngine(_load(tiny_model_dir))
    target = _load(other_model_dir)
    ptrs = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    before = engine.score([(requests_[0], [5, 6, 7])])[0]

    if spelling == "modules":  # transformers 5.x module names
        stream = [(n, p.detach().clone()) for n, p in target.named_parameters()]
    else:  # transformers 4.x / checkpoint names, as save_pretrained writes them
        stream = list(load_file(str(other_model_dir / "model.safetensors")).items())
        assert any(n.startswith("visual.") for n, _ in stream)
        bound = {"buckets_1KiB": 1024, "buckets_1MiB": 1 << 20, "one_bucket": None}.get(spelling, "pairs")
        if bound != "pairs":
            stream = list(iter_buckets(stream, bound))
    engine.update_weights(iter(stream))

    assert engine.weight_version == 1
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == ptrs  # in place
    for (n, p), (n2, q) in zip(engine.model.named_parameters(), target.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    after = engine.score([(r, [5, 6, 7]) for r in requests_])
    eng_t = HFRolloutEngine(target)
    ref = eng_t.score([(r, [5, 6, 7]) for r in requests_])
    assert after == ref and after[0] != before
    g1 = engine.generate(requests_, 1, SAMPLING)
    g2 = eng_t.generate(requests_, 1, SAMPLING)
    assert [s[0].token_ids for s in g1] == [s[0].token_ids for s in g2]


def test_failed_update_keeps_previous_weights(tiny_model_dir, other_model_dir):
    engine = HFRolloutEngine(_load(tiny_model_dir))
    snap = _snapshot(engine.model)
    new = list(load_file(str(other_model_dir / "model.safetensors")).items())

    def broken_stream():
        for i, item in enumerate(new):
            if i == len(new) // 2:
                raise RuntimeError("trainer died mid-export")
            yield item

    with pytest.raises(RuntimeError, match="mid-export"):
        engine.update_weights(broken_stream())
    assert _same_weights(engine.model, snap) and engine.weight_version == 0

    # a bad tensor late in the stream: rejected before anything is written
    bad = new[:-1] + [(new[-1][0], torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights(bad)
    with pytest.raises(KeyError, match="not a parameter"):
        engine.update_weights(new[:5] + [("model.layers.99.mlp.up_proj.weight", new[0][1])])
    with pytest.raises(ValueError, match="without"):
        engine.update_weights(new[:-3])  # incomplete
    assert _same_weights(engine.model, snap) and engine.weight_version == 0

    engine.update_weights(new[:3], require_complete=False)  # explicit partial update
    assert engine.weight_version == 1
    assert torch.equal(dict(engine.model.named_parameters())[canonical_param_name(new[0][0])], new[0][1])


def test_tied_embeddings(tiny_model_dir_tied):
    engine = HFRolloutEngine(_load(tiny_model_dir_tied))
    sd = load_file(str(tiny_model_dir_tied / "model.safetensors"))
    new = [(k, v + 0.01) for k, v in sd.items()]
    names = {k for k, _ in new}
    engine.update_weights(new)  # with or without lm_head.weight in the file, one tensor feeds both
    emb = engine.model.model.language_model.embed_tokens.weight
    assert engine.model.lm_head.weight.data_ptr() == emb.data_ptr()
    assert torch.equal(emb, dict(new)["model.embed_tokens.weight"])
    if "lm_head.weight" not in names:
        conflicting = new + [("lm_head.weight", dict(new)["model.embed_tokens.weight"] + 1.0)]
        with pytest.raises(ValueError, match="tied"):
            engine.update_weights(conflicting)
        assert engine.weight_version == 1


def test_release_and_resume(hf_model, requests_):
    eng = HFRolloutEngine(hf_model)
    eng.release_memory()
    with pytest.raises(RuntimeError, match="resume_memory"):
        eng.generate(requests_, 1, SAMPLING)
    eng.resume_memory()
    assert len(eng.generate(requests_[:1], 1, SAMPLING)) == 1


def test_bad_requests(hf_model, requests_):
    eng = HFRolloutEngine(hf_model)
    r = requests_[0]
    no_pads = [t for t in r.prompt_ids if t != hf_model.config.image_token_id]
    with pytest.raises(ValueError, match="image_pad"):
        eng.generate([RolloutRequest(no_pads, r.pixel_values, r.image_grid_thw)], 1, SAMPLING)
    with pytest.raises(ValueError, match="both"):
        RolloutRequest([1, 2], r.pixel_values, None)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU fallback path needs CUDA")
def test_gpu_fallback_matches_cpu(tiny_model_dir, requests_):
    cpu = HFRolloutEngine.from_pretrained(tiny_model_dir, device="cpu")
    gpu = HFRolloutEngine.from_pretrained(tiny_model_dir, device="cuda")
    a = cpu.generate(requests_, 2, SAMPLING)
    b = gpu.generate(requests_, 2, SAMPLING)
    assert [len(s) for s in a] == [len(s) for s in b] == [2] * len(requests_)
    for s1, s2 in zip(a, b):
        for x, y in zip(s1, s2):
            # same seeds, same model: the same tokens first (log-probs of different tokens say nothing)
            assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
            assert len(x.log_probs) == len(y.log_probs) == len(x.token_ids)
            assert max(abs(p - q) for p, q in zip(x.log_probs, y.log_probs)) < 1e-3
    gpu.release_memory()
    assert next(gpu.model.parameters()).device.type == "cpu"
    gpu.resume_memory()
    assert next(gpu.model.parameters()).device.type == "cuda"


def test_banned_tokens_never_sampled_and_log_probs_unchanged(hf_model, requests_):
    """Banning the multimodal tokens removes them from sampling only; the reported log-probs are
    still those of the full softmax, so a trainer re-score agrees."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=g)
    favourite = logits.argmax(-1)
    banned = SamplingParams(temperature=0.0, banned_token_ids=tuple(favourite.tolist()))
    tok = sample_tokens(logits, banned, None)
    assert not any(int(t) in set(favourite.tolist()) for t in tok)
    for u in torch.linspace(0.0, 0.999999, 21):
        s = sample_tokens(logits, SamplingParams(banned_token_ids=(int(favourite[0]),)), torch.full((3,), float(u)))
        assert int(s[0]) != int(favourite[0])

    eng = HFRolloutEngine(hf_model, record_logits=True)
    image_pad = int(hf_model.config.image_token_id)
    sp = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3, banned_token_ids=(image_pad,))
    for samples in eng.generate(requests_, 2, sp):
        for o in samples:
            assert image_pad not in o.token_ids
            ref = torch.log_softmax(o.logits, -1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
            assert (ref - torch.tensor(o.log_probs)).abs().max() <= TOL


# ----------------------------------------------------------------------------- in-place updates


def _manifest(stream):
    return [(n, tuple(t.shape), t.dtype) for n, t in stream]


@pytest.mark.parametrize("form", ["pairs", "buckets_1KiB"])
def test_in_place_update_equals_loaded_model(tiny_model_dir, other_model_dir, requests_, form):
    engine = HFRolloutEngine(_load(tiny_model_dir))
    target = _load(other_model_dir)
    ptrs = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    new = list(load_file(str(other_model_dir / "model.safetensors")).items())
    stream = new if form == "pairs" else list(iter_buckets(new, 1024))
    engine.update_weights(iter(stream), mode="in_place", expected=_manifest(new))

    assert engine.weight_version == 1
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == ptrs  # same storage
    for (n, p), (n2, q) in zip(engine.model.named_parameters(), target.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    eng_t = HFRolloutEngine(target)
    items = [(r, [5, 6, 7]) for r in requests_]
    assert engine.score(items) == eng_t.score(items)
    g1, g2 = engine.generate(requests_, 2, SAMPLING), eng_t.generate(requests_, 2, SAMPLING)
    assert [[s.token_ids for s in r] for r in g1] == [[s.token_ids for s in r] for r in g2]


def test_in_place_failure_marks_engine_unusable_until_complete_update(tiny_model_dir, other_model_dir, requests_):
    engine = HFRolloutEngine(_load(tiny_model_dir))
    old = list(load_file(str(tiny_model_dir / "model.safetensors")).items())
    new = list(load_file(str(other_model_dir / "model.safetensors")).items())
    manifest = _manifest(new)

    def broken_stream():
        for i, item in enumerate(new):
            if i == len(new) // 2:
                raise RuntimeError("trainer died mid-export")
            yield item

    with pytest.raises(RuntimeError, match="mid-export"):
        engine.update_weights(broken_stream(), mode="in_place", expected=manifest)
    assert engine.weight_version == 0
    for call in (lambda: engine.generate(requests_[:1], 1, SAMPLING), lambda: engine.score([(requests_[0], [5])])):
        with pytest.raises(RuntimeError, match=r"incomplete.*to version 1.*mid-export.*complete update_weights"):
            call()

    # a later update that also falls short keeps it unusable, naming the new failure
    with pytest.raises(ValueError, match="ended after"):
        engine.update_weights(iter(old[:-2]), mode="in_place", expected=_manifest(old))
    with pytest.raises(RuntimeError, match="ended after"):
        engine.generate(requests_[:1], 1, SAMPLING)
    # so does a partial update, which cannot make the weights complete
    engine.update_weights(old[:3], mode="in_place", expected=_manifest(old[:3]), require_complete=False)
    with pytest.raises(RuntimeError, match="incomplete"):
        engine.generate(requests_[:1], 1, SAMPLING)

    # a complete update restores it: the engine equals a model loaded with those weights
    engine.update_weights(iter(old), mode="in_place", expected=_manifest(old))
    assert engine.weight_version == 2
    ref = HFRolloutEngine(_load(tiny_model_dir))
    items = [(r, [5, 6, 7]) for r in requests_]
    assert engine.score(items) == ref.score(items)
    # a complete staged update restores it too
    with pytest.raises(RuntimeError):
        engine.update_weights(broken_stream(), mode="in_place", expected=manifest)
    engine.update_weights(new, mode="staged")
    assert engine.weight_version == 3 and len(engine.generate(requests_[:1], 1, SAMPLING)) == 1


def test_in_place_manifest_mismatch_rejected_before_any_copy(tiny_model_dir, other_model_dir, requests_):
    engine = HFRolloutEngine(_load(tiny_model_dir))
    snap = _snapshot(engine.model)
    new = list(load_file(str(other_model_dir / "model.safetensors")).items())
    manifest = _manifest(new)

    def run(man, stream=new):
        engine.update_weights(iter(stream), mode="in_place", expected=man)

    with pytest.raises(KeyError, match="not a parameter"):
        run(manifest + [("model.layers.99.mlp.up_proj.weight", manifest[0][1], torch.float32)])
    with pytest.raises(ValueError, match="shape"):
        run(manifest[:-1] + [(manifest[-1][0], (3, 3), manifest[-1][2])])
    with pytest.raises(TypeError, match="dtype"):
        run(manifest[:-1] + [(manifest[-1][0], manifest[-1][1], torch.int64)])
    with pytest.raises(ValueError, match="without"):
        run(manifest[:-3])  # the manifest does not cover the model
    with pytest.raises(ValueError, match="twice"):
        run(manifest + manifest[:1])
    with pytest.raises(ValueError, match="manifest"):
        engine.update_weights(iter(new), mode="in_place")  # no manifest at all
    assert _same_weights(engine.model, snap) and engine.weight_version == 0
    assert len(engine.generate(requests_[:1], 1, SAMPLING)) == 1  # still usable

    # the stream itself deviating from its manifest (a late tensor of another shape) is caught before
    # that tensor is copied, but earlier ones were: the engine is marked unusable
    lying = new[:-1] + [(new[-1][0], torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="announced"):
        run(manifest, lying)
    with pytest.raises(RuntimeError, match="incomplete"):
        engine.generate(requests_[:1], 1, SAMPLING)


def test_in_place_tied_embeddings(tiny_model_dir_tied):
    engine = HFRolloutEngine(_load(tiny_model_dir_tied))
    emb = engine.model.model.language_model.embed_tokens.weight
    sd = load_file(str(tiny_model_dir_tied / "model.safetensors"))
    new = [(k, v + 0.01) for k, v in sd.items()]
    engine.update_weights(new, mode="in_place", expected=_manifest(new))
    assert engine.model.lm_head.weight.data_ptr() == emb.data_ptr()
    assert torch.equal(emb, dict(new)["model.embed_tokens.weight"]) and engine.weight_version == 1
    if "lm_head.weight" not in sd:
        conflicting = new + [("lm_head.weight", dict(new)["model.embed_tokens.weight"] + 1.0)]
        with pytest.raises(ValueError, match="tied"):
            engine.update_weights(conflicting, mode="in_place", expected=_manifest(conflicting))
        assert engine.weight_version == 1
