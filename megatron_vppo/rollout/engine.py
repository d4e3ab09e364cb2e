"""The rollout engine contract the trainer codes against.

Implementations (registry: `megatron_vppo.rollout.ENGINES`): `hf_engine.HFRolloutEngine` (in-process
transformers model; CPU, and a GPU fallback), `vllm_engine.VLLMRolloutEngine` (vLLM; CPU and GPU) and
`sglang_engine.SGLangRolloutEngine` (GPU). The trainer only
sees this protocol: generate n samples per request, take a weight stream in HF layout, give GPU
memory back while training runs in the same processes.

Conventions every engine follows:
  * `RolloutOutput.token_ids` are the generated ids only (the prompt is not repeated); a stop token
    that ended the sample is included, with its log-prob, so the trainer learns to stop.
  * `RolloutOutput.log_probs[i]` is log softmax(logits / temperature)[token_ids[i]] over the full
    vocabulary: temperature-scaled but NOT renormalised after top-p / top-k filtering. That is what
    a trainer re-score at the same temperature computes. temperature == 0 means greedy decoding,
    and the log-probs are then those of the unscaled (temperature 1) distribution.
  * `weight_version` counts successful `update_weights` calls; a failed update leaves it as it was
    and the engine refuses to generate until a complete update succeeds (an engine that cannot roll
    back, like SGLang, may hold a mix of old and new weights in between).
  * After `release_memory` ... `resume_memory`, call `update_weights` before `generate`: engines may
    drop their weights on release.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, runtime_checkable

import torch

from megatron_vppo.sync.buckets import WeightStream

FinishReason = Literal["stop", "length"]


@dataclass
class RolloutRequest:
    """One prompt, already tokenised with its image pads expanded (see data/processor.py).

    `pixel_values` (N, C·T·P·P) and `image_grid_thw` (num_images, 3) are the processor's outputs for
    this prompt's images, or None for a text-only prompt. `seed` overrides the per-request seed
    (default: derived from SamplingParams.seed and the request's index in the call) so that a
    caller that splits data across ranks can keep samples independent of the split.
    `images` (optional) are the raw images, for engines that preprocess themselves.
    """

    prompt_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    seed: int | None = None
    # Raw images (paths / URLs / base64) for engines that preprocess themselves (SGLang servers).
    images: list | None = None

    def __post_init__(self):
        if len(self.prompt_ids) == 0:
            raise ValueError("RolloutRequest.prompt_ids is empty; a prompt needs at least one token")
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("RolloutRequest needs both pixel_values and image_grid_thw, or neither")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # <= 0: disabled
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    # Never sampled (e.g. <|image_pad|>: a response holding one would claim an image it has not).
    # Log-probs stay those of the unfiltered softmax, like top-p/top-k filtering.
    banned_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "banned_token_ids", tuple(int(t) for t in self.banned_token_ids))


@dataclass
class RolloutOutput:
    token_ids: list[int]
    log_probs: list[float]
    finish_reason: FinishReason
    # Per-step logits (len(token_ids), V) when the engine was asked to record them (tests/debug).
    logits: torch.Tensor | None = field(default=None, repr=False)


# (hf_name, shape, dtype) of every tensor a weight stream will carry (`sync.plan.ExportPlan.manifest`).
Manifest = Sequence[tuple[str, Sequence[int], torch.dtype]]


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer calls on an engine. Every class in `rollout.ENGINES` implements all of it
    (tests/test_engine_protocol.py checks), and so do the partial engines of non-first ranks
    (`sglang_engine.SGLangTPPeer`), whose generate/score refuse with a message."""

    weight_version: int

    # Capabilities: class attributes, read from the class (`ENGINES[name]`) — the same on every rank and
    # known at config time, before any engine exists. Nothing branches on an engine's name; add an
    # attribute here, and to every engine class, when a new one is needed.
    # True: takes the plain (name, tensor) stream and copies each tensor as it arrives, so
    # `sync.engine_push.push_to_engine` passes `mode` and `expected`; False: takes byte-bounded buckets.
    in_process: bool
    # Placement capability: True when one engine can span `rollout.engine_tp` > 1 consecutive ranks
    # (its TP ranks, one per GPU: colocated SGLang); False: an engine on every rank (engine_tp 1).
    tensor_parallel: bool
    # generate/score take the processor's `pixel_values` (so a perturbed-pixel view can be scored);
    # False: the engine preprocesses raw images itself (vLLM), so only image-level perturbations reach it.
    takes_pixel_values: bool
    # `rollout.*` keys this engine reads beyond those every engine reads (`config.ROLLOUT_KEYS_EVERY_ENGINE_READS`);
    # one of `config.ENGINE_ROLLOUT_KEYS` set away from its default for an engine that does not read it
    # is a config error naming the engine
    reads: frozenset

    @classmethod
    def standalone(cls, model_dir, *, dtype: str = "fp32", seed: int = 0, device: str | None = None,
                   max_model_len: int | None = None, min_pixels: int | None = None,
                   max_pixels: int | None = None, max_batch_size: int = 16) -> "RolloutEngine":
        """An engine for one process outside the trainer (`megatron-vppo eval`, tools/generate.py), from
        an HF directory; `device` None: this process's accelerator (LOCAL_RANK), else the CPU."""
        ...

    @staticmethod
    def check_engine_args(args: dict) -> None:
        """Config-time check of `rollout.engine_args` (ConfigError naming the problem); engines that
        take none refuse any (`engine_args.refuse_engine_args`)."""
        ...

    @classmethod
    def from_config(cls, cfg, model_dir, dims) -> "RolloutEngine | None":
        """This rank's part of its engine for a RunConfig, or None where the rank holds none (`dims`:
        `distributed.ParallelDims`; an engine per `dims.engine_tp` consecutive ranks, its entry point
        on `dims.engine_rank`). Collective: `train.build.build_engine` calls it on every rank."""
        ...

    def generate(
        self, requests: Sequence[RolloutRequest], n: int, sampling: SamplingParams
    ) -> list[list[RolloutOutput]]:
        """Per request, `n` samples (outer list in request order, inner in sample order)."""
        ...

    def score(self, items: Sequence[tuple[RolloutRequest, Sequence[int]]], temperature: float = 1.0
              ) -> list[list[float]]:
        """Log-probs of each given response's tokens under its prompt (+ the request's pixel_values,
        e.g. a perturbed view), prefill only, in the convention above (old_logp_source=engine)."""
        ...

    def update_weights(self, stream: WeightStream, *, mode: str | None = None,
                       expected: Manifest | None = None) -> None:
        """Load HF-named weights from (name, tensor) pairs or `Bucket`s. `mode` ("in_place" | "staged")
        and `expected` (the stream's manifest, checked before the first copy) are for in-process
        engines; a bucketed engine refuses a mode and checks names as it loads."""
        ...

    def release_memory(self) -> None:
        """Give accelerator memory (weights, KV cache) back so training can use it."""
        ...

    def resume_memory(self) -> None:
        """Re-acquire what `release_memory` gave back. The weights may not survive: an engine that drops
        them (SGLang without `enable_weights_cpu_backup`) refuses `generate` until the next
        `update_weights`, so callers update after every resume (the trainer always does)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine and free what it holds (processes, memory); the object is unusable after."""
        ...


def local_device(device: str | None) -> str:
    """`device`, or this process's GPU (LOCAL_RANK) when there is one, else "cpu"."""
    import os

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return device


def sample_seed(base_seed: int, request_seed: int, sample_index: int) -> int:
    """A 63-bit seed for one sample. Hash-mixed so nearby (seed, index) pairs give unrelated
    streams; depends only on its arguments, never on batch position or composition."""
    h = hashlib.blake2b(f"{base_seed}/{request_seed}/{sample_index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def request_seed(request: RolloutRequest, index_in_call: int) -> int:
    return request.seed if request.seed is not None else index_in_call
