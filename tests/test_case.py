"""esm-case: example selection by id or position, markers at the right offsets, files."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from esm_steer.evaluate import case as C
from esm_steer.evaluate.case_markdown import case_markdown
from esm_steer.io import read_jsonl
from esm_steer.runs import Run, RunError
from test_eval import EXAMPLES, FakeEngine, compose_cfg, fakes, make_artifacts  # noqa: F401 - fixture

TEXT = "First, add.\n\n3 + 4 = 7.\n\nThe answer is 7."


def test_pick_examples_by_id_position_and_unknown():
    assert [e.id for e in C.pick_examples(EXAMPLES, ["q003", "0", "q003"])] == ["q003", "q000"]
    full = EXAMPLES + [SimpleNamespace(id="extra", question="?", gold="1")]
    assert C.pick_examples(EXAMPLES, ["extra"], full)[0].id == "extra"
    with pytest.raises(RunError) as e:
        C.pick_examples(EXAMPLES, ["nope"])
    assert "\n" not in str(e.value) and "q000" in str(e.value) and "nope" in str(e.value)
    with pytest.raises(RunError):
        C.pick_examples(EXAMPLES, [str(len(EXAMPLES))])


def _boundary_offsets(tokenizer, ids):
    """Token offsets right after each token that completes a "\\n\\n"."""
    out, text = [], ""
    for j in range(len(ids)):
        before = text.count("\n\n")
        text = tokenizer.decode(ids[: j + 1], skip_special_tokens=True)
        if text.count("\n\n") > before:
            out.append(j + 1)
    return out


def test_markers_sit_at_the_step_token_offsets(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    b1, b2 = _boundary_offsets(tokenizer, ids)
    steps = [
        {"m": 0, "offset": 0, "chosen": None},
        {"m": 1, "offset": b1, "chosen": 3, "scale": 0.42},
        {"m": 2, "offset": b2, "chosen": 11, "scale": 1.5},
    ]
    r = {"response": TEXT, "token_ids": ids, "steps": steps}
    offs = C.step_char_offsets(r, tokenizer)
    assert offs == [len(tokenizer.decode(ids[:o], skip_special_tokens=True)) for o in (0, b1, b2)]
    md = case_markdown(
        [EXAMPLES[0]],
        {
            "esm": {
                "q000": {
                    **r,
                    "id": "q000",
                    "pred": "7",
                    "correct": False,
                    "finish_reason": "stop",
                    "tokens_used": len(ids),
                    "probe_tokens_used": 0,
                }
            }
        },
        {("esm", "q000"): offs},
        t_max=32,
    )
    assert "⟦m=0 → null⟧First, add.\n\n⟦m=1 → t0003 ×0.42⟧3 + 4 = 7.\n\n⟦m=2 → t0011 ×1.50⟧The answer is 7." in md
    # without token ids the markers fall back to the m-th delimiter in the text: the same places here
    assert C.step_char_offsets({"response": TEXT, "steps": steps}) == offs


def test_case_run_writes_md_and_jsonl(tmp_path, fakes):
    cfg = compose_cfg(["eval.example_ids=[q004,1]", "eval.tag=dbg"], entry="case")
    run = Run(make_artifacts(tmp_path), cfg)
    by = C.run(cfg, run, engine=FakeEngine())
    name = "dbg_greedy_esm_T16"
    recs = read_jsonl(tmp_path / "eval" / name / "per_example.jsonl")
    assert sorted((r["method"], r["id"]) for r in recs) == [
        ("esm", "q001"),
        ("esm", "q004"),
        ("greedy", "q001"),
        ("greedy", "q004"),
    ]
    md = (tmp_path / "cases" / f"{name}.md").read_text()
    assert md.index("## q004") < md.index("## q001")
    assert "### greedy" in md and "### esm" in md and "⟦m=0 → t0003 ×0.42⟧" in md and "⟦m=1 → null⟧" in md
    assert "| 0 | 0 | ok | t0003:0.900, t0005:0.400 |" in md  # retrieved tools with sims, in the steps table
    assert by["esm"]["q004"]["correct"] is True  # esm_right(4)
    # a rerun resumes: nothing regenerated, no duplicates
    engine = FakeEngine()
    C.run(cfg, run, engine=engine)
    assert engine.calls == 0 and len(read_jsonl(tmp_path / "eval" / name / "per_example.jsonl")) == 4


def test_case_needs_example_ids(tmp_path, fakes):
    cfg = compose_cfg(entry="case")
    with pytest.raises(RunError, match="eval.example_ids"):
        C.run(cfg, Run(tmp_path, cfg), engine=FakeEngine())


def test_case_unknown_id_lists_valid_ones(tmp_path, fakes):
    cfg = compose_cfg(["eval.example_ids=[zzz]", "eval.methods=[greedy]"], entry="case")
    with pytest.raises(RunError, match="q000"):
        C.run(cfg, Run(tmp_path, cfg), engine=FakeEngine())
