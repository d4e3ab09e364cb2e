"""Binary answer reward: is the last boxed answer of a response equal to the ground truth?

`score(response, answer)` is 1.0 or 0.0 and never raises, whatever the model wrote.

Methods:
- "mathruler" (default, the paper's reward): `mathruler.grader.grade_answer(boxed, answer)`.
- "math_verify": `math_verify.verify(parse(answer), parse(boxed))`, each side wrapped in `$...$`.
  Its own signal-based timeouts are switched off (they only work on a main thread); ours replace them.

Both read the boxed answer with `boxed.extract_last_boxed` (lenient by default, `extraction="mathruler"`
for mathruler's exact rule); a response without a complete box scores 0.0.

Timeouts: sympy can take minutes or forever on hostile input (`\\boxed{99999999!}`). Every call runs under a
deadline (`timeout_s`) and scores 0.0 when it expires. Backends:
- "process" (default): a persistent worker process per grading process; on a timeout it is killed
  and restarted lazily, so a runaway computation stops using the CPU.
- "thread": a daemon thread per call; a timed-out thread is abandoned (it may keep a core busy until it
  finishes) — for environments where starting a process is not possible. Code that holds the GIL (a big
  integer factorial inside sympy) delays the deadline until it yields, so "process" is the safe choice.
- "inline" or `timeout_s=None`: no deadline (tests, trusted input).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Sequence

from megatron_vppo.reward.boxed import EXTRACTIONS, extract_last_boxed

__all__ = ["METHODS", "BACKENDS", "Grader", "grade_answer_text", "score", "batch_score"]

log = logging.getLogger(__name__)

METHODS = ("mathruler", "math_verify")
BACKENDS = ("process", "thread", "inline")
DEFAULT_TIMEOUT_S = 10.0
_WORKER_START_TIMEOUT_S = 120.0  # importing sympy in a fresh process on a busy machine


# ---------------------------------------------------------------------------------------------------------
# The graders themselves (no deadline; run wherever the backend puts them)


def _mathruler_equal(pred: str, answer: str) -> bool:
    from mathruler.grader import grade_answer

    return bool(grade_answer(pred, answer))


def _silence_math_verify_timeout_warning() -> None:
    # math-verify warns once that timeouts are disabled; we disable them on purpose (see module doc).
    import math_verify.grader
    import math_verify.parser

    for mod in (math_verify.parser, math_verify.grader):
        if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
            mod.TIMEOUT_WARNING_SHOWN = True


def _math_verify_equal(pred: str, answer: str) -> bool:
    from math_verify import parse, verify

    _silence_math_verify_timeout_warning()
    gold = parse(f"${answer}$", parsing_timeout=None)
    target = parse(f"${pred}$", parsing_timeout=None)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=None))


_EQUAL: dict[str, Callable[[str, str], bool]] = {
    "mathruler": _mathruler_equal,
    "math_verify": _math_verify_equal,
}


def grade_answer_text(pred: str | None, answer: str, method: str = "mathruler") -> bool:
    """Is the extracted answer `pred` equal to `answer` under `method`? No deadline; never raises."""
    if pred is None or not isinstance(answer, str) or not answer.strip():
        return False
    try:
        return _EQUAL[method](str(pred), answer)
    except Exception as exc:  # any library failure on odd input is a wrong answer, not a crash
        log.debug("grader %s raised %r on pred=%.200r", method, exc, pred)
        return False


def _check_args(method: str, backend: str, extraction: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if extraction not in EXTRACTIONS:
        raise ValueError(f"extraction={extraction!r} is not one of {EXTRACTIONS}")


# ---------------------------------------------------------------------------------------------------------
# Deadline backends


def _worker_main(fd: int) -> None:
    """Worker process loop: receive (method, pred, answer), send back a bool; exits on None or EOF."""
    conn = Connection(fd)
    # Import and warm both graders before reporting ready: the per-call deadline is for grading only,
    # not for importing sympy on a busy machine.
    for method in METHODS:
        grade_answer_text("\\frac{1}{2}", "0.5", method)
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        method, pred, answer = job
        conn.send(grade_answer_text(pred, answer, method))


class _ProcessRunner:
    """One persistent worker process; a call that misses its deadline kills it (restarted on next use).

    The worker is a plain `python -c` subprocess talking over a socket pair, not a multiprocessing child,
    so it never re-imports the caller's `__main__` (training scripts need no import guard for it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self.restarts = 0

    def _start(self) -> None:
        parent, child = mp.Pipe(duplex=True)
        fd = child.fileno()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding megatron_vppo/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        code = f"from megatron_vppo.reward.grade import _worker_main; _worker_main({fd})"
        proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL)
        child.close()
        if not parent.poll(_WORKER_START_TIMEOUT_S):
            proc.kill()
            proc.wait()
            raise RuntimeError("reward grader worker did not start")
        parent.recv()
        self._proc, self._conn = proc, parent

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def run(self, method: str, pred: str, answer: str, timeout_s: float) -> bool | None:
        """The grade, or None when the deadline passed or the worker died."""
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start()
                self._conn.send((method, pred, answer))
                if self._conn.poll(timeout_s):
                    return bool(self._conn.recv())
            except (EOFError, OSError, RuntimeError) as exc:
                log.warning("reward grader worker failed (%r); restarting it", exc)
            # deadline passed or worker broken: kill it so a runaway sympy stops burning CPU
            self._stop()
            self.restarts += 1
            return None


