"""`megatron-vppo demo`: the whole pipeline offline on CPU, in minutes.

1. build the tiny random model of `model.arch` (Qwen2.5-VL by default; real architecture) and the synthetic visual task;
2. a short supervised warm-start with transformers, so some rewards are non-zero (an untrained model
   never writes a \\boxed{} answer and RL would see only zero-reward groups);
3. VPPO RL with the trainer (examples/configs/demo_cpu.yaml), validation before and after. The RL run
   goes to `<out>/rl`; a previous demo run there is deleted first (the trainer itself never starts
   over another run's files).
The last line is `demo: val_accuracy before=<x> after=<y> steps=<n>`.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "examples" / "configs" / "demo_cpu.yaml"


def warm_start(model_dir: Path, train_path: Path, out_dir: Path, *, steps: int, batch_size: int, lr: float,
               seed: int) -> Path:
    """Supervised fine-tuning on `\\boxed{answer}` responses (format + a little of the task)."""
    from megatron_vppo.data.dataset import PromptDataset
    from megatron_vppo.data.processor import VLProcessor, collate
    from megatron_vppo.models import spec_for_hf_config

    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    processor = VLProcessor.from_pretrained(model_dir)
    model = spec_for_hf_config(model_dir).engine_model_class().from_pretrained(str(model_dir)).train()
    data = PromptDataset(train_path)
    eos = processor.tokenizer.convert_ids_to_tokens(processor.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    for _ in range(steps):
        samples = []
        for i in rng.sample(range(len(data)), batch_size):
            rec = data[i]
            samples.append(processor.encode(rec["problem"], rec["images"], response=f"\\boxed{{{rec['answer']}}}{eos}"))
        batch = collate(samples, processor.pad_token_id)
        labels = batch["input_ids"].clone()
        pos = torch.arange(labels.shape[1])[None]
        labels[(pos < batch["response_start"][:, None]) | (batch["attention_mask"] == 0)] = -100
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    mm_token_type_ids=batch["mm_token_type_ids"], pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"], labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    from megatron_vppo.sync.hf_writer import copy_side_files

    copy_side_files(model_dir, tmp)
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-vppo demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/demo", help="working directory (model, data, run)")
    ap.add_argument("--config", default=str(DEMO_CONFIG))
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--train-rows", type=int, default=512)
    ap.add_argument("--val-rows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help="RL steps (= train.total_steps; default: the demo config's 30)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.total_steps=5")
    args = ap.parse_args(argv)
    if args.steps is not None:
        if args.steps < 1:
            ap.error(f"--steps {args.steps}: must be >= 1")
        args.overrides = [*args.overrides, f"train.total_steps={args.steps}"]
    from megatron_vppo.console import setup_logging

    setup_logging()  # this package's INFO (step lines); Megatron's INFO (its parameter lists) stays quiet

    from megatron_vppo.run_config import load_config
    from megatron_vppo.data.synthetic_task import write_synthetic_dataset
    from megatron_vppo.models import MODELS
    from megatron_vppo.train.run import train

    t0 = time.perf_counter()
    out = Path(args.out)
    cfg = load_config(args.config, args.overrides)  # model.arch picks the tiny model to build
    init_dir = out / "model_init"
    if not (init_dir / "config.json").is_file():
        MODELS[cfg.model.arch].make_tiny_model(init_dir, seed=args.seed)
    data_dir = out / "data"
    if not (data_dir / "validation.jsonl").is_file():
        write_synthetic_dataset(data_dir, args.train_rows, args.val_rows, seed=args.seed)
    sft_dir = warm_start(init_dir, data_dir / "train.jsonl", out / f"model_sft{args.sft_steps}", steps=args.sft_steps,
                         batch_size=16, lr=2e-3, seed=args.seed)
    if (out / "rl").exists():  # the demo owns its working directory: start the RL run afresh
        print(f"demo: removing the previous demo run in {out / 'rl'}")
        shutil.rmtree(out / "rl")
    cfg = load_config(args.config, [
        f"model.path={sft_dir}", f"data.train={data_dir / 'train.jsonl'}",
        f"data.val={data_dir / 'validation.jsonl'}", f"train.output_dir={out / 'rl'}", *args.overrides,
    ])
    train(cfg)
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val/accuracy"]) for r in rows if "val/accuracy" in r]
    before, after = val[0][1], val[-1][1]
    print(f"demo: wall {time.perf_counter() - t0:.0f}s, metrics in {out / 'rl'}/metrics.jsonl, plot metrics.png")
    print(f"demo: val_accuracy before={before:.4f} after={after:.4f} steps={cfg.train.total_steps}")
    return 0
