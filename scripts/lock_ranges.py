#!/usr/bin/env python3
"""Every pin of a GPU lock inside the range each locked package declares for it (extras included).

`uv pip compile` already satisfies the requirements a resolution follows; this catches the ones it does
not: the extras a dependent is *tested* with but nobody installs (megatron-core's `dev` extra names the
Transformer Engine range it was tested against), and packages kept out of the lock on purpose
(transformer-engine-torch, built against the locked torch in the README's second step).

    python scripts/lock_ranges.py requirements-gpu.in requirements-gpu.txt [--cache DIR]

Metadata comes from each locked wheel's METADATA, read from PyPI with HTTP range requests (only the
zip directory and the METADATA member; cached under --cache), or from an sdist's PKG-INFO. The range
logic (`check`) is pure and tested offline in tests/test_gpu_stack.py with METADATA fixtures.
"""
from __future__ import annotations

import argparse
import email.parser
import io
import json
import re
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

# Extras a dependent is tested with although we do not install them: their Requires-Dist bind the
# versions of the packages we do lock (megatron-core's CI installs `megatron-core[dev]`).
TESTED_EXTRAS = {"megatron-core": ("dev",)}

# Documented exceptions: (dependent, dependency) -> why the locked version may sit outside the range.
# Each one is listed in docs/gpu_stack.md and pinned by tests/test_gpu_stack.py.
EXCEPTIONS = {
    ("megatron-core", "flashinfer-python"): "megatron-core[dev] tests flashinfer ~=0.5 for its own inference "
    "engine, which this project does not use; flashinfer is SGLang's/vLLM's sampler/attention and follows their pin",
    ("megatron-core", "opentelemetry-api"): "megatron-core[dev] tests opentelemetry-api ~=1.33.1 (optional tracing, "
    "unused here); fastapi/anthropic in the engines' stacks require >=1.44, so no lock can honour both",
    ("transformer-engine-torch", "transformer-engine-cu12"): "the sdist's static PKG-INFO names the CUDA 12 core; "
    "its setup.py requires transformer-engine-cu{torch's CUDA major} when built, and the locked torch is CUDA 13 "
    "(transformer-engine-cu13==2.11.0 is locked)",
}

# Packages deliberately kept out of a lock, with the version installed beside it (README GPU section).
OUTSIDE_LOCK = {"transformer-engine-torch": "2.11.0"}

TARGET = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}


@dataclass(frozen=True)
class Problem:
    dependent: str
    requirement: str
    locked: str | None  # None: the dependency is not in the lock

    def __str__(self):
        got = f"the lock has {self.locked}" if self.locked else "it is not in the lock"
        return f"{self.dependent} requires {self.requirement}; {got}"


