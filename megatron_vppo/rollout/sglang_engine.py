"""SGLang rollout engine (GPU), written against SGLang 0.5.23's source; imported lazily.

One deployment (docs/sglang.md has the protocol in full):

* `SGLangRolloutEngine` — colocated: an `sglang.Engine` on every `rollout.engine_tp` consecutive GPUs
  (so every GPU hosts an engine TP rank), started by the engine's first trainer rank. Each update is one
  weight-update session (`begin_weight_update` ... `end_weight_update`, required since 0.5.21) of
  flattened-bucket calls to `update_weights_from_tensor`, one serialized payload per engine TP rank,
  each packed on that rank's GPU by the trainer rank sharing it (`sglang_weights.py`;
  `SGLangTPPeer` is that rank's side). `release_memory_occupation` / `resume_memory_occupation` hand
  weights and KV cache to the trainer between rollouts; without `enable_weights_cpu_backup` the
  weights are gone after a release, so `generate` refuses until the next `update_weights`.
  (An HTTP client for separate `sglang.launch_server` servers existed that no config could select; it
  was deleted — disaggregated serving needs a launch recipe and a weight-update group first.)

Everything that does not need SGLang (sampling-parameter mapping, request translation, output
parsing, payload layout, the round protocol) is a plain
function tested on CPU, against SGLang's own code where it loads on CPU (tests/sglang_source.py).

Differences from the in-process engine worth knowing:
  * SGLang stops at the model's EOS ids (generation_config) in addition to `stop_token_ids`; pass
    them explicitly so both engines agree.
  * Per-sample seeds need `sampling_seed` (and `enable_deterministic_inference` for bitwise
    reproducibility); enable `use_sampling_seed`.
  * Log-prob convention: ours is the temperature-scaled, unfiltered softmax (engine.py). SGLang
    returns the temperature-scaled one unless SGLANG_RETURN_ORIGINAL_LOGPROB is set, but after its
    `logit_bias` (our banned tokens): normalised without them. With banned tokens the colocated
    engine therefore replaces the sampling log-probs by a prefill-only score of the sampled
    responses (no bias: the full vocabulary), which is the convention at T = 1 (and T = 0, greedy:
    unscaled); other temperatures with banned tokens are refused (SGLang scores at T = 1 only).
  * Names: before the first update, the stream's manifest is checked against the tensor names of
    the checkpoint the engine loaded (SGLang's qwen2_5_vl `load_weights` skips a name it does not
    know without a word); a mismatch is refused before any payload is sent.
  * fp32 engines use `attention_backend="triton"` (FlashAttention 3 has no fp32 kernels).
  * An update that fails midway cannot be rolled back inside SGLang: the session is closed, and the
    engine marks itself unusable (`generate` raises) until a later complete update succeeds.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from megatron_vppo.sync.buckets import DEFAULT_BUCKET_BYTES, WeightStream
from megatron_vppo.rollout.engine_args import refuse_engine_args
from megatron_vppo.rollout.sglang_weights import engine_groups, mem_fraction_static, min_free_bytes
from megatron_vppo.rollout.sglang_weights import contributions, run_rounds
from megatron_vppo.rollout.engine import (
    Manifest,
    RolloutOutput,
    RolloutRequest,
    SamplingParams,
    request_seed,
    sample_seed,
)


def _import_sglang():
    try:
        import sglang  # noqa: F401
    except ImportError as e:  # pragma: no cover - GPU-only dependency
        raise ImportError(
            "the SGLang rollout engine needs `sglang` 0.5.x (a CUDA build): pip install -e .[gpu]; "
            "on CPU use rollout.engine=hf"
        ) from e
    return sglang


# ----------------------------------------------------------------------------- pure translation


def to_sglang_sampling_params(
    sampling: SamplingParams, *, seed: int | None = None, use_sampling_seed: bool = False
) -> dict:
    """Our SamplingParams -> SGLang's per-request `sampling_params` dict."""
    d = {
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "top_k": int(sampling.top_k) if sampling.top_k and sampling.top_k > 0 else -1,
        "max_new_tokens": int(sampling.max_new_tokens),
        "stop_token_ids": list(sampling.stop_token_ids),
        # keep special tokens and the stop token itself: the trainer needs exact ids
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if sampling.banned_token_ids:
        # SGLang's SamplingParams.logit_bias (token id string -> bias added to the logits). SGLang adds
        # it BEFORE its sampler takes log-probs (ModelRunner._preprocess_logits ->
        # SamplingBatchInfo.apply_logits_bias, then layers/sampler.py), so the sampling log-probs are
        # normalised without the banned tokens; SGLangRolloutEngine.generate re-scores them
        # (banned_logprob_rescore) to get the project's full-vocabulary convention back.
        d["logit_bias"] = {str(t): -1.0e9 for t in sampling.banned_token_ids}
    if use_sampling_seed and seed is not None:
        d["sampling_seed"] = int(seed) & 0x7FFFFFFF
    return d


def to_sglang_image_data(request: RolloutRequest) -> list[dict]:
    """This request's images in SGLang's "processor_output" format (input_ids already hold the
    expanded <|image_pad|> runs, which is what that format expects); [] for a text-only request.

    Always a list, never None: `GenerateReqInput._normalize_image_data` decides from the FIRST
    entry whether the batch is a list of per-request lists, so a leading None would make it wrap
    every later request's list once more."""
    if request.pixel_values is None:
        return []
    return [
        {
            "format": "processor_output",
            "pixel_values": request.pixel_values,
            "image_grid_thw": request.image_grid_thw.reshape(-1, 3),
        }
    ]


def expand_requests(
    requests: Sequence[RolloutRequest], n: int, sampling: SamplingParams, use_sampling_seed: bool = False
) -> dict:
    """One SGLang sub-request per (request, sample), request-major, so sample j of request r is
    entry r * n + j. Returns the keyword arguments of `Engine.generate`."""
    input_ids, image_data, params = [], [], []
    for i, r in enumerate(requests):
        rs = request_seed(r, i)
        for j in range(n):
            input_ids.append(list(r.prompt_ids))
            image_data.append(to_sglang_image_data(r))
            params.append(
                to_sglang_sampling_params(
                    sampling, seed=sample_seed(sampling.seed, rs, j), use_sampling_seed=use_sampling_seed
                )
            )
    kwargs: dict[str, Any] = dict(input_ids=input_ids, sampling_params=params, return_logprob=True)
    if any(image_data):
        kwargs["image_data"] = image_data
    return kwargs


def score_request(items: Sequence[tuple[RolloutRequest, Sequence[int]]]) -> dict:
    """`Engine.generate` keyword arguments that score given responses: prompt + response as the input,
    no new tokens (SGLang's prefill-only path), log-probs of the input from the response onward."""
    input_ids, image_data, starts = [], [], []
    for req, resp in items:
        input_ids.append(list(req.prompt_ids) + list(resp))
        image_data.append(to_sglang_image_data(req))
        starts.append(len(req.prompt_ids))
    kwargs: dict[str, Any] = dict(input_ids=input_ids, sampling_params=[{"max_new_tokens": 0}] * len(items),
                                  return_logprob=True, logprob_start_len=starts)
    if any(image_data):
        kwargs["image_data"] = image_data
    return kwargs


def parse_score_output(out: dict, response: Sequence[int]) -> list[float]:
    """The response tokens' log-probs from one prefill-only result's `input_token_logprobs`
    ((logprob, token_id, text) per input position from logprob_start_len on); the ids must match."""
    entries = (out.get("meta_info") or {}).get("input_token_logprobs") or []
    tail = entries[len(entries) - len(response):] if response else []
    if len(tail) != len(response) or [int(e[1]) for e in tail] != [int(t) for t in response] or \
            any(e[0] is None for e in tail):
        raise RuntimeError(f"SGLang returned {len(entries)} input log-probs that do not cover the {len(response)} "
                           f"response tokens (was logprob_start_len honoured?)")
    return [float(e[0]) for e in tail]


def parse_sglang_output(out: dict) -> RolloutOutput:
    """One SGLang result dict -> RolloutOutput (ids and log-probs from meta_info)."""
    meta = out.get("meta_info", {})
    fr = meta.get("finish_reason")
    kind = fr.get("type") if isinstance(fr, dict) else fr
    if kind not in ("stop", "length"):
        raise RuntimeError(f"SGLang request did not finish normally (finish_reason={fr!r}): {out.get('text', '')[:200]!r}")
    entries = meta.get("output_token_logprobs") or []
    ids = [int(e[1]) for e in entries]
    logps = [float(e[0]) for e in entries]
    if "output_ids" in out and list(out["output_ids"]) != ids:
        raise RuntimeError("SGLang output_ids and output_token_logprobs disagree; is return_logprob on?")
    return RolloutOutput(token_ids=ids, log_probs=logps, finish_reason=kind)


def group_outputs(flat: Sequence[dict], num_requests: int, n: int) -> list[list[RolloutOutput]]:
    if len(flat) != num_requests * n:
        raise RuntimeError(f"SGLang returned {len(flat)} results for {num_requests} x {n} samples")
    parsed = [parse_sglang_output(o) for o in flat]
    return [parsed[r * n : (r + 1) * n] for r in range(num_requests)]


def banned_logprob_rescore(sampling: SamplingParams) -> bool:
    """Whether this call's sampling log-probs must be re-scored: SGLang normalises them without the
    banned tokens (their logit_bias is applied first). Its prefill scoring has no bias and no
    temperature, i.e. the convention at T = 1 and at T = 0 (greedy: unscaled log-probs)."""
    if not sampling.banned_token_ids:
        return False
    if sampling.temperature not in (0.0, 1.0):
        raise ValueError(
            f"rollout.temperature={sampling.temperature} with banned tokens: SGLang applies their logit_bias before "
            "it takes log-probs and scores prompts at temperature 1 only, so its log-probs would miss the banned "
            "tokens' share of the normaliser; use rollout.temperature=1.0, or rollout.engine=vllm / hf")
    return True


def with_scored_log_probs(outputs: list[list[RolloutOutput]], scores: Sequence[Sequence[float]]
                          ) -> list[list[RolloutOutput]]:
    """`outputs` (request-major) with each sample's log-probs replaced by its prefill score."""
    flat = [o for group in outputs for o in group]
    if len(scores) != len(flat):
        raise RuntimeError(f"{len(scores)} scores for {len(flat)} samples")
    it = iter(scores)
    out = []
    for group in outputs:
        row = []
        for o in group:
            lp = [float(x) for x in next(it)]
            if len(lp) != len(o.token_ids):
                raise RuntimeError(f"a re-scored sample has {len(lp)} log-probs for {len(o.token_ids)} tokens")
            row.append(RolloutOutput(token_ids=o.token_ids, log_probs=lp, finish_reason=o.finish_reason))
        out.append(row)
    return out


def checkpoint_names(model_dir) -> set[str]:
    """The tensor names (transformers' parameter spelling) of the HF checkpoint in `model_dir`."""
    from safetensors import safe_open

    from megatron_vppo.models import spec_for_hf_config

    model_dir = Path(model_dir)
    spec = spec_for_hf_config(json.loads((model_dir / "config.json").read_text()))
    names = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names.update(spec.engine_param_name(n) for n in h.keys())
    if not names:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights to check the update's names against")
    return names


def check_manifest_names(manifest_names: Sequence[str], ckpt: set[str], engine_name) -> None:
    """Refuse an update whose names differ from the checkpoint the engine loaded (both in
    transformers' spelling via `engine_name`): SGLang's loader skips unknown names silently, and a
    checkpoint tensor the stream lacks would stay stale. A tied lm_head may come or not."""
    got = {engine_name(n) for n in manifest_names}
    optional = {"lm_head.weight"} if "lm_head.weight" not in ckpt else set()
    unknown = sorted(got - ckpt - optional)
    missing = sorted(ckpt - got)
    if unknown or missing:
        raise ValueError(
            f"the weight update does not match the SGLang engine's checkpoint: {len(unknown)} name(s) it does not "
            f"have (SGLang would skip them silently), e.g. {unknown[:3]}, and {len(missing)} it would keep stale, "
            f"e.g. {missing[:3]}; is model.path the model being trained? (nothing was sent to the engine)")


# ----------------------------------------------------------------------------- process environment

AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


@contextlib.contextmanager
def without_agent_store():
    """torchrun's c10d rendezvous exports TORCHELASTIC_USE_AGENT_STORE=True, telling torch
    (<= 2.13, `rendezvous._create_c10d_store`) that its agent serves the TCP store. SGLang's
    scheduler processes and the weight-update group rendezvous on stores of their own, which would
    then all be clients waiting for a server nobody runs. Cleared while they are created (child
    processes inherit the environment at spawn) and restored afterwards."""
    saved = os.environ.pop(AGENT_STORE_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[AGENT_STORE_ENV] = saved


# ----------------------------------------------------------------------------- colocated engine


def _check_result(res, what: str):
    """SGLang control calls answer (success, message), a dict with `success`, or an object with it."""
    if isinstance(res, tuple) and res and res[0] is False:
        raise RuntimeError(f"SGLang {what} failed: {res[1] if len(res) > 1 else res}")
    if isinstance(res, dict) and res.get("success") is False:
        raise RuntimeError(f"SGLang {what} failed: {res.get('message', res)}")
    if getattr(res, "success", None) is False:
        raise RuntimeError(f"SGLang {what} failed: {getattr(res, 'message', res)}")


@contextlib.contextmanager
def uuid_cuda_reductions(monkey_patch_torch_reductions: Callable[[], None]):
    """SGLang's producer-side torch reduction patch, only while payloads are serialized. It sends a CUDA
    tensor with its device UUID, which the receiving rank maps to its own device index; but it is
    process-wide and breaks every CPU tensor pickled by torch.multiprocessing afterwards (it rewrites a
    7th reduction argument CPU tensors do not have). SGLang calls it only in its own worker processes and
    in its producer helper, never in the Engine's host process, so undoing it here is safe."""
    from torch.multiprocessing import reductions

    was_patched = hasattr(reductions, "_reduce_tensor_original")
    monkey_patch_torch_reductions()
    try:
        yield
    finally:
        if not was_patched:
            reductions.reduce_tensor = reductions._reduce_tensor_original
            reductions.rebuild_cuda_tensor = reductions._rebuild_cuda_tensor_original
            del reductions._reduce_tensor_original, reductions._rebuild_cuda_tensor_original
            reductions.init_reductions()


def serialize_payload(payload: dict) -> bytes:
    """One flattened-bucket payload, serialized the way SGLang's own helper does it: under its torch
    reduction patch (`uuid_cuda_reductions`), by `MultiprocessingSerializer`, with the metadata as
    SGLang's `FlattenedTensorMetadata`, one of the few classes its `SafeUnpickler` lets through."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    metas = [m if isinstance(m, FlattenedTensorMetadata) else FlattenedTensorMetadata(**m) for m in payload["metadata"]]
    with uuid_cuda_reductions(monkey_patch_torch_reductions):
        return MultiprocessingSerializer.serialize({"flattened_tensor": payload["flattened_tensor"], "metadata": metas})


def run_in_session(begin: Callable[[], Any], end: Callable[[], Any], body: Callable[[], Any]) -> None:
    """SGLang >= 0.5.21 refuses weight loads outside a session: begin, the loads, end. The end runs
    even when a load failed (a session left open refuses the next begin); the load's error wins."""
    _check_result(begin(), "begin_weight_update")
    try:
        body()
    except BaseException:
        try:
            end()
        except Exception:  # noqa: BLE001 — the load's error is the one to report
            pass
        raise
    _check_result(end(), "end_weight_update")


_SGLANG_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _refuse_mode(mode: str | None, who: str) -> None:
    if mode is not None:
        raise ValueError(f"{who} updates from buckets in one SGLang session; update mode {mode!r} is for "
                         "in-process engines (leave mode unset)")


class SGLangRolloutEngine:
    """A colocated `sglang.Engine` (GPU); `launch` starts one. The engine object is passed in so the
    protocol (sessions, rounds, release/resume rules) runs the same against anything with its API.

    `weight_group` / `weight_src`: the gloo group of the trainer ranks whose GPUs host the engine's
    TP ranks (this rank first) and this rank's global rank; None for tp_size 1. The other members
    run `SGLangTPPeer`. `serialize`: how a payload becomes bytes (SGLang's serializer by default)."""

    in_process = False  # takes byte-bounded buckets
    tensor_parallel = True  # one engine spans rollout.engine_tp GPUs
    takes_pixel_values = True  # images go as processor_output (pixel_values + grid)
    reads = frozenset({"bucket_bytes", "engine_gpu_share", "engine_weights_cpu_backup", "engine_tp"})

    @classmethod
    def standalone(cls, model_dir, *, dtype: str = "fp32", seed: int = 0, device: str | None = None,
                   max_model_len: int | None = None, min_pixels: int | None = None,
                   max_pixels: int | None = None, max_batch_size: int = 16) -> "SGLangRolloutEngine":
        """An `sglang.Engine` on this process's GPU (LOCAL_RANK), no memory saver (nothing trains beside it)."""
        return cls.launch(str(model_dir), base_gpu_id=int(os.environ.get("LOCAL_RANK", 0)),
                          dtype=_SGLANG_DTYPE[dtype], random_seed=seed, enable_memory_saver=False,
                          mem_fraction_static=0.8)

    @staticmethod
    def check_engine_args(args: dict) -> None:
        refuse_engine_args("sglang", args)

    @classmethod
    def from_config(cls, cfg, model_dir, dims) -> "SGLangRolloutEngine | SGLangTPPeer | None":
        """The trainer's colocated engines (collective over every rank): one per `dims.engine_tp`
        consecutive ranks (`rollout.engine_tp`), so every GPU hosts an engine TP rank. On each engine's
        first rank an `sglang.Engine` whose TP ranks sit on the GPUs of its ranks; on the others an
        `SGLangTPPeer` (it packs the weight payload its GPU's engine rank reads). Its memory budget is `rollout.engine_gpu_share` of the GPU,
        turned into SGLang's mem_fraction_static from the memory free now, after the model and
        optimizer (docs/sglang.md). The weights are replaced by the trainer's before the first rollout,
        so model.path only seeds the architecture."""
        import logging

        from megatron_vppo.config import ConfigError

        device, tp = dims.device, dims.engine_tp
        if device.type != "cuda":
            raise ConfigError("rollout.engine=sglang needs a GPU; on CPU use rollout.engine=hf")
        first_gpu = device.index - dims.engine_tp_rank  # SGLang's base_gpu_id for this engine
        if first_gpu < 0 or first_gpu + tp > torch.cuda.device_count():  # same verdict on every rank
            raise ConfigError(f"rollout.engine_tp={tp}: the engine's ranks {dims.engine_ranks} do not sit on GPUs "
                              f"{max(first_gpu, 0)}..{first_gpu + tp - 1} of one node, where the colocated "
                              "SGLang engine puts its TP ranks; keep rollout.engine_tp within a node's GPUs")
        group, src = engine_groups(dims)  # collective over every rank
        if src is None:
            return None
        try:  # the same inputs on every member, so every member refuses together
            frac = mem_fraction_static(cfg.rollout.engine_gpu_share,
                                       torch.cuda.get_device_properties(device).total_memory, min_free_bytes(group))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not dims.engine_rank:
            return SGLangTPPeer(group, src, cfg.rollout.bucket_bytes)
        logging.getLogger("megatron_vppo.train").info(
            "SGLang engine: TP %d from GPU %d, mem_fraction_static %.3f (engine_gpu_share %.2f)",
            tp, device.index, frac, cfg.rollout.engine_gpu_share)
        return cls.launch(
            str(model_dir),
            tp_size=tp,
            mem_fraction_static=frac,
            dtype=_SGLANG_DTYPE[cfg.model.dtype],
            base_gpu_id=device.index,
            random_seed=cfg.train.seed,
            enable_weights_cpu_backup=cfg.rollout.engine_weights_cpu_backup,
            bucket_bytes=cfg.rollout.bucket_bytes,
            weight_group=group,
            weight_src=src,
        )

    def __init__(
        self,
        engine,
        *,
        tp_size: int = 1,
        weights_cpu_backup: bool = False,
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
        use_sampling_seed: bool = False,
        weight_group=None,
        weight_src: int | None = None,
        serialize: Callable[[dict], bytes] | None = None,
        model_dir=None,
    ):
        if tp_size > 1 and weight_group is None:
            raise ValueError("SGLangRolloutEngine(tp_size > 1) needs weight_group: one payload per engine TP rank, "
                             "each from the trainer rank on that GPU (sglang_weights.engine_groups)")
        self._engine = engine
        self.tp_size = tp_size
        self.weights_cpu_backup = weights_cpu_backup
        self.bucket_bytes = bucket_bytes
        self.use_sampling_seed = use_sampling_seed
        self.weight_group = weight_group
        self.weight_src = weight_src
        self.serialize = serialize or serialize_payload
        self.weight_version = 0
        self._broken: str | None = None
        self._released = False
        self._weights_valid = True  # the checkpoint's weights, until a release drops them
        self.model_dir = model_dir  # the checkpoint the engine loaded: an update's names are checked against it
        self._checked_names: tuple | None = None

    @classmethod
    def launch(
        cls,
        model_path: str,
        *,
        tp_size: int = 1,
        mem_fraction_static: float = 0.5,
        dtype: str = "bfloat16",
        base_gpu_id: int = 0,
        random_seed: int = 0,
        enable_memory_saver: bool = True,
        enable_weights_cpu_backup: bool = False,
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
        use_sampling_seed: bool = False,
        weight_group=None,
        weight_src: int | None = None,
        **engine_kwargs,
    ) -> "SGLangRolloutEngine":
        """Start `sglang.Engine` (memory saver on by default: the trainer gets the GPU back between
        rollouts); `engine_kwargs` go to it verbatim (fp32 gets the triton attention backend unless
        given)."""
        sglang = _import_sglang()
        with without_agent_store():
            engine = sglang.Engine(
                model_path=str(model_path),
                tp_size=tp_size,
                mem_fraction_static=mem_fraction_static,
                dtype=dtype,
                base_gpu_id=base_gpu_id,
                random_seed=random_seed,
                enable_memory_saver=enable_memory_saver,
                enable_weights_cpu_backup=enable_weights_cpu_backup,
                skip_tokenizer_init=True,
                **engine_kwargs_for(dtype, engine_kwargs),
            )
        return cls(engine, tp_size=tp_size, weights_cpu_backup=enable_weights_cpu_backup, bucket_bytes=bucket_bytes,
                   use_sampling_seed=use_sampling_seed, weight_group=weight_group, weight_src=weight_src,
                   model_dir=str(model_path))

    def _check_usable(self) -> None:
        if self._broken:
            raise RuntimeError(self._broken)
        if self._released:
            raise RuntimeError("the SGLang engine's memory is released; call resume_memory() before generate")
        if not self._weights_valid:
            raise RuntimeError(
                "the SGLang engine's weights were dropped by release_memory (enable_weights_cpu_backup is off); "
                "call update_weights after resume_memory before generate")

    def generate(self, requests: Sequence[RolloutRequest], n: int, sampling: SamplingParams) -> list[list[RolloutOutput]]:
        self._check_usable()
        rescore = banned_logprob_rescore(sampling)
        kwargs = expand_requests(requests, n, sampling, self.use_sampling_seed)
        out = self._engine.generate(**kwargs)
        outputs = group_outputs(out if isinstance(out, list) else [out], len(requests), n)
        if rescore:  # SGLang's sampling log-probs exclude the banned tokens from the normaliser
            items = [(r, o.token_ids) for r, group in zip(requests, outputs) for o in group]
            outputs = with_scored_log_probs(outputs, self.score(items))
        return outputs

    def score(self, items: Sequence[tuple[RolloutRequest, Sequence[int]]], temperature: float = 1.0) -> list[list[float]]:
        """Prefill-only log-probs of given responses (old_logp_source=engine). SGLang 0.5.23 computes
        input log-probs from unscaled logits, which is the project's convention only at temperature 1."""
        self._check_usable()
        if temperature != 1.0:
            raise ValueError(f"SGLang scores prompts at temperature 1 only (asked {temperature}); with "
                             f"rollout.engine=sglang use rollout.temperature=1.0 or train.old_logp_source=trainer")
        if not items:
            return []
        out = self._engine.generate(**score_request(items))
        out = out if isinstance(out, list) else [out]
        if len(out) != len(items):
            raise RuntimeError(f"SGLang returned {len(out)} results for {len(items)} scoring requests")
        return [parse_score_output(o, resp) for o, (_, resp) in zip(out, items)]

    def update_weights(self, stream: WeightStream, *, mode: str | None = None,
                       expected: Manifest | None = None) -> None:
        """All engine TP ranks' payloads per bucket, in one session for the whole stream (collective
        over `weight_group`: every member calls this or `SGLangTPPeer.update_weights`). Everything that
        can fail here fails inside a round, so the peers hear of it instead of waiting in a gather.
        `expected` (the stream's manifest) is checked against the checkpoint's names before anything
        is sent, once per manifest: SGLang's loader skips a name it does not know without a word."""
        _refuse_mode(mode, "SGLangRolloutEngine")
        session = {"open": False}

        def apply(payloads: list[bytes]) -> None:
            if self._released:
                raise RuntimeError("the SGLang engine's memory is released; call resume_memory() before update_weights")
            if len(payloads) != self.tp_size:
                raise RuntimeError(f"{len(payloads)} payloads for {self.tp_size} engine TP ranks")
            if not session["open"]:  # inside the first round, so the TP peers hear of a refusal
                self._check_names(expected)
                _check_result(self._engine.begin_weight_update(), "begin_weight_update")
                session["open"] = True
            _check_result(self._engine.update_weights_from_tensor(
                named_tensors=payloads, load_format="flattened_bucket", flush_cache=False),
                "update_weights_from_tensor")

        rounds = contributions(stream, self.bucket_bytes, self.serialize)
        try:
            run_in_session(lambda: None, lambda: self._engine.end_weight_update() if session["open"] else None,
                           lambda: run_rounds(rounds, self.weight_group, self.weight_src, True, apply))
            if session["open"]:
                _check_result(self._engine.flush_cache(), "flush_cache")  # KV computed with the old weights
        except BaseException as e:
            if session["open"]:  # a refusal before the session changed nothing
                self._broken = (
                    f"SGLang weight update failed midway ({type(e).__name__}: {e}); the engine may hold a mix "
                    "of old and new weights and refuses to generate until a complete update succeeds")
            raise
        finally:
            _ipc_collect()  # our buckets' IPC blocks, now that the engine let go of them
        self._broken = None
        if session["open"]:  # an empty stream loads nothing and changes nothing
            self._weights_valid = True
            self.weight_version += 1

    def _check_names(self, expected: Manifest | None) -> None:
        """The manifest against the loaded checkpoint's names, once per manifest (module docstring)."""
        if expected is None or self.model_dir is None:
            return
        names = tuple(n for n, _, _ in expected)
        if names != self._checked_names:
            from megatron_vppo.models import spec_for_hf_config

            spec = spec_for_hf_config(json.loads((Path(self.model_dir) / "config.json").read_text()))
            check_manifest_names(names, checkpoint_names(self.model_dir), spec.engine_param_name)
            self._checked_names = names

    def release_memory(self) -> None:
        _check_result(self._engine.release_memory_occupation(), "release_memory_occupation")
        self._released = True
        self._weights_valid = self.weights_cpu_backup
        _peer_barrier(self.weight_group)

    def resume_memory(self) -> None:
        # The trainer's cached blocks go back to the driver first, on every GPU the engine uses
        # (the peers empty theirs before this barrier); SGLang re-maps its pages into that room.
        _empty_cache()
        _peer_barrier(self.weight_group)
        _check_result(self._engine.resume_memory_occupation(), "resume_memory_occupation")
        self._released = False

    def shutdown(self) -> None:
        self._engine.shutdown()


def _ipc_collect() -> None:
    if torch.cuda.is_available():
        torch.cuda.ipc_collect()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peer_barrier(group) -> None:
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group)


class SGLangTPPeer:
    """A trainer rank whose GPU hosts one of the colocated engine's TP ranks (not its first): it packs
    and serializes that rank's payloads, and empties its allocator cache before the engine resumes."""

    def __init__(self, weight_group, weight_src: int, bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
                 serialize: Callable[[dict], bytes] | None = None):
        self.weight_group = weight_group
        self.weight_src = weight_src
        self.bucket_bytes = bucket_bytes
        self.serialize = serialize or serialize_payload
        self.weight_version = 0

    in_process = False
    tensor_parallel = True
    takes_pixel_values = True  # images go as processor_output (pixel_values + grid)
    reads = frozenset({"bucket_bytes", "engine_gpu_share", "engine_weights_cpu_backup", "engine_tp"})

    @classmethod
    def standalone(cls, model_dir, *, dtype: str = "fp32", seed: int = 0, device: str | None = None,
                   max_model_len: int | None = None, min_pixels: int | None = None,
                   max_pixels: int | None = None, max_batch_size: int = 16):
        raise TypeError("SGLangTPPeer is a trainer rank's side of a colocated engine; use SGLangRolloutEngine.standalone")

    @staticmethod
    def check_engine_args(args: dict) -> None:
        refuse_engine_args("sglang", args)

    @classmethod
    def from_config(cls, cfg, model_dir, dims) -> "SGLangRolloutEngine | SGLangTPPeer | None":
        """Made by `SGLangRolloutEngine.from_config` on the engine's non-first TP ranks."""
        return SGLangRolloutEngine.from_config(cfg, model_dir, dims)

    def generate(self, requests: Sequence[RolloutRequest], n: int, sampling: SamplingParams) -> list[list[RolloutOutput]]:
        raise RuntimeError("an SGLang TP peer hosts no engine entry point; generate on the replica's engine rank "
                           "(ParallelDims.engine_rank)")

    def score(self, items: Sequence[tuple[RolloutRequest, Sequence[int]]], temperature: float = 1.0) -> list[list[float]]:
        raise RuntimeError("an SGLang TP peer hosts no engine entry point; score on the replica's engine rank "
                           "(ParallelDims.engine_rank)")

    def update_weights(self, stream: WeightStream, *, mode: str | None = None,
                       expected: Manifest | None = None) -> None:
        _refuse_mode(mode, "SGLangTPPeer")
        rounds = contributions(stream, self.bucket_bytes, self.serialize)
        try:
            run_rounds(rounds, self.weight_group, self.weight_src, False, None)
        finally:
            _ipc_collect()
        self.weight_version += 1

    def release_memory(self) -> None:
        _peer_barrier(self.weight_group)

    def resume_memory(self) -> None:
        _empty_cache()
        _peer_barrier(self.weight_group)

    def shutdown(self) -> None:
        """Nothing to stop: the engine rank's `shutdown` stops the SGLang processes on this GPU too."""


def engine_kwargs_for(dtype: str, engine_kwargs: dict) -> dict:
    """Settings the dtype forces: fp32 needs the triton attention backend (SGLang's default on
    Hopper, FlashAttention 3, has no fp32 kernels). An explicit choice is kept."""
    out = dict(engine_kwargs)
    if dtype in ("float32", "fp32") and "attention_backend" not in out:
        out["attention_backend"] = "triton"
    return out
