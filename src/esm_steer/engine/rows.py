"""What a decode-batch row holds in Python on either backend, and the one rule for recording a
decoded token (EOS, control points, stop strings, the token budget): docs/method.md, "Online"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from esm_steer.engine.base import FINISH_LENGTH, FINISH_STOP
from esm_steer.engine.segments import SegmentTracker


@dataclass
class RowState:
    """Tokens, logprobs and control-point state of one row."""

    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tracker: SegmentTracker | None = None
    text: str = ""  # decoded pieces, kept only when stop strings are checked
    at_control_point: bool = False
    finish_reason: str | None = None


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    """What ``Engine.start`` refuses: no prompt, or an empty one."""
    if not prompts:
        raise ValueError("start() needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("start() got an empty prompt")


class RowAccess:
    """The per-row getters of the ``DecodeBatch`` protocol, shared by both backends' batches:
    each reads the :class:`RowState` in ``self._rows`` (handle -> state)."""

    _rows: dict

    def _row(self, row: int):
        try:
            return self._rows[row]
        except KeyError:
            raise KeyError(f"unknown or dropped row {row}") from None

    def tokens(self, row: int) -> list[int]:
        return self._row(row).tokens

    def logprobs(self, row: int) -> list[float]:
        return self._row(row).logprobs

    def finish_reason(self, row: int) -> str | None:
        return self._row(row).finish_reason

    def prompt_len(self, row: int) -> int:
        return self._row(row).prompt_len

    def at_control_point(self, row: int) -> bool:
        """True when the row's last decoded token completed >= 1 delimiter occurrence
        (cleared the next time the row decodes a token)."""
        return self._row(row).at_control_point


def record_token(
    state: RowState,
    tok: int,
    lp: float,
    eos_ids: set[int],
    tokenizer,
    stop: Sequence[str] = (),
    max_new_tokens: int | None = None,
) -> bool:
    """Append a decoded token to a row; return True if the row finished.

    EOS finishes the row (reason "stop") and is recorded in neither tokens nor text; a token
    whose text completes a delimiter sets ``at_control_point`` (cleared by the next token)."""
    state.at_control_point = False
    if tok in eos_ids:
        state.finish_reason = FINISH_STOP
        return True
    state.tokens.append(tok)
    state.logprobs.append(lp)
    if state.tracker is not None or stop:
        piece = tokenizer.decode([tok], skip_special_tokens=False)
        if state.tracker is not None:
            state.at_control_point = state.tracker.feed(piece) > 0
        if stop:
            start = max(0, len(state.text) - max(len(s) for s in stop) + 1)
            state.text += piece
            if any(s in state.text[start:] for s in stop):
                state.finish_reason = FINISH_STOP
                return True
    if max_new_tokens is not None and len(state.tokens) >= max_new_tokens:
        state.finish_reason = FINISH_LENGTH
        return True
    return False
