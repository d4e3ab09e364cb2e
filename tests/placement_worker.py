"""Several trainer runs in ONE process launch (launches are the suite's main cost): for each
`name=override,override,...` argument, build the run at that layout (Megatron's groups are rebuilt; the
default process group is kept), validate, run `steps` RL steps, validate again, and leave the metrics
in `<out>/<name>/metrics.jsonl`. Run under torchrun, or as one plain process for a 1-rank reference.

    python tests/placement_worker.py CONFIG OUT STEPS name=key=value,key=value ...
"""
from __future__ import annotations

import sys

import megatron_vppo  # noqa: F401  (before transformers: the vLLM torchvision shim)


def run_layout(config: str, out: str, steps: int, name: str, overrides: list[str]) -> None:
    from megatron_vppo.run_config import load_config
    from megatron_vppo.train.build import build_run
    from megatron_vppo.train.loop import rl_step, validate

    cfg = load_config(config, [*overrides, f"train.output_dir={out}/{name}", f"train.total_steps={steps}"])
    trainer, _ = build_run(cfg)
    try:
        trainer.logger.log(0, validate(trainer))
        for _ in range(steps):
            trainer.step += 1
            metrics = rl_step(trainer)
            if trainer.step == steps:
                metrics.update(validate(trainer))
            trainer.logger.log(trainer.step, metrics)
    finally:
        trainer.logger.close()
        trainer.grader.close()
        if trainer.engine is not None:
            trainer.engine.shutdown()


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    from megatron_vppo.distributed import barrier, destroy_distributed

    config, out, steps, *layouts = argv
    for spec in layouts:
        name, _, rest = spec.partition("=")
        run_layout(config, out, int(steps), name, [o for o in rest.split(",") if o])
        barrier()
    if dist.is_initialized():
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
