"""The online ESM policy: at each control point retrieve, probe, and steer the next segment.

DESIGN §2 "Online, at each control point", for one row (= one example):

1. key = the layer-ℓ state at the row's last token (``batch.last_hidden``, free from the step).
2. Retrieve the top ``k_retrieve`` memory entries; drop those with sim < ``min_sim``; fewer
   than ``min_entries`` left -> null for this segment. Group by tool:
   Â_i = sim-weighted mean Q of tool i's entries · its best sim (:mod:`.retrieve`).
3. Probe the top ``L`` tools and null: fork the row's KV cache (``batch.fork``, no
   re-encoding; the original row is the null probe), decode ``probe_tokens`` greedy tokens on
   each with k_scale·v_i injected; logprob_i = mean token logprob of the probe.
4. Score_i = beta·Â_i + rho·(logprob_i − logprob_null), null scores 0; a tool must beat null
   (ties go to null) and reach ``tau_null``.
5. Keep the winner's row — its probe tokens start the segment — drop the others, and inject
   k_scale·Score·v at layer ℓ for the rest of the segment (null: no steering).

Ablations: ``no_memory`` takes the L library tools with the highest Q (Â_i = Q_i, no
retrieval); ``no_probing`` scores Score_i = beta·Â_i without any probe decoding.
Baseline ``static`` (SEAL-style): one fixed vector at every control point, k_scale·v with v the
top-Q tool's vector (``online.static_vector: top``) or the Q-weighted mean of the library's
vectors (``mean``); no retrieval, no probe. Each step records the fixed tool (or ``"mean"``) as
chosen and k_scale as its scale.

Every step also records ``h_norm`` = ‖h_ℓ‖ at the row's last token (the key, before the row's
own steering) and ``inject_norm`` = the norm of the vector injected for the next segment (0 for
null), so that the steering strength ‖k_scale·Score·v‖ / ‖h_ℓ‖ is read from the records.

Control points: m = 0 at the end of the prompt, then one each time a kept token completes
``control_points.segment_delimiter`` (the :class:`SegmentTracker` rule mining uses), while
m < M. The engine decodes eagerly (a step samples a token from logits computed earlier, then
forwards it), so a vector set at a control point steers every position of the next segment,
from its first token on; the first token itself is predicted at the delimiter (segment m−1),
hence all probes of a control point share their first token. A probe whose token completes a
delimiter stops there (its segment has ended; the row sits out the other probes' steps), so
control points always sit exactly at delimiters, as in mining.

Budget: T_max = ``max_new_tokens`` counts KEPT tokens (the winner's probe tokens included);
a probe decodes at most T_max − kept tokens, so kept tokens never exceed T_max. The losing
probes' tokens are counted separately in ``probe_tokens_used``.

Batched: all examples of a chunk share one :class:`DecodeBatch`; each row has its own control
points, probes and steering vector, and probe rows of different examples decode in the same
``step()`` calls. An example's result does not depend on its batch (greedy, up to float noise
of batched matmuls).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from esm_steer.engine.base import FINISH_LENGTH, FINISH_STOP
from esm_steer.esm.retrieve import (
    GATE_NO_TOOLS,
    GATE_OK,
    GATE_TAU_NULL,
    Retrieval,
    aggregate,
)

log = logging.getLogger(__name__)

VARIANTS = ("esm", "no_memory", "no_probing", "static")
STATIC_VECTORS = ("top", "mean")
STATIC_MEAN = "mean"  # the chosen "tool" of static with online.static_vector=mean


@dataclass
class OnlineResult:
    """One example's steered response and what the policy did at each control point."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    tokens_used: int  # kept response tokens (<= T_max)
    probe_tokens_used: int  # tokens decoded by losing probes (thrown away)
    budget_used: int  # tokens_used + probe_tokens_used
    # one per control point: {"m", "offset", "retrieved": [[tool_id, sim]], "num_kept",
    # "gate", "candidates": [{"tool", "A_hat", "logprob", "score", "probe_token_ids", "eos"}],
    # "chosen", "scale", "h_norm", "inject_norm"}
    steps: list[dict] = field(default_factory=list)


