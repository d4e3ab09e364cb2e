"""Write a tiny random model (of `--arch`, a MODELS name; Qwen2.5-VL by default) as an offline HF
directory (for tests and the CPU demo).

    python tools/make_tiny_model.py --out /tmp/tiny [--arch qwen2_5_vl] [--seed 0] [--tokenizer bpe|qwen]
                                    [--tie-word-embeddings] [--hidden-size H] [--num-layers L]
                                    [--num-heads N] [--num-kv-heads K] [--head-dim D] [--intermediate-size F]

Sizes default to the model's tiny defaults (Qwen2.5-VL: hidden 64, 2 layers, 4 heads, 2 KV heads, so
head_dim 16). vLLM's CPU attention needs a head_dim of 32 or more (32, 64, 80, ...):
`--head-dim 32` makes a model it runs (Qwen2.5-VL: hidden = heads x head_dim).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_vppo.config import ModelConfig  # noqa: E402
from megatron_vppo.models import MODELS  # noqa: E402

# (flag, the HF text-config key it sets, help). Unset flags keep the model's tiny default.
SIZE_FLAGS = (
    ("--hidden-size", "hidden_size", "language model width"),
    ("--num-layers", "num_hidden_layers", "language model layers"),
    ("--num-heads", "num_attention_heads", "attention heads"),
    ("--num-kv-heads", "num_key_value_heads", "key/value heads (divides --num-heads)"),
    ("--head-dim", "head_dim", "attention head size (Qwen2.5-VL: sets hidden = heads x head_dim)"),
    ("--intermediate-size", "intermediate_size", "MLP width (default: 2 x hidden when the width changes)"),
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--arch", choices=sorted(MODELS), default=ModelConfig().arch, help="the model (a MODELS name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", choices=["bpe", "qwen"], default="bpe",
                    help="bpe: small trained BPE (fast); qwen: the real Qwen2.5 vocabulary, offline")
    ap.add_argument("--tie-word-embeddings", action="store_true")
    sizes = ap.add_argument_group("sizes (default: the model's tiny defaults)")
    for flag, _, text in SIZE_FLAGS:
        sizes.add_argument(flag, type=int, default=None, metavar="N", help=text)
    args = ap.parse_args(argv)
    for flag, _, _ in SIZE_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            ap.error(f"{flag} {value}: must be >= 1")
    args.error = ap.error
    return args


def text_config_overrides(args: argparse.Namespace) -> dict:
    """The size flags given, as HF text-config keys."""
    out = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key, _ in SIZE_FLAGS}
    return {k: v for k, v in out.items() if v is not None}


def main(argv=None):
    args = parse_args(argv)
    kwargs = dict(seed=args.seed, tokenizer=args.tokenizer, tie_word_embeddings=args.tie_word_embeddings)
    text = text_config_overrides(args)
    if text:
        kwargs["text_config"] = text
    try:
        out = MODELS[args.arch].make_tiny_model(args.out, **kwargs)
    except ValueError as e:  # inconsistent sizes (e.g. heads not a multiple of KV heads)
        args.error(str(e))
    print(out)


if __name__ == "__main__":
    main()
