"""Case markdown: improved and regressed lists, control-point markers, retrieved tools."""

from __future__ import annotations

from esm_steer.evaluate import case_markdown
from test_stats import rec


def test_cases_list_the_right_improved_and_regressed_ids():
    greedy = [rec(i, c) for i, c in enumerate([True, False, False, True, True, False])]
    esm = [rec(i, c) for i, c in enumerate([True, True, False, False, True, True])]
    improved, regressed = case_markdown.improved_regressed(greedy, esm)
    assert [b["id"] for b, _ in improved] == ["e1", "e5"]
    assert [b["id"] for b, _ in regressed] == ["e3"]
    md = case_markdown.cases_markdown(greedy, esm, t_max=32, max_cases=1)
    assert "2 improved" in md and "1 regressed" in md
    assert "### e1" in md and "### e5" not in md and "### e3" in md  # max_cases=1 per kind
    assert md.index("## Improved") < md.index("### e1") < md.index("## Regressed") < md.index("### e3")


def test_mark_response_inserts_markers_in_order():
    steps = [{"m": 0, "chosen": None}, {"m": 1, "chosen": 3, "scale": 0.421}, {"m": 2, "chosen": "t7", "scale": None}]
    out = case_markdown.mark_response("abc\n\ndef\n\nghi", steps, [0, 5, 10])
    assert out == "⟦m=0 → null⟧abc\n\n⟦m=1 → t0003 ×0.42⟧def\n\n⟦m=2 → t7⟧ghi"


def test_retrieved_summary_groups_entries_by_tool():
    ret = [["t5", 0.99], ["t5", 0.97], ["t1", 0.5], ["t5", 0.98], ["t2", 0.4], ["t3", 0.3]]
    assert case_markdown.retrieved_summary(ret, max_tools=3) == "t5:0.990 ×3, t1:0.500, t2:0.400 (+1 tools)"
    assert case_markdown.retrieved_summary([]) == ""
