"""tools/generate.py end to end: torchrun with 2 gloo ranks writes the same file as 1 process."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from conftest import make_test_images

    d = tmp_path_factory.mktemp("gen_data")
    a, b = make_test_images()
    a.save(d / "a.png")
    b.save(d / "b.png")
    rows = [
        {"problem": "How many red circles are in the image?", "images": ["a.png"]},
        {"problem": "What is 3 + 4?", "images": []},
        {"problem": "<image> Find the area of the square.", "images": [str(d / "b.png")]},
    ]
    path = d / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(cmd, timeout=240):
    """Run in its own process group so a hang can be killed with all its workers."""
    p = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout}s: {cmd}\nSTDERR:\n{err[-5000:]}")
    assert p.returncode == 0, f"{cmd}\nSTDOUT:\n{out[-3000:]}\nSTDERR:\n{err[-5000:]}"


def _args(model, data, out, extra=("--device", "cpu")):
    return [
        "tools/generate.py", "--model", str(model), "--data", str(data), "--out", str(out),
        "--num-samples", "2", "--seed", "7", "--temperature", "0.9", "--top-p", "0.95",
        "--max-new-tokens", "6", *extra,
    ]


def test_generate_torchrun_two_ranks_equals_one_process(tiny_model_dir, data_file, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    _run([sys.executable, *_args(tiny_model_dir, data_file, one, ["--device", "cpu", "--batch-size", "1"])])
    _run([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        *_args(tiny_model_dir, data_file, two),
    ], timeout=400)
    lines1, lines2 = one.read_text().splitlines(), two.read_text().splitlines()
    assert len(lines1) == 3 * 2
    assert [json.loads(x)["input_ids"] for x in lines1] == [json.loads(x)["input_ids"] for x in lines2]
    for x, y in zip(lines1, lines2):
        a, b = json.loads(x), json.loads(y)
        assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
        assert a["response_start"] == b["response_start"]
        assert max(abs(p - q) for p, q in zip(a["log_probs"], b["log_probs"])) <= 1e-5
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file

    # content: prompts are the processor's, log-probs re-score under the in-process engine
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.rollout.engine import RolloutRequest
    from megatron_vppo.rollout.hf_engine import HFRolloutEngine

    proc = VLProcessor.from_pretrained(tiny_model_dir)
    rows = [json.loads(x) for x in data_file.read_text().splitlines()]
    eng = HFRolloutEngine.from_pretrained(tiny_model_dir)
    for k, line in enumerate(lines1):
        out = json.loads(line)
        row = rows[k // 2]
        imgs = [p if os.path.isabs(p) else str(data_file.parent / p) for p in row["images"]]
        enc = proc.encode(row["problem"], imgs)
        prompt = enc["input_ids"].tolist()
        assert out["response_start"] == len(prompt) and out["input_ids"][: len(prompt)] == prompt
        resp = out["input_ids"][len(prompt):]
        assert len(resp) == len(out["log_probs"]) >= 1
        assert out["finish_reason"] in ("stop", "length")
        req = RolloutRequest(prompt, enc["pixel_values"], enc["image_grid_thw"])
        lp = eng.score([(req, resp)], temperature=0.9)[0]
        assert max(abs(p - q) for p, q in zip(lp, out["log_probs"])) <= 1e-5
    # the two samples of an input differ
    assert json.loads(lines1[0])["input_ids"] != json.loads(lines1[1])["input_ids"]


def test_generate_rejects_bad_input(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    res = subprocess.run(
        [sys.executable, *_args(tiny_model_dir, bad, tmp_path / "o.jsonl")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert res.returncode != 0 and 'missing "problem"' in res.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the sglang engine needs a GPU and sglang 0.5.x")
def test_generate_sglang_engine_runs(tiny_model_dir, data_file, tmp_path):
    pytest.importorskip("sglang")
    out = tmp_path / "sg.jsonl"
    _run([sys.executable, *_args(tiny_model_dir, data_file, out, ["--engine", "sglang"])], timeout=600)
    assert len(out.read_text().splitlines()) == 6
