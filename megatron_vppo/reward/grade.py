"""Binary answer reward: is the last boxed answer of a response equal to the ground truth?

`score(response, answer)` is 1.0 or 0.0 and never raises, whatever the model wrote.

Methods:
- "mathruler" (default, the paper's reward): `mathruler.grader.grade_answer(boxed, answer)`.
- "math_verify": `math_verify.verify(parse(answer), parse(boxed))`, each side wrapped in `$...$`.
  Its own signal-based timeouts are switched off (they only work on a main thread); ours replace them.

Both read the boxed answer with `boxed.extract_last_boxed` (lenient by default, `extraction="mathruler"`
for mathruler's exact rule); a response without a complete box scores 0.0.

Failures are never a silent 0: `Grader.require()` imports the method's package where grading runs and
raises `GraderImportError` naming it; a grader that raises on an answer, or returns anything but a real
bool or 0/1 (NaN, the string "False": never read as truthy), scores 0.0 but is counted (`Grader.errors`,
the first few logged with the answer); a call past the deadline is counted too (`Grader.timeouts`); and
`check_error_rate` stops a run whose share of such answers passes `reward.max_error_rate` (both
libraries catch odd input themselves, so a raise means a broken grader, not a wrong answer).

Timeouts: sympy can take minutes or forever on hostile input (`\\boxed{99999999!}`). Every call runs under a
deadline (`timeout_s`) and scores 0.0 when it expires (counted, see above). Backends:
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

from megatron_vppo.errors import RunAbort

__all__ = ["METHODS", "BACKENDS", "Grader", "GraderFailure", "GraderImportError", "check_error_rate",
           "grade_answer_text", "score", "batch_score"]

log = logging.getLogger(__name__)

METHODS = ("mathruler", "math_verify")
BACKENDS = ("process", "thread", "inline")
DEFAULT_TIMEOUT_S = 10.0
_WORKER_START_TIMEOUT_S = 120.0  # importing sympy in a fresh process on a busy machine
LOG_FIRST_ERRORS = 5  # grader exceptions logged with their answer; later ones are only counted
_PACKAGES = {"mathruler": ("mathruler.grader", "pip install mathruler pylatexenc"),
             "math_verify": ("math_verify", "pip install math-verify")}


class GraderImportError(RunAbort):
    """The grading package of reward.method cannot be imported: every reward would be 0."""


class GraderFailure(RunAbort):
    """Too many answers made the grader raise: the rewards (or the accuracy) would be wrong."""


# ---------------------------------------------------------------------------------------------------------
# The graders themselves (no deadline; run wherever the backend puts them)


def _mathruler_equal(pred: str, answer: str) -> bool:
    from mathruler.grader import grade_answer

    return grade_answer(pred, answer)  # checked by _as_grade: a non-bool is a grader error, never truthy


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
    return verify(gold, target, timeout_seconds=None)


_EQUAL: dict[str, Callable[[str, str], bool]] = {
    "mathruler": _mathruler_equal,
    "math_verify": _math_verify_equal,
}


def import_problem(method: str) -> str | None:
    """None when `method`'s package imports here, else one line naming the package and how to get it."""
    import importlib

    module, install = _PACKAGES[method]
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or any error raised while the package initialises
        return (f"reward.method={method}: cannot import {module} ({type(exc).__name__}: {exc}); every reward "
                f"would be 0. Fix the environment ({install}) or choose another reward.method ({', '.join(METHODS)})")
    return None


def _as_grade(value: object) -> bool:
    """A grader's result as a grade: only a real bool (numpy's and 0-d tensors' included) or the number
    0 / 1 is one. Anything else — NaN, the string "False", None, 0.5 — is a broken grader (TypeError),
    never read as truthy."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_" or (hasattr(value, "dtype") and str(getattr(value, "dtype", "")) in
                                           ("bool", "torch.bool") and getattr(value, "ndim", 1) == 0):
        return bool(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise TypeError(f"the grader returned {value!r:.60} ({type(value).__name__}), not a bool or 0/1")


def _grade(pred: str | None, answer: str, method: str) -> tuple[bool, str | None]:
    """(equal?, None) or (False, "ExcType: message") when the grader raised or returned a non-grade."""
    if pred is None or not isinstance(answer, str) or not answer.strip():
        return False, None
    try:
        return _as_grade(_EQUAL[method](str(pred), answer)), None
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"[:300]


def grade_answer_text(pred: str | None, answer: str, method: str = "mathruler") -> bool:
    """Is the extracted answer `pred` equal to `answer` under `method`? No deadline; never raises
    (a grader exception is False here; `Grader` counts them)."""
    return _grade(pred, answer, method)[0]


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
    """Worker process loop: receive (method, pred, answer), send back (bool, error or None); exits on
    None or EOF. It first reports which methods import ({method: problem or None})."""
    conn = Connection(fd)
    # Import and warm both graders before reporting ready: the per-call deadline is for grading only,
    # not for importing sympy on a busy machine.
    problems = {method: import_problem(method) for method in METHODS}
    for method in METHODS:
        if problems[method] is None:
            _grade("\\frac{1}{2}", "0.5", method)
    conn.send(problems)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        method, pred, answer = job
        conn.send(_grade(pred, answer, method))


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
        self.import_problems: dict[str, str | None] | None = None  # from the worker, once started

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
        try:
            self.import_problems = parent.recv()
        except (EOFError, OSError):
            proc.kill()
            proc.wait()
            raise RuntimeError(f"reward grader worker exited at start-up (exit code {proc.poll()})") from None
        self._proc, self._conn = proc, parent

    def problem(self, method: str) -> str | None:
        """Why `method` cannot grade in the worker (None if it can); starts the worker."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._stop()
                try:
                    self._start()
                except RuntimeError as exc:
                    return f"reward.method={method}: {exc}"
            return self.import_problems.get(method)

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

    def run(self, method: str, pred: str, answer: str, timeout_s: float) -> tuple[bool, str | None] | None:
        """(grade, error), or None when the deadline passed or the worker died."""
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start()
                self._conn.send((method, pred, answer))
                if self._conn.poll(timeout_s):
                    ok, err = self._conn.recv()
                    return bool(ok), err
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


