"""A name -> object mapping whose entries are "module:attribute" paths, imported on first lookup, so a
registry (MODELS, ENGINES) can list heavy back ends (Megatron, transformers, vLLM) without importing them."""
from __future__ import annotations

import importlib
from collections.abc import Mapping


class LazyRegistry(Mapping):
    def __init__(self, what: str, paths: dict[str, str]):
        self._what = what  # "model arch", "rollout engine": for the unknown-name error
        self._paths = dict(paths)

    def __getitem__(self, name: str):
        if name not in self._paths:
            raise KeyError(f"unknown {self._what} {name!r}; known: {sorted(self._paths)}")
        module, attr = self._paths[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)