@dataclass
class _Probe:
    """The probes of one control point, decoding."""

    step: dict  # the step record, completed on resolution
    candidates: list[dict]  # [null, tool_1, ..., tool_L]: {"tool", "A_hat", "vector"}
    rows: list[int]  # rows[j] decodes candidates[j]; rows[0] is the example's original row
    start: int  # response tokens before the probe (same for every row)
    length: int  # tokens each probe decodes at most (<= probe_tokens, <= T_max - start)
    stopped: set[int] = field(default_factory=set)  # rows done probing (length or delimiter), not finished


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
    """Runs the online ESM policy (or an ablation) on a :class:`DecodeBatch`-capable engine.

    Args:
        engine: an engine with ``start(prompts, segment_delimiter=...) -> DecodeBatch`` (HF
            backend) and a ``tokenizer``.
        library: the selected tools (``library.tools``: ``tool_id``, ``Q``, ``vector [d]``).
        memory: the retrieval index (``search(queries [B, d], k) -> (sims, idx)``,
            ``entries[i]["tool_id"|"Q"]``); unused by ``no_memory``.
        online_cfg: :class:`esm_steer.config.OnlineConfig`.
        control_points_cfg: :class:`esm_steer.config.ControlPointsConfig`.
    """

    def __init__(self, engine, library, memory, online_cfg, control_points_cfg):
        if online_cfg.variant not in VARIANTS:
            raise ValueError(f"online.variant={online_cfg.variant!r}: one of {', '.join(VARIANTS)}")
        if not hasattr(engine, "start"):
            raise TypeError(
                f"the online policy needs step-level decoding (HF backend); {type(engine).__name__} has no start()"
            )
        self.engine = engine
        self.library = library
        self.memory = memory
        self.cfg = online_cfg
        self.cp = control_points_cfg
        self.tokenizer = engine.tokenizer
        self.tools = {t.tool_id: t for t in library.tools}
        self._vectors: dict[str, torch.Tensor] = {}
        # no_memory: the candidates never change (the L highest-Q tools, Â = Q)
        top = (
            library.top_by_q(online_cfg.L)
            if hasattr(library, "top_by_q")
            else sorted(library.tools, key=lambda t: -t.Q)
        )
        self._top_by_q = [(t.tool_id, float(t.Q)) for t in top][: online_cfg.L]
        self._static = self._static_tool() if online_cfg.variant == "static" else None

    def _static_tool(self) -> str | None:
        """static: the id of the fixed vector (the top-Q tool, or STATIC_MEAN); None: empty library."""
        how = getattr(self.cfg, "static_vector", "top")
        if how not in STATIC_VECTORS:
            raise ValueError(f"online.static_vector={how!r}: one of {', '.join(STATIC_VECTORS)}")
        tools = list(self.library.tools)
        if not tools:
            return None
        if how == "top":
            return max(tools, key=lambda t: float(t.Q)).tool_id
        # Q-weighted mean; Q clipped at 0 (a tool that hurts is no weight), plain mean if all are <= 0
        vs = torch.stack([torch.as_tensor(t.vector).detach().float().cpu().reshape(-1) for t in tools])
        w = torch.tensor([max(float(t.Q), 0.0) for t in tools])
        w = w / w.sum() if float(w.sum()) > 0 else torch.full((len(tools),), 1.0 / len(tools))
        self._vectors[STATIC_MEAN] = (w[:, None] * vs).sum(0)
        return STATIC_MEAN

    # ------------------------------------------------------------------ public

    def run(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[OnlineResult]:
        """Steered greedy responses to ``prompts`` (token ids), T_max = ``max_new_tokens`` kept tokens."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        bs = int(getattr(self.engine, "batch_size", 16) or 16)
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

        self._open_control_points(batch, examples, T)  # m = 0: the end of the prompt
        while True:
            live = [ex for ex in examples if ex.result is None]
            if not live:
                break
            if not batch.active_rows():  # cannot happen if the bookkeeping is right; never spin
                raise RuntimeError("online policy: examples left but no active rows")
            # probe rows that already stopped sit this step out (their siblings go on)
            paused = [r for ex in live if ex.probe is not None for r in ex.probe.stopped]
            if paused:
                batch.step(rows=sorted(set(batch.active_rows()) - set(paused)))
            else:
                batch.step()
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
            ex.due = ex.m < self.cp.M

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
        retrievals = self._retrieve(batch, examples)
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
            if self.cfg.variant == "static":
                self._steer_static(batch, ex, step)
                continue
            tools = ret.tools[: self.cfg.L]
            if ret.gate != GATE_OK or not tools:
                step["gate"] = ret.gate if ret.gate != GATE_OK else GATE_NO_TOOLS
                batch.set_steer(ex.row, None)  # null for this segment
                continue
            candidates = [{"tool": None, "A_hat": 0.0}] + [{"tool": t, "A_hat": a} for t, a in tools]
            if self.cfg.variant == "no_probing":
                for c in candidates:
                    c["logprob"] = None
                    c["score"] = 0.0 if c["tool"] is None else self.cfg.beta * c["A_hat"]
                self._choose(batch, ex, step, candidates, ex.row)
                continue
            probing.append((ex, step, candidates, start))

        # probe: the original row is null, L forks (same KV cache, no re-encoding) carry k_scale·v_i
        forks = self._fork(batch, {ex.row: len(c) - 1 for ex, _, c, _ in probing})
        for ex, step, candidates, start in probing:
            rows = [ex.row] + forks[ex.row]
            batch.set_steer(ex.row, None)
            for row, c in zip(rows[1:], candidates[1:]):
                batch.set_steer(row, self._vector(c["tool"], self.cfg.k_scale))
            ex.probe = _Probe(step, candidates, rows, start, min(self.cfg.probe_tokens, T - start))

    @staticmethod
    def _fork(batch, requests: dict[int, int]) -> dict[int, list[int]]:
        """Fork several rows. Each ``fork`` call re-selects the whole KV cache, so a batch that
        offers ``fork_many({row: n}) -> {row: [new rows]}`` (one select) is used when present."""
        if not requests:
            return {}
        if hasattr(batch, "fork_many"):
            return {r: list(v) for r, v in batch.fork_many(dict(requests)).items()}
        return {row: list(batch.fork(row, n)) for row, n in requests.items()}

    def _steer_static(self, batch, ex: _Example, step: dict) -> None:
        """static: the same k_scale·v at every control point (no retrieval, no probe)."""
        if self._static is None:
            step["gate"] = GATE_NO_TOOLS
            batch.set_steer(ex.row, None)
            return
        scale = float(self.cfg.k_scale)
        vec = self._vector(self._static, scale) if scale != 0.0 else None
        step["chosen"] = self._static
        step["scale"] = scale
        step["inject_norm"] = float(vec.norm()) if vec is not None else 0.0
        batch.set_steer(ex.row, vec)

    def _retrieve(self, batch, examples: list[_Example]) -> list[Retrieval]:
        if self.cfg.variant in ("no_memory", "static"):
            gate = GATE_OK if self._top_by_q else GATE_NO_TOOLS
            return [Retrieval([], 0, gate, list(self._top_by_q)) for _ in examples]
        keys = torch.stack([batch.last_hidden(ex.row).float() for ex in examples]).numpy()
        # one search for every row at a control point; the memory normalises the queries when
        # its keys are normalised (then sims are cosines)
        sims, idx = self.memory.search(keys, int(self.cfg.k_retrieve))
        sims, idx = np.asarray(sims), np.asarray(idx)
        return [
            aggregate(sims[b], idx[b], self.memory.entries, self.cfg.min_sim, self.cfg.min_entries)
            for b in range(len(examples))
        ]

    def _resolve_probe(self, batch, ex: _Example, T: int, drop: list[int]) -> None:
        p = ex.probe
        assert p is not None
        ex.probe = None
        lps = [self._probe_logprob(batch, row, p.start) for row in p.rows]
        lp_null = lps[0]
        for c, row, lp in zip(p.candidates, p.rows, lps):
            c["logprob"] = lp
            c["score"] = 0.0 if c["tool"] is None else self.cfg.beta * c["A_hat"] + self.cfg.rho * (lp - lp_null)
            c["probe_token_ids"] = list(batch.tokens(row)[p.start :])
            c["eos"] = batch.finish_reason(row) == FINISH_STOP  # the probe ended the response
        winner = self._choose(batch, ex, p.step, p.candidates, None, rows=p.rows)

        # keep the winner's row (its probe tokens start the segment); the others are probe cost
        losers = [r for r in p.rows if r != winner]
        for r in losers:
            ex.probe_tokens_used += len(batch.tokens(r)) - p.start
            ex.probe_tokens_used += batch.finish_reason(r) == FINISH_STOP  # the EOS step was decoded too
        drop.extend(losers)  # before the next step
        ex.row = winner
        # the winner continues as an ordinary decoding row
        self._after_decode_step(batch, ex, T)

    def _choose(self, batch, ex: _Example, step: dict, candidates: list[dict], row, rows=None) -> int:
        """Pick the best-scoring candidate (null wins ties; a tool below tau_null -> null),
        record it, and set the row's steering k_scale·Score·v for the segment. Returns the row."""
        best = 0  # candidates[0] is null, score 0
        for j in range(1, len(candidates)):
            if candidates[j]["score"] > candidates[best]["score"]:
                best = j
        if best != 0 and candidates[best]["score"] < self.cfg.tau_null:
            step["gate"] = GATE_TAU_NULL
            best = 0
        chosen = candidates[best]
        winner_row = rows[best] if rows is not None else row
        scale = 0.0 if chosen["tool"] is None else self.cfg.k_scale * chosen["score"]
        step["candidates"] = [
            {k: c.get(k) for k in ("tool", "A_hat", "logprob", "score", "probe_token_ids", "eos") if k in c}
            for c in candidates
        ]
        step["chosen"] = chosen["tool"]
        step["scale"] = float(scale)
        vec = self._vector(chosen["tool"], scale) if scale != 0.0 else None
        step["inject_norm"] = float(vec.norm()) if vec is not None else 0.0
        if batch.finish_reason(winner_row) is None:  # a probe may have ended the row (EOS / T_max)
            # scale 0 (null, or k_scale = 0): no vector at all, bit-identical to the unsteered model
            batch.set_steer(winner_row, vec)
        return winner_row

    # ------------------------------------------------------------------ helpers

    def _probe_logprob(self, batch, row: int, start: int) -> float:
        """Mean log p of the probe's tokens. A probe that ended on EOS at once has no token:
        its logprob is 0.0 (an EOS the model chose greedily; the engine does not record it)."""
        lps = batch.logprobs(row)[start:]
        return float(sum(lps) / len(lps)) if lps else 0.0

    def _vector(self, tool_id: str, scale: float) -> torch.Tensor:
        v = self._vectors.get(tool_id)
        if v is None:
            v = torch.as_tensor(self.tools[tool_id].vector).detach().float().cpu().reshape(-1)
            self._vectors[tool_id] = v
        return v * scale

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


def summarize(results: Sequence[OnlineResult]) -> dict[str, Any]:
    """Aggregate counters of a run (logged by the benchmark; handy for diagnostics)."""
    steps = [s for r in results for s in r.steps]
    used = sum(r.tokens_used for r in results)
    probe = sum(r.probe_tokens_used for r in results)
    gates: dict[str, int] = {}
    for s in steps:
        gates[s["gate"]] = gates.get(s["gate"], 0) + 1
    return {
        "examples": len(results),
        "control_points": len(steps),
        "null_rate": (sum(s["chosen"] is None for s in steps) / len(steps)) if steps else math.nan,
        "gates": gates,
        "tokens_used": used,
        "probe_tokens_used": probe,
        "probe_overhead": probe / used if used else math.nan,
    }
