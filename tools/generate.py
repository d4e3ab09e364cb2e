"""Batch generation for evaluation and spot checks.

    torchrun --nproc-per-node K tools/generate.py --model DIR --data IN.jsonl --out OUT.jsonl \
        --num-samples N --seed S [--temperature T --top-p P --top-k K --max-new-tokens M] \
        [--engine hf|sglang|vllm] [--batch-size B] [--device cpu|cuda] [--dtype fp32|bf16] [--config RUN.yaml]

Sampling settings left unset take the run config's values (rollout.top_p / top_k / max_response_length
of --config, else config.py's defaults), as the trainer samples.

Input lines: {"problem": str, "images": [path, ...]} (relative paths resolve against the data
file's folder). Output: N lines per input, in input order, each
    {"input_ids": [prompt + response ids], "response_start": int, "log_probs": [one per
     response token], "text": str, "finish_reason": "stop" | "length"}
Inputs are split over ranks (strided) and gathered on rank 0, which writes the file atomically
(temp file + rename). Sample seeds depend on (S, input index, sample index) only, so the output
does not depend on K or on the batch size. Generation stops at the model's EOS ids and, as in
training rollouts, never samples image / video pad tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from jsonl_io import InputRowError, read_rows, write_jsonl_atomic  # noqa: E402

from megatron_vppo.rollout import ENGINES  # noqa: E402
from megatron_vppo.rollout.engine import RolloutRequest, SamplingParams  # noqa: E402

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (weights, tokenizer, preprocessor)")
    ap.add_argument("--data", required=True, help='input JSONL: {"problem", "images": [paths]}')
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=None, help="rollout.top_p")
    ap.add_argument("--top-k", type=int, default=None, help="rollout.top_k")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="rollout.max_response_length")
    ap.add_argument("--config", default=None, help="run config YAML whose rollout.* settings are the defaults")
    ap.add_argument("--engine", choices=sorted(ENGINES), default="hf", help="rollout.engine (its standalone form)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences decoded together per rank (hf)")
    ap.add_argument("--device", default=None, help="hf engine device (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    args = ap.parse_args(argv)
    from megatron_vppo.config import RunConfig
    from megatron_vppo.run_config import load_config

    rollout = (load_config(args.config) if args.config else RunConfig()).rollout
    for flag, value in (("top_p", rollout.top_p), ("top_k", rollout.top_k),
                        ("max_new_tokens", rollout.max_response_length)):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    return args


def stop_ids(model_dir: Path, processor) -> tuple[int, ...]:
    ids = set()
    gc = model_dir / "generation_config.json"
    if gc.exists():
        eos = json.loads(gc.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if processor.eos_token_id is not None:
        ids.add(processor.eos_token_id)
    return tuple(sorted(int(i) for i in ids))


def build_engine(args, max_len: int | None = None):
    """This rank's engine (`standalone` of `ENGINES[--engine]`); `max_len` (longest prompt +
    --max-new-tokens) sizes a context-bounded engine's context."""
    return ENGINES[args.engine].standalone(args.model, dtype=args.dtype, seed=args.seed, device=args.device,
                                           max_model_len=max_len, max_batch_size=args.batch_size)


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    from megatron_vppo.train.startup import model_dir_problem

    problem = model_dir_problem(args.model, "--model")
    if problem:
        if rank == 0:
            print(f"generate.py: error: {problem}", file=sys.stderr)
        return 2
    try:
        rows = read_rows(args.data)  # on every rank, before any collective: a bad row stops all alike
    except (InputRowError, FileNotFoundError) as e:
        if rank == 0:
            print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    from megatron_vppo.config import ConfigError
    from megatron_vppo.rollout import check_engine_model

    try:  # e.g. vLLM on CPU and a head_dim it cannot run: one line now, not a log at the first generate
        check_engine_model(args.engine, args.model)
    except ConfigError as e:
        if rank == 0:
            print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    if world > 1:
        import datetime

        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(minutes=60))
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    from megatron_vppo.data.processor import VLProcessor

    processor = VLProcessor.from_pretrained(args.model)
    sampling = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=stop_ids(Path(args.model), processor),
        seed=args.seed,
        # as in training rollouts: a response holding an image pad would claim an image it has not
        banned_token_ids=processor.multimodal_token_ids,
    )

    mine = list(range(rank, len(rows), world))
    requests, starts = [], []
    for i in mine:
        images = rows[i]["images"]
        enc = processor.encode(rows[i]["problem"], images)
        requests.append(
            RolloutRequest(
                prompt_ids=enc["input_ids"].tolist(),
                pixel_values=enc["pixel_values"],
                image_grid_thw=enc["image_grid_thw"],
                seed=i,  # global index: samples do not depend on the rank split
                images=images or None,
            )
        )
        starts.append(enc["response_start"])

    longest = max((len(r.prompt_ids) for r in requests), default=1)
    engine = build_engine(args, max_len=longest + args.max_new_tokens)
    outputs = engine.generate(requests, args.num_samples, sampling) if requests else []
    local = {}
    for i, req, start, samples in zip(mine, requests, starts, outputs):
        local[i] = [
            dict(
                input_ids=list(req.prompt_ids) + list(o.token_ids),
                response_start=start,
                log_probs=list(o.log_probs),
                text=processor.tokenizer.decode(o.token_ids, skip_special_tokens=True),
                finish_reason=o.finish_reason,
            )
            for o in samples
        ]

    if world > 1:
        gathered = [None] * world if rank == 0 else None
        torch.distributed.gather_object(local, gathered, dst=0)
        if rank == 0:
            for part in gathered:
                local.update(part)
    if rank == 0:
        write_jsonl_atomic(args.out, [rec for i in range(len(rows)) for rec in local[i]])
        print(f"wrote {len(rows) * args.num_samples} samples for {len(rows)} inputs to {args.out}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if hasattr(engine, "shutdown"):
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
