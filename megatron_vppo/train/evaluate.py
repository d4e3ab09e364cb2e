"""Evaluation: accuracy@k (the paper's avg@8 protocol: mean accuracy of k samples at temperature 1.0).

`megatron-vppo eval --model DIR --data PATH [--k 8] [--temperature 1.0]` uses the same sampling and
grading code as the trainer's validation, on the in-process engine.
"""
from __future__ import annotations

import argparse
import json
import sys


def accuracy_at_k(groups: list[dict]) -> float:
    """Mean reward over every sample of every prompt (groups as `rollout_step.sample_groups` returns)."""
    scores = [o[3] for g in groups for o in g["outputs"]]
    return sum(scores) / len(scores) if scores else float("nan")


def per_prompt_accuracy(groups: list[dict]) -> list[float]:
    return [sum(o[3] for o in g["outputs"]) / len(g["outputs"]) for g in groups]


def evaluate_model(model_dir: str, data: str, *, k: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                   max_new_tokens: int = 256, seed: int = 0, limit: int | None = None,
                   min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """Single-process evaluation of an HF directory on a ViRL39K-schema dataset."""
    from megatron_vppo.data.dataset import PromptDataset
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.reward.grade import Grader
    from megatron_vppo.rollout.engine import SamplingParams
    from megatron_vppo.rollout.hf_engine import HFRolloutEngine
    from megatron_vppo.train.rollout_step import encode_prompts, generate_and_grade

    processor = VLProcessor.from_pretrained(model_dir, min_pixels=min_pixels, max_pixels=max_pixels)
    dataset = PromptDataset(data)
    records = []
    for i in range(len(dataset)):
        rec, _ = dataset.get(i)
        if rec is not None:
            records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    prompts = encode_prompts(processor, records)
    engine = HFRolloutEngine.from_pretrained(model_dir)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                              stop_token_ids=(processor.eos_token_id,), seed=seed,
                          banned_token_ids=processor.multimodal_token_ids)
    with Grader() as grader:
        groups = generate_and_grade(engine, processor.tokenizer, grader, prompts, list(range(len(prompts))),
                                    n=k, sampling=sampling, seed_parts=(seed, -1))
    return {"model": str(model_dir), "data": str(data), "k": k, "temperature": temperature,
            "prompts": len(groups), f"accuracy@{k}": accuracy_at_k(groups),
            "pass@k_frac": sum(1 for a in per_prompt_accuracy(groups) if a > 0) / max(len(groups), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-vppo eval", description=__doc__)
    ap.add_argument("--model", required=True, help="HF directory")
    ap.add_argument("--data", required=True, help="parquet / jsonl / arrow / saved dataset dir (ViRL39K schema)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args(argv)
    res = evaluate_model(args.model, args.data, k=args.k, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, limit=args.limit)
    if not args.json:
        width = max(len(k) for k in res)
        for key, val in res.items():
            print(f"{key:<{width}}  {val:.4f}" if isinstance(val, float) else f"{key:<{width}}  {val}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
