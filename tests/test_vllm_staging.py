"""A multi-process trainer's vLLM update is staged on the host tensor by tensor (issue 18 item 3).

The child engine core reloads from safetensors files; these tests run the engine's own validation
stream and writer on the tiny checkpoint without starting vLLM (the TP2·PP2 trainer run in
tests/test_rollout_vllm.py drives the same path through a real child engine).
"""
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_vppo.config import ConfigError
from megatron_vppo.models import spec_for_hf_config
from megatron_vppo.rollout import vllm_engine as ve


def _engine_without_vllm(model_dir):
    """The engine's weight-checking state for `model_dir`, without a vLLM behind it."""
    import json

    eng = ve.VLLMRolloutEngine.__new__(ve.VLLMRolloutEngine)
    cfg = json.loads((model_dir / "config.json").read_text())
    eng.model_dir, eng.spec, eng.tied = model_dir, spec_for_hf_config(cfg), False
    eng._ckpt = ve._checkpoint_tensors(model_dir, eng.spec)
    eng._dtype = "float32"
    return eng


def test_update_is_written_tensor_by_tensor_holding_one(tiny_model_dir, tmp_path):
    eng = _engine_without_vllm(tiny_model_dir)
    ckpt = {}
    for f in sorted(tiny_model_dir.glob("*.safetensors")):
        ckpt.update(load_file(f))
    alive, most_alive = [], [0]

    def stream():  # the trainer's stream: each tensor a fresh buffer; count how many earlier ones live
        for name, t in ckpt.items():
            most_alive[0] = max(most_alive[0], sum(r() is not None for r in alive))
            t = (t + 1).requires_grad_(False)
            yield name, t
            alive.append(weakref.ref(t))
            del t

    out = tmp_path / "stage"
    out.mkdir()
    names = ve.stage_safetensors(eng._checked_stream(stream(), None, to_host=True), str(out))
    assert names == list(ckpt)
    # at most the previous tensor's host copy is still referenced when the next one is produced
    assert most_alive[0] <= 1, f"{most_alive[0]} earlier tensors still held while streaming"
    back = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            assert len(list(h.keys())) == 1
        back.update(load_file(f))
    assert set(back) == set(ckpt)
    for name, t in ckpt.items():
        torch.testing.assert_close(back[name], t + 1, rtol=0, atol=0)
    full = sum(t.numel() * t.element_size() for t in ckpt.values())
    assert eng._update_bytes(None) == full


def test_bad_name_stops_before_the_child_sees_a_file(tiny_model_dir, tmp_path):
    eng = _engine_without_vllm(tiny_model_dir)
    stream = iter([("model.not_a_weight", torch.zeros(2))])
    with pytest.raises(KeyError, match="not in the engine's checkpoint"):
        ve.stage_safetensors(eng._checked_stream(stream, None, to_host=True), str(tmp_path))
    assert not list(tmp_path.glob("*.safetensors"))


def test_staging_space_and_directory_errors_name_the_key(tmp_path):
    with pytest.raises(OSError, match=r"rollout\.engine_args\.staging_dir") as e:
        ve.check_staging_space(str(tmp_path), 1 << 60)
    assert "GiB free" in str(e.value)
    ve.check_staging_space(str(tmp_path), 1)
    assert ve.staging_root(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"rollout\.engine_args\.staging_dir"):
        ve.staging_root(str(tmp_path / "missing"))
    assert ve.VLLMEngineArgs.parse({"staging_dir": str(tmp_path)}).staging_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="staging_dir"):
        ve.VLLMEngineArgs.parse({"staging_directory": "/x"})
