"""Diagnostics on hand-made records, and whether steering acts against greedy."""

from __future__ import annotations

import numpy as np
import pytest

from esm_steer.evaluate import diagnostics
from test_stats import rec


def test_diagnostics_on_hand_made_records():
    s = lambda m, chosen, gate, sims: {
        "m": m,
        "offset": m,
        "retrieved": [[t, x] for t, x in sims],
        "gate": gate,  # noqa: E731
        "candidates": [],
        "chosen": chosen,
        "scale": 0.3 if chosen is not None else None,
    }
    records = [
        rec(
            0, True, tokens=10, probe=4, steps=[s(0, 3, "ok", [(3, 0.9), (4, 0.5)]), s(1, None, "tau_null", [(4, 0.7)])]
        ),
        rec(1, False, tokens=20, probe=4, finish="length", steps=[s(0, None, "min_sim", [])]),
        rec(2, True, tokens=30, probe=0, steps=[s(0, 3, "ok", [(3, 0.8)]), s(1, 5, "ok", [(5, 0.6)])]),
        rec(3, False, tokens=40, probe=0, finish="length", response=""),
    ]
    d = diagnostics.diagnose(records)
    assert d["n"] == 4 and d["accuracy"] == 0.5
    assert d["truncation_rate"] == 0.5
    assert d["steps_total"] == 5 and d["null_steps"] == 2 and d["null_rate"] == pytest.approx(0.4)
    assert d["gate_hits"] == {"min_sim": 1, "ok": 3, "tau_null": 1}
    assert d["tokens"] == {"mean": 25.0, "median": 25.0, "p90": pytest.approx(37.0), "max": 40.0}
    assert d["probe_tokens"]["mean"] == 2.0 and d["probe_overhead"] == pytest.approx(8 / 100)
    assert d["retrieval_sim"]["max"] == 0.9 and d["retrieval_sim"]["mean"] == pytest.approx(
        (0.9 + 0.5 + 0.7 + 0.8 + 0.6) / 5
    )
    assert d["retrieval_top1_sim"]["mean"] == pytest.approx((0.9 + 0.7 + 0.8 + 0.6) / 4)
    assert d["chosen_tools"] == {"3": 2, "5": 1}
    assert d["empty_responses"] == 1

    greedy = diagnostics.diagnose([rec(0, True), rec(1, False, finish="length")])
    assert greedy["null_rate"] is None and greedy["gate_hits"] == {} and greedy["truncation_rate"] == 0.5

    df = diagnostics.diagnostics_frame({"greedy": greedy, "esm": d})
    assert list(df["method"]) == ["greedy", "esm"]
    assert df.loc[1, "gate_ok"] == 3 and df.loc[0, "gate_ok"] == 0 and df.loc[1, "tokens_p90"] == pytest.approx(37.0)


def test_steering_diagnostics_against_greedy():
    def step(chosen, h=2.0, inj=1.0, lps=(-1.0, -1.5, -0.2)):
        cands = [{"tool": None, "logprob": lps[0]}] + [{"tool": f"t{j}", "logprob": lp} for j, lp in enumerate(lps[1:])]
        return {"chosen": chosen, "h_norm": h, "inject_norm": inj if chosen else 0.0, "candidates": cands, "gate": "ok"}

    greedy = [dict(rec(i, i < 5), token_ids=[1, 2, i]) for i in range(10)]
    meth = [
        dict(rec(i, i in (0, 7, 8), steps=[step("t0", inj=i + 1.0), step(None)]), token_ids=[1, 2, i if i < 6 else 0])
        for i in range(10)
    ]
    d = diagnostics.diagnose(meth, greedy)
    assert d["differ_from_greedy"] == pytest.approx(4 / 10)  # ids 6..9 (id 0 keeps token 0)
    assert d["flips_greedy_right_to_wrong"] == 4 and d["flips_greedy_wrong_to_right"] == 2  # 1-4 lost; 7, 8 won
    assert d["null_rate"] == pytest.approx(0.5)
    assert d["probe_logprob_gap"]["median"] == pytest.approx(0.65)  # |−1.5+1| = 0.5, |−0.2+1| = 0.8
    assert d["inject_ratio"]["median"] == pytest.approx(np.median([(i + 1.0) / 2.0 for i in range(10)]))
    assert diagnostics.diagnose(meth)["differ_from_greedy"] is None  # no greedy: unknown, not 0
