"""`check_engine_args` for engines that read no `rollout.engine_args` (kept out of rollout/engine.py:
config.py imports the rollout package, so the package's own modules import no config)."""
from __future__ import annotations


def refuse_engine_args(engine: str, args: dict) -> None:
    """Any `rollout.engine_args` for `engine` is a ConfigError naming them."""
    if args:
        from megatron_vppo.config import ConfigError

        raise ConfigError(f"rollout.engine_args {sorted(args)} given, but rollout.engine={engine} takes none; "
                          "remove them (engine_args is read by rollout.engine=vllm)")
