"""Typed run configuration: dataclasses are the one source of defaults; YAML and `key=value`
overrides are checked against them, and an unknown key is an error that names the nearest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    sp: bool = False
    dp: int | None = None  # derived from the world size when unset


@dataclass
class ModelConfig:
    path: str = ""  # HF directory or Megatron checkpoint
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    fp8: str | None = None  # None | hybrid | e4m3
    fp8_recipe: str = "delayed"  # delayed | tensorwise (current scaling)
    recompute: bool = False
    vocab_pad_multiple: int = 128


@dataclass
class VPPOConfig:
    """Spec §3–§6 and the recipe table of §7."""
    algorithm: str = "vppo"  # vppo | dapo | grpo
    top_k_ratio: float = 0.4
    beta_min: float = 0.9
    entropy_coef: float = 0.06
    dependency_estimator: str = "sampled_k3"  # sampled_k3 | exact_kl
    tas_scope: str = "global"  # global | official
    perturbation: str = "pixel"  # pixel | image
    perturb_prob: float = 0.5
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | sglang | vllm (megatron_vppo.rollout.ENGINES)
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 0.99
    top_k: int = -1
    max_prompt_length: int = 4096
    max_response_length: int = 2048
    bucket_bytes: int = 512 * 1024 * 1024
    sglang_mode: str = "colocated"  # colocated | disaggregated
    sglang_mem_fraction: float = 0.5
    max_dynamic_sampling_retries: int = 4
    # Engine-specific settings, validated by the engine (vllm: rollout/vllm_engine.py VLLMEngineArgs).
    engine_args: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    train: str = ""
    val: str = ""
    min_pixels: int = 200704
    max_pixels: int = 1003520
    shuffle: bool = True
    filter_overlong_prompts: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-6
    lr_schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    use_distributed_optimizer: bool = True


@dataclass
class TrainConfig:
    seed: int = 1
    prompts_per_step: int = 384
    mini_batch_prompts: int = 128
    micro_batch_size: int = 4
    ppo_epochs: int = 1
    total_steps: int = 200
    val_every: int = 5
    val_k: int = 8
    output_dir: str = "outputs/run"
    save_every: int = 10
    keep_last: int = 3
    resume: str = "auto"  # auto | never | PATH


@dataclass
class RewardConfig:
    """Spec §1.2: binary accuracy of the last \\boxed{} answer (mathruler, as the paper's reward)."""
    method: str = "mathruler"  # mathruler | math_verify
    extraction: str = "lenient"  # lenient | mathruler (exact parity with the reference extraction)
    timeout_s: float = 10.0  # per-call grading deadline; a timed-out answer scores 0


@dataclass
class RunConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    vppo: VPPOConfig = field(default_factory=VPPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


def _nearest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if value is None:
            raise ConfigError(f"{where}: expected a string, got null")
        return str(value)
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys raise ConfigError naming the nearest one."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_nearest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides (values parsed as YAML scalars) onto a nested dict."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    import yaml

    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(RunConfig, data)
    validate_choices(cfg)
    return cfg


_CHOICES = {
    ("model", "dtype"): {"fp32", "bf16", "fp16"},
    ("model", "transformer_impl"): {"auto", "local", "transformer_engine"},
    ("model", "fp8"): {None, "hybrid", "e4m3"},
    ("model", "fp8_recipe"): {"delayed", "tensorwise"},
    ("vppo", "algorithm"): {"vppo", "dapo", "grpo"},
    ("vppo", "dependency_estimator"): {"sampled_k3", "exact_kl"},
    ("vppo", "tas_scope"): {"global", "official"},
    ("vppo", "perturbation"): {"pixel", "image"},
    ("rollout", "engine"): {"hf", "sglang", "vllm"},
    ("rollout", "sglang_mode"): {"colocated", "disaggregated"},
    ("optim", "lr_schedule"): {"constant", "cosine", "linear"},
    ("reward", "method"): {"mathruler", "math_verify"},
    ("reward", "extraction"): {"lenient", "mathruler"},
}


def validate_choices(cfg: RunConfig) -> None:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            shown = sorted(str(a) for a in allowed)
            raise ConfigError(f"{section}.{key}={value!r} is not one of {shown}")
    if not isinstance(cfg.rollout.engine_args, dict):
        raise ConfigError(f"rollout.engine_args must be a mapping, got {cfg.rollout.engine_args!r}")
    from megatron_vppo.rollout import check_engine_args

    check_engine_args(cfg.rollout.engine, cfg.rollout.engine_args)
    if not 0.0 < cfg.vppo.top_k_ratio <= 1.0:
        raise ConfigError(f"vppo.top_k_ratio={cfg.vppo.top_k_ratio} must be in (0, 1]")
    if not 0.0 <= cfg.vppo.beta_min <= 1.0:
        raise ConfigError(f"vppo.beta_min={cfg.vppo.beta_min} must be in [0, 1]")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
