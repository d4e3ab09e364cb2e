"""Every command, flag and config key that `megatron-vppo --help`, the sub-commands' --help and the README
show exists (issue 19, item 4: `train --help` failed, `demo [--steps N]` was advertised and rejected, the
README named `rollout.sglang_*` keys that never existed).

All in-process (each --help is an argparse print + SystemExit), so the whole file costs seconds.
"""
from __future__ import annotations

import dataclasses
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from megatron_vppo import cli
from megatron_vppo.config import RunConfig
from megatron_vppo.run_config import load_config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
TOOL_COMMANDS = {"convert_checkpoint": "convert", "score": "score", "generate": "generate", "tune_parallelism": "tune"}


def _capture(capsys, fn) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = fn()
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return int(rc or 0), out.out + out.err


def command_help(capsys, *argv: str) -> str:
    """`megatron-vppo ARGV... --help`: exit 0 and its text."""
    rc, text = _capture(capsys, lambda: cli.main([*argv, "--help"]))
    assert rc == 0, f"megatron-vppo {' '.join(argv)} --help exited {rc}: {text[-2000:]}"
    return text


def tool_help(capsys, script: str, *argv: str) -> str:
    """`python tools/SCRIPT ARGV... --help`, run as the README runs it (for tools without a CLI command)."""
    path = REPO / script
    old = sys.argv

    def run():
        sys.argv = [str(path), *argv, "--help"]
        try:
            runpy.run_path(str(path), run_name="__main__")
        finally:
            sys.argv = old

    rc, text = _capture(capsys, run)
    assert rc == 0, f"{script} {' '.join(argv)} --help exited {rc}: {text[-2000:]}"
    return text


