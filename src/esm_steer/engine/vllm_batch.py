"""The vLLM decode batch: rows as requests that share their prefix (docs/method.md, "Online").

A row is Python state only: its prompt, tokens, logprobs, control-point tracker and its steering
history, a list of ``(first, last, vector, scale)`` ranges. There is no KV cache of its own:
each step sends every stepping row as one request (prompt = prompt + tokens so far, with all of
its ranges), so prefix caching with per-block steering keys (:mod:`.vllm_steer`) reuses the KV
the row's earlier requests computed, and a fork is a copy of the Python state whose requests
hit the same blocks. A prefix-cache miss recomputes the same KV from the ranges.

A step runs each row to its next event in one request: EOS, ``max_new_tokens``, a completed
delimiter, or its ``max_tokens`` limit. The delimiter is passed to vLLM as a stop string only to
stop early; the row's :class:`SegmentTracker` (the HF batch's very rule) decides where the
control point is, and tokens past it are dropped, so control points sit where HF puts them.
``last_hidden`` asks vLLM for layer ℓ's state at the row's last token in a one-token request
(the hook captures it), for every row waiting for it at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from esm_steer.engine import vllm_steer
from esm_steer.engine.base import FINISH_LENGTH
from esm_steer.engine.rows import RowAccess, RowState, check_prompts, record_token
from esm_steer.engine.segments import SegmentTracker


@dataclass
class _VRow(RowState):
    prompt: list[int] = field(default_factory=list)
    ranges: list[list] = field(default_factory=list)  # [first, last, vector, scale, key]
    hidden: torch.Tensor | None = None
    hidden_at: int = -1  # len(prompt + tokens) when `hidden` was captured

    def ids(self) -> list[int]:
        return self.prompt + self.tokens

    def clone(self) -> _VRow:
        return _VRow(
            prompt_len=self.prompt_len,
            tokens=list(self.tokens),
            logprobs=list(self.logprobs),
            tracker=self.tracker.copy() if self.tracker is not None else None,
            text=self.text,
            at_control_point=self.at_control_point,
            prompt=self.prompt,  # never modified
            ranges=[list(r) for r in self.ranges],
            hidden=self.hidden,
            hidden_at=self.hidden_at,
        )


class VLLMDecodeBatch(RowAccess):
    """Rows as vLLM requests sharing their prefix (implements ``base.DecodeBatch``)."""

    def __init__(
        self,
        engine,
        prompts: Sequence[Sequence[int]],
        segment_delimiter: str | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] = (),
    ):
        check_prompts(prompts)
        if not getattr(engine, "steer_installed", False):
            vllm_steer.install(engine)
        self.engine = engine
        self.segment_delimiter = segment_delimiter
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self._rows: dict[int, _VRow] = {}
        self._next = 0
        self._keys: dict[int, tuple[torch.Tensor, str]] = {}  # id(vector) -> (vector, range key)
        for p in prompts:
            tracker = SegmentTracker(segment_delimiter) if segment_delimiter else None
            self._add(_VRow(prompt_len=len(p), prompt=[int(t) for t in p], tracker=tracker))

    def _add(self, row: _VRow) -> int:
        h = self._next
        self._next += 1
        self._rows[h] = row
        return h

    def _live(self, row: int) -> _VRow:
        state = self._row(row)
        if state.finish_reason is not None:
            raise ValueError(f"row {row} is finished ({state.finish_reason}) and has left the batch")
        return state

    # ------------------------------------------------------------------ protocol: state

    def active_rows(self) -> list[int]:
        return sorted(h for h, r in self._rows.items() if r.finish_reason is None)

    def ranges(self, row: int) -> list[tuple[int, int, torch.Tensor, float]]:
        """The row's steering history: (first, last, vector, scale) per steered segment."""
        return [(a, b, v, s) for a, b, v, s, _ in self._row(row).ranges]

    def set_steer(self, row: int, vector: torch.Tensor | None, scale: float = 1.0) -> None:
        state = self._live(row)
        pos = len(state.prompt) + len(state.tokens)  # the first position not forwarded yet
        kept = []
        for r in state.ranges:
            if r[0] >= pos:
                continue
            if r[1] >= pos:
                r = [r[0], pos - 1, *r[2:]]
            kept.append(r)
        if vector is not None:
            v = torch.as_tensor(vector).detach().float().cpu().reshape(-1)
            if v.numel() != int(self.engine.info.hidden_size):
                raise ValueError(
                    f"steering vector has {v.numel()} values, hidden size is {self.engine.info.hidden_size}"
                )
            kept.append([pos, vllm_steer.OPEN, v, float(scale), self._key(vector, v, float(scale))])
        state.ranges = kept

    def set_impulse(self, row: int, vector: torch.Tensor | None, scale: float = 1.0) -> None:
        """scale·vector at the row's last token only: a one-position range there. That token was
        generated but not yet forwarded as part of a prompt, or was forwarded under other block
        keys (a capture), so the next request computes it with the impulse (block keys differ)."""
        state = self._live(row)
        if vector is None:
            return
        v = torch.as_tensor(vector).detach().float().cpu().reshape(-1)
        if v.numel() != int(self.engine.info.hidden_size):
            raise ValueError(f"steering vector has {v.numel()} values, hidden size is {self.engine.info.hidden_size}")
        at = len(state.prompt) + len(state.tokens) - 1
        state.ranges.append([at, at, v, float(scale), self._key(vector, v, float(scale))])

    def _key(self, original, v: torch.Tensor, scale: float) -> str:
        cached = self._keys.get(id(original))
        if cached is None or cached[0] is not original:
            cached = (original, vllm_steer.range_key(v, 1.0))
            self._keys[id(original)] = cached
        return f"{cached[1]}*{scale!r}"

    def fork(self, row: int, n: int) -> list[int]:
        return self.fork_many({row: n})[row]

    def fork_many(self, requests: Mapping[int, int]) -> dict[int, list[int]]:
        return {row: [self._add(self._live(row).clone()) for _ in range(max(n, 0))] for row, n in requests.items()}

    def drop(self, rows: Sequence[int]) -> None:
        for r in rows:
            self._rows.pop(r, None)

    def finish(self, row: int, reason: str) -> None:
        state = self._row(row)
        if state.finish_reason is None:
            state.finish_reason = reason

    # ------------------------------------------------------------------ requests

    def _request(self, state: _VRow, params, extra: dict | None = None):
        from vllm.inputs import TokensPrompt

        args = vllm_steer.steer_args(
            [(a, b, v, s) for a, b, v, s, _ in state.ranges],
            int(self.engine.info.hidden_size),
            keys=[k for *_, k in state.ranges],
        )
        if extra:
            args.update(extra)
        if args:
            params.extra_args = {**(params.extra_args or {}), **args}
        return TokensPrompt(prompt_token_ids=state.ids()), params

    def _generate(self, pairs):
        prompts, params = [p for p, _ in pairs], [s for _, s in pairs]
        return self.engine.llm.generate(prompts, params, use_tqdm=False)

    def step(
        self,
        temperature: float = 0.0,
        top_p: float = 1.0,
        rows: Sequence[int] | None = None,
        max_tokens: Mapping[int, int] | None = None,
    ) -> dict[int, int]:
        """Run every stepping row to its next event in one batched ``generate`` (class doc)."""
        from vllm import SamplingParams

        stepping = self.active_rows() if rows is None else sorted(rows)
        limits = dict(max_tokens or {})
        if limits and min(limits.values()) < 1:
            raise ValueError(f"step(max_tokens=...) needs limits >= 1, got {limits}")
        todo, pairs = [], []
        stop = [*([self.segment_delimiter] if self.segment_delimiter else []), *self.stop]
        room = int(self.engine.model_cfg.max_model_len) if self.engine.model_cfg is not None else None
        for h in stepping:
            state = self._live(h)
            n = limits.get(h, 1 << 30)
            if self.max_new_tokens is not None:
                n = min(n, self.max_new_tokens - len(state.tokens))
            if room is not None:
                n = min(n, room - len(state.ids()))
            if n < 1:
                state.finish_reason = FINISH_LENGTH
                continue
            params = SamplingParams(
                n=1,
                temperature=float(temperature) if temperature > 0 else 0.0,
                top_p=float(top_p) if temperature > 0 else 1.0,
                max_tokens=int(n),
                stop=stop or None,
                logprobs=0,
            )
            todo.append(h)
            pairs.append(self._request(state, params))
        out: dict[int, int] = {}
        if not pairs:
            return out
        eos, tok = self.engine.eos_token_ids, self.engine.tokenizer
        for h, res in zip(todo, self._generate(pairs)):
            state, completion = self._rows[h], res.outputs[0]
            ids = [int(t) for t in completion.token_ids]
            lps = [vllm_steer.token_logprob(e, t) for e, t in zip(completion.logprobs or [], ids)]
            for t, lp in zip(ids, lps):
                out[h] = t
                if record_token(state, t, lp, eos, tok, self.stop, self.max_new_tokens) or state.at_control_point:
                    break  # an event: tokens past it are not the row's
        return out

    # ------------------------------------------------------------------ hidden states

    def last_hidden(self, row: int) -> torch.Tensor:
        state = self._row(row)
        if state.hidden_at != len(state.ids()):
            # every row waiting for its state at a control point (or at the prompt) in one call
            waiting = [
                h
                for h, r in self._rows.items()
                if r.hidden_at != len(r.ids()) and (r.at_control_point or not r.tokens) and r.finish_reason is None
            ]
            self._capture(sorted(set(waiting) | {row}))
        return state.hidden

    def _capture(self, rows: list[int]) -> None:
        from vllm import SamplingParams

        pairs, tags = [], []
        for h in rows:
            state = self._rows[h]
            at = len(state.ids()) - 1  # the last token: the control point's state
            tag = f"{id(self)}:{h}:{at + 1}"
            params = SamplingParams(n=1, temperature=0.0, max_tokens=1)
            pairs.append(self._request(state, params, {vllm_steer.CAPTURE_KEY: [tag, at, at]}))
            tags.append((tag, at))
        self._generate(pairs)
        got = vllm_steer.pop_captured(self.engine)
        for h, (tag, at) in zip(rows, tags):
            state = self._rows[h]
            state.hidden = vllm_steer.captured_span(got, tag, at, at)[0]
            state.hidden_at = at + 1
