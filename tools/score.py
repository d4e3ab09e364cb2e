"""Per-token log-probs of given responses under the trainer's Megatron model.

    torchrun --nproc-per-node K tools/score.py --model DIR --data IN.jsonl --out OUT.jsonl \
        --tp N --pp M [--micro-batch B] [--temperature T] [--dtype fp32|bf16|fp16] [--hf-config DIR]

DIR is a Hugging Face directory or a Megatron checkpoint (tools/convert_checkpoint.py hf-to-mcore,
or a trainer step_NNNNNNN dir with --hf-config naming the HF directory it came from); the kind is
detected. K must be a multiple of N*M; the extra factor is data parallel. Without torchrun the tool
starts N*M processes itself.

Input lines: {"problem": str (with "<image>" placeholders, or none), "images": [paths] (relative
paths resolve against the data file's folder), and "response": str or "response_ids": [token ids]}.
The prompt is built as in spec §7 (`data.processor.VLProcessor`). Text is tokenised; token ids are
scored as they are — to re-score generated samples use their ids (tools/generate.py's
`input_ids[response_start:]`): re-tokenising the decoded text need not give the sampled ids back. Output (same order, written by rank 0 atomically):
    {"input_ids": [prompt + response ids], "response_start": int, "log_probs": [one per response token]}
The log-probs are log softmax(logits / T)[token] over the true vocabulary, computed vocab-parallel
on the last pipeline stage (the trainer's code, `megatron_vppo.train.scoring`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert_checkpoint import launch, run_rank  # noqa: E402
from jsonl_io import InputRowError, read_rows, write_jsonl_atomic  # noqa: E402

FIELDS = ("problem",)  # plus "images"
RESPONSE = {"response": "str", "response_ids": "ids"}  # exactly one per row


def score(args) -> None:
    """Per-rank body: load, encode this rank's data, score, rank 0 writes."""
    import torch.distributed as dist

    from megatron_vppo.checkpoint.model_checkpoint import load_model, model_dims, model_spec, read_model_config
    from megatron_vppo.config import ModelConfig, ParallelConfig
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.train.scoring import score_samples

    cfg = read_model_config(args.model, args.hf_config)
    parallel = ParallelConfig(tp=args.tp, pp=args.pp)
    dims = init_distributed(parallel, **model_dims(cfg))
    rows = read_rows(args.data, FIELDS, RESPONSE)
    vocab = model_spec(cfg).text_arch(cfg).vocab_size
    for i, r in enumerate(rows, 1):
        if max(r.get("response_ids") or [0]) >= vocab:
            raise ValueError(f"{args.data}: row {i}: response_ids holds id {max(r['response_ids'])}, beyond the "
                             f"model's vocabulary ({vocab} ids); were they produced by another tokenizer?")
    m = load_model(args.model, parallel, ModelConfig(dtype=args.dtype), hf_files=args.hf_config, dims=dims)
    if m.hf_files is None:
        raise FileNotFoundError(f"{args.model}: no tokenizer / processor files; pass --hf-config DIR")
    proc = VLProcessor.from_pretrained(m.hf_files)
    samples = [proc.encode(r["problem"], r["images"], response=r["response"] if "response" in r else r["response_ids"])
               for r in rows]
    pad = proc.pad_token_id if proc.pad_token_id is not None else 0
    out = score_samples(m.chunks, samples, dims=dims, vocab_size=model_spec(cfg).text_arch(cfg).vocab_size, pad_id=pad,
                        micro_batch_size=args.micro_batch, temperature=args.temperature)
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        write_jsonl_atomic(args.out, out)


def _user_errors():
    from megatron_vppo.checkpoint.dist_checkpoint import CheckpointError
    from megatron_vppo.parallel_layout import LayoutError
    from megatron_vppo.sync.plan import ExportError

    return (InputRowError, ExportError, CheckpointError, LayoutError, FileNotFoundError, ValueError)


def _rank_main(args) -> int:
    return run_rank(score, args, "score.py", _user_errors())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF directory or Megatron checkpoint")
    ap.add_argument("--data", required=True,
                    help='input JSONL: {"problem", "images": [paths], "response" (text) or "response_ids" (token ids)}')
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=1, help="samples per pipeline micro-batch")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="the model's compute dtype (log-probs are reduced in fp32 either way)")
    ap.add_argument("--hf-config", default=None, help="HF directory with config + tokenizer (trainer checkpoints)")
    args = ap.parse_args(argv)
    if args.temperature <= 0:
        ap.error(f"--temperature {args.temperature}: must be > 0")
    if args.micro_batch < 1:
        ap.error(f"--micro-batch {args.micro_batch}: must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return launch(_rank_main, args, args.tp * args.pp)


if __name__ == "__main__":
    sys.exit(main())