def read_lock(text: str) -> dict[str, str]:
    """name -> version for the `name==version` lines of a compiled lock."""
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def read_requested_extras(text: str) -> dict[str, set[str]]:
    """name -> extras asked for by the `.in` lines (`transformer-engine[core_cu13]==...`)."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            out.setdefault(canonicalize_name(req.name), set()).update(canonicalize_name(e) for e in req.extras)
    return out


def requires_dist(metadata: str) -> list[str]:
    return email.parser.Parser().parsestr(metadata).get_all("Requires-Dist") or []


def _applies(req: Requirement, extra: str | None) -> bool:
    if req.marker is None:
        return extra is None
    env = dict(default_environment(), **TARGET, extra=extra or "")
    return req.marker.evaluate(env)


def check(pins: dict[str, str], metadata: dict[str, str], requested: dict[str, set[str]],
          tested_extras=TESTED_EXTRAS, exceptions=EXCEPTIONS) -> list[Problem]:
    """Problems with `pins` (name -> version, the lock plus packages installed beside it).

    metadata: name -> METADATA text of that pinned version. A requirement that applies without extras
    or under an extra someone requests must be present and in range; under a tested-only extra
    (`tested_extras`) it binds only the packages that are locked. `exceptions` silences listed pairs.
    """
    extras = {canonicalize_name(k): set(v) for k, v in requested.items()}
    parsed = {name: [Requirement(r) for r in requires_dist(text)] for name, text in metadata.items()}
    changed = True
    while changed:  # extras requested by locked packages' own requirements (sglang -> foo[bar])
        changed = False
        for name, reqs in parsed.items():
            for req in reqs:
                if any(_applies(req, e) for e in [None, *extras.get(name, ())]):
                    dep = canonicalize_name(req.name)
                    new = {canonicalize_name(e) for e in req.extras} - extras.get(dep, set())
                    if new:
                        extras.setdefault(dep, set()).update(new)
                        changed = True
    problems = []
    for name in sorted(parsed):
        tested = {canonicalize_name(e) for e in tested_extras.get(name, ())}
        for req in parsed[name]:
            dep = canonicalize_name(req.name)
            needed = any(_applies(req, e) for e in [None, *extras.get(name, ())])
            if not needed and not any(_applies(req, e) for e in tested):
                continue
            if (name, dep) in exceptions:
                continue
            locked = pins.get(dep)
            if locked is None:
                if needed:
                    problems.append(Problem(name, str(req), None))
                continue
            if not req.specifier.contains(Version(locked), prereleases=True):
                problems.append(Problem(name, str(req), f"{dep}=={locked}"))
    return problems


# ---- fetching METADATA from PyPI (needs the registry; not used by the tests) ------------------------

class _HttpFile(io.RawIOBase):
    """A seekable read-only view of a URL through HTTP range requests (enough for zipfile)."""

    def __init__(self, url: str):
        self.url, self.pos = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
            self.size = int(r.headers["Content-Length"])

    def seekable(self):
        return True

    def readable(self):
        return True

    def seek(self, offset, whence=0):
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def read(self, n=-1):
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            data = r.read()
        self.pos += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _pick_file(files: list[dict], name: str, version: str) -> dict:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    ours = [f for f in files if f["filename"].lower().startswith(f"{stem}-{version}-".lower())
            or f["filename"].lower().startswith(f"{stem}-{version}.".lower())]
    wheels = [f for f in ours if f["filename"].endswith(".whl")]
    prefer = [f for f in wheels if re.search(r"(py3-none-any|cp311|abi3|py2.py3).*(any|x86_64)\.whl$", f["filename"])]
    pick = (prefer or wheels or [f for f in ours if f["filename"].endswith((".tar.gz", ".zip"))])
    if not pick:
        raise SystemExit(f"lock_ranges: no file for {name}=={version} on PyPI")
    return pick[0]


def fetch_metadata(name: str, version: str, cache: Path) -> str:
    path = cache / f"{name}-{version}.METADATA"
    if path.exists():
        return path.read_text()
    req = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    f = _pick_file(files, name, version)
    if f["filename"].endswith(".whl"):
        with zipfile.ZipFile(io.BufferedReader(_HttpFile(f["url"]), 1 << 16)) as z:
            member = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(member).decode()
    else:
        import tarfile
        with urllib.request.urlopen(f["url"], timeout=300) as r, tarfile.open(fileobj=io.BytesIO(r.read())) as t:
            member = next(m for m in t.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
            text = t.extractfile(member).read().decode()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("infile")
    ap.add_argument("lock")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "megatron_vppo_lock_metadata")
    a = ap.parse_args(argv)
    pins = read_lock(Path(a.lock).read_text())
    pins.update({k: v for k, v in OUTSIDE_LOCK.items() if k not in pins})
    metadata = {name: fetch_metadata(name, ver, a.cache) for name, ver in sorted(pins.items())}
    problems = check(pins, metadata, read_requested_extras(Path(a.infile).read_text()))
    for p in problems:
        print(f"lock_ranges: {a.lock}: {p}", file=sys.stderr)
    if problems:
        print(f"lock_ranges: {len(problems)} pin(s) outside a declared range; change the .in (or add a documented "
              "exception to EXCEPTIONS in scripts/lock_ranges.py and docs/gpu_stack.md)", file=sys.stderr)
        return 1
    print(f"lock_ranges: {a.lock}: {len(pins)} pins inside every declared range "
          f"({len(EXCEPTIONS)} documented exception(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