def _run_in_thread(method: str, pred: str, answer: str, timeout_s: float) -> tuple[bool, str | None] | None:
    result: list = []
    t = threading.Thread(
        target=lambda: result.append(_grade(pred, answer, method)), daemon=True, name="reward-grader"
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
        self.timeouts = 0  # calls that hit the deadline (scored 0.0), for the caller's metrics and error rate
        self.last_timeout: str | None = None  # "pred=..., answer=..." of the latest one
        self.errors = 0  # answers whose grading raised (scored 0.0), for the caller's metrics
        self.last_error: str | None = None  # "ExcType: msg (pred=..., answer=...)" of the latest one
        self._owns_runner = backend == "process" and not shared_worker
        self._runner = None
        if backend == "process":
            self._runner = _SHARED_RUNNER if shared_worker else _ProcessRunner()

    def require(self) -> None:
        """Raise GraderImportError unless the method's package imports where grading runs (the worker
        process for the "process" backend, this process otherwise). Call once at start-up."""
        problem = self._runner.problem(self.method) if self._runner is not None else import_problem(self.method)
        if problem:
            raise GraderImportError(problem)

    def score(self, response: object, answer: object) -> float:
        pred = None
        try:
            pred = extract_last_boxed(response, self.extraction)
            if pred is None or not isinstance(answer, str) or not answer.strip():
                return 0.0
            if self.timeout_s is None or self.timeout_s <= 0 or self.backend == "inline":
                res = _grade(pred, answer, self.method)
            elif self._runner is not None:
                res = self._runner.run(self.method, pred, answer, self.timeout_s)
            else:
                res = _run_in_thread(self.method, pred, answer, self.timeout_s)
            if res is None:
                self.timeouts += 1
                self.last_timeout = f"pred={pred!r:.120}, answer={answer!r:.60}"
                if self.timeouts <= LOG_FIRST_ERRORS:
                    log.warning("reward grading exceeded reward.timeout_s=%g (pred=%.120r, answer=%.60r): scored "
                                "0.0, counted against reward.max_error_rate (timeout %d%s)", self.timeout_s, pred,
                                answer, self.timeouts,
                                "; later ones are only counted" if self.timeouts == LOG_FIRST_ERRORS else "")
                return 0.0
            ok, err = res
            if err is not None:
                self._count_error(err, pred, answer)
            return float(ok)
        except Exception as exc:  # never let odd model output stop training mid-step; counted instead
            self._count_error(f"{type(exc).__name__}: {exc}", pred, answer)
            return 0.0

    def _count_error(self, err: str, pred: object, answer: object) -> None:
        self.errors += 1
        self.last_error = f"{err} (pred={pred!r:.120}, answer={answer!r:.60})"
        if self.errors <= LOG_FIRST_ERRORS:
            log.warning("reward grader %s raised %s on pred=%.120r answer=%.60r: scored 0.0 (error %d%s)",
                        self.method, err, pred, answer, self.errors,
                        "; later ones are only counted" if self.errors == LOG_FIRST_ERRORS else "")

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


def check_error_rate(errors: int, graded: int, max_rate: float, where: str, example: str | None = None,
                     timeouts: int = 0, timeout_example: str | None = None) -> float:
    """The share of graded answers whose grader failed (raised, returned a non-grade, or ran past its
    deadline); GraderFailure above `max_rate`."""
    rate = (errors + timeouts) / graded if graded else 0.0
    if rate > max_rate:
        what = " and ".join(x for x in (f"raised on {errors}" if errors else "",
                                        f"timed out (past reward.timeout_s) on {timeouts}" if timeouts else "") if x)
        first = f"; first: {example}" if example else (f"; first timeout: {timeout_example}" if timeout_example else "")
        fix = ("Fix the grader environment, or raise reward.max_error_rate" if errors else
               "Fix the grader (a hanging grader), raise reward.timeout_s, or raise reward.max_error_rate")
        raise GraderFailure(f"{where}: the reward grader {what} of {graded} answers ({rate:.0%} > "
                            f"reward.max_error_rate={max_rate:g}), so rewards would be wrong{first}. {fix}")
    return rate


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
