"""Symbolic LaTeX equivalence (math-verify, then sympy) behind a deadline.

All symbolic work runs in a daemon worker thread with a deadline (:data:`SYMBOLIC_TIMEOUT_S`),
so grading never hangs and works off the main thread, where signal-based timeouts (math-verify's
own) are unavailable. Inputs that could make a single C-level big-integer operation run for
minutes (which holds the GIL, so no thread deadline could interrupt it) are refused first
(:func:`_too_heavy`).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

from esm_steer.data.grading.numeric import numbers_equal, strip_math

log = logging.getLogger(__name__)

SYMBOLIC_TIMEOUT_S = 5.0  # per math-verify / sympy call (imports excluded)
_MAX_ABANDONED = 2  # stuck worker threads tolerated before symbolic checks are switched off
_abandoned: list[threading.Thread] = []
_warned_off = False


def _too_heavy(s: str) -> bool:
    """Inputs that could stall sympy inside one C call (huge integer powers, factorials)."""
    if len(s) > 300:
        return True
    if re.search(r"(?:\^|\*\*)\s*(?:\{[^{}]*|\(?[\w.]+\)?\s*)(?:\^|\*\*)", s):  # towers a^{b^c}, a^b^c
        return True
    if re.search(r"(\^|\*\*)\s*\{?\s*\(?\s*\d{4,}", s):  # exponent >= 1000
        return True
    return bool(re.search(r"\d{5,}\s*!|\\prod|\\sum|\\int", s))  # huge factorials, unbounded series


def run_bounded(fn: Callable, *args, timeout: float | None = None):
    """``fn(*args)`` in a daemon thread; its result, or None on timeout or error.

    A thread that misses its deadline is abandoned (Python cannot kill it); once
    ``_MAX_ABANDONED`` are still alive, symbolic checks are skipped instead of piling up.
    """
    global _warned_off
    timeout = SYMBOLIC_TIMEOUT_S if timeout is None else timeout
    _abandoned[:] = [t for t in _abandoned if t.is_alive()]
    if len(_abandoned) >= _MAX_ABANDONED:
        if not _warned_off:
            log.warning("%d symbolic grading threads are stuck; skipping symbolic checks", len(_abandoned))
            _warned_off = True
        return None
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except Exception as e:  # noqa: BLE001 - any parser failure means "not provably equal"
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="esm-grade-symbolic")
    t.start()
    t.join(timeout)
    if t.is_alive():
        _abandoned.append(t)
        log.warning("symbolic check %s timed out after %.1fs", getattr(fn, "__name__", fn), timeout)
        return None
    if "error" in box:
        log.debug("symbolic check failed: %s", box["error"])
    return box.get("value")


def _import_symbolic() -> None:
    for mod in ("sympy", "latex2sympy2_extended", "math_verify"):
        try:
            __import__(mod)
        except ImportError:
            pass


def _math_verify_equal(pred: str, gold: str) -> bool | None:
    try:
        import math_verify.grader
        import math_verify.parser
        from math_verify import parse, verify
    except ImportError:
        return None
    # its "timeout disabled" warning does not apply: run_bounded is the timeout
    math_verify.grader.TIMEOUT_WARNING_SHOWN = math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    # timeouts off: they use SIGALRM (main thread only); run_bounded bounds this call
    g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not g or not p:
        return None
    return bool(verify(g, p, timeout_seconds=None))


def _sympy_equal(pred: str, gold: str) -> bool | None:
    import sympy

    try:
        from latex2sympy2_extended import latex2sympy
    except ImportError:
        from sympy.parsing.latex import parse_latex as latex2sympy
    a, b = latex2sympy(pred), latex2sympy(gold)
    if not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return None
    return sympy.simplify(a - b) == 0


def math_equal(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None or not str(pred).strip():
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    same = numbers_equal(pred, gold)
    if same is not None:
        return same  # both plain numbers: nothing symbolic left to check
    if strip_math(pred) == strip_math(gold):
        return True
    if _too_heavy(pred) or _too_heavy(gold):
        return False
    _import_symbolic()  # outside the deadline: the first import alone takes seconds
    if run_bounded(_math_verify_equal, pred, gold):
        return True
    return bool(run_bounded(_sympy_equal, strip_math(pred), strip_math(gold)))
