"""tools/convert_checkpoint.py: HF <-> Megatron distributed checkpoint, across layouts.

Oracles: the HF directory we started from (every tensor must come back bit for bit, side files byte
for byte), transformers' logits on those weights, and the same layout loaded straight from HF.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_helpers import run_distributed

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
              "generation_config.json")


def _cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _allow_children():
    """torch_dist's writer starts helper processes; test ranks are daemonic, which forbids children."""
    import multiprocessing as mp

    mp.current_process()._config["daemon"] = False


def _tool():
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_checkpoint

    return convert_checkpoint


def _assert_same_hf(src: Path, out: Path):
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(a) == set(b), (set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for f in SIDE_FILES:
        assert (out / f).read_bytes() == (src / f).read_bytes(), f
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name], "temporary directory left behind"


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """The untied tiny model converted by the CLI at TP2×PP2 (the tool spawns its 4 processes)."""
    out = tmp_path_factory.mktemp("convert") / "mcore_tp2pp2"
    proc = _cli("hf-to-mcore", "--hf", tiny_model_dir, "--out", out, "--tp", 2, "--pp", 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out.parent / "hf_to_mcore.log").write_text(proc.stdout + proc.stderr)
    return out


def _assert_quiet(text: str) -> None:
    """No per-rank third-party notices (torch's ShardedTensor deprecation, Megatron's Apex / TE fallbacks)."""
    for noise in ("DTensor", "ShardedTensor", "FutureWarning", "Apex"):
        assert noise not in text, text[-3000:]


def test_cli_roundtrip_tp2pp2_to_tp1_is_bit_exact(tiny_model_dir, converted, tmp_path, capsys):
    meta = json.loads((converted / "megatron_vppo_model.json").read_text())
    assert meta["saved_layout"]["tp"] == 2 and meta["saved_layout"]["pp"] == 2
    out = tmp_path / "hf_back"
    proc = _cli("mcore-to-hf", "--ckpt", converted, "--out", out)  # loads at TP1 (resharding)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # issue 19 item 8: a converter says what it wrote and its size
    assert f"convert_checkpoint.py mcore-to-hf: wrote {out} (" in proc.stdout and " MiB)" in proc.stdout, proc.stdout
    _assert_same_hf(Path(tiny_model_dir), out)
    _assert_quiet(proc.stdout + proc.stderr)
    _assert_quiet((converted.parent / "hf_to_mcore.log").read_text())

    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vppo.data.processor import VLProcessor

    Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    VLProcessor.from_pretrained(out)

    capsys.readouterr()  # refused before any process starts: the tool's main in this process
    assert _tool().main(["mcore-to-hf", "--ckpt", str(converted), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def _hf_to_mcore(rank, world, hf, out, tp, pp):
    _allow_children()
    _tool().hf_to_mcore(hf, out, tp, pp)


def _mcore_to_hf(rank, world, ckpt, out, tp, pp):
    _tool().mcore_to_hf(ckpt, out, tp, pp)


def test_roundtrip_tied_tp2pp2_to_tp2(tiny_model_dir_tied, tmp_path):
    ckpt, out = tmp_path / "mcore", tmp_path / "hf_back"
    run_distributed(_hf_to_mcore, 4, str(tiny_model_dir_tied), str(ckpt), 2, 2)
    run_distributed(_mcore_to_hf, 2, str(ckpt), str(out), 2, 1)
    _assert_same_hf(Path(tiny_model_dir_tied), out)
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))


def _tp1_logits(rank, world, ckpt, hf):
    from megatron_vppo.checkpoint.model_checkpoint import load_model, model_dims, read_model_config
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.data.processor import VLProcessor, collate
    from megatron_vppo.distributed import init_distributed
    from conftest import make_test_images

    dims = init_distributed(ParallelConfig(), **model_dims(read_model_config(ckpt)))
    proc = VLProcessor.from_pretrained(hf)
    batch = collate([proc.encode("<image>Red or blue?", make_test_images()[:1], response="red"),
                     proc.encode("No image.", response="fine")], proc.pad_token_id)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    torch.manual_seed(123)  # different init for the two models: only loading can make them agree
    from_ckpt = load_model(ckpt, dims=dims).chunks[0]
    torch.manual_seed(456)
    from_hf = load_model(hf, dims=dims).chunks[0]
    with torch.no_grad():
        return from_ckpt(**kw), from_hf(**kw), batch


def test_checkpoint_from_tp2pp2_gives_identical_logits_at_tp1(tiny_model_dir, converted):
    from transformers import Qwen2_5_VLForConditionalGeneration

    (ck, hf, batch), = run_distributed(_tp1_logits, 1, str(converted), str(tiny_model_dir))
    assert torch.equal(ck, hf)
    vocab = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).config.text_config.vocab_size
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    pos, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"].long(),
                                        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]).logits
    valid = batch["attention_mask"].bool()
    assert (ck[..., :vocab][valid] - ref[valid]).abs().max().item() <= 1e-4


def test_corrupt_or_missing_checkpoint_is_a_clear_error(converted, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(converted, bad)
    biggest = max((bad / "step_0000000" / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    proc = _cli("mcore-to-hf", "--ckpt", bad, "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert "cannot be loaded" in proc.stderr and str(bad) in proc.stderr and "hf-to-mcore" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))

    capsys.readouterr()
    assert _tool().main(["mcore-to-hf", "--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_score_detects_megatron_checkpoint(tiny_model_dir, converted, tmp_path):
    """tools/score.py on the converted checkpoint gives exactly what it gives on the HF directory."""
    from test_score import _rows, _score_worker
    from conftest import make_test_images

    for img, name in zip(make_test_images(), ("a.png", "b.png")):
        img.save(tmp_path / name)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(tiny_model_dir)))
    outs = {}
    for kind, model in (("mcore", converted), ("hf", tiny_model_dir)):
        outs[kind] = tmp_path / f"{kind}.jsonl"
        run_distributed(_score_worker, 1, str(model), str(data), str(outs[kind]), 1, 1, 2)
    assert outs["mcore"].read_text() == outs["hf"].read_text()
