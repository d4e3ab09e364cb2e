"""A name -> object mapping whose entries are "module:attribute" paths, imported on first lookup, so a
registry (MODELS, ENGINES) can list heavy back ends (Megatron, transformers, vLLM) without importing them.
`register` adds an entry at run time (a path, or the object itself: an extension defined outside the
package, e.g. in a test or a user's plug-in module)."""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


class LazyRegistry(Mapping):
    def __init__(self, what: str, paths: dict[str, str]):
        self._what = what  # "model arch", "rollout engine": for the unknown-name error
        self._paths: dict[str, Any] = dict(paths)

    def __getitem__(self, name: str):
        if name not in self._paths:
            raise KeyError(f"unknown {self._what} {name!r}; known: {sorted(self._paths)}")
        entry = self._paths[name]
        if not isinstance(entry, str):
            return entry
        module, attr = entry.split(":")
        return getattr(importlib.import_module(module), attr)

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def register(self, name: str, entry: Any) -> None:
        """Add `name`: a "module:attribute" path (imported on lookup) or the object itself."""
        if name in self._paths:
            raise KeyError(f"{self._what} {name!r} is already registered; pick another name")
        self._paths[name] = entry

    def unregister(self, name: str) -> None:
        del self._paths[name]
