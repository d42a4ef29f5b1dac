"""Result tables: columns, rows, the delta against greedy, the log rendering."""

from __future__ import annotations

import pytest

from esm_steer.evaluate import report
from test_stats import rec


def test_results_table_columns_and_rows():
    by = {"greedy": [rec(i, i % 2 == 0) for i in range(10)], "esm": [rec(i, i % 3 != 1, probe=5) for i in range(10)]}
    df = report.results_table(by, ["greedy", "esm"], dataset="arith", model="m", t_max=64, bootstrap_samples=500)
    assert list(df.columns) == report.TABLE_COLUMNS and list(df["method"]) == ["greedy", "esm"]
    assert df.loc[1, "accuracy"] == pytest.approx(0.7) and df.loc[1, "delta_vs_greedy"] == pytest.approx(0.2)
    assert df.loc[1, "probe_overhead"] == pytest.approx(0.5) and df.loc[0, "wall_s"] == pytest.approx(5.0)
    text = report.format_table(df)
    assert "greedy" in text and "esm" in text and "T_max=64" in text
