"""Every rollout engine implements the whole `RolloutEngine` protocol the trainer codes against
(by inspection: no engine is started, no GPU needed)."""
from __future__ import annotations

import inspect

import pytest

from megatron_vppo.rollout import ENGINES
from megatron_vppo.rollout.engine import RolloutEngine

# Declared on the protocol: methods/classmethods and data attributes.
MEMBERS = sorted(n for n in vars(RolloutEngine) if not n.startswith("_")) + ["in_process", "weight_version"]


def _engine_classes():
    from megatron_vppo.rollout.sglang_engine import SGLangTPPeer

    return [ENGINES[name] for name in ENGINES] + [SGLangTPPeer]


def _params(fn) -> dict:
    return inspect.signature(fn).parameters


def test_protocol_declares_what_callers_use():
    for name in ("generate", "score", "update_weights", "release_memory", "resume_memory", "shutdown",
                 "from_config", "check_engine_args"):
        assert callable(getattr(RolloutEngine, name)), name
    assert {"in_process", "weight_version"} <= set(RolloutEngine.__annotations__)
    upd = _params(RolloutEngine.update_weights)
    assert upd["mode"].kind is inspect.Parameter.KEYWORD_ONLY and upd["expected"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(_params(RolloutEngine.from_config)) == ["cfg", "model_dir", "dims"]


@pytest.mark.parametrize("cls", _engine_classes(), ids=lambda c: c.__name__)
def test_engine_class_has_every_protocol_member(cls):
    missing = [m for m in MEMBERS if m not in ("weight_version",) and not hasattr(cls, m)]
    assert not missing, f"{cls.__name__} lacks {missing}"
    assert isinstance(cls.in_process, bool)
    # weight_version is set per instance: its __init__ assigns it
    assert "self.weight_version = 0" in inspect.getsource(cls.__init__)
    for m in MEMBERS:
        proto = getattr(RolloutEngine, m, None)
        if not callable(proto) or m == "from_config":
            continue
        want = [p for p in _params(proto) if p != "self"]
        got = _params(getattr(cls, m))
        assert all(p in got for p in want), f"{cls.__name__}.{m}{inspect.signature(getattr(cls, m))} lacks {want}"
    assert list(_params(cls.from_config)) == ["cfg", "model_dir", "dims"], cls.__name__
    assert isinstance(inspect.getattr_static(cls, "from_config"), classmethod), cls.__name__
    assert isinstance(inspect.getattr_static(cls, "check_engine_args"), staticmethod), cls.__name__


@pytest.mark.parametrize("cls", _engine_classes(), ids=lambda c: c.__name__)
def test_engine_class_declares_its_capabilities(cls):
    """Capabilities are class attributes (read before any engine exists, the same on every rank), and the
    rollout.* keys an engine declares are engine keys of RolloutConfig."""
    from megatron_vppo.run_config import ENGINE_KEYS

    for name in ("in_process", "takes_pixel_values", "tensor_parallel"):
        assert isinstance(inspect.getattr_static(cls, name), bool), f"{cls.__name__}.{name}"
    assert isinstance(cls.reads, frozenset) and {f"rollout.{k}" for k in cls.reads} <= ENGINE_KEYS, cls.reads
    assert isinstance(inspect.getattr_static(cls, "standalone"), classmethod), cls.__name__


def test_engines_without_engine_args_refuse_them():
    from megatron_vppo.config import ConfigError
    from megatron_vppo.rollout import check_engine_args

    check_engine_args("hf", {})
    for name in ("hf", "sglang"):
        with pytest.raises(ConfigError, match=f"rollout.engine={name} takes none"):
            check_engine_args(name, {"max_model_len": 8})


def test_engine_placement_is_a_declared_capability():
    """`rollout.engine_tp` comes from the class's `tensor_parallel`, never from the engine's name: engines
    that cannot span ranks sit on every rank and refuse engine_tp > 1; SGLang defaults to the training TP."""
    from megatron_vppo.config import ConfigError
    from megatron_vppo.rollout import engine_tp_for

    for cls in _engine_classes():
        assert isinstance(cls.tensor_parallel, bool), cls.__name__
    for name in ENGINES:
        cls = ENGINES[name]
        assert engine_tp_for(name, None, 4) == (4 if cls.tensor_parallel else 1)
        assert engine_tp_for(name, 1, 4) == 1
        if cls.tensor_parallel:
            assert engine_tp_for(name, 2, 4) == 2
        else:
            with pytest.raises(ConfigError, match=f"rollout.engine_tp=2: rollout.engine={name}"):
                engine_tp_for(name, 2, 4)


def test_engine_ranks_and_from_config_follow_engine_tp(tmp_path):
    """An engine per engine_tp consecutive ranks, whatever the training layout; the in-process engines
    are None only on an engine's non-first ranks."""
    from megatron_vppo.config import RunConfig
    from megatron_vppo.distributed import ParallelDims, with_engines
    from megatron_vppo.parallel_layout import LayoutError

    world = [ParallelDims(tp=2, pp=2, dp=2, world_size=8, rank=r) for r in range(8)]
    four = [with_engines(d, 2, local_world_size=4) for d in world]
    assert [d.engine_index for d in four] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [d.engine_rank for d in four] == [True, False] * 4
    assert four[5].engine_ranks == [4, 5] and four[5].num_engines == 4
    assert all(d.engine_rank and d.num_engines == 8 for d in (with_engines(d, 1, 4) for d in world))
    for bad in (3, 8):  # not a divisor of the world / spans two nodes of 4
        with pytest.raises(LayoutError, match=f"rollout.engine_tp={bad}"):
            with_engines(world[0], bad, local_world_size=4)
    cfg = RunConfig()
    for dims in (four[1], four[7]):
        assert ENGINES["hf"].from_config(cfg, tmp_path, dims) is None
        assert ENGINES["vllm"].from_config(cfg, tmp_path, dims) is None
