"""`megatron-vppo` command line: one entry point, each sub-command imported lazily so `--help` is fast.

    megatron-vppo train CONFIG.yaml [section.key=value ...] [--print-config]   (torchrun for > 1 process)
    megatron-vppo demo [--out DIR] [--steps N]                (tiny offline demo on CPU)
    megatron-vppo eval --model DIR --data PATH [--k 8] [--temperature 1.0] [--engine hf|vllm]
    megatron-vppo convert hf-to-mcore|mcore-to-hf ...         (= tools/convert_checkpoint.py)
    megatron-vppo tune --model CONFIG.json --gpus N ...       (= tools/tune_parallelism.py)
    megatron-vppo score --model DIR --data IN --out OUT ...   (= tools/score.py)
    megatron-vppo generate --model DIR --data IN --out OUT ... (= tools/generate.py)

`megatron-vppo COMMAND --help` shows each command's options.
"""
from __future__ import annotations

import argparse
import errno
import os
import runpy
import sys
from pathlib import Path

_TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _run_tool(name: str, argv: list[str], command: str) -> int:
    script = _TOOLS / f"{name}.py"
    if not script.exists():
        print(f"megatron-vppo: {script} not found (tools/ ships with the source checkout)", file=sys.stderr)
        return 2
    sys.argv = [f"megatron-vppo {command}", *argv]  # argparse's usage line names the command the user ran
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _setup_logging() -> None:
    from megatron_vppo.console import setup_logging

    setup_logging()


TRAIN_HELP = """\
usage: megatron-vppo train [CONFIG.yaml] [section.key=value ...] [--print-config]
       torchrun --nproc-per-node N -m megatron_vppo.cli train CONFIG.yaml [section.key=value ...]

Train with the settings of CONFIG.yaml (optional: every key has a default) and `section.key=value`
overrides (type-checked; an unknown key is an error naming the nearest valid one).
Sections: {sections} (megatron_vppo/config.py holds every key and its
default; examples/configs/ holds example configs).
The resolved config is saved as `config.yaml` in train.output_dir when the run starts.

options:
  -h, --help      show this help and exit
  --print-config  print the resolved config as YAML and exit, before anything is loaded

examples:
  megatron-vppo train examples/configs/demo_cpu.yaml model.path=/path/to/hf_dir data.train=train.parquet
  megatron-vppo train CONFIG.yaml rollout.engine=vllm rollout.engine_args.kv_cache_gib=2 --print-config
"""


def _train(rest: list[str]) -> int:
    """`train CONFIG [k=v ...] [--print-config]`. A mistake in the config, the paths or the parallel sizes
    is reported in one line with exit code 2, before any process group could hang on it (every rank
    finds the same mistake; rank 0 prints it)."""
    from megatron_vppo.config import ConfigError, RunConfig, config_yaml
    from megatron_vppo.run_config import load_config
    from megatron_vppo.data.dataset import DataError
    from megatron_vppo.errors import RunAbort
    from megatron_vppo.parallel_layout import LayoutError

    if "-h" in rest or "--help" in rest:
        import dataclasses

        print(TRAIN_HELP.format(sections=", ".join(f.name for f in dataclasses.fields(RunConfig))), end="")
        return 0
    print_config = "--print-config" in rest
    rest = [a for a in rest if a != "--print-config"]
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        print(f"megatron-vppo train: unknown option {flags[0]} (options: --print-config, --help; settings are "
              f"section.key=value)", file=sys.stderr)
        return 2
    if not rest or "=" in rest[0]:
        config_path, overrides = None, rest
    else:
        config_path, overrides = rest[0], rest[1:]
    if config_path is not None and not Path(config_path).is_file():
        print(f"megatron-vppo train: config file {config_path} not found", file=sys.stderr)
        return 2
    try:
        cfg = load_config(config_path, overrides)
        if print_config:  # before any model, process group or output directory
            if os.environ.get("RANK", "0") == "0":
                print(config_yaml(cfg), end="")
            return 0
        _setup_logging()
        from megatron_vppo.train.run import train

        train(cfg)
    except (ConfigError, LayoutError, DataError) as err:
        if os.environ.get("RANK", "0") == "0":
            kind = ("config" if isinstance(err, ConfigError) else
                    "parallel layout" if isinstance(err, LayoutError) else "data")
            print(f"megatron-vppo train: {kind} error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # RunInterrupted / SaveInterrupted name what was saved
        signum = int(getattr(err, "signum", 2))
        reason = str(err) or ("SIGINT (Ctrl-C) before the first training step or outside the step loop: "
                              "stopped at once; nothing saved since the last checkpoint. Continue with "
                              "train.resume=auto")
        print(f"megatron-vppo train: interrupted: {reason}", file=sys.stderr)
        return 128 + signum
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"megatron-vppo train: {err.strerror}{where}", file=sys.stderr)
        return 1
    except RunAbort as err:  # decided on every rank alike (non-finite values, grader failures)
        if os.environ.get("RANK", "0") == "0":
            print(f"megatron-vppo train: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        from megatron_vppo.checkpoint.dist_checkpoint import CheckpointError

        if not isinstance(err, CheckpointError):
            raise
        print(f"megatron-vppo train: checkpoint error: {err}", file=sys.stderr)
        return 1
    return 0


COMMANDS = ("train", "demo", "eval", "convert", "tune", "score", "generate")
_TOOL_SCRIPTS = {"convert": "convert_checkpoint", "score": "score", "generate": "generate"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="megatron-vppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command '{command}'")

    if command == "train":
        return _train(rest)
    if command == "demo":
        from megatron_vppo.train.demo import main as demo_main

        return demo_main(rest) or 0
    if command == "eval":
        _setup_logging()
        from megatron_vppo.train.evaluate import main as eval_main

        return eval_main(rest) or 0
    if command == "tune":  # lives in the package, so it works from an installed wheel without tools/
        from megatron_vppo.tuning.cli import main as tune_main

        return tune_main(rest)
    return _run_tool(_TOOL_SCRIPTS[command], rest, command)


if __name__ == "__main__":
    sys.exit(main())
