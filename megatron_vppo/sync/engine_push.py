"""Feed the trainer's weights to the rollout engines (collective over all ranks).

Engines sit on every rank (`ParallelDims.engine_tp` consecutive ranks per engine), so every rank
receives the full HF-layout stream from the TP/PP shards (dst "all"), group by group: each rank holds
one group (one bucket) at a time. After the update every engine's `weight_version` is compared: an
update is complete on every engine or the run stops (never a mix of versions across engines).

An in-process engine (`engine.in_process`: the HF and vLLM engines) gets the plain stream in reused
receive buffers (it copies each tensor into its parameter as it arrives: in-place mode) plus the
plan's manifest; other engines (SGLang) get byte-bounded buckets.
"""
from __future__ import annotations

import torch

from megatron_vppo.distributed import ParallelDims, all_ranks_ok, min_max_world
from megatron_vppo.megatron_cpu import without_device_redirect
from megatron_vppo.sync.buckets import DEFAULT_BUCKET_BYTES, iter_buckets
from megatron_vppo.sync.plan import DESTINATIONS, ExportError, local_params, plan_for
from megatron_vppo.sync.stream import drain, hf_stream

UPDATE_MODES = ("in_place", "staged")


def push_to_engine(model_chunks, adapter, engine, *, bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
                   bucketed: bool | None = None, mode: str | None = None, dst: str = "rank0",
                   dtype: torch.dtype | None = None, dims: ParallelDims) -> None:
    """Export into `engine.update_weights` on the destination rank(s) (collective over all ranks).

    `engine` may be None on ranks that hold none. An in-process engine (`engine.in_process`, e.g.
    `HFRolloutEngine`) copies each tensor into its parameters as it arrives: it gets the plain stream
    (in reused receive buffers), the stream's manifest (`expected=`, validated before the first copy)
    and `mode` — "in_place" by default (one copy per tensor; a stream that breaks marks the engine
    unusable until a complete update), or "staged" (all or nothing, one extra copy of the model).
    Other engines (SGLang) get byte-bounded buckets of `bucket_bytes`. `bucketed` forces either form.
    If the engine raises, the stream is still run to its end (so no rank hangs in a collective) and
    every rank raises."""
    in_process = engine is not None and engine.in_process
    if mode is not None and mode not in UPDATE_MODES:
        raise ValueError(f"mode={mode!r}: use one of {UPDATE_MODES}")
    if mode is not None and engine is not None and not in_process:
        raise ValueError(f"mode={mode!r} applies to in-process engines only; {type(engine).__name__} "
                         "updates from buckets (leave mode unset)")
    if dst not in DESTINATIONS:
        raise ValueError(f"dst={dst!r}: use one of {DESTINATIONS}")
    local = local_params(model_chunks, adapter)
    plan = plan_for(local, adapter, None, dims=dims)  # collective: every rank, whatever its engine
    if bucketed is None:
        bucketed = not in_process
    # reused receive buffers only for a consumer that copies each tensor before asking for the next
    stream = hf_stream(model_chunks, adapter, dims, dst=dst, dtype=dtype, plan=plan, local=local,
                       reuse_buffers=in_process and not bucketed)
    if bucketed:
        stream = iter_buckets(stream, bucket_bytes)
    err = None
    with without_device_redirect():  # our own copy loop: the CPU adapter's per-call redirect is overhead
        if engine is None:
            drain(stream)
        else:
            try:
                if in_process:
                    engine.update_weights(stream, mode=mode or "in_place", expected=plan.manifest(dtype))
                else:  # the manifest too: SGLang checks its names before the first payload
                    engine.update_weights(stream, expected=plan.manifest(dtype))
            except Exception as e:  # noqa: BLE001 — finish the collective first
                err = e
                drain(stream)
            else:
                drain(stream)  # an engine that stopped early still owes the other ranks their collectives
    if not all_ranks_ok(err is None):
        if err is not None:
            raise err
        raise ExportError("weight update failed on another rank (see its log); this rank's engine, if any, "
                          "was updated but the update is not consistent across ranks")


def check_engine_versions(engine, engine_name: str = "") -> int:
    """Every engine (and engine TP rank) reports the same `weight_version` after an update, or every
    rank raises: the never-half-updated guarantee across engines (one all-reduce of two numbers).
    Ranks without an engine take no part in the comparison. Returns the version."""
    span = min_max_world(engine.weight_version if engine is not None else None)
    if span is None:
        return -1
    low, high = span
    if low != high:
        raise ExportError(f"rollout engines disagree on their weight version after an update (min {low}, max "
                          f"{high}; rollout.engine={engine_name}): an engine missed an update, so the rollouts "
                          "would mix policies; restart from the last checkpoint")
    return high
