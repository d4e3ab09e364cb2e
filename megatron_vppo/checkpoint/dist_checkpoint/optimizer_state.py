"""Optimizer state around a save or load: Megatron-Core 0.16.1 with torch AdamW (no Apex / TE) needs
its Adam state allocated before a load, its step restored after one, and this run's hyperparameters put
back over the saved ones.

The non-distributed optimizer's state is stored per parameter in global coordinates and reshards across
TP/PP/DP like the model; the distributed optimizer's `dp_reshardable` format stores its flat grad-buffer
shards and reshards across DP only.
"""
from __future__ import annotations

import torch

from megatron_vppo.checkpoint.dist_checkpoint.format import OPTIMIZER_SHARDING_TYPE

def is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    return any(isinstance(o, DistributedOptimizer) for o in opts)

_TORCH_ADAM = (torch.optim.Adam, torch.optim.AdamW)

def prepare_for_load(optimizer) -> None:
    """Allocate a fresh distributed optimizer's torch-Adam state, `step` included (before a load, and
    before saving an optimizer that has not stepped yet).

    Without Apex / Transformer Engine, Megatron-Core 0.16.1 falls back to torch AdamW, whose per-param
    state needs a `step`; its init_state_fn allocates only exp_avg / exp_avg_sq, and
    DistributedOptimizer.state_dict() (called while building the loading sharded state dict) then
    fails on an optimizer that has not stepped yet. The placeholder step is overwritten by the load.
    """
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for o in opts:
        inner = getattr(o, "optimizer", None)
        if not isinstance(o, DistributedOptimizer) or not isinstance(inner, _TORCH_ADAM):
            continue
        if getattr(o, "init_state_fn", None) is not None:
            o.init_state_fn(inner, o.config)
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if st and "step" not in st:
                    st["step"] = torch.tensor(0.0)

def restore_adam_steps(optimizer) -> None:
    """Put the saved Adam step back into every per-param state after a distributed-optimizer load.

    With torch AdamW (no Apex/TE), `dp_reshardable` stores the step in the param groups and marks the
    per-param `step` tensor non-persistent, so Megatron-Core 0.16.1's loader copies the *loading*
    optimizer's own step over it (0 for a fresh one) and Adam's bias correction restarts. The saved
    step is still in the inner optimizer's param groups after the load; copy it back.
    """
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for o in opts:
        inner = getattr(o, "optimizer", None)
        if not isinstance(o, DistributedOptimizer) or not isinstance(inner, _TORCH_ADAM):
            continue
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                if st and "step" in st:
                    st["step"] = torch.tensor(float(group["step"]), dtype=st["step"].dtype)

def group_hparams(optimizer) -> list[dict]:
    """The param groups' hyperparameters as this run built them (lr bounds, betas, eps, weight decay,
    multipliers): everything but the params and Adam's step."""
    return [{k: v for k, v in g.items() if k not in ("params", "step")} for g in optimizer.param_groups]

def set_group_hparams(optimizer, hparams: list[dict]) -> None:
    """After a load: torch's load_state_dict replaced the param groups' hyperparameters with the saved
    ones (Megatron's per-group max_lr included, which its LR schedule reads); this run's config wins,
    so a changed optim.lr or Adam beta takes effect. The checkpoint supplies the state only."""
    groups = optimizer.param_groups
    if len(groups) != len(hparams):
        return
    for g, h in zip(groups, hparams):
        g.update(h)

def never_stepped(optimizer) -> bool:
    """No torch-optimizer state on this rank yet (no step has run)."""
    from megatron.core.optimizer import ChainedOptimizer

    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    return all(not any(st for st in getattr(getattr(o, "optimizer", None), "state", {}).values()) for o in opts)

def optimizer_metadata() -> dict:
    return {"distrib_optim_sharding_type": OPTIMIZER_SHARDING_TYPE}
