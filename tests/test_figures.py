"""Figures: the files eval writes, and one errorbar per method."""

from __future__ import annotations

import pytest

from esm_steer.evaluate import figures, report
from test_stats import rec


def test_tokens_histogram_writes_pdf_and_png(tmp_path):
    paths = figures.tokens_histogram({"greedy": [rec(i, True, tokens=i) for i in range(5)]}, tmp_path, 8)
    assert sorted(p.name for p in paths) == ["tokens_hist_T8.pdf", "tokens_hist_T8.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_accuracy_vs_budget_has_one_point_per_method(tmp_path):
    by = {
        "greedy": [rec(i, i % 2 == 0, tokens=10) for i in range(10)],
        "esm": [rec(i, i % 3 == 0, tokens=8, probe=6) for i in range(10)],
        "static": [rec(i, True, tokens=12) for i in range(10)],
    }
    pts = figures.budget_points(by)
    assert [p["method"] for p in pts] == ["greedy", "esm", "static"]
    assert [p["mean_budget"] for p in pts] == [10, 14, 12] and pts[1]["accuracy"] == pytest.approx(0.4)
    assert pts[2]["ci_low"] < 1 == pts[2]["ci_high"]
    fig = figures.acc_vs_budget_figure(pts, 64)
    ax = fig.axes[0]
    assert len(ax.containers) == 3  # one errorbar per method
    xs = sorted(float(c.lines[0].get_xdata()[0]) for c in ax.containers)
    assert xs == [10, 12, 14]
    paths = figures.accuracy_vs_budget(by, tmp_path, 64)
    assert [p.name for p in paths] == ["acc_vs_budget_T64.pdf", "acc_vs_budget_T64.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert report.results_table(by, list(by), "arith", "m", 64)["mean_budget"].tolist() == [10, 14, 12]
