"""Every accepted key has an effect, and switching algorithm or engine on a shipped config takes one
override (issue 20 item 2). Config loading only: nothing is built."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from megatron_vppo.algo.registry import ALGORITHMS
from megatron_vppo.config import ConfigError, RunConfig
from megatron_vppo.rollout import ENGINES
from megatron_vppo.run_config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))
CPU_ENGINES = ("hf", "vllm")  # the engines that run on CPU


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_switches_algorithm_and_engine_with_one_override(config):
    """Each shipped config × each algorithm (× each CPU engine) loads; a key the file wrote for its own
    algorithm / engine that the new one does not read is back at its default, everything else kept."""
    base = load_config(config)
    for algo in ALGORITHMS:
        cfg = load_config(config, [f"algo.name={algo}"])
        assert cfg.algo.name == algo and cfg.train == base.train and cfg.data == base.data
        reads = ALGORITHMS[algo].reads
        for key in ("clip_low", "top_k_ratio", "entropy_coef", "beta_min"):
            expect = getattr(base.algo, key) if key in reads else getattr(RunConfig().algo, key)
            assert getattr(cfg.algo, key) == expect, (config.stem, algo, key)
        for engine in CPU_ENGINES:
            both = load_config(config, [f"algo.name={algo}", f"rollout.engine={engine}"])
            assert (both.algo.name, both.rollout.engine) == (algo, engine)
    for engine in CPU_ENGINES:
        cfg = load_config(config, [f"rollout.engine={engine}"])
        assert cfg.rollout.engine == engine
        assert cfg.rollout.top_p == base.rollout.top_p and cfg.algo == base.algo
        if "engine_gpu_share" not in ENGINES[engine].reads:
            assert cfg.rollout.engine_gpu_share == RunConfig().rollout.engine_gpu_share


def test_dropped_key_is_one_info_line(caplog):
    """demo_cpu.yaml is written for vppo (entropy_coef: 0.0); algo.name=dapo drops it with one line."""
    demo = next(p for p in CONFIGS if p.stem == "demo_cpu")
    with caplog.at_level(logging.INFO, logger="megatron_vppo.config"):
        cfg = load_config(demo, ["algo.name=dapo"])
    assert cfg.algo.entropy_coef == RunConfig().algo.entropy_coef
    lines = [r.getMessage() for r in caplog.records if "entropy_coef" in r.getMessage()]
    assert len(lines) == 1 and "'vppo'" in lines[0] and "algo.name=dapo" in lines[0]


def _file(tmp_path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_a_key_the_chosen_entry_does_not_read_is_an_error_naming_it(tmp_path):
    # on the command line
    with pytest.raises(ConfigError, match="algorithm 'dapo' does not read it"):
        load_config(None, ["algo.name=dapo", "algo.entropy_coef=0.1"])
    # in a file that names that algorithm itself
    with pytest.raises(ConfigError, match="algo.top_k_ratio=0.5 is set, but algorithm 'grpo'"):
        load_config(_file(tmp_path, "algo: {name: grpo, top_k_ratio: 0.5}\n"))
    # written for an algorithm that does not read it either: the file is wrong, whatever the override
    with pytest.raises(ConfigError, match="algo.clip_high=0.3 is set, but algorithm 'grpo'"):
        load_config(_file(tmp_path, "algo: {name: grpo, clip_high: 0.3}\n"), ["algo.name=gspo", "algo.name=grpo"])
    # dynamic sampling's budget belongs to the algorithms that filter groups
    with pytest.raises(ConfigError, match="rollout.max_dynamic_sampling_retries=2 is set, but algorithm 'grpo'"):
        load_config(None, ["algo.name=grpo", "rollout.max_dynamic_sampling_retries=2"])
    load_config(None, ["algo.name=dapo", "rollout.max_dynamic_sampling_retries=2"])
    # engine keys: named by the engine
    for key, value in (("engine_gpu_share", 0.3), ("engine_weights_cpu_backup", True), ("bucket_bytes", 1024)):
        for engine in CPU_ENGINES:
            with pytest.raises(ConfigError, match=f"rollout.{key}=.* engine '{engine}' does not read it"):
                load_config(None, [f"rollout.engine={engine}", f"rollout.{key}={value}"])
        load_config(None, ["rollout.engine=sglang", f"rollout.{key}={value}"])
    # an engine switch drops what the file wrote for its own engine
    cfg = load_config(_file(tmp_path, "rollout: {engine: sglang, engine_gpu_share: 0.3}\n"), ["rollout.engine=hf"])
    assert cfg.rollout.engine_gpu_share == RunConfig().rollout.engine_gpu_share


def test_settings_that_only_mean_something_together():
    with pytest.raises(ConfigError, match="train.check_old_logp_every=2 .* train.old_logp_source=engine"):
        load_config(None, ["train.check_old_logp_every=2"])
    load_config(None, ["train.check_old_logp_every=2", "train.old_logp_source=engine"])
    with pytest.raises(ConfigError, match="model.fp8_recipe='tensorwise' is set, but model.fp8 is unset"):
        load_config(None, ["model.fp8_recipe=tensorwise"])
    load_config(None, ["model.fp8_recipe=tensorwise", "model.fp8=hybrid"])


def test_eval_reads_the_run_configs_defaults(tmp_path):
    """`megatron-vppo eval` samples as the trainer's validation does (issue 20 item 7): rollout.top_p 0.99,
    not 1.0; `--config` supplies a run's values; a flag overrides one."""
    from megatron_vppo.train.evaluate import parse_args

    base = ["--model", "m", "--data", "d"]
    run = RunConfig()
    args = parse_args(base)
    assert (args.top_p, args.top_k, args.k, args.seed, args.max_new_tokens, args.max_grader_error_rate) == (
        run.rollout.top_p, run.rollout.top_k, run.train.val_k, run.train.seed, run.rollout.max_response_length,
        run.reward.max_error_rate)
    assert args.min_pixels is None  # no run config: the model's processor keeps its bounds
    cfg = _file(tmp_path, "rollout: {top_p: 0.9, max_response_length: 7}\ntrain: {seed: 5, val_k: 3}\n"
                          "data: {min_pixels: 3136, max_pixels: 12544}\n")
    args = parse_args(base + ["--config", str(cfg), "--seed", "2"])
    assert (args.top_p, args.max_new_tokens, args.k, args.seed, args.min_pixels) == (0.9, 7, 3, 2, 3136)