_SHARED_RUNNER = _ProcessRunner()  # starts its process on first use only


@atexit.register
def _close_shared_runner() -> None:
    _SHARED_RUNNER.close()


def _run_in_thread(method: str, pred: str, answer: str, timeout_s: float) -> bool | None:
    result: list[bool] = []
    t = threading.Thread(
        target=lambda: result.append(grade_answer_text(pred, answer, method)), daemon=True, name="reward-grader"
    )
    t.start()
    t.join(timeout_s)
    return result[0] if result else None


class Grader:
    """Scores responses against ground truths under a per-call deadline (see module doc).

    One instance owns at most one worker process; use it from any thread (calls are serialised).
    """

    def __init__(
        self,
        method: str = "mathruler",
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        backend: str = "process",
        extraction: str = "lenient",
        shared_worker: bool = False,
    ) -> None:
        _check_args(method, backend, extraction)
        self.method, self.timeout_s, self.backend, self.extraction = method, timeout_s, backend, extraction
        self.timeouts = 0  # calls that hit the deadline, for the caller's metrics
        self._owns_runner = backend == "process" and not shared_worker
        self._runner = None
        if backend == "process":
            self._runner = _SHARED_RUNNER if shared_worker else _ProcessRunner()

    def score(self, response: object, answer: object) -> float:
        try:
            pred = extract_last_boxed(response, self.extraction)
            if pred is None or not isinstance(answer, str) or not answer.strip():
                return 0.0
            if self.timeout_s is None or self.timeout_s <= 0 or self.backend == "inline":
                return float(grade_answer_text(pred, answer, self.method))
            if self._runner is not None:
                ok = self._runner.run(self.method, pred, answer, self.timeout_s)
            else:
                ok = _run_in_thread(self.method, pred, answer, self.timeout_s)
            if ok is None:
                self.timeouts += 1
                log.warning("reward grading exceeded %.1fs (pred=%.120r, answer=%.60r): scored 0.0",
                            self.timeout_s, pred, answer)
                return 0.0
            return float(ok)
        except Exception as exc:  # never let odd model output stop training
            log.warning("reward grading failed with %r: scored 0.0", exc)
            return 0.0

    __call__ = score

    def batch_score(self, responses: Sequence[object], answers: Sequence[object]) -> list[float]:
        if len(responses) != len(answers):
            raise ValueError(f"batch_score got {len(responses)} responses but {len(answers)} answers")
        return [self.score(r, a) for r, a in zip(responses, answers)]

    def close(self) -> None:
        if self._owns_runner:
            self._runner.close()

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# Function API: one worker process per grading process, shared by every call


def score(
    response: object,
    answer: object,
    method: str = "mathruler",
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    backend: str = "process",
    extraction: str = "lenient",
) -> float:
    """1.0 if the last boxed answer in `response` equals `answer` under `method`, else 0.0. Never raises
    on model output (bad `method`/`backend`/`extraction` names are a ValueError)."""
    return Grader(method, timeout_s, backend, extraction, shared_worker=True).score(response, answer)


def batch_score(
    responses: Sequence[object],
    answers: Sequence[object],
    method: str = "mathruler",
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    backend: str = "process",
    extraction: str = "lenient",
) -> list[float]:
    """`score` over aligned lists (one deadline per item)."""
    return Grader(method, timeout_s, backend, extraction, shared_worker=True).batch_score(responses, answers)
