"""SGLang rollout engines (GPU), written against SGLang 0.5.x's documented API; imported lazily.

Two deployments:

* `SGLangRolloutEngine` — colocated: an `sglang.Engine` inside the trainer's process, sharing its
  GPU. Weights arrive as flattened buckets through `Engine.update_weights_from_tensor(...,
  load_format="flattened_bucket")` (CUDA IPC handles serialised with SGLang's
  `MultiprocessingSerializer`; no copy through the host). `release_memory_occupation` /
  `resume_memory_occupation` hand weights and KV cache back to the trainer between rollouts
  (needs `enable_memory_saver=True`).
* `SGLangServerEngine` — disaggregated: HTTP client for `python -m sglang.launch_server` servers.
  Weights travel over an NCCL group the trainer's rank 0 forms with every server rank
  (`/init_weights_update_group`); per bucket the trainer posts `/update_weights_from_distributed`
  with names/dtypes/shapes and broadcasts the tensors in that order. Generation is paused and the
  radix cache flushed around an update.

Everything that does not need SGLang (sampling-parameter mapping, request translation, output
parsing, bucket metadata, the trainer side of the NCCL group) is a plain function tested on CPU.

Differences from the in-process engine worth knowing:
  * SGLang stops at the model's EOS ids (generation_config) in addition to `stop_token_ids`; pass
    them explicitly so both engines agree.
  * Per-sample seeds need an SGLang build with the `sampling_seed` sampling parameter (and
    `enable_deterministic_inference` for bitwise reproducibility); enable `use_sampling_seed`.
  * Log-prob convention: ours is the temperature-scaled, unfiltered softmax (engine.py). SGLang
    0.5.x returns the temperature-scaled one unless SGLANG_RETURN_ORIGINAL_LOGPROB is set; this
    has not been verified on a GPU at T != 1 — check it with the trainer's consistency gate.
  * An update that fails midway cannot be rolled back inside SGLang: the engine marks itself
    unusable (`generate` raises) until a later complete update succeeds.
"""
from __future__ import annotations

import concurrent.futures
import json
import urllib.request
from datetime import timedelta
from typing import Any, Iterable, Iterator, Sequence

import torch

