"""Write a tiny random model (of `--arch`, a MODELS name; Qwen2.5-VL by default) as an offline HF
directory (for tests and the CPU demo).

    python tools/make_tiny_model.py --out /tmp/tiny [--arch qwen2_5_vl] [--seed 0] [--tokenizer bpe|qwen]
                                    [--tie-word-embeddings]
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_vppo.config import ModelConfig  # noqa: E402
from megatron_vppo.models import MODELS  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--arch", choices=sorted(MODELS), default=ModelConfig().arch, help="the model (a MODELS name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", choices=["bpe", "qwen"], default="bpe",
                    help="bpe: small trained BPE (fast); qwen: the real Qwen2.5 vocabulary, offline")
    ap.add_argument("--tie-word-embeddings", action="store_true")
    args = ap.parse_args(argv)
    out = MODELS[args.arch].make_tiny_model(args.out, seed=args.seed, tokenizer=args.tokenizer,
                          tie_word_embeddings=args.tie_word_embeddings)
    print(out)


if __name__ == "__main__":
    main()
