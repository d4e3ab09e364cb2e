"""tools/score.py and megatron_vppo.train.scoring: response log-probs under the Megatron model.

Oracle: transformers' Qwen2.5-VL on the same weights and the same token ids (explicit M-RoPE
positions), log_softmax at temperature 1 — within 1e-4 in fp32, at TP1 (with data parallel 2) and
TP2×PP2 (through torchrun, the CLI path). The third row gives its response as token ids that the
tokenizer would not produce from their text (one token per character): they are scored as given.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_test_images

from dist_helpers import free_port, run_distributed

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4

ROWS = [
    {"problem": "<image>What is red here, and <image> what is green?", "images": ["a.png", "b.png"],
     "response": "<think>circle then triangle</think> \\boxed{2}<|im_end|>"},
    {"problem": "Compute 3 + 4.", "images": [], "response": "<think>3+4=7</think> The answer is \\boxed{7}."},
    {"problem": "How many shapes?", "images": ["b.png"], "response_ids": "\\boxed{3}"},  # ids: _rows
]


def _rows(model_dir) -> list[dict]:
    """ROWS with the third response as one token id per character (not the BPE's own tokenisation)."""
    from megatron_vppo.data.processor import VLProcessor

    tok = VLProcessor.from_pretrained(model_dir).tokenizer
    out = []
    for r in ROWS:
        if "response_ids" in r:
            text = r["response_ids"]
            ids = tok.convert_tokens_to_ids(list(text))
            assert None not in ids and tok.unk_token_id not in ids and tok.decode(ids) == text
            assert ids != tok(text, add_special_tokens=False)["input_ids"]  # re-tokenising would change them
            r = {**r, "response_ids": ids}
        out.append(r)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("score_data")
    a, b = make_test_images()
    a.save(d / "a.png")
    b.save(d / "b.png")
    path = d / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(tiny_model_dir)))
    return path


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data_file):
    """transformers' log-probs of each response, one sample at a time (no padding involved)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vppo.data.processor import VLProcessor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    proc = VLProcessor.from_pretrained(tiny_model_dir)
    out = []
    for r in _rows(tiny_model_dir):
        enc = proc.encode(r["problem"], [str(data_file.parent / p) for p in r["images"]],
                          response=r.get("response", r.get("response_ids")))
        ids = enc["input_ids"][None]
        mask = torch.ones_like(ids)
        pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=enc["mm_token_type_ids"][None].long(),
                                            image_grid_thw=enc["image_grid_thw"], attention_mask=mask)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=enc["pixel_values"],
                           image_grid_thw=enc["image_grid_thw"]).logits[0].float()
        s = enc["response_start"]
        logp = F.log_softmax(logits[s - 1 : -1], dim=-1).gather(-1, ids[0, s:, None]).squeeze(-1)
        out.append({"input_ids": ids[0].tolist(), "response_start": s, "log_probs": logp})
    return out


def _check(got: list[dict], ref: list[dict]):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g["input_ids"] == r["input_ids"] and g["response_start"] == r["response_start"]
        lp = torch.tensor(g["log_probs"], dtype=torch.float32)
        assert lp.shape == r["log_probs"].shape
        assert (lp - r["log_probs"]).abs().max().item() <= TOL


def _score_worker(rank, world, model_dir, data, out, tp, pp, micro):
    sys.path.insert(0, str(ROOT / "tools"))
    import score

    score.score(score.parse_args(["--model", model_dir, "--data", data, "--out", out, "--tp", str(tp),
                                  "--pp", str(pp), "--micro-batch", str(micro)]))


def test_score_tp1_data_parallel_matches_transformers(tiny_model_dir, data_file, reference, tmp_path):
    """TP1 with two data-parallel ranks (3 samples split 2 + 1), micro-batches of 2 (a filler row)."""
    out = tmp_path / "out.jsonl"
    run_distributed(_score_worker, 2, str(tiny_model_dir), str(data_file), str(out), 1, 1, 2)
    _check([json.loads(x) for x in out.read_text().splitlines()], reference)


def test_score_cli_torchrun_tp2_pp2_matches_transformers(tiny_model_dir, data_file, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
           str(free_port()), str(ROOT / "tools" / "score.py"), "--model", str(tiny_model_dir), "--data",
           str(data_file), "--out", str(out), "--tp", "2", "--pp", "2", "--micro-batch", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check([json.loads(x) for x in out.read_text().splitlines()], reference)


def test_score_bad_input_is_a_clear_error(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "x", "images": ["missing.png"], "response": "y"}) + "\n")
    sys.path.insert(0, str(ROOT / "tools"))
    import score

    with pytest.raises(score.InputRowError, match="missing.png"):
        score.read_rows(bad, score.FIELDS, score.RESPONSE)
    for row, match in (({"problem": "x", "response": "y", "response_ids": [1]}, "exactly one of"),
                       ({"problem": "x"}, "exactly one of"),
                       ({"problem": "x", "response_ids": [1, "2"]}, "list of token ids"),
                       ({"problem": "x", "response_ids": "12"}, "list of token ids")):
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(score.InputRowError, match=f"bad.jsonl:1: .*{match}"):
            score.read_rows(bad, score.FIELDS, score.RESPONSE)