from megatron_vppo.rollout.buckets import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    WeightStream,
    iter_buckets,
    tensor_nbytes,
    unpack_bucket,
)
from megatron_vppo.rollout.engine import (
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
        # SGLang's SamplingParams.logit_bias (token id string -> bias added to the logits); a large
        # negative bias bans the token without affecting the returned log-probs' normaliser.
        d["logit_bias"] = {str(t): -1.0e9 for t in sampling.banned_token_ids}
    if use_sampling_seed and seed is not None:
        d["sampling_seed"] = int(seed) & 0x7FFFFFFF
    return d


def to_sglang_image_data(request: RolloutRequest) -> list[dict] | None:
    """Processor outputs in SGLang's "processor_output" format (input_ids already hold the
    expanded <|image_pad|> runs, which is what that format expects)."""
    if request.pixel_values is None:
        return None
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
    if any(x is not None for x in image_data):
        kwargs["image_data"] = image_data
    return kwargs


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


def flattened_bucket_groups(bucket: Bucket) -> list[tuple[torch.Tensor, list[dict]]]:
    """Per dtype: (flat buffer, metadata dicts with the fields of SGLang's
    `FlattenedTensorMetadata`: name, shape, dtype, start_idx, end_idx, numel). SGLang's
    reconstruct path assumes one dtype per flattened tensor, so a mixed bucket becomes several."""
    groups = []
    for dtype, buf in bucket.buffers.items():
        metas = [
            dict(
                name=m.name,
                shape=torch.Size(m.shape),
                dtype=m.dtype,
                start_idx=m.offset,
                end_idx=m.offset + m.numel,
                numel=m.numel,
            )
            for m in bucket.metas
            if m.dtype == dtype
        ]
        groups.append((buf, metas))
    return groups


def distributed_update_request(named: Sequence[tuple[str, torch.Tensor]], group_name: str, flush_cache: bool) -> dict:
    """JSON body of `/update_weights_from_distributed` for tensors broadcast in this order."""
    return dict(
        names=[n for n, _ in named],
        dtypes=[str(t.dtype).removeprefix("torch.") for _, t in named],
        shapes=[list(t.shape) for _, t in named],
        group_name=group_name,
        flush_cache=flush_cache,
    )


def collapse_image_pads(prompt_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Runs of <|image_pad|> -> one pad per image, for servers that expand pads themselves from
    raw images."""
    out: list[int] = []
    for t in prompt_ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(int(t))
    return out


def _as_buckets(stream: WeightStream, bucket_bytes: int | None) -> Iterator[Bucket]:
    """Buckets as they come; loose (name, tensor) pairs are packed to `bucket_bytes`."""
    loose: list = []
    loose_bytes = 0

    def pack_loose():
        nonlocal loose_bytes
        yield from iter_buckets(loose, bucket_bytes)
        loose.clear()
        loose_bytes = 0

    for item in stream:
        if isinstance(item, Bucket):
            yield from pack_loose()
            yield item
        else:
            loose.append(item)
            loose_bytes += tensor_nbytes(item[1])  # a running total: re-summing is quadratic in tensors
            if bucket_bytes and loose_bytes >= bucket_bytes:
                yield from pack_loose()
    yield from pack_loose()


def _with_last(it: Iterable) -> Iterator[tuple[Any, bool]]:
    it = iter(it)
    try:
        prev = next(it)
    except StopIteration:
        return
    for x in it:
        yield prev, False
        prev = x
    yield prev, True


# ----------------------------------------------------------------------------- trainer side of NCCL


def new_weight_update_group(
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    backend: str = "nccl",
    timeout: timedelta = timedelta(minutes=10),
):
    """A process group outside the trainer's default world (trainer rank 0 + all server ranks),
    formed the way SGLang's `/init_weights_update_group` forms its side: TCP rendezvous at
    master_address:master_port, a store prefixed by `group_name`."""
    from torch.distributed import distributed_c10d as c10d

    store, rank, world_size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = c10d._new_process_group_helper(
        world_size, rank, [], backend, c10d.PrefixStore(group_name, store), group_name=group_name, timeout=timeout
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


# ----------------------------------------------------------------------------- colocated engine


class SGLangRolloutEngine:
    """`sglang.Engine` in this process (GPU). `engine_kwargs` go to `sglang.Engine` verbatim."""

    def __init__(
        self,
        model_path: str,
        *,
        tp_size: int = 1,
        mem_fraction_static: float = 0.5,
        dtype: str = "bfloat16",
        base_gpu_id: int = 0,
        random_seed: int = 0,
        enable_memory_saver: bool = True,
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
        use_sampling_seed: bool = False,
        **engine_kwargs,
    ):
        sglang = _import_sglang()
        self.tp_size = tp_size
        self.bucket_bytes = bucket_bytes
        self.use_sampling_seed = use_sampling_seed
        self.weight_version = 0
        self._broken: str | None = None
        self._engine = sglang.Engine(
            model_path=str(model_path),
            tp_size=tp_size,
            mem_fraction_static=mem_fraction_static,
            dtype=dtype,
            base_gpu_id=base_gpu_id,
            random_seed=random_seed,
            enable_memory_saver=enable_memory_saver,
            skip_tokenizer_init=True,
            **engine_kwargs,
        )

    def generate(self, requests: Sequence[RolloutRequest], n: int, sampling: SamplingParams) -> list[list[RolloutOutput]]:
        if self._broken:
            raise RuntimeError(self._broken)
        kwargs = expand_requests(requests, n, sampling, self.use_sampling_seed)
        out = self._engine.generate(**kwargs)
        return group_outputs(out if isinstance(out, list) else [out], len(requests), n)

    def update_weights(self, stream: WeightStream) -> None:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

        try:
            for bucket, last in _with_last(_as_buckets(stream, self.bucket_bytes)):
                groups = flattened_bucket_groups(bucket)
                for k, (buf, metas) in enumerate(groups):
                    payload = {
                        "flattened_tensor": buf,
                        "metadata": [FlattenedTensorMetadata(**m) for m in metas],
                    }
                    ser = MultiprocessingSerializer.serialize(payload, output_str=True)
                    res = self._engine.update_weights_from_tensor(
                        named_tensors=[ser] * self.tp_size,
                        load_format="flattened_bucket",
                        flush_cache=last and k == len(groups) - 1,
                    )
                    _check_result(res, "update_weights_from_tensor")
                # SGLang may still be copying out of `buf` asynchronously; sync before reuse
                torch.cuda.synchronize()
        except BaseException as e:
            self._broken = (
                f"SGLang weight update failed midway ({type(e).__name__}: {e}); the engine holds a mix "
                "of old and new weights and refuses to generate until a complete update succeeds"
            )
            raise
        self._broken = None
        self.weight_version += 1

    def release_memory(self) -> None:
        self._engine.release_memory_occupation()

    def resume_memory(self) -> None:
        self._engine.resume_memory_occupation()

    def shutdown(self) -> None:
        self._engine.shutdown()


def _check_result(res, what: str):
    """SGLang returns (success, message) (or a dict with `success`) from control calls."""
    if isinstance(res, tuple) and res and res[0] is False:
        raise RuntimeError(f"SGLang {what} failed: {res[1] if len(res) > 1 else res}")
    if isinstance(res, dict) and res.get("success") is False:
        raise RuntimeError(f"SGLang {what} failed: {res.get('message', res)}")


# ----------------------------------------------------------------------------- disaggregated servers


class SGLangServerEngine:
    """HTTP client for `python -m sglang.launch_server` servers (one URL per server).

    Requests are spread round-robin over servers. Images go as raw images (`request.images`:
    paths / base64 / URLs), with one <|image_pad|> per image in `input_ids`, since tensors do not
    travel over JSON; the server's preprocessor must use the same min/max pixels as ours.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        gpus_per_server: int = 1,
        image_token_id: int | None = None,
        timeout_s: float = 3600.0,
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
        use_sampling_seed: bool = False,
    ):
        self.urls = [u.rstrip("/") for u in urls]
        self.gpus_per_server = gpus_per_server
        self.image_token_id = image_token_id
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        self.use_sampling_seed = use_sampling_seed
        self.weight_version = 0
        self._group = None
        self._group_name = None
        self._broken: str | None = None

    # -- http
    def _post(self, url: str, path: str, body: dict | None = None):
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            raw = resp.read()
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return raw.decode(errors="replace")

    def _post_all(self, path: str, body: dict | None = None) -> list:
        with concurrent.futures.ThreadPoolExecutor(len(self.urls)) as ex:
            return list(ex.map(lambda u: self._post(u, path, body), self.urls))

    # -- generation
    def generate(self, requests: Sequence[RolloutRequest], n: int, sampling: SamplingParams) -> list[list[RolloutOutput]]:
        if self._broken:
            raise RuntimeError(self._broken)
        bodies = []
        for i, r in enumerate(requests):
            rs = request_seed(r, i)
            ids = list(r.prompt_ids)
            images = r.images
            if r.pixel_values is not None:
                if not images:
                    raise ValueError(
                        "SGLangServerEngine needs raw images (RolloutRequest.images) for image prompts; "
                        "pixel tensors cannot be sent over HTTP"
                    )
                if self.image_token_id is None:
                    raise ValueError("SGLangServerEngine(image_token_id=...) is required for image prompts")
                ids = collapse_image_pads(ids, self.image_token_id)
            for j in range(n):
                body = dict(
                    input_ids=ids,
                    sampling_params=to_sglang_sampling_params(
                        sampling, seed=sample_seed(sampling.seed, rs, j), use_sampling_seed=self.use_sampling_seed
                    ),
                    return_logprob=True,
                )
                if r.pixel_values is not None:
                    body["image_data"] = [str(x) for x in images]
                bodies.append(body)
        with concurrent.futures.ThreadPoolExecutor(min(64, max(1, len(bodies)))) as ex:
            flat = list(ex.map(lambda kb: self._post(self.urls[kb[0] % len(self.urls)], "/generate", kb[1]), enumerate(bodies)))
        return group_outputs(flat, len(requests), n)

    # -- weights
    def init_weight_update_group(
        self, master_address: str, master_port: int, group_name: str = "vppo_weight_update", backend: str = "nccl"
    ):
        """Form the NCCL group: this process is rank 0, server i's GPUs are ranks
        1 + i*gpus_per_server ... Servers and trainer must join concurrently."""
        world = 1 + len(self.urls) * self.gpus_per_server
        with concurrent.futures.ThreadPoolExecutor(len(self.urls)) as ex:
            futs = [
                ex.submit(
                    self._post,
                    u,
                    "/init_weights_update_group",
                    dict(
                        master_address=master_address,
                        master_port=master_port,
                        rank_offset=1 + i * self.gpus_per_server,
                        world_size=world,
                        group_name=group_name,
                        backend=backend,
                    ),
                )
                for i, u in enumerate(self.urls)
            ]
            self._group = new_weight_update_group(master_address, master_port, world, 0, group_name, backend)
            for f in futs:
                _check_result(f.result(), "init_weights_update_group")
        self._group_name = group_name

    def update_weights(self, stream: WeightStream) -> None:
        if self._group is None:
            raise RuntimeError("call init_weight_update_group(...) before update_weights on SGLang servers")
        import torch.distributed as dist

        self._post_all("/pause_generation")
        try:
            for bucket in _as_buckets(stream, self.bucket_bytes):
                named = [(k, v.cuda() if torch.cuda.is_available() else v) for k, v in unpack_bucket(bucket)]
                body = distributed_update_request(named, self._group_name, flush_cache=False)
                with concurrent.futures.ThreadPoolExecutor(len(self.urls)) as ex:
                    futs = [ex.submit(self._post, u, "/update_weights_from_distributed", body) for u in self.urls]
                    for _, t in named:
                        dist.broadcast(t.contiguous(), src=0, group=self._group)
                    for f in futs:
                        _check_result(f.result(), "update_weights_from_distributed")
            self._post_all("/flush_cache")
        except BaseException as e:
            self._broken = f"SGLang server weight update failed midway ({type(e).__name__}: {e}); refusing to generate"
            raise
        finally:
            self._post_all("/continue_generation")
        self._broken = None
        self.weight_version += 1

    def release_memory(self) -> None:
        self._post_all("/release_memory_occupation")

    def resume_memory(self) -> None:
        self._post_all("/resume_memory_occupation")
