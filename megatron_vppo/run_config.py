"""Load a run config and check it against the registries: the layer above config.py.

config.py (imported by every package, importing none) holds the typed sections, their defaults and the
checks that need nothing else. The choices the registries own — `model.arch` (MODELS), `algo.name`
(ALGORITHMS), `rollout.engine` (ENGINES) — and the keys each chosen entry reads are checked here:

* every accepted key has an effect: an `algo.*` key the chosen algorithm does not read, or a
  `rollout.*` key the chosen engine (or algorithm, for dynamic sampling) does not read, set away from its
  default, is a ConfigError naming the algorithm or engine;
* switching algorithm or engine on a shipped config takes one override: a key the file wrote for the
  algorithm / engine it names, which a command-line `algo.name=` / `rollout.engine=` replaced, is dropped
  (back to its default) with one info line. Given on the command line, or read by neither, it is an error.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

from megatron_vppo.algo.registry import ALGORITHMS, Algorithm
from megatron_vppo.algo.rollout_correction import check_correction
from megatron_vppo.config import (ALGORITHM_ROLLOUT_KEYS, ROLLOUT_KEYS_EVERY_ENGINE_READS, AlgoConfig, ConfigError,
                                  RolloutConfig, RunConfig, apply_overrides, check_renamed_sections, from_dict,
                                  read_config_file, validate_choices, validate_ranges)
from megatron_vppo.models import MODELS
from megatron_vppo.rollout import ENGINES

log = logging.getLogger("megatron_vppo.config")

# Keys whose reader is the chosen algorithm / engine (qualified "section.key").
ALGORITHM_KEYS = frozenset({f"algo.{f.name}" for f in dataclasses.fields(AlgoConfig) if f.name != "name"}
                           | {f"rollout.{k}" for k in ALGORITHM_ROLLOUT_KEYS})
ENGINE_KEYS = frozenset(f"rollout.{f.name}" for f in dataclasses.fields(RolloutConfig)
                        if f.name not in ROLLOUT_KEYS_EVERY_ENGINE_READS | ALGORITHM_ROLLOUT_KEYS)


def algorithm_reads(algo: Algorithm) -> frozenset[str]:
    """The qualified keys an algorithm reads: its declared `algo.*` keys, and the dynamic-sampling budget
    when it filters groups."""
    extra = {f"rollout.{k}" for k in ALGORITHM_ROLLOUT_KEYS} if algo.dynamic_sampling else set()
    return frozenset({f"algo.{k}" for k in algo.reads} | extra)


def engine_reads(engine_cls: type) -> frozenset[str]:
    return frozenset(f"rollout.{k}" for k in engine_cls.reads)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file + `key=value` overrides -> a RunConfig whose every value is range-checked and read."""
    file_data = read_config_file(path)
    overrides = list(overrides or [])
    data = apply_overrides(copy.deepcopy(file_data), overrides)
    check_renamed_sections(data)
    cfg = from_dict(RunConfig, data)
    validate(cfg, file_data=file_data, cli_keys={o.split("=", 1)[0] for o in overrides})
    return cfg


def validate(cfg: RunConfig, *, file_data: dict | None = None, cli_keys: set[str] | None = None) -> None:
    """Check `cfg` (in place: keys dropped by an algorithm / engine switch go back to their defaults).
    Without `file_data` every key counts as given on the command line (strict)."""
    validate_choices(cfg)
    validate_ranges(cfg)
    if cfg.model.arch not in MODELS:
        raise ConfigError(f"model.arch={cfg.model.arch!r} is not a known model; known: {sorted(MODELS)}")
    if cfg.algo.name not in ALGORITHMS:
        raise ConfigError(f"algo.name={cfg.algo.name!r} is not one of {sorted(ALGORITHMS)}")
    if cfg.rollout.engine not in ENGINES:
        raise ConfigError(f"rollout.engine={cfg.rollout.engine!r} is not one of {sorted(ENGINES)}")
    strict = file_data is None
    file_data = file_data or {}
    cli_keys = set(cli_keys or ())
    algo, engine_cls = ALGORITHMS[cfg.algo.name], ENGINES[cfg.rollout.engine]
    file_algo = _file_choice(file_data, "algo", "name", AlgoConfig.name)
    file_engine = _file_choice(file_data, "rollout", "engine", RolloutConfig.engine)
    _drop_or_refuse(cfg, ALGORITHM_KEYS, algorithm_reads(algo), "algorithm", cfg.algo.name, file_algo,
                    algorithm_reads(ALGORITHMS[file_algo]) if file_algo in ALGORITHMS else frozenset(),
                    cli_keys, strict)
    _drop_or_refuse(cfg, ENGINE_KEYS, engine_reads(engine_cls), "engine", cfg.rollout.engine, file_engine,
                    engine_reads(ENGINES[file_engine]) if file_engine in ENGINES else frozenset(),
                    cli_keys, strict)
    if not isinstance(cfg.rollout.engine_args, dict):
        raise ConfigError(f"rollout.engine_args must be a mapping, got {cfg.rollout.engine_args!r}")
    engine_cls.check_engine_args(cfg.rollout.engine_args)
    from megatron_vppo.rollout import engine_tp_for

    engine_tp_for(cfg.rollout.engine, cfg.rollout.engine_tp, cfg.parallel.tp)  # refuses what the engine cannot
    try:
        algo.check(cfg.algo)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_combinations(cfg, algo, engine_cls)


