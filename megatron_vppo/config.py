"""Typed run configuration: dataclasses are the one source of defaults; YAML and `key=value`
overrides are checked against them, and an unknown key is an error that names the nearest valid key.
Every numeric value is range-checked at load (`RANGES`), and a YAML syntax error is one line with
file:line:column — a bad setting fails before anything is built, never after the model loads.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


# Defaults that pure functions outside the dataclasses also use (algo/loss.py, sync/buckets.py): one value each.
TOKEN_CLIP_DEFAULTS = (0.2, 0.28)  # (clip_low, clip_high) of the token-level algorithms when algo.clip_* is unset
DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024  # rollout.bucket_bytes


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
    arch: str = "qwen2_5_vl"  # a name in megatron_vppo.models.MODELS
    path: str = ""  # HF directory or Megatron checkpoint
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    fp8: str | None = None  # None | hybrid | e4m3
    fp8_recipe: str = "delayed"  # delayed | tensorwise (current scaling)
    recompute: bool = False
    vocab_pad_multiple: int = 128


@dataclass
class RolloutCorrectionConfig:
    """Importance weights π_old / π_rollout on the policy loss (docs/rollout_correction.md)."""
    level: str = "none"  # none | token | sequence
    mode: str = "truncate"  # truncate (TIS) | mask (MIS)
    cap: float = 2.0  # C >= 1: truncate caps w at C; mask drops w outside [1/C, C]


@dataclass
class PapoConfig:
    """PAPO (spec/perception_family.md): the implicit perception loss on GRPO (`papo`) or DAPO (`papo_d`)."""
    gamma: float | None = None  # k3 coefficient γ; None: the preset's (papo 0.02, papo_d 0.01)
    eta: float | None = None  # sampled-entropy coefficient η; None: the preset's (papo 0.05 (7B), papo_d 0.03)
    mask_ratio: float = 0.6  # share of 14-px patches blackened in the second view
    clamp_k3_small: bool = False  # clamp k3 to [0, 0.2] instead of [-10, 10] (an option of the authors' scripts)
    # TRL's variant: the masked view is forwarded again in the update, with gradient, and k3 takes both
    # views' current log-probs (~2x the update's activations); false: the authors' q, scored once, no gradient
    second_view_grad: bool = False


@dataclass
class PgpoConfig:
    """PGPO: per-token advantage weights from the second view (algo/pgpo.py)."""
    view: str = "blind"  # blind (attention masked on the prompt's image pads) | patches (algo.perturb_prob)
    tau: float = 0.4
    beta: float = 2.0
    threshold: str = "fixed"  # fixed | quantile (the authors' development code)
    low_weight_floor: float = 0.0  # 0 (paper) | 0.1 (the authors' development code)
    mass_normalization: bool = True  # true (paper) | false (the authors' development code)


@dataclass
class VepoConfig:
    """VEPO: token selection by visual divergence (algo/vepo.py)."""
    noise_std: float = 2.0  # std of the Gaussian noise on normalised pixel_values (authors' code: 2·√12 ≈ 6.93)
    alpha: float = 0.7
    top_ratio: float = 0.2
    entropy_coef: float = 1e-3  # sampled-entropy bonus over the kept tokens (the VEPO recipe)


@dataclass
class AlgoConfig:
    """The RL algorithm and its settings (spec §3–§6 and the recipe table of §7 for vppo).

    `name` picks an entry of `megatron_vppo.algo.ALGORITHMS`; each algorithm declares the keys it reads,
    and a key it does not read, set away from its default, is a ConfigError — unless the file wrote it for
    the algorithm a command-line `algo.name=` replaced (then it is dropped with one info line;
    `run_config.validate`)."""
    name: str = "vppo"  # a name in megatron_vppo.algo.ALGORITHMS (grpo | dapo | vppo | gspo | papo | papo_d | pgpo | vepo)
    # None: the algorithm's own default (Algorithm.clip_defaults): 0.2 / 0.28 for the token-level
    # algorithms, 3e-4 / 4e-4 for gspo (its paper's values; the ratio there is a per-token geometric mean)
    clip_low: float | None = None
    clip_high: float | None = None
    dual_clip: float = 3.0
    top_k_ratio: float = 0.4
    beta_min: float = 0.9
    entropy_coef: float = 0.06
    dependency_estimator: str = "sampled_k3"  # sampled_k3 | exact_kl
    tas_scope: str = "global"  # global | official
    perturbation: str = "pixel"  # pixel | image
    perturb_prob: float = 0.5
    # trainer π_old vs the engine's sampling log-probs (old_logp_source=trainer only)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    papo: PapoConfig = field(default_factory=PapoConfig)
    pgpo: PgpoConfig = field(default_factory=PgpoConfig)
    vepo: VepoConfig = field(default_factory=VepoConfig)


@dataclass
class RolloutConfig:
    engine: str = "hf"  # a name in megatron_vppo.rollout.ENGINES (hf | sglang | vllm)
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 0.99
    top_k: int = -1
    max_prompt_length: int = 4096
    max_response_length: int = 2048
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    # Ranks per rollout engine: one engine per engine_tp consecutive ranks of a node, so every GPU rolls
    # out (world_size / engine_tp engines). None: the training TP for engines that span ranks
    # (`tensor_parallel`: SGLang), 1 for the others (hf, vllm: an engine on every rank, which do not read
    # this key: only engines that span ranks list it in their `reads`).
    engine_tp: int | None = None
    # SGLang runs colocated (an engine per rollout.engine_tp GPUs, on every GPU; see
    # docs/sglang.md). Share of each GPU's total memory that engine uses for weights + KV cache while
    # it generates; it gives it all back while the trainer runs. The trainer turns it into SGLang's
    # mem_fraction_static from the memory free when the engine starts; the tuner's --rollout-share.
    engine_gpu_share: float = 0.5
    # Keep a CPU copy of the engine's weights across release/resume (host memory: one model copy per
    # engine GPU). Off: the trainer's weight sync after each resume reloads them anyway.
    engine_weights_cpu_backup: bool = False
    max_dynamic_sampling_retries: int = 4
    # Engine-specific settings, validated by the engine (vllm: rollout/vllm_engine.py VLLMEngineArgs).
    engine_args: dict = field(default_factory=dict)


# rollout.* keys the trainer reads whatever the engine; the others belong to the engines that declare them
# (`RolloutEngine.reads`) or, for ALGORITHM_ROLLOUT_KEYS, to the algorithms with dynamic sampling.
ROLLOUT_KEYS_EVERY_ENGINE_READS = frozenset({"engine", "engine_args", "group_size", "temperature", "top_p", "top_k",
                                             "max_prompt_length", "max_response_length"})
ALGORITHM_ROLLOUT_KEYS = frozenset({"max_dynamic_sampling_retries"})


@dataclass
class DataConfig:
    train: str = ""
    val: str = ""
    min_pixels: int = 200704
    max_pixels: int = 1003520
    shuffle: bool = True
    filter_overlong_prompts: bool = True
    problem_key: str = "problem"  # column names of the ViRL39K schema, for tables that name them otherwise
    images_key: str = "images"
    answer_key: str = "answer"
    resume_position: bool = True  # false: on resume, start the data order afresh instead of at the saved position


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
    # Set: every pass packs trajectories (thd, no padding) first-fit decreasing into micro-batches of at
    # most this many tokens per view, DP shards balanced by tokens; micro_batch_size is then unused.
    max_tokens_per_micro_batch: int | None = None
    ppo_epochs: int = 1
    total_steps: int = 200
    val_every: int = 5
    val_k: int = 8
    output_dir: str = "outputs/run"
    save_every: int = 10
    keep_last: int = 3
    resume: str = "auto"  # auto | never | PATH
    # π_old: "trainer" = the paired no-grad pass; "engine" = the engine's sampling log-probs, and the
    # perturbed view scored by the engine (one prefill), no trainer pass at all
    old_logp_source: str = "trainer"  # trainer | engine
    # engine mode: every N steps also run the trainer's pass and log how well the dependency agrees (0 = never)
    check_old_logp_every: int = 0
    existing_output: str = "refuse"  # refuse | move_aside: a fresh run into a dir holding another run
    load_optimizer: bool = True  # false: on resume, load the weights only (Adam moments and schedule restart)
    max_nonfinite_steps: int = 3  # consecutive optimizer steps skipped for a non-finite loss/grad before the run stops


@dataclass
class RewardConfig:
    """Spec §1.2: binary accuracy of the last \\boxed{} answer (mathruler, as the paper's reward)."""
    method: str = "mathruler"  # mathruler | math_verify
    extraction: str = "lenient"  # lenient | mathruler (exact parity with the reference extraction)
    timeout_s: float = 10.0  # per-call grading deadline; a timed-out answer scores 0
    max_error_rate: float = 0.05  # a step (or eval) whose grader raised on more than this fraction of answers stops


@dataclass
class RunConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
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
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': {_yaml_error('the value', e)}; quote it") from None
    return data


# Sections renamed: the old name is an error that names the new keys (never read silently).
RENAMED_SECTIONS = {"vppo": ("algo", {"algorithm": "name"})}


def check_renamed_sections(data: dict) -> None:
    for old, (new, keys) in RENAMED_SECTIONS.items():
        if old not in data:
            continue
        section = data[old] if isinstance(data[old], dict) else {}
        moved = [f"{old}.{k} is {new}.{keys.get(k, k)}" for k in section]
        detail = "; ".join(moved) if moved else f"{old}.algorithm is {new}.name, {old}.X is {new}.X"
        raise ConfigError(f"the `{old}:` section is now `{new}:`; {detail}")


def _yaml_error(where: str, err: Exception) -> ConfigError:
    """A YAML syntax error as one line: file:line:column and what the parser expected."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None and where != "the value" else where
    what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
    return ConfigError(f"{at}: YAML syntax error: {what or err}")


def read_config_file(path: str | Path | None) -> dict:
    """A config YAML's sections as a dict ({} for None); errors are one ConfigError line."""
    import yaml

    if path is None:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise _yaml_error(str(path), e) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


_CHOICES = {
    ("model", "dtype"): {"fp32", "bf16", "fp16"},
    ("model", "transformer_impl"): {"auto", "local", "transformer_engine"},
    ("model", "fp8"): {None, "hybrid", "e4m3"},
    ("model", "fp8_recipe"): {"delayed", "tensorwise"},
    ("algo", "dependency_estimator"): {"sampled_k3", "exact_kl"},
    ("algo", "tas_scope"): {"global", "official"},
    ("algo", "perturbation"): {"pixel", "image"},
    ("algo.pgpo", "view"): {"blind", "patches"},
    ("algo.pgpo", "threshold"): {"fixed", "quantile"},
    ("train", "old_logp_source"): {"trainer", "engine"},
    ("optim", "lr_schedule"): {"constant", "cosine", "linear"},
    ("reward", "method"): {"mathruler", "math_verify"},
    ("reward", "extraction"): {"lenient", "mathruler"},
    ("train", "existing_output"): {"refuse", "move_aside"},
}


def _section(cfg: RunConfig, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate_choices(cfg: RunConfig) -> None:
    """The fixed choices above; the registries' choices (model.arch, algo.name, rollout.engine) and
    what the chosen entries read are checked by `run_config.validate`."""
    for (section, key), allowed in _CHOICES.items():
        value = getattr(_section(cfg, section), key)
        if value not in allowed:
            shown = sorted(str(a) for a in allowed)
            raise ConfigError(f"{section}.{key}={value!r} is not one of {shown}")


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric field; `why` says what breaks outside it."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def contains(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def text(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        lo = f"{'(' if self.lo_open else '['}{self.lo}"
        return f"{lo}, {self.hi}{')' if self.hi_open else ']'}"


def _at_least(lo: float, why: str = "") -> Range:
    return Range(lo=lo, why=why)


def _above(lo: float, why: str = "") -> Range:
    return Range(lo=lo, lo_open=True, why=why)


_PROB = Range(0.0, 1.0)
_BETA = Range(0.0, 1.0, hi_open=True, why="Adam's bias correction divides by 1 - beta^t")

# Every int/float field of RunConfig has an entry (tests/test_faults_run.py checks it), checked at load.
RANGES: dict[tuple[str, str], Range] = {
    ("parallel", "tp"): _at_least(1), ("parallel", "pp"): _at_least(1), ("parallel", "vpp"): _at_least(1),
    ("parallel", "cp"): _at_least(1), ("parallel", "dp"): _at_least(1),
    ("model", "vocab_pad_multiple"): _at_least(1),
    ("algo", "top_k_ratio"): Range(0.0, 1.0, lo_open=True), ("algo", "beta_min"): _PROB,
    ("algo", "entropy_coef"): _at_least(0.0), ("algo", "perturb_prob"): _PROB,
    ("algo", "clip_low"): Range(0.0, 1.0, hi_open=True, why="the ratio's lower bound 1 - clip_low must stay > 0"),
    ("algo", "clip_high"): _at_least(0.0),
    ("algo", "dual_clip"): _above(1.0, "the dual-clip bound c must exceed 1 (spec: 3.0)"),
    ("rollout", "group_size"): _at_least(2, "GRPO advantages compare answers within a group"),
    ("rollout", "temperature"): _above(0.0, "RL samples; greedy rollouts make every group's answers identical"),
    ("rollout", "top_p"): Range(0.0, 1.0, lo_open=True), ("rollout", "top_k"): _at_least(-1, "-1 or 0: no top-k"),
    ("rollout", "max_prompt_length"): _at_least(1), ("rollout", "max_response_length"): _at_least(1),
    ("rollout", "bucket_bytes"): _at_least(1), ("rollout", "engine_tp"): _at_least(1),
    ("rollout", "engine_gpu_share"): Range(0.0, 0.95, lo_open=True,
                                          why="the colocated engine's share of the GPU memory free at its start"),
    ("rollout", "max_dynamic_sampling_retries"): _at_least(0),
    ("data", "min_pixels"): _at_least(1), ("data", "max_pixels"): _at_least(1),
    ("optim", "lr"): Range(0.0, 1.0, lo_open=True, hi_open=True,
                           why="Adam moves every weight by about lr per step; fine-tuning uses 1e-7..1e-3"),
    ("optim", "warmup_steps"): _at_least(0), ("optim", "weight_decay"): _at_least(0.0),
    ("optim", "adam_beta1"): _BETA, ("optim", "adam_beta2"): _BETA,
    ("optim", "grad_clip"): _at_least(0.0, "0 turns clipping off"),
    ("train", "seed"): _at_least(0), ("train", "prompts_per_step"): _at_least(1),
    ("train", "mini_batch_prompts"): _at_least(1), ("train", "micro_batch_size"): _at_least(1),
    ("train", "ppo_epochs"): _at_least(1), ("train", "total_steps"): _at_least(1),
    ("train", "val_every"): _at_least(0, "0 turns validation off"), ("train", "val_k"): _at_least(1),
    ("train", "save_every"): _at_least(0, "0 saves at the last step only"),
    ("train", "keep_last"): _at_least(0, "0 keeps every checkpoint"),
    ("train", "max_nonfinite_steps"): _at_least(1),
    ("train", "check_old_logp_every"): _at_least(0, "0 never checks"),
    ("train", "max_tokens_per_micro_batch"): _at_least(1, "unset (null) pads micro-batches instead of packing"),
    ("reward", "timeout_s"): _at_least(0.0, "0 grades without a deadline"), ("reward", "max_error_rate"): _PROB,
}


# Numeric fields of the nested algo sections (RANGES holds the top-level sections' fields).
NESTED_RANGES: dict[tuple[str, str], Range] = {
    ("algo.papo", "gamma"): _at_least(0.0), ("algo.papo", "eta"): _at_least(0.0),
    ("algo.papo", "mask_ratio"): _PROB,
    ("algo.pgpo", "tau"): Range(0.0, 1.0, lo_open=True, why="w = I/τ below the threshold"),
    ("algo.pgpo", "beta"): _at_least(0.0), ("algo.pgpo", "low_weight_floor"): _PROB,
    ("algo.vepo", "noise_std"): _at_least(0.0), ("algo.vepo", "alpha"): _PROB,
    ("algo.vepo", "top_ratio"): Range(0.0, 1.0, lo_open=True), ("algo.vepo", "entropy_coef"): _at_least(0.0),
}


def validate_ranges(cfg: RunConfig) -> None:
    """One line per bad value, naming the key and its allowed range, before anything is built."""
    for (section, key), allowed in {**RANGES, **NESTED_RANGES}.items():
        value = getattr(_section(cfg, section), key)
        if value is None:
            continue
        if not allowed.contains(value):
            why = f" ({allowed.why})" if allowed.why else ""
            raise ConfigError(f"{section}.{key}={value!r} is out of range: allowed {allowed.text()}{why}")
    if cfg.data.min_pixels > cfg.data.max_pixels:
        raise ConfigError(f"data.min_pixels={cfg.data.min_pixels} > data.max_pixels={cfg.data.max_pixels}; "
                          f"lower data.min_pixels or raise data.max_pixels")


def flatten_dotted(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested settings as the dotted keys overrides and messages use."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


CONFIG_FILE = "config.yaml"  # the resolved config a run saves in train.output_dir


def config_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (every key, defaults included): `load_config` of it gives `cfg` back."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: RunConfig, out_dir: str | Path | None = None) -> Path:
    """Write `config_yaml(cfg)` to `<train.output_dir>/config.yaml` (atomically: temp file + rename) and
    return its path; a directory that cannot be written is a ConfigError naming it."""
    out = Path(cfg.train.output_dir if out_dir is None else out_dir)
    path = out / CONFIG_FILE
    tmp = path.with_name(f".{CONFIG_FILE}.tmp")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.write_text(config_yaml(cfg), encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise ConfigError(f"train.output_dir={str(out)!r}: cannot write {CONFIG_FILE} ({e.strerror}); "
                          "choose a writable train.output_dir") from None
    return path
