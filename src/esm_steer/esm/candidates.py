"""Stage I's math (docs/method.md, Stage I): reward, the P/N choice and the candidates.

Reward R(r) = 1[correct] − length_penalty · tokens(r) / max_new_tokens. Positive set P (correct,
at most K_pos, highest R first) and negative set N (incorrect, at most K_neg, lowest R first);
``pos_source: gold`` makes the teacher-forced reference solution the only positive,
``rollout_or_gold`` uses it only when no rollout is correct. For each control point m that
rollouts of both sets reach with a non-empty segment m:

- key k  = mean over P∪N of h at the last token before control point m (m = 0: last prompt token)
- v      = mean_{r∈P} s(r, m) − mean_{r∈N} s(r, m),  s(r, m) = mean of h over segment m of r
           (``vector: segment_mean``), or with ``vector: control_point`` (STIR) s(r, m) = h at
           the control point itself: v = μ⁺ − μ⁻ of the states the key averages
- Q      = R̄_P − R̄_N over the rollouts that reach m

Control points m = first_m..M−1 are mined (STIR: first_m = 1, never the end of the prompt).

v is not normalised and Q is not scaled by ‖v‖. The top ``keep_top_C`` by Q (ties: question
id, m) are kept.

With ``require_correct_and_incorrect: false`` a question whose rollouts are all correct (or
all incorrect) is not dropped: its rollouts are ranked by R and split into a top half (P)
and a bottom half (N), a contrast of concision rather than of correctness.

Nothing here samples or touches the disk: :mod:`esm_steer.esm.mine` drives the stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from esm_steer.engine.segments import segment_spans

GOLD_SAMPLE_ID = -1  # the teacher-forced reference solution (never written to rollouts.jsonl)


def reward(correct: bool, tokens: int, max_new_tokens: int, length_penalty: float) -> float:
    """R(r) = 1[correct] − length_penalty · tokens / max_new_tokens."""
    return float(bool(correct)) - float(length_penalty) * tokens / float(max_new_tokens)


# ---------------------------------------------------------------- candidates from traces


@dataclass
class Trace:
    """One response teacher-forced after its prompt, as a candidate needs it."""

    reward: float
    h: torch.Tensor  # [prompt_len + length, d] layer-ℓ states of prompt + response
    prompt_len: int
    offsets: list[int]  # control-point offsets b_0 = 0 < b_1 < ... (response tokens)
    length: int  # response tokens

    def span(self, m: int) -> tuple[int, int]:
        return segment_spans(self.offsets, self.length)[m]

    def reaches(self, m: int) -> bool:
        """Control point m exists in this response and opens a non-empty segment."""
        if m >= len(self.offsets):
            return False
        s, e = self.span(m)
        return e > s

    def state(self, m: int) -> torch.Tensor:
        """h at the last token before control point m (m = 0: the last prompt token)."""
        return self.h[self.prompt_len + self.offsets[m] - 1]

    def segment_mean(self, m: int) -> torch.Tensor:
        """s(r, m): mean of h over segment m's tokens."""
        s, e = self.span(m)
        return self.h[self.prompt_len + s : self.prompt_len + e].mean(0)


@dataclass
class Candidate:
    question_id: str
    m: int
    Q: float
    vector: torch.Tensor  # [d]
    key: torch.Tensor  # [d]
    states: torch.Tensor  # [n_pos + n_neg, d], P first
    n_pos: int
    n_neg: int
    id: str = ""

    def rank_key(self) -> tuple:
        return (-self.Q, self.question_id, self.m)

    def record(self) -> dict:
        return {
            "id": self.id,
            "question_id": self.question_id,
            "m": self.m,
            "Q": self.Q,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "v_norm": float(self.vector.norm()),
            "n_states": int(self.states.shape[0]),
        }


VECTORS = ("segment_mean", "control_point")  # offline_mine.vector


def question_candidates(
    question_id: str,
    pos: Sequence[Trace],
    neg: Sequence[Trace],
    M: int,
    vector: str = "segment_mean",
    first_m: int = 0,
) -> list[Candidate]:
    """The candidates (q, m), m = first_m..M−1, that P and N both reach."""
    if vector not in VECTORS:
        raise ValueError(f"offline_mine.vector={vector!r}: one of {', '.join(VECTORS)}")
    out = []
    for m in range(first_m, M):
        P = [t for t in pos if t.reaches(m)]
        N = [t for t in neg if t.reaches(m)]
        if not P or not N:
            continue
        states = torch.stack([t.state(m) for t in P + N]).float()
        if vector == "control_point":
            v = states[: len(P)].mean(0) - states[len(P) :].mean(0)
        else:
            v = torch.stack([t.segment_mean(m) for t in P]).float().mean(0) - torch.stack(
                [t.segment_mean(m) for t in N]
            ).float().mean(0)
        Q = sum(t.reward for t in P) / len(P) - sum(t.reward for t in N) / len(N)
        out.append(Candidate(question_id, m, float(Q), v, states.mean(0), states, len(P), len(N)))
    return out


def keep_top(cands: list[Candidate], C: int) -> list[Candidate]:
    return sorted(cands, key=Candidate.rank_key)[:C]


# ---------------------------------------------------------------- P and N


def choose_sets(
    rollouts: Sequence[dict],
    K_pos: int,
    K_neg: int,
    pos_source: str = "rollout",
    gold: dict | None = None,
    require_both: bool = True,
) -> tuple[list[dict], list[dict], str | None]:
    """(P, N, reason): records of the positive and negative sets, or a skip reason.

    rollouts: one question's records (correct, reward, sample_id); gold: a record of the
    reference solution (None when the dataset has none).
    """
    correct = sorted((r for r in rollouts if r["correct"]), key=lambda r: (-r["reward"], r["sample_id"]))
    incorrect = sorted((r for r in rollouts if not r["correct"]), key=lambda r: (r["reward"], r["sample_id"]))
    neg = incorrect[:K_neg]
    if pos_source == "rollout":
        pos, why_no_pos = correct[:K_pos], "no correct rollout"
    elif pos_source == "gold":
        pos, why_no_pos = ([gold] if gold else []), "no gold solution"
    elif pos_source == "rollout_or_gold":
        pos = correct[:K_pos] or ([gold] if gold else [])
        why_no_pos = "no correct rollout and no gold solution"
    else:
        raise ValueError(f"offline_mine.pos_source={pos_source!r}: one of rollout, gold, rollout_or_gold")
    if pos and neg:
        return pos, neg, None
    if require_both:
        return [], [], (why_no_pos if not pos else "no incorrect rollout")
    # not required: rank by R and contrast the better half with the worse half
    ranked = sorted(rollouts, key=lambda r: (-r["reward"], r["sample_id"]))
    n = len(ranked)
    half = n // 2
    if not pos:
        if half < 1:
            return [], [], "fewer than 2 rollouts"
        return ranked[: min(K_pos, half)], ranked[n - min(K_neg, n - half) :], None
    if pos[0]["sample_id"] == GOLD_SAMPLE_ID:  # gold vs the worst rollouts
        return pos, ranked[-K_neg:] if n else [], (None if n else "no rollout")
    if half < 1:
        return [], [], "fewer than 2 rollouts"
    return ranked[: min(K_pos, half)], ranked[n - min(K_neg, n - half) :], None
