"""Find the final answer a model wrote inside `\\boxed{...}`.

The reward of the paper (EasyR1 / mathruler) reads the content of the LAST `\\boxed{` in the
response, up to its balancing `}`. Two extractors live here:

- `mathruler` (strict): exactly mathruler's rule — the last literal `\\boxed{`; every `{`/`}` counts
  (escaped ones too); if that box never closes, there is no answer (earlier boxes are not tried).
- `lenient` (default): also accepts `\\boxed {x}` (spaces), `\\fbox{x}` and the MATH-style `\\boxed 5`;
  escaped braces `\\{ \\}` do not count towards balance; if the last box never closes, the last box
  that does close is used.

Whenever the last box is a well-formed `\\boxed{...}` without escaped braces, both give the same
string. Both run in linear time and never raise: odd input gives `None`.
"""

from __future__ import annotations

import re

__all__ = ["extract_last_boxed", "EXTRACTIONS"]

EXTRACTIONS = ("lenient", "mathruler")

# `\boxed{`, `\boxed {`, `\fbox{` — the command must not continue as a longer name (`\boxedfoo`).
_OPEN_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*\{")
# MATH-style `\boxed 5` / `\boxed -3` (no braces): one token up to whitespace or `$`.
_BARE_RE = re.compile(r"\\boxed[ \t]+([^\s${}\\][^\s${}]*)")


def _closing_index(text: str, start: int, count_escaped: bool, stop: int | None = None) -> int:
    """Index of the `}` that closes a group whose content starts at `start` (searching text[:stop]), or -1."""
    depth = 0
    i, n = start, len(text) if stop is None else stop
    while i < n:
        ch = text[i]
        if ch == "\\" and not count_escaped and i + 1 < n and text[i + 1] in "{}\\":
            i += 2  # `\{`, `\}`, `\\` are literal characters, not grouping
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return -1


def _mathruler(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    content_start = start + len("\\boxed{")
    end = _closing_index(text, content_start, count_escaped=True)
    return None if end < 0 else text[content_start:end].strip()


def _lenient(text: str) -> str | None:
    best: tuple[int, str] | None = None
    # Try boxes from the last one backwards; the first that closes wins. A box that is still open
    # when the next (later, failed) box starts cannot close either, so each scan stops there: linear.
    stop = None
    for m in reversed(list(_OPEN_RE.finditer(text))):
        end = _closing_index(text, m.end(), count_escaped=False, stop=stop)
        if end >= 0:
            best = (m.end(), text[m.end():end].strip())
            break
        stop = m.end()
    bare = None
    for m in _BARE_RE.finditer(text):
        bare = (m.start(1), m.group(1).strip())
    if bare is not None and (best is None or bare[0] > best[0]):
        return bare[1]
    return None if best is None else best[1]


def extract_last_boxed(text: object, extraction: str = "lenient") -> str | None:
    """Content of the last box in `text` (stripped), or None when there is no complete box.

    `extraction` is "lenient" (default) or "mathruler" (bit-for-bit mathruler's
    `extract_boxed_content`, except that "no answer" is None instead of the string "None").
    Non-string input gives None rather than an error: model output is never trusted.
    """
    if extraction not in EXTRACTIONS:
        raise ValueError(f"extraction={extraction!r} is not one of {EXTRACTIONS}")
    if not isinstance(text, str) or "\\" not in text:
        return None
    return _mathruler(text) if extraction == "mathruler" else _lenient(text)
