"""Non-finite guard: a NaN/Inf never reaches the weights, a checkpoint or the rollout engine silently.

Per optimizer step (`guarded_step`):
  * before the update — the loss sums and the reduced gradients are checked; if any rank sees a
    non-finite value the step is skipped on every rank (no update, no schedule advance), logged and
    counted; `train.max_nonfinite_steps` skipped steps in a row stop the run with NonFiniteError;
  * after the update — the updated weights are checked; a non-finite weight cannot be undone without
    a copy, so the run stops at once, before anything is saved or exported.
Before every save and every engine update `check_finite` checks the weights (and, for a save, the
optimizer state) again. Every decision is one all-reduced flag, so all ranks decide alike.

Cost: one sum per tensor over the local gradient shards before the step and the parameters after it
(the elementwise `isfinite` runs only on a tensor whose sum is not finite) and one host sync per
check — a reduction pass over the weights, small next to a forward/backward of the same weights.

Test-only fault hook: `MEGATRON_VPPO_TEST_CORRUPT_OPTIMIZER=STEP[@RANK]` fills the Adam moments with
NaN just before the first optimizer update of RL step STEP, on every rank or only on global rank RANK
(a corrupted optimizer state, as a bad restore or a memory fault would leave it);
tests/test_faults_run.py drives it. Unset, it does nothing.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Iterable

import torch
import torch.distributed as dist

from megatron_vppo.distributed import any_rank
from megatron_vppo.errors import RunAbort

log = logging.getLogger("megatron_vppo.train")

_CHUNK = 1 << 24  # elements per isfinite call: bounds the temporary bool buffer
CORRUPT_ENV = "MEGATRON_VPPO_TEST_CORRUPT_OPTIMIZER"


class NonFiniteError(RunAbort):
    """Non-finite values the run cannot continue past."""


def _exact_nonfinite(t: torch.Tensor) -> bool:
    flat = t.detach().reshape(-1)
    return any(bool((~torch.isfinite(flat[i:i + _CHUNK])).any()) for i in range(0, flat.numel(), _CHUNK))


def _any_nonfinite(tensors: Iterable[torch.Tensor]) -> bool:
    """Any NaN/Inf element? A sum per tensor is the fast test (a NaN or Inf element always makes it
    non-finite; one reduction, no temporary); only a tensor whose sum is not finite — a real NaN/Inf,
    or finite values whose sum overflowed — gets the exact elementwise check."""
    tensors = [t for t in tensors if t is not None and t.numel() and t.is_floating_point()]
    if not tensors:
        return False
    sums = torch.stack([t.detach().sum(dtype=torch.float32).to(tensors[0].device) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return False
    return any(_exact_nonfinite(t) for t, s in zip(tensors, sums.tolist()) if not math.isfinite(s))


def _grad_tensors(ddp_chunks) -> list[torch.Tensor]:
    """The reduced gradients: DDP's contiguous grad buffers (every bucket group of every chunk)."""
    out = []
    for chunk in ddp_chunks:
        buffers = list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))
        if buffers:
            out.extend(b.grad_data for b in buffers)
        else:  # a chunk without Megatron DDP buffers
            out.extend(p.main_grad if hasattr(p, "main_grad") else p.grad for p in chunk.parameters())
    return out


def _param_tensors(ddp_chunks) -> list[torch.Tensor]:
    return [p for chunk in ddp_chunks for p in chunk.parameters()]


def _inner_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    opts = chained if chained is not None else [optimizer]
    return [getattr(o, "optimizer", None) for o in opts if getattr(o, "optimizer", None) is not None]


def _loss_scaled(optimizer) -> bool:
    opts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(getattr(o, "grad_scaler", None) is not None for o in opts)


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Adam moments and, for mixed precision, the fp32 main params (what a checkpoint stores)."""
    out = []
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            out.extend(group["params"])
        for state in inner.state.values():
            out.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out


def check_finite(model_chunks, optimizer=None, *, what: str, step: int) -> None:
    """Raise NonFiniteError on every rank when any weight (or optimizer state, if given) is not finite."""
    tensors = _param_tensors(model_chunks) + (_optimizer_tensors(optimizer) if optimizer is not None else [])
    if any_rank(_any_nonfinite(tensors)):
        raise NonFiniteError(
            f"step {step}: refusing the {what}: the model {'or optimizer state ' if optimizer else ''}holds "
            f"non-finite values; nothing was written. Resume from the last checkpoint (train.resume=auto) "
            f"with a lower optim.lr or tighter optim.grad_clip")


def _corrupt_optimizer_for_test(optimizer, step: int, state: dict) -> None:
    want = os.environ.get(CORRUPT_ENV)
    if not want or state.get("corrupted"):
        return
    at_step, _, rank = want.partition("@")
    if int(at_step) != step or (rank and dist.is_initialized() and int(rank) != dist.get_rank()):
        return
    n = 0
    for inner in _inner_optimizers(optimizer):
        for st in inner.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if isinstance(st.get(key), torch.Tensor):
                    st[key].fill_(float("nan"))
                    n += 1
    state["corrupted"] = True
    log.warning("%s=%s: filled %d Adam moment tensor(s) with NaN (test-only fault hook)", CORRUPT_ENV, want, n)


def guarded_step(optimizer, ddp_chunks, loss_sums: dict, *, step: int, state: dict, max_in_a_row: int):
    """Megatron's optimizer.step() behind the guard. Returns (stepped, grad_norm, skipped_as_nonfinite).

    `state` persists across steps (the in-a-row counter). `loss_sums` are this rank's loss numerators
    (empty off the last pipeline stage)."""
    _corrupt_optimizer_for_test(optimizer, step, state)
    # fp16 loss scaling overflows on purpose while it finds its scale: Megatron skips those steps itself
    # (ok=False) and they are not faults, so only the loss is checked there.
    local_bad = False if _loss_scaled(optimizer) else _any_nonfinite(_grad_tensors(ddp_chunks))
    loss_bad = any(not math.isfinite(float(v)) for v in loss_sums.values())
    if any_rank(loss_bad or local_bad):
        state["in_a_row"] = state.get("in_a_row", 0) + 1
        state["skipped_total"] = state.get("skipped_total", 0) + 1
        log.warning("step %d: non-finite loss or gradient; optimizer step skipped (%d in a row, limit "
                    "train.max_nonfinite_steps=%d)", step, state["in_a_row"], max_in_a_row)
        if state["in_a_row"] >= max_in_a_row:
            raise NonFiniteError(
                f"step {step}: {state['in_a_row']} optimizer steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={max_in_a_row}); stopping. The weights are those of the last good "
                f"step; resume from the last checkpoint (train.resume=auto) with a lower optim.lr, a tighter "
                f"optim.grad_clip or smaller loss coefficients (algo.entropy_coef)")
        return False, None, True
    ok, grad_norm, _ = optimizer.step()
    if any_rank(_any_nonfinite(_param_tensors(ddp_chunks))):
        raise NonFiniteError(
            f"step {step}: the optimizer update made the weights non-finite (finite loss and gradients; "
            f"grad norm {float(grad_norm) if grad_norm is not None else float('nan'):.3g}), so the optimizer "
            f"state or optim.lr={_lr(optimizer):g} is at fault; nothing from this step was saved or sent to the "
            f"engine. Resume from the last checkpoint (train.resume=auto), with a lower optim.lr")
    state["in_a_row"] = 0
    return ok, grad_norm, False


def _lr(optimizer) -> float:
    try:
        return float(optimizer.param_groups[0]["lr"])
    except Exception:
        return float("nan")
