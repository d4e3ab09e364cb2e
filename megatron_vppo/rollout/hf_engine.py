"""In-process rollout engine on a model's transformers class (its MODELS spec's `engine_model_class`;
CPU, also a GPU fallback). Everything model-specific (position ids, the vision tower's dtype) comes
from the model's spec (models/spec.py `engine_*` methods).

The decode loop is ours, not `model.generate`, so that sampling, seeds and log-probs are exactly
what the trainer expects (see engine.py for the conventions):

  * prompts are LEFT-padded into one batch; each request is prefilled once and its KV cache is
    repeated for its n samples;
  * position ids are computed explicitly on the prompt by `spec.engine_prompt_positions` (for M-RoPE
    models transformers 5.x silently falls back to 1-D positions without them); a decode step's
    positions are `spec.engine_decode_positions` of (real tokens so far) + rope delta — the text
    positions HF uses after the largest prompt position;
  * every sample draws its uniforms from its own CPU `torch.Generator`, seeded from
    (SamplingParams.seed, request seed, sample index), so a sample does not depend on what else
    is in the batch, on the micro-batch size, or on the device;
  * finished rows are dropped from the batch (KV cache rows selected away).

`update_weights` copies the stream into the parameters in place (`param.copy_`: same storage, no
reload), in one of two modes, both validating every name, shape and dtype:

  * "staged" (the default for direct calls): every tensor is first copied aside, then all are
    committed; an error anywhere leaves the previous weights complete and `weight_version` unchanged.
    Costs a second copy of the model in fresh memory.
  * "in_place" (what the trainer's sync uses, via `sync.engine_push.push_to_engine`): the caller
    passes the stream's manifest (`expected=`, from `export_plan(...).manifest()`), which is checked
    against the model before the first copy; each tensor is then copied straight into its parameter.
    If the stream breaks or ends early the engine is marked unusable — `generate` / `score` raise an
    error naming the failed update — until a later complete update succeeds. Never silently
    half-updated; `weight_version` bumps only when an update completes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from megatron_vppo.sync.buckets import WeightStream, iter_named_tensors, plan_manifest
from megatron_vppo.rollout.engine import (
    RolloutOutput,
    RolloutRequest,
    SamplingParams,
    local_device,
    request_seed,
    sample_seed,
)
from megatron_vppo.rollout.engine_args import refuse_engine_args

def canonical_param_name(name: str, spec=None) -> str:
    """Module-parameter name in the engine's transformers model for an HF weight name in any spelling:
    `spec.engine_param_name` of the model's MODELS entry (the default `model.arch`'s when None)."""
    if spec is None:
        from megatron_vppo.config import ModelConfig
        from megatron_vppo.models import MODELS

        spec = MODELS[ModelConfig().arch]
    return spec.engine_param_name(name)


def _no_device_redirect(fn):
    """Run `fn` outside the CPU adapter's CUDA->CPU redirect mode (megatron_cpu.py): a transformers
    model never names a CUDA device on CPU, and the mode's per-call dispatch cost ~8 % of a prefill."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from megatron_vppo.megatron_cpu import without_device_redirect

        with without_device_redirect():
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- sampling (pure)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at `tokens` over the full vocabulary (T == 0 -> T = 1), in fp32."""
    t = temperature if temperature > 0 else 1.0
    logp = F.log_softmax(logits.float() / t, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def filtered_sorted_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int):
    """Descending-sorted probabilities of the temperature-scaled softmax with top-k / top-p
    filtering applied (filtered entries zeroed), and the vocabulary ids in that order."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    sorted_p, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    if top_k is not None and 0 < top_k < sorted_p.shape[-1]:
        sorted_p[..., top_k:] = 0.0
    if top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    return sorted_p, sorted_ids


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token per row: argmax when temperature == 0, else inverse-CDF sampling with one
    uniform per row (so a row's draw depends only on its own generator)."""
    if sampling.banned_token_ids:
        logits = logits.clone()
        logits[..., list(sampling.banned_token_ids)] = float("-inf")
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    sorted_p, sorted_ids = filtered_sorted_probs(logits, sampling.temperature, sampling.top_p, sampling.top_k)
    cdf = torch.cumsum(sorted_p, dim=-1)
    target = uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    # never land on a zeroed (filtered) tail entry because of rounding at the top of the CDF
    n_kept = (sorted_p > 0).sum(dim=-1, keepdim=True)
    idx = torch.minimum(idx, n_kept - 1)
    return sorted_ids.gather(-1, idx).squeeze(-1)


# ----------------------------------------------------------------------------- batching helpers


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, length - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids.to(device), mask.to(device)


class HFRolloutEngine:
    """Batched, KV-cached sampling on a transformers VL model (`Qwen2_5_VLForConditionalGeneration`).

    `max_batch_size` bounds the number of sequences (requests x n) decoded together; results do
    not depend on it. `record_logits=True` attaches each step's logits to the outputs (tests).
    """

    # Takes plain (name, tensor) streams and copies each tensor as it arrives, so `push_to_engine`
    # hands it the unbucketed stream, the manifest and an update mode.
    in_process = True
    tensor_parallel = False  # one engine per rank (rollout.engine_tp 1)
    takes_pixel_values = True
    reads = frozenset()  # no bucket_bytes: it takes the plain stream

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_batch_size: int | None = None,
        pad_token_id: int | None = None,
        record_logits: bool = False,
    ):
        from megatron_vppo.models import spec_for_hf_config

        self.model = model.eval()
        cfg = model.config
        self.spec = spec_for_hf_config({"model_type": getattr(cfg, "model_type", None)})
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(getattr(cfg, "video_token_id", -1) or -1)
        text_cfg = getattr(cfg, "text_config", cfg)
        if pad_token_id is None:
            pad_token_id = getattr(text_cfg, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.max_batch_size = max_batch_size
        self.record_logits = record_logits
        self.weight_version = 0
        self._released_to: torch.device | None = None
        self._broken: str | None = None  # why the weights are incomplete (a failed in-place update)
        self._checked: tuple | None = None  # (manifest, require_complete, plan): the last manifest that fit
        self._params = dict(model.named_parameters(remove_duplicate=False))

    @classmethod
    def from_pretrained(
        cls, path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs
    ) -> "HFRolloutEngine":
        from megatron_vppo.models import spec_for_hf_config

        model_class = spec_for_hf_config(path).engine_model_class()
        model = model_class.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
        return cls(model.to(device), **kwargs)

    @classmethod
    def standalone(cls, model_dir, *, dtype: str = "fp32", seed: int = 0, device: str | None = None,
                   max_model_len: int | None = None, min_pixels: int | None = None,
                   max_pixels: int | None = None, max_batch_size: int = 16) -> "HFRolloutEngine":
        """From an HF directory on `device` (the processor's pixel bounds are the caller's business)."""
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        return cls.from_pretrained(model_dir, device=local_device(device), dtype=dtypes[dtype],
                                   max_batch_size=max_batch_size)

    @staticmethod
    def check_engine_args(args: dict) -> None:
        refuse_engine_args("hf", args)

    @classmethod
    def from_config(cls, cfg, model_dir, dims) -> "HFRolloutEngine | None":
        """The trainer's engine on every engine rank (with engine_tp 1: every rank), on that rank's device in
        the model's dtype; None elsewhere."""
        if not dims.engine_rank:
            return None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.model.dtype]
        return cls.from_pretrained(model_dir, device=dims.device, dtype=dtype)

    def shutdown(self) -> None:
        """Drop the model (an in-process engine holds nothing else)."""
        self.model = None
        self._params = {}
        self._broken = "the engine was shut down; build a new one"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check_usable(self):
        if self._broken is not None:
            raise RuntimeError(self._broken)
        if self._released_to is not None:
            raise RuntimeError("the rollout engine's memory is released; call resume_memory() before generating")

    # ------------------------------------------------------------------ prompt preparation

    def _prompt_batch(self, seqs: Sequence[Sequence[int]], requests: Sequence[RolloutRequest]) -> dict:
        """Left-padded ids, mask, explicit position ids (the spec's) and rope deltas [B]."""
        device = self.device
        ids, mask = _left_pad(seqs, self.pad_token_id, device)
        pix = [r.pixel_values for r in requests if r.pixel_values is not None]
        grids = [r.image_grid_thw for r in requests if r.image_grid_thw is not None]
        for r, s in zip(requests, seqs):
            n_pad = sum(1 for t in s if t == self.image_token_id)
            expected = 0 if r.image_grid_thw is None else int(self._merged_tokens(r.image_grid_thw))
            if n_pad != expected:
                raise ValueError(
                    f"prompt has {n_pad} <|image_pad|> tokens but its image_grid_thw needs {expected}; "
                    "encode the prompt with the project processor (data/processor.py) so pads are expanded"
                )
        grid = torch.cat([g.reshape(-1, 3) for g in grids]).to(device) if grids else None
        position_ids, deltas = self.spec.engine_prompt_positions(self.model, ids, mask, grid)
        batch = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, rope_deltas=deltas.reshape(-1))
        if pix:
            batch["pixel_values"] = torch.cat(pix).to(device=device, dtype=self._vision_dtype())
            batch["image_grid_thw"] = grid
        return batch

    def _merged_tokens(self, grid_thw: torch.Tensor) -> int:
        merge = self.model.config.vision_config.spatial_merge_size
        return int((grid_thw.reshape(-1, 3).prod(-1) // (merge * merge)).sum())

    def _vision_dtype(self):
        return self.spec.engine_vision_dtype(self.model)

    def _forward(self, batch: dict, cache, logits_to_keep: int = 0):
        kw = {k: v for k, v in batch.items() if k != "rope_deltas"}
        return self.model(**kw, past_key_values=cache, use_cache=cache is not None, logits_to_keep=logits_to_keep)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    @_no_device_redirect
    def generate(
        self, requests: Sequence[RolloutRequest], n: int, sampling: SamplingParams
    ) -> list[list[RolloutOutput]]:
        self._check_usable()
        if n < 1:
            raise ValueError(f"n (samples per request) must be >= 1, got {n}")
        per_chunk = max(1, (self.max_batch_size or (len(requests) * n)) // n)
        results: list[list[RolloutOutput]] = []
        for start in range(0, len(requests), per_chunk):
            chunk = list(requests[start : start + per_chunk])
            seeds = [request_seed(r, start + i) for i, r in enumerate(chunk)]
            results.extend(self._generate_chunk(chunk, seeds, n, sampling))
        return results

    def _generate_chunk(self, requests, req_seeds, n, sampling: SamplingParams):
        from transformers import DynamicCache

        batch = self._prompt_batch([r.prompt_ids for r in requests], requests)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(batch, cache, logits_to_keep=1).logits[:, -1, :]

        # one prefill per request, then n rows per request (row = request * n + sample)
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
        mask = batch["attention_mask"].repeat_interleave(n, dim=0)
        next_pos = (mask.sum(-1) + batch["rope_deltas"].repeat_interleave(n, dim=0)).long()  # [B]
        rows = len(requests) * n
        gens = []
        for r in range(len(requests)):
            for j in range(n):
                g = torch.Generator(device="cpu")
                g.manual_seed(sample_seed(sampling.seed, req_seeds[r], j))
                gens.append(g)

        tokens = [[] for _ in range(rows)]
        logps = [[] for _ in range(rows)]
        step_logits = [[] for _ in range(rows)]
        finish = [None] * rows
        active = list(range(rows))  # row ids still decoding, in cache order
        stop = set(sampling.stop_token_ids)
        for step in range(sampling.max_new_tokens):
            uniforms = None
            if sampling.temperature > 0:
                uniforms = torch.cat([torch.rand(1, generator=gens[r], dtype=torch.float64) for r in active])
            tok = sample_tokens(logits, sampling, uniforms)
            lp = token_log_probs(logits, tok, sampling.temperature)
            tok_l, lp_l = tok.tolist(), lp.tolist()
            keep = []
            for k, r in enumerate(active):
                tokens[r].append(tok_l[k])
                logps[r].append(lp_l[k])
                if self.record_logits:
                    step_logits[r].append(logits[k].float().cpu())
                if tok_l[k] in stop:
                    finish[r] = "stop"
                elif step + 1 == sampling.max_new_tokens:
                    finish[r] = "length"
                else:
                    keep.append(k)
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=mask.device)
                cache.batch_select_indices(idx)
                mask, next_pos, tok = mask[idx], next_pos[idx], tok[idx]
                active = [active[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = self.spec.engine_decode_positions(next_pos)
            step_batch = dict(input_ids=tok.view(-1, 1), attention_mask=mask, position_ids=pos)
            logits = self._forward(step_batch, cache, logits_to_keep=1).logits[:, -1, :]
            next_pos = next_pos + 1

        out = []
        for r in range(len(requests)):
            samples = []
            for j in range(n):
                row = r * n + j
                samples.append(
                    RolloutOutput(
                        token_ids=tokens[row],
                        log_probs=logps[row],
                        finish_reason=finish[row],
                        logits=torch.stack(step_logits[row]) if self.record_logits else None,
                    )
                )
            out.append(samples)
        return out

    # ------------------------------------------------------------------ re-scoring

    @torch.no_grad()
    @_no_device_redirect
    def score(
        self,
        items: Sequence[tuple[RolloutRequest, Sequence[int]]],
        temperature: float = 1.0,
    ) -> list[list[float]]:
        """Log-probs of each response token given its prompt (+ images), one full forward per
        micro-batch, same convention as `generate` (temperature-scaled, unfiltered)."""
        self._check_usable()
        out: list[list[float]] = []
        step = self.max_batch_size or max(1, len(items))
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            reqs = [r for r, _ in chunk]
            seqs = [list(r.prompt_ids) + list(resp) for r, resp in chunk]
            batch = self._prompt_batch(seqs, reqs)
            logits = self._forward(batch, None).logits
            length = batch["input_ids"].shape[1]
            for b, (r, resp) in enumerate(chunk):
                n_resp = len(resp)
                if n_resp == 0:
                    out.append([])
                    continue
                # logits at position p predict token p+1; the response occupies the last n_resp slots
                lg = logits[b, length - n_resp - 1 : length - 1]
                tgt = torch.as_tensor(list(resp), device=lg.device)
                out.append(token_log_probs(lg, tgt, temperature).tolist())
        return out

    # ------------------------------------------------------------------ weights

    def update_weights(
        self,
        stream: WeightStream,
        *,
        mode: str = "staged",
        expected: Sequence[tuple[str, Sequence[int], torch.dtype]] | None = None,
        require_complete: bool = True,
    ) -> None:
        """Load HF-named weights in place; `mode` "staged" or "in_place" (see the module docstring).

        `expected`: (name, shape, dtype) of every tensor the stream will carry, checked against the
        model before anything is copied (required for "in_place"). `require_complete=False` allows a
        partial update (only the named tensors change; an unusable engine stays unusable)."""
        if mode == "in_place":
            if expected is None:
                raise ValueError("update_weights(mode='in_place') needs the stream's manifest (expected=[(name, "
                                 "shape, dtype), ...], e.g. export_plan(...).manifest()) to validate it before "
                                 "the first copy; pass it, or use mode='staged'")
            self._update_in_place(stream, self._check_manifest(expected, require_complete), require_complete)
        elif mode == "staged":
            if expected is not None:
                self._check_manifest(expected, require_complete)
            self._update_staged(stream, require_complete)
        else:
            raise ValueError(f"mode={mode!r}: use 'staged' or 'in_place'")

    def _resolve(self, name: str, shape, dtype) -> torch.nn.Parameter:
        """The parameter a weight name feeds, after checking shape and dtype kind."""
        key = self.spec.engine_param_name(name)
        p = self._params.get(key)
        if p is None:
            raise KeyError(
                f"weight {name!r} (as {key!r}) is not a parameter of the rollout model; "
                "is the stream for another model or config?"
            )
        if tuple(shape) != tuple(p.shape):
            raise ValueError(f"weight {name!r} has shape {tuple(shape)}, the model's is {tuple(p.shape)}")
        if p.is_floating_point() != dtype.is_floating_point:
            raise TypeError(f"weight {name!r} has dtype {dtype}, incompatible with the model's {p.dtype}")
        return p

    def _missing(self, covered: set[int]) -> list[str]:
        return sorted(n for n, p in self._params.items() if id(p) not in covered)

    def _check_manifest(self, expected, require_complete: bool) -> dict[str, tuple]:
        """{name: (param, shape, dtype)} for a manifest that fits the model; raises before any copy.
        The trainer sends the same manifest every step: a repeat is recognised, not re-checked."""
        key = tuple((name, tuple(shape), dtype) for name, shape, dtype in expected)
        if self._checked is not None and self._checked[:2] == (key, require_complete):
            return self._checked[2]
        expected, plan = plan_manifest(key, self._resolve)
        if require_complete:
            missing = self._missing({id(p) for p, _, _ in plan.values()})
            if missing:
                raise ValueError(
                    f"the update's manifest is without {len(missing)} parameter(s), e.g. {missing[:3]}; "
                    "no weight was changed (pass require_complete=False for a partial update)"
                )
        self._checked = (expected, require_complete, plan)
        return plan

    def _update_in_place(self, stream: WeightStream, plan: dict[str, tuple], complete: bool) -> None:
        version = self.weight_version + 1
        written: dict[int, str] = {}  # id(param) -> the name that wrote it (tied weights share one)
        seen: set[str] = set()
        try:
            with torch.no_grad():
                for name, t in iter_named_tensors(stream):
                    entry = plan.get(name)
                    if entry is None:
                        raise KeyError(f"weight {name!r} is not in the update's manifest")
                    p, shape, dtype = entry
                    if name in seen:
                        raise ValueError(f"weight {name!r} arrived twice in one update")
                    if t.shape != shape or t.dtype != dtype:
                        raise ValueError(f"weight {name!r} arrived as {tuple(t.shape)} {t.dtype}; the manifest "
                                         f"announced {tuple(shape)} {dtype}")
                    seen.add(name)
                    first = written.get(id(p))
                    if first is None:
                        p.copy_(t)
                        written[id(p)] = name
                    elif not torch.equal(p, t.to(device=p.device, dtype=p.dtype)):
                        raise ValueError(f"tied weights {first!r} and {name!r} arrived with different values; "
                                         "a tied model can hold only one")
            if len(seen) != len(plan):
                missing = [n for n in plan if n not in seen]
                raise ValueError(f"weight stream ended after {len(seen)} of {len(plan)} tensors, without "
                                 f"{missing[:3]}")
        except BaseException as e:
            if written:  # the previous weights are gone: refuse to generate with a mix
                self._broken = (
                    f"the rollout engine's weights are incomplete: an in-place update_weights (to version "
                    f"{version}) failed after {len(written)} of {len(plan)} tensors were copied "
                    f"({type(e).__name__}: {e}). Run a complete update_weights (e.g. the trainer's weight "
                    "sync) before generating or scoring."
                )
            raise
        if complete:
            self._broken = None
        self.weight_version = version

    def _update_staged(self, stream: WeightStream, require_complete: bool) -> None:
        staged: dict[int, tuple[str, torch.nn.Parameter, torch.Tensor]] = {}
        for name, t in iter_named_tensors(stream):
            p = self._resolve(name, t.shape, t.dtype)
            key = self.spec.engine_param_name(name)
            new = t.detach().to(device=p.device, dtype=p.dtype, copy=True)
            prev = staged.get(id(p))
            if prev is not None and prev[0] != key and not torch.equal(prev[2], new):
                raise ValueError(
                    f"tied weights {prev[0]!r} and {key!r} arrived with different values; "
                    "a tied model can hold only one"
                )
            staged[id(p)] = (key, p, new)
        if require_complete:
            missing = self._missing(set(staged))
            if missing:
                raise ValueError(
                    f"weight stream ended without {len(missing)} parameter(s), e.g. {missing[:3]}; "
                    "the engine keeps its previous weights (pass require_complete=False for a partial update)"
                )
        with torch.no_grad():
            for _, p, new in staged.values():
                p.copy_(new)
        if require_complete:
            self._broken = None
        self.weight_version += 1

    # ------------------------------------------------------------------ memory

    def release_memory(self) -> None:
        """On an accelerator, park the weights on the CPU and empty the allocator cache (the KV
        cache lives only inside a `generate` call). On CPU there is nothing to give back; the engine
        only refuses to generate until `resume_memory`, so colocated code paths behave the same."""
        if self._released_to is not None:
            return
        dev = self.device
        if dev.type != "cpu":
            self.model.to("cpu")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        self._released_to = dev

    def resume_memory(self) -> None:
        if self._released_to is None:
            return
        if self._released_to.type != "cpu":
            self.model.to(self._released_to)
        self._released_to = None
