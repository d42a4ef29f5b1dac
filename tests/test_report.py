"""Report: Wilson and paired bootstrap CIs, diagnostics on hand-made records, case lists."""

from __future__ import annotations

import math

import numpy as np
import pytest

from esm_steer.evaluate import report


def rec(i, correct, tokens=10, probe=0, finish="stop", steps=None, response="r"):
    return {
        "id": f"e{i}",
        "question": f"q{i}",
        "gold": "1",
        "response": response,
        "pred": "1" if correct else "0",
        "correct": correct,
        "finish_reason": finish,
        "tokens_used": tokens,
        "probe_tokens_used": probe,
        "budget_used": tokens + probe,
        "steps": steps or [],
        "wall_s": 0.5,
    }


def test_wilson_interval_known_values():
    lo, hi = report.wilson_ci(0, 10)
    assert lo == 0 and hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    lo, hi = report.wilson_ci(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert all(math.isnan(x) for x in report.wilson_ci(0, 0))
    assert report.wilson_ci(0, 6)[0] == 0.0 and report.wilson_ci(6, 6)[1] == 1.0  # no 1e-17 residue


def test_paired_bootstrap_contains_the_true_difference_and_is_centred():
    rng = np.random.default_rng(1)
    n = 400
    esm = np.zeros(n)
    esm[rng.permutation(n)[:240]] = 1  # accuracy 0.6 exactly
    greedy = np.zeros(n)
    greedy[rng.permutation(n)[:160]] = 1  # 0.4
    d, lo, hi = report.paired_bootstrap_delta(esm, greedy, samples=2000, seed=0)
    assert d == pytest.approx(0.2)
    assert lo < 0.2 < hi
    assert (lo + hi) / 2 == pytest.approx(d, abs=0.01)
    assert 0.05 < hi - lo < 0.3
    assert report.paired_bootstrap_delta(esm, greedy, 2000, seed=0) == (d, lo, hi)  # seeded


def test_paired_bootstrap_is_narrow_when_the_methods_agree_mostly():
    # esm = greedy plus 20 extra right answers: the paired CI is tight around 0.05
    greedy = np.array([1] * 160 + [0] * 240, dtype=float)
    esm = greedy.copy()
    esm[160:180] = 1
    d, lo, hi = report.paired_bootstrap_delta(esm, greedy, 2000, seed=3)
    assert d == pytest.approx(0.05) and 0 < lo < 0.05 < hi < 0.1


def test_paired_correct_aligns_by_id():
    a = [rec(1, True), rec(2, False), rec(3, True)]
    b = [rec(3, False), rec(1, True)]
    assert report.paired_correct(a, b) == ([1.0, 1.0], [1.0, 0.0])


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
    d = report.diagnose(records)
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

    greedy = report.diagnose([rec(0, True), rec(1, False, finish="length")])
    assert greedy["null_rate"] is None and greedy["gate_hits"] == {} and greedy["truncation_rate"] == 0.5

    df = report.diagnostics_frame({"greedy": greedy, "esm": d})
    assert list(df["method"]) == ["greedy", "esm"]
    assert df.loc[1, "gate_ok"] == 3 and df.loc[0, "gate_ok"] == 0 and df.loc[1, "tokens_p90"] == pytest.approx(37.0)


def test_results_table_columns_and_rows():
    by = {"greedy": [rec(i, i % 2 == 0) for i in range(10)], "esm": [rec(i, i % 3 != 1, probe=5) for i in range(10)]}
    df = report.results_table(by, ["greedy", "esm"], dataset="arith", model="m", t_max=64, bootstrap_samples=500)
    assert list(df.columns) == report.TABLE_COLUMNS and list(df["method"]) == ["greedy", "esm"]
    assert df.loc[1, "accuracy"] == pytest.approx(0.7) and df.loc[1, "delta_vs_greedy"] == pytest.approx(0.2)
    assert df.loc[1, "probe_overhead"] == pytest.approx(0.5) and df.loc[0, "wall_s"] == pytest.approx(5.0)
    text = report.format_table(df)
    assert "greedy" in text and "esm" in text and "T_max=64" in text


def test_cases_list_the_right_improved_and_regressed_ids():
    greedy = [rec(i, c) for i, c in enumerate([True, False, False, True, True, False])]
    esm = [rec(i, c) for i, c in enumerate([True, True, False, False, True, True])]
    improved, regressed = report.improved_regressed(greedy, esm)
    assert [b["id"] for b, _ in improved] == ["e1", "e5"]
    assert [b["id"] for b, _ in regressed] == ["e3"]
    md = report.cases_markdown(greedy, esm, t_max=32, max_cases=1)
    assert "2 improved" in md and "1 regressed" in md
    assert "### e1" in md and "### e5" not in md and "### e3" in md  # max_cases=1 per kind
    assert md.index("## Improved") < md.index("### e1") < md.index("## Regressed") < md.index("### e3")


def test_mark_response_inserts_markers_in_order():
    steps = [{"m": 0, "chosen": None}, {"m": 1, "chosen": 3, "scale": 0.421}, {"m": 2, "chosen": "t7", "scale": None}]
    out = report.mark_response("abc\n\ndef\n\nghi", steps, [0, 5, 10])
    assert out == "⟦m=0 → null⟧abc\n\n⟦m=1 → t0003 ×0.42⟧def\n\n⟦m=2 → t7⟧ghi"


def test_tokens_histogram_writes_pdf_and_png(tmp_path):
    paths = report.tokens_histogram({"greedy": [rec(i, True, tokens=i) for i in range(5)]}, tmp_path, 8)
    assert sorted(p.name for p in paths) == ["tokens_hist_T8.pdf", "tokens_hist_T8.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_retrieved_summary_groups_entries_by_tool():
    ret = [["t5", 0.99], ["t5", 0.97], ["t1", 0.5], ["t5", 0.98], ["t2", 0.4], ["t3", 0.3]]
    assert report.retrieved_summary(ret, max_tools=3) == "t5:0.990 ×3, t1:0.500, t2:0.400 (+1 tools)"
    assert report.retrieved_summary([]) == ""


def test_accuracy_vs_budget_has_one_point_per_method(tmp_path):
    by = {
        "greedy": [rec(i, i % 2 == 0, tokens=10) for i in range(10)],
        "esm": [rec(i, i % 3 == 0, tokens=8, probe=6) for i in range(10)],
        "static": [rec(i, True, tokens=12) for i in range(10)],
    }
    pts = report.budget_points(by)
    assert [p["method"] for p in pts] == ["greedy", "esm", "static"]
    assert [p["mean_budget"] for p in pts] == [10, 14, 12] and pts[1]["accuracy"] == pytest.approx(0.4)
    assert pts[2]["ci_low"] < 1 == pts[2]["ci_high"]
    fig = report.acc_vs_budget_figure(pts, 64)
    ax = fig.axes[0]
    assert len(ax.containers) == 3  # one errorbar per method
    xs = sorted(float(c.lines[0].get_xdata()[0]) for c in ax.containers)
    assert xs == [10, 12, 14]
    paths = report.accuracy_vs_budget(by, tmp_path, 64)
    assert [p.name for p in paths] == ["acc_vs_budget_T64.pdf", "acc_vs_budget_T64.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert report.results_table(by, list(by), "arith", "m", 64)["mean_budget"].tolist() == [10, 14, 12]


def test_steering_diagnostics_against_greedy():
    def step(chosen, h=2.0, inj=1.0, lps=(-1.0, -1.5, -0.2)):
        cands = [{"tool": None, "logprob": lps[0]}] + [{"tool": f"t{j}", "logprob": lp} for j, lp in enumerate(lps[1:])]
        return {"chosen": chosen, "h_norm": h, "inject_norm": inj if chosen else 0.0, "candidates": cands, "gate": "ok"}

    greedy = [dict(rec(i, i < 5), token_ids=[1, 2, i]) for i in range(10)]
    meth = [
        dict(rec(i, i in (0, 7, 8), steps=[step("t0", inj=i + 1.0), step(None)]), token_ids=[1, 2, i if i < 6 else 0])
        for i in range(10)
    ]
    d = report.diagnose(meth, greedy)
    assert d["differ_from_greedy"] == pytest.approx(4 / 10)  # ids 6..9 (id 0 keeps token 0)
    assert d["flips_greedy_right_to_wrong"] == 4 and d["flips_greedy_wrong_to_right"] == 2  # 1-4 lost; 7, 8 won
    assert d["null_rate"] == pytest.approx(0.5)
    assert d["probe_logprob_gap"]["median"] == pytest.approx(0.65)  # |−1.5+1| = 0.5, |−0.2+1| = 0.8
    assert d["inject_ratio"]["median"] == pytest.approx(np.median([(i + 1.0) / 2.0 for i in range(10)]))
    assert report.diagnose(meth)["differ_from_greedy"] is None  # no greedy: unknown, not 0
