"""The online ESM policy: at each control point retrieve, probe, and steer the next segment.

The rules, the ablations (``no_memory``, ``no_probing``), the ``static`` baseline, the budget
accounting and the ``steps`` records are docs/method.md's "Online" section; the scoring and the
choice are in :mod:`.policy`. This module drives a :class:`~esm_steer.engine.base.DecodeBatch`,
one policy for both backends:

- HF: rows over one KV cache; a probe is a fork of the row's cache, a step decodes one token.
- vLLM: rows are requests sharing the example's prefix through prefix caching (the fork); a
  step runs each row to its next event (delimiter, EOS, T_max, or the probe's length).

The policy re-checks those events after every step, so both give the same decisions. Control
points: m = 0 at the end of the prompt, then one each time a kept token completes
``control_points.segment_delimiter`` (the SegmentTracker rule mining uses), while m < M. A probe
whose token completes a delimiter stops there (its row sits out its siblings' steps). A probe
decodes at most T_max − kept tokens, so kept tokens never exceed T_max.

Batched: all examples of a chunk share one batch; each row has its own control points, probes
and steering, and probe rows of different examples decode in the same ``step()`` calls.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from esm_steer.config import ModelConfig
from esm_steer.engine.base import FINISH_LENGTH, FINISH_STOP
from esm_steer.esm.policy import OnlineResult, choose, record_choice, score, summarize
from esm_steer.esm.retrieve import GATE_NO_TOOLS, GATE_OK, Retrieval, aggregate
from esm_steer.esm.strategies import strategy_class

__all__ = ["OnlinePolicy", "OnlineResult", "summarize"]

log = logging.getLogger(__name__)


@dataclass
class _Probe:
    """The probes of one control point, decoding."""

    step: dict  # the step record, completed on resolution
    candidates: list[dict]  # [null, tool_1, ..., tool_L]: {"tool", "A_hat", "vector"}
    rows: list[int]  # rows[j] decodes candidates[j]; rows[0] is the example's original row
    start: int  # response tokens before the probe (same for every row)
    length: int  # tokens each probe decodes at most (<= probe_tokens, <= T_max - start)
    stopped: set[int] = field(default_factory=set)  # rows done probing (length or delimiter), not finished
    # online.inject=impulse: the row parked at the control point (rows are all forks of it), from
    # which the segment is generated again with the winner's impulse
    base: int | None = None


@dataclass
class _Example:
    """Per-example decoding state."""

    index: int
    row: int  # the row holding the kept response
    steps: list[dict] = field(default_factory=list)
    probe_tokens_used: int = 0
    m: int = 0  # the next control point's index = kept tokens that completed a delimiter
    due: bool = True  # a control point waits to be opened (m = 0 at the prompt's end)
    probe: _Probe | None = None
    result: OnlineResult | None = None


class OnlinePolicy:
    """Runs the online ESM policy (or an ablation) on an engine's :class:`DecodeBatch`; what
    differs between the variants is the registered strategy of ``online.variant``
    (:mod:`.strategies`).

    Args:
        engine: an engine with ``supports_steering`` and ``start(prompts, segment_delimiter=...,
            max_new_tokens=...) -> DecodeBatch`` (either backend) and a ``tokenizer``.
        library: the selected tools (``library.tools``: ``tool_id``, ``Q``, ``vector [d]``).
        memory: the retrieval index (``search(queries [B, d], k) -> (sims, idx)``,
            ``entries[i]["tool_id"|"Q"]``); unused by ``no_memory`` and ``static``.
        online_cfg: :class:`esm_steer.config.OnlineConfig`.
        control_points_cfg: :class:`esm_steer.config.ControlPointsConfig`.
    """

    def __init__(self, engine, library, memory, online_cfg, control_points_cfg):
        strategy = strategy_class(str(online_cfg.variant))
        if not engine.supports_steering:
            raise TypeError(f"the online policy needs steered step-level decoding; {type(engine).__name__} has none")
        self.engine = engine
        self.library = library
        self.memory = memory
        self.cfg = online_cfg
        self.cp = control_points_cfg
        self.tokenizer = engine.tokenizer
        self.tools = {t.tool_id: t for t in library.tools}
        self._vectors: dict[str, torch.Tensor] = {}
        # no_memory: the candidates never change (the L highest-Q tools, Â = Q)
        self._top_by_q = [(t.tool_id, float(t.Q)) for t in library.top_by_q(online_cfg.L)][: online_cfg.L]
        self.impulse = online_cfg.inject == "impulse"
        self.first_m = int(control_points_cfg.first_m)
        if online_cfg.null_score == "anchors" and strategy.uses_memory and not memory.has_null_anchors:
            raise ValueError("online.null_score=anchors needs a memory built with offline_memory.null_anchors=true")
        self.strategy = strategy(self)

    # ------------------------------------------------------------------ public

    def run(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[OnlineResult]:
        """Steered greedy responses to ``prompts`` (token ids), T_max = ``max_new_tokens`` kept tokens."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        bs = int(getattr(self.engine, "batch_size", None) or ModelConfig.batch_size)
        results: list[OnlineResult] = []
        for lo in range(0, len(prompts), bs):
            chunk = [list(p) for p in prompts[lo : lo + bs]]
            results.extend(self._run_chunk(chunk, max_new_tokens))
            log.debug("online %s: %d/%d examples", self.cfg.variant, len(results), len(prompts))
        return results

    # ------------------------------------------------------------------ the decode loop

    def _run_chunk(self, prompts: list[list[int]], T: int) -> list[OnlineResult]:
        # max_new_tokens: the batch finishes a row at T_max inside step() (no wasted forward);
        # probes never reach it before their parent would (a probe decodes <= T_max - kept)
        batch = self.engine.start(prompts, segment_delimiter=self.cp.segment_delimiter, max_new_tokens=T)
        examples = [_Example(index=i, row=r) for i, r in enumerate(batch.active_rows())]
        assert len(examples) == len(prompts), "engine.start must create one row per prompt, in order"

        if self.first_m == 0:
            self._open_control_points(batch, examples, T)  # m = 0: the end of the prompt
        for ex in examples:
            ex.due = False
        while True:
            live = [ex for ex in examples if ex.result is None]
            if not live:
                break
            if not batch.active_rows():  # cannot happen if the bookkeeping is right; never spin
                raise RuntimeError("online policy: examples left but no active rows")
            # probe rows that already stopped sit this step out (their siblings go on)
            paused = {r for ex in live if ex.probe is not None for r in ex.probe.stopped}
            paused |= {ex.probe.base for ex in live if ex.probe is not None and ex.probe.base is not None}
            # a probe row decodes at most its probe length (one token per step on HF anyway)
            limits = {
                r: ex.probe.start + ex.probe.length - len(batch.tokens(r))
                for ex in live
                if ex.probe is not None
                for r in ex.probe.rows
                if r not in paused and batch.finish_reason(r) is None
            }
            batch.step(rows=sorted(set(batch.active_rows()) - paused), max_tokens=limits)
            drop: list[int] = []  # losing probe rows of this step, dropped together
            for ex in live:
                if ex.probe is None:
                    self._after_decode_step(batch, ex, T)
                else:
                    self._after_probe_step(batch, ex, T, drop)
            if drop:
                # one drop for all examples: each drop (and fork) re-selects the whole KV cache,
                # which on CPU costs as much as several decode steps
                batch.drop(drop)
            due = [ex for ex in live if ex.result is None and ex.due]
            if due:
                self._open_control_points(batch, due, T)
        return [ex.result for ex in examples]  # type: ignore[misc]

    def _after_decode_step(self, batch, ex: _Example, T: int) -> None:
        row = ex.row
        if batch.finish_reason(row) is None and len(batch.tokens(row)) >= T:
            batch.finish(row, FINISH_LENGTH)  # engines that ignore start(max_new_tokens=)
        if batch.finish_reason(row) is not None:  # EOS or T_max
            self._finalize(batch, ex)
            return
        if batch.at_control_point(row):
            ex.m += 1
            ex.due = self.first_m <= ex.m < self.cp.M

    def _after_probe_step(self, batch, ex: _Example, T: int, drop: list[int]) -> None:
        p = ex.probe
        assert p is not None
        running = False
        for row in p.rows:
            if row in p.stopped or batch.finish_reason(row) is not None:
                continue
            # a delimiter ends the segment, hence the probe: the next control point sits there
            if batch.at_control_point(row) or len(batch.tokens(row)) - p.start >= p.length:
                p.stopped.add(row)
            else:
                running = True
        if not running:  # every probe stopped or finished (EOS / T_max)
            self._resolve_probe(batch, ex, T, drop)

    # ------------------------------------------------------------------ control points

    def _open_control_points(self, batch, examples: list[_Example], T: int) -> None:
        """Retrieve for every example at a control point (one search), then gate, score or fork."""
        for ex in examples:
            ex.due = False
        retrievals = self.strategy.retrieve(batch, examples)
        probing: list[tuple[_Example, dict, list[dict], int]] = []
        for ex, ret in zip(examples, retrievals):
            start = len(batch.tokens(ex.row))
            step = {
                "m": ex.m,
                "offset": start,
                "retrieved": [[t, s] for t, s in ret.retrieved],
                "num_kept": ret.num_kept,
                "gate": ret.gate,
                "candidates": [],
                "chosen": None,
                "scale": 0.0,
                "h_norm": float(batch.last_hidden(ex.row).float().norm()),  # ‖h_ℓ‖ before this row's steering
                "inject_norm": 0.0,
            }
            ex.steps.append(step)
            candidates = self.strategy.act(batch, ex, step, ret)
            if candidates is not None:
                probing.append((ex, step, candidates, start))

        # probe: the original row is null, L forks (same KV cache, no re-encoding) carry k_scale·v_i
        # (online.probe_scale); impulse: every probe is a fork, the original row waits at the
        # control point. One fork_many for all examples: on HF each fork re-selects the KV cache
        extra = 1 if self.impulse else 0
        forks = batch.fork_many({ex.row: len(c) - 1 + extra for ex, _, c, _ in probing}) if probing else {}
        scale = self.cfg.k_scale if self.cfg.probe_scale is None else self.cfg.probe_scale
        for ex, step, candidates, start in probing:
            base = ex.row if self.impulse else None
            rows = list(forks[ex.row]) if self.impulse else [ex.row] + list(forks[ex.row])
            batch.set_steer(rows[0], None)
            for row, c in zip(rows[1:], candidates[1:]):
                self.inject(batch, row, self.vector(c["tool"]), scale)
            ex.probe = _Probe(step, candidates, rows, start, min(self.cfg.probe_tokens, T - start), base=base)

    def inject(self, batch, row: int, vector: torch.Tensor | None, scale: float) -> None:
        """online.inject: segment steers every position the row decodes from now on; impulse
        only the control point's position (its forward redone), nothing after it."""
        if self.impulse:
            batch.set_steer(row, None)
            batch.set_impulse(row, vector, scale)
        else:
            batch.set_steer(row, vector, scale)

    def top_by_q(self, examples: list[_Example]) -> list[Retrieval]:
        """No retrieval: every example's candidates are the library's L highest-Q tools (Â = Q)."""
        gate = GATE_OK if self._top_by_q else GATE_NO_TOOLS
        return [Retrieval([], 0, gate, list(self._top_by_q)) for _ in examples]

    def search_memory(self, batch, examples: list[_Example]) -> list[Retrieval]:
        """One memory search for every example's control-point state, then the gates."""
        keys = torch.stack([batch.last_hidden(ex.row).float() for ex in examples]).numpy()
        # one search for every row at a control point; the memory normalises the queries when
        # its keys are normalised (then sims are cosines); retrieve_same_m: entries of the row's m
        k = int(self.cfg.k_retrieve)
        if self.cfg.retrieve_same_m:
            sims, idx = self.memory.search(keys, k, [ex.m for ex in examples])
        else:
            sims, idx = self.memory.search(keys, k)
        sims, idx = np.asarray(sims), np.asarray(idx)
        return [
            aggregate(sims[b], idx[b], self.memory.entries, self.cfg.min_sim, self.cfg.min_entries)
            for b in range(len(examples))
        ]

    def _resolve_probe(self, batch, ex: _Example, T: int, drop: list[int]) -> None:
        p = ex.probe
        assert p is not None
        ex.probe = None
        score(p.candidates, self.cfg.beta, self.cfg.rho, [self._probe_logprob(batch, r, p.start) for r in p.rows])
        for c, row in zip(p.candidates, p.rows):
            c["probe_token_ids"] = list(batch.tokens(row)[p.start :])
            c["eos"] = batch.finish_reason(row) == FINISH_STOP  # the probe ended the response
        winner = self.choose(batch, ex, p.step, p.candidates, None, rows=p.rows, base=p.base)

        # keep the winner's row (its probe tokens start the segment); the others are probe cost
        losers = [r for r in p.rows + ([p.base] if p.base is not None else []) if r != winner]
        for r in losers:
            ex.probe_tokens_used += len(batch.tokens(r)) - p.start
            ex.probe_tokens_used += batch.finish_reason(r) == FINISH_STOP  # the EOS step was decoded too
        drop.extend(losers)  # before the next step
        ex.row = winner
        if winner == p.base:  # the segment is generated again from the control point, with the impulse
            return
        # the winner continues as an ordinary decoding row
        self._after_decode_step(batch, ex, T)

    def choose(self, batch, ex: _Example, step: dict, candidates: list[dict], row, rows=None, base=None) -> int:
        """Pick the candidate (:func:`.policy.choose`), record it, and set the winning row's
        steering k_scale·Score·v for the segment (impulse: at the control point). Returns the
        row; with ``base`` (impulse probes) a winning tool's segment restarts from ``base``."""
        best, gate = choose(candidates, self.cfg.tau_null)
        if gate is not None:
            step["gate"] = gate
        chosen = candidates[best]
        winner_row = rows[best] if rows is not None else row
        scale = 0.0 if chosen["tool"] is None else self.cfg.k_scale * chosen["score"]
        vec = self.vector(chosen["tool"]) if scale != 0.0 else None
        record_choice(step, candidates, chosen, scale, float((vec * scale).norm()) if vec is not None else 0.0)
        if base is not None and chosen["tool"] is not None:
            # the probes are thrown away (STIR): the segment is generated again from the control point
            winner_row = base
        if batch.finish_reason(winner_row) is None:  # a probe may have ended the row (EOS / T_max)
            # scale 0 (null, or k_scale = 0): no vector at all, bit-identical to the unsteered model
            if winner_row == base or rows is None or not self.impulse:
                self.inject(batch, winner_row, vec, scale)
        return winner_row

    # ------------------------------------------------------------------ helpers

    def _probe_logprob(self, batch, row: int, start: int) -> float:
        """Mean log p of the probe's tokens. A probe that ended on EOS at once has no token:
        its logprob is 0.0 (an EOS the model chose greedily; the engine does not record it)."""
        lps = batch.logprobs(row)[start:]
        return float(sum(lps) / len(lps)) if lps else 0.0

    def add_vector(self, tool_id: str, vector: torch.Tensor) -> None:
        """A vector that is no library tool's (static's Q-weighted mean), under its own id."""
        self._vectors[tool_id] = vector.detach().float().cpu().reshape(-1)

    def vector(self, tool_id: str) -> torch.Tensor:
        """The tool's vector, float32 CPU, one tensor per tool (scaled by the batch)."""
        v = self._vectors.get(tool_id)
        if v is None:
            v = torch.as_tensor(self.tools[tool_id].vector).detach().float().cpu().reshape(-1)
            self._vectors[tool_id] = v
        return v

    def _finalize(self, batch, ex: _Example) -> None:
        row = ex.row
        ids = [int(t) for t in batch.tokens(row)]
        reason = batch.finish_reason(row) or FINISH_LENGTH
        ex.result = OnlineResult(
            token_ids=ids,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            finish_reason=reason,
            tokens_used=len(ids),
            probe_tokens_used=ex.probe_tokens_used,
            budget_used=len(ids) + ex.probe_tokens_used,
            steps=ex.steps,
        )
        ex.due = False
        batch.drop([row])