def validate_algorithm(algo_cfg: AlgoConfig) -> None:
    """Strict check of an `algo` section alone: the algorithm exists and reads every key set."""
    cfg = RunConfig(algo=algo_cfg)
    if algo_cfg.name not in ALGORITHMS:
        raise ConfigError(f"algo.name={algo_cfg.name!r} is not one of {sorted(ALGORITHMS)}")
    algo = ALGORITHMS[algo_cfg.name]
    _drop_or_refuse(cfg, {k for k in ALGORITHM_KEYS if k.startswith("algo.")}, algorithm_reads(algo), "algorithm",
                    algo_cfg.name, algo_cfg.name, frozenset(), set(), True)
    try:
        algo.check(algo_cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _file_choice(file_data: dict, section: str, key: str, default: str) -> str:
    sec = file_data.get(section)
    return str(sec.get(key, default)) if isinstance(sec, dict) else default


def _get(cfg: RunConfig, key: str):
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _drop_or_refuse(cfg: RunConfig, governed, reads, what: str, chosen: str, file_choice: str, file_reads,
                    cli_keys: set[str], strict: bool) -> None:
    default = RunConfig()
    for key in sorted(set(governed) - set(reads)):
        value, default_value = _get(cfg, key), _get(default, key)
        if value == default_value:
            continue
        on_cli = strict or any(k == key or k.startswith(key + ".") for k in cli_keys)
        if not on_cli and file_choice != chosen and key in file_reads:
            log.info("%s=%r was written for %s %r; the override %s=%s does not read it, so it is ignored",
                     key, value, what, file_choice, "algo.name" if what == "algorithm" else "rollout.engine", chosen)
            section, name = key.split(".", 1)
            setattr(getattr(cfg, section), name, copy.deepcopy(default_value))
            continue
        shown = ", ".join(sorted(k for k in reads if k.split(".")[0] == key.split(".")[0])) or "none of them"
        if dataclasses.is_dataclass(value):  # name the nested key that is set (algo.papo.gamma)
            sub = next(f.name for f in dataclasses.fields(value)
                       if getattr(value, f.name) != getattr(default_value, f.name))
            key, value = f"{key}.{sub}", getattr(value, sub)
        raise ConfigError(f"{key}={value!r} is set, but {what} {chosen!r} does not read it (it reads {shown}); "
                          f"remove {key} or choose an {what} that reads it")


def _validate_combinations(cfg: RunConfig, algo: Algorithm, engine_cls: type) -> None:
    """Settings that are each valid but not together."""
    if (cfg.train.old_logp_source == "engine" and algo.needs_perturbed_view and cfg.algo.perturbation != "image"
            and not engine_cls.takes_pixel_values):
        raise ConfigError("train.old_logp_source=engine has the engine score the perturbed view; "
                          f"algo.perturbation={cfg.algo.perturbation!r} edits pixel_values, which rollout.engine="
                          f"{cfg.rollout.engine} cannot take (it preprocesses raw images itself); set "
                          "algo.perturbation=image (the blackened image, which it preprocesses to the trainer's "
                          "pixels), or use train.old_logp_source=trainer")
    if cfg.train.old_logp_source == "engine" and algo.needs_perturbed_view and not algo.engine_view(cfg.algo):
        raise ConfigError(f"train.old_logp_source=engine: the second view of algo.name={cfg.algo.name} is not an "
                          "image the engine can score (vepo needs full distributions; pgpo.view=blind an attention "
                          "mask); use train.old_logp_source=trainer (or algo.pgpo.view=patches for pgpo)")
    rc = cfg.algo.rollout_correction
    try:
        check_correction(rc.level, rc.mode, rc.cap)
    except ValueError as e:
        raise ConfigError(f"algo.{e}") from None
    if cfg.train.old_logp_source == "engine":
        if rc.level != "none":
            raise ConfigError("algo.rollout_correction applies with train.old_logp_source=trainer only (in engine "
                              "mode π_old is the engine's own log-prob); set algo.rollout_correction.level=none")
        if cfg.algo.dependency_estimator == "exact_kl":
            raise ConfigError("algo.dependency_estimator=exact_kl needs full distributions, which only the trainer's "
                              "pass has; use train.old_logp_source=trainer or algo.dependency_estimator=sampled_k3")
    elif cfg.train.check_old_logp_every != 0:
        raise ConfigError(f"train.check_old_logp_every={cfg.train.check_old_logp_every} compares the engine's π_old "
                          "with the trainer's, which only train.old_logp_source=engine has; set "
                          "train.check_old_logp_every=0 or train.old_logp_source=engine")
    if cfg.model.fp8 is None and cfg.model.fp8_recipe != RunConfig().model.fp8_recipe:
        raise ConfigError(f"model.fp8_recipe={cfg.model.fp8_recipe!r} is set, but model.fp8 is unset (no FP8 GEMMs "
                          "to scale); set model.fp8=hybrid or e4m3, or remove model.fp8_recipe")