def has_flag(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def flags_of(tokens: list[str]) -> list[str]:
    return [t.strip("[]").split("=")[0] for t in tokens if t.strip("[]").startswith("--")]


# --------------------------------------------------------------------------- `megatron-vppo --help`


def test_every_command_has_help(capsys):
    for command in cli.COMMANDS:
        text = command_help(capsys, command)
        assert "usage:" in text, (command, text[:500])


def test_top_level_help_advertises_only_what_works(capsys):
    rc, top = _capture(capsys, lambda: cli.main(["--help"]))
    assert rc == 0
    lines = [ln.split() for ln in top.splitlines() if ln.strip().startswith("megatron-vppo ")]
    assert {ln[1] for ln in lines if ln[1] != "COMMAND"} == set(cli.COMMANDS), top
    for ln in lines:
        if ln[1] == "COMMAND":
            continue
        text = command_help(capsys, ln[1])
        for flag in flags_of(ln[2:]):
            assert has_flag(text, flag), f"`megatron-vppo --help` shows `{ln[1]} {flag}`, which its --help lacks"


def test_train_help_and_unknown_option(capsys):
    text = command_help(capsys, "train")
    assert "--print-config" in text and "section.key=value" in text
    rc, err = _capture(capsys, lambda: cli.main(["train", "--bogus"]))
    assert rc == 2 and "unknown option --bogus" in err


def test_demo_steps_is_train_total_steps(monkeypatch, tmp_path):
    """`demo --steps N` (advertised by `megatron-vppo --help`) reaches the trainer as train.total_steps=N."""
    from megatron_vppo.train import demo

    seen = {}

    def fake_load(path, overrides):
        seen["overrides"] = list(overrides)
        raise RuntimeError("stop")

    monkeypatch.setattr("megatron_vppo.run_config.load_config", fake_load)
    with pytest.raises(RuntimeError, match="stop"):
        demo.main(["--out", str(tmp_path), "--steps", "5"])
    assert seen["overrides"][-1] == "train.total_steps=5"
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--steps", "0"])


# --------------------------------------------------------------------------- the README


def _readme_commands() -> list[list[str]]:
    """Each command line of the README's ```bash blocks, as tokens (comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line.replace("[", " [ ").replace("]", " ] ")))
    return out


def test_readme_commands_flags_and_paths_exist(capsys):
    checked = set()
    for tokens in _readme_commands():
        tokens = [t for t in tokens if t not in ("[", "]")]
        for t in tokens:  # scripts, configs and examples the line names
            if re.match(r"^(examples|scripts|tools|docs|bench)/", t):
                assert (REPO / t).exists(), f"README names {t}, which does not exist"
        if "megatron-vppo" in tokens or "megatron_vppo.cli" in tokens:
            i = tokens.index("megatron-vppo") + 1 if "megatron-vppo" in tokens else tokens.index("megatron_vppo.cli") + 1
            command, args = tokens[i], tokens[i + 1:]
            text = command_help(capsys, command)
            if command == "train":
                config = args[0] if args and not args[0].startswith("-") and "=" not in args[0] else None
                overrides = [a for a in args if "=" in a and not a.startswith("-")]
                load_config(config if config and (REPO / config).is_file() else None, overrides)
        else:
            script = next((t for t in tokens if t.startswith("tools/") and t.endswith(".py")), None)
            if script is None:
                continue
            args = tokens[tokens.index(script) + 1:]
            sub = [args[0]] if args and not args[0].startswith("-") else []
            name = Path(script).stem
            text = (command_help(capsys, TOOL_COMMANDS[name], *sub) if name in TOOL_COMMANDS
                    else tool_help(capsys, script, *sub))
            command = name
        for flag in flags_of(args):
            assert has_flag(text, flag), f"README: `{' '.join(tokens)}`: {command} has no {flag}"
        checked.add(command)
    assert {"train", "eval", "convert_checkpoint", "score", "generate", "tune_parallelism", "make_tiny_model",
            "demo"} <= checked, checked


def _resolve_key(dotted: str) -> bool:
    """Whether `section.key[.sub]` names a RunConfig field (engine_args keys: the vLLM engine's)."""
    from megatron_vppo.rollout.vllm_engine import VLLMEngineArgs

    node = RunConfig()
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        if part == "engine_args":  # a mapping the engine validates: only vLLM takes keys
            rest = parts[i + 1:]
            return len(rest) <= 1 and (not rest or rest[0] in {f.name for f in dataclasses.fields(VLLMEngineArgs)})
        node = getattr(node, part)
    return True


KEY = re.compile(r"(?<![\w./=-])(parallel|model|algo|rollout|data|optim|train|reward)\.([A-Za-z_*][\w*]*(?:\.[A-Za-z_*][\w*]*)*)")


def test_readme_config_keys_exist():
    keys = sorted({m.group(0) for m in KEY.finditer(README)})
    assert len(keys) > 10, keys  # the pattern still finds the README's keys
    missing = [k for k in keys if not _resolve_key(k)]
    assert not missing, f"README names config keys that do not exist: {missing}"
    assert not _resolve_key("rollout.sglang_mode") and _resolve_key("rollout.engine_gpu_share")
    # the vLLM row's engine_args names
    row = next(ln for ln in README.splitlines() if ln.startswith("| `vllm`"))
    names = re.findall(r"`(\w+)`", row.split("`engine_args`:")[1].split("(see")[0])
    assert names and all(_resolve_key(f"rollout.engine_args.{n}") for n in names), names


def test_demo_console_shows_this_package_not_megatrons_info(tmp_path):
    """The demo logged everything at INFO, Megatron's DDP parameter list included (issue 19): it now sets up
    the trainer's console (megatron_vppo INFO, others WARNING). A fresh interpreter, as `make demo` runs it."""
    import os
    import subprocess

    code = f"""
import logging, sys
sys.path.insert(0, {str(REPO)!r})
import megatron_vppo.run_config as c
def stop(*a, **k):
    raise SystemExit(0)
c.load_config = stop  # the demo sets up its console first, then reads its config: stop there
from megatron_vppo.train import demo
try:
    demo.main(["--out", {str(tmp_path)!r}, "--steps", "1"])
except SystemExit:
    pass
on = lambda name: int(logging.getLogger(name).isEnabledFor(logging.INFO))
print(on("megatron.core.distributed.param_and_grad_buffer"), on("megatron_vppo.train"))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["0", "1"], p.stdout + p.stderr[-2000:]
