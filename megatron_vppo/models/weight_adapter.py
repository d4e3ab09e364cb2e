"""The contract between a model's Megatron parameters and its HF checkpoint, in both directions.

Loaders (checkpoint/hf_load.py), the export stream, the HF writer and the converter call only these
methods; a new model implements the abstract ones (see models/qwen2_5_vl/weights.py). HF -> Megatron
goes through `groups` only (the loader reads just the HF tensors a rank's parameters need). Tensors are
FULL (un-sharded) on both sides: a Megatron tensor's chunk r along its `partition_dim` is TP rank r's.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Group:
    """One conversion: read `hf_names` (plus every HF tensor whose name starts with `hf_prefix`, if
    set), call `to_mcore(dict)` -> {megatron name: full tensor}."""

    hf_names: list[str]
    mcore_names: list[str]
    to_mcore: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    hf_prefix: str | None = None


class WeightAdapter(ABC):
    """HF <-> Megatron names and layouts for one model config and TP size."""

    @abstractmethod
    def groups(self, mcore_names) -> list[Group]:
        """The conversions that produce `mcore_names` from HF tensors (the loader reads only theirs)."""

    @abstractmethod
    def mcore_to_hf(self, mc_state: dict[str, torch.Tensor], spelling: str = "v4") -> dict[str, torch.Tensor]:
        """Any subset of full Megatron tensors -> HF tensors (also right for gradients)."""

    def canonical_hf_name(self, name: str) -> str:
        """An HF name as this adapter spells it (checkpoints written by other library versions)."""
        return name

    def canonical_mcore_name(self, name: str) -> str:
        """A Megatron parameter name as this adapter spells it (Transformer Engine fuses some)."""
        return name

    def export_group_key(self, name: str) -> str:
        """Parameters with one key convert together on export. Language-model parameters convert one
        at a time; any other top-level module (a vision tower, a projector) converts as a whole, since
        its conversion may need all of its tensors together."""
        top = name.split(".", 1)[0]
        return name if top == "language_model" else top
