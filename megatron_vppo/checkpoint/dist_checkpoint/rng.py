"""Per-rank RNG states (python, numpy, torch CPU and CUDA, Megatron's RNG tracker) in a
weights_only-loadable form. Restored only at the saved layout and world size."""
from __future__ import annotations

import random

import numpy as np
import torch

def get_rng_state() -> dict:
    """This rank's RNG states in a weights_only-loadable form."""
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": None,
    }
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if tracker.is_initialized():
        states = tracker.get_states()
        state["tracker"] = {k: v.clone() if torch.is_tensor(v) else v for k, v in states.items()}
    return state

def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker") is not None:
        tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))
