"""Case files in markdown: responses with each control point marked where its tool's vector
starts (``⟦m=1 → t0003 ×0.42⟧``), the steps' retrieved tools, candidate scores and choice
(control points: docs/method.md). ``cases/cases_T<T>.md`` lists the examples a method improved or
regressed against greedy; :func:`case_markdown` is esm-case's side-by-side study.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from esm_steer.config import BASELINE
from esm_steer.io import atomic_write_text


def _tool(t: Any) -> str:
    if t is None:
        return "null"
    if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
        return f"t{int(t):04d}"
    return str(t)


def _num(x: Any, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, (float, int, np.floating)) else str(x)


def marker(step: dict) -> str:
    """``⟦m=1 → t0003 ×0.42⟧`` (or ``⟦m=1 → null⟧``) for one control point."""
    if step.get("chosen") is None:
        return f"⟦m={step.get('m')} → null⟧"
    scale = step.get("scale")
    return f"⟦m={step.get('m')} → {_tool(step['chosen'])}" + (f" ×{scale:.2f}⟧" if scale is not None else "⟧")


def mark_response(response: str, steps: Sequence[dict], char_offsets: Sequence[int]) -> str:
    """The response with each step's marker inserted at its char offset (steps in order)."""
    out, prev = [], 0
    for step, off in sorted(zip(steps, char_offsets), key=lambda x: x[1]):
        off = max(prev, min(int(off), len(response)))
        out += [response[prev:off], marker(step)]
        prev = off
    out.append(response[prev:])
    return "".join(out)


def delimiter_offsets(text: str, delimiter: str, n: int) -> list[int]:
    """Char positions of control points 0..n-1 by text alone: 0, then right after each
    delimiter occurrence (where a step's token offset is unknown)."""
    out, i = [0], 0
    while len(out) < n:
        j = text.find(delimiter, i)
        if j < 0:
            break
        i = j + len(delimiter)
        out.append(i)
    return out


def text_step_offsets(response: str, steps: Sequence[dict], delimiter: str) -> list[int]:
    by_delim = delimiter_offsets(response, delimiter, max([int(s.get("m") or 0) for s in steps] + [0]) + 1)
    return [by_delim[int(s.get("m") or 0)] if int(s.get("m") or 0) < len(by_delim) else len(response) for s in steps]


def retrieved_summary(retrieved: Sequence, max_tools: int = 3) -> str:
    """Retrieved memory entries grouped by tool (a tool has several anchors): best sim and
    how many of its entries came back, in retrieval order; e.g. ``t0005:0.999 ×3, t0001:0.412``."""
    best: dict[Any, float] = {}
    count: Counter = Counter()
    for e in retrieved:
        t, sim = (e[0], e[1]) if len(e) > 1 else (e[0], None)
        count[t] += 1
        if t not in best or (sim is not None and (best[t] is None or sim > best[t])):
            best[t] = sim
    tools = list(best)
    out = ", ".join(
        f"{_tool(t)}:{_num(best[t])}" + (f" ×{count[t]}" if count[t] > 1 else "") for t in tools[:max_tools]
    )
    return out + (f" (+{len(tools) - max_tools} tools)" if len(tools) > max_tools else "")


def steps_table(steps: Sequence[dict], max_retrieved: int = 4) -> str:
    """A markdown table of control points: gate, retrieved tools, candidate scores, choice."""
    if not steps:
        return "_no control points_\n"
    lines = [
        "| m | offset | gate | retrieved (tool:sim) | candidates (tool: Â / logprob / score) | chosen | scale |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        ret = retrieved_summary(s.get("retrieved") or [], max_retrieved)
        cands = "; ".join(
            f"{_tool(c.get('tool'))}: {_num(c.get('A_hat'))} / {_num(c.get('logprob'))} / {_num(c.get('score'))}"
            for c in (s.get("candidates") or [])
        )
        lines.append(
            f"| {s.get('m')} | {s.get('offset', '-')} | {s.get('gate', '-')} | {ret or '-'} | {cands or '-'} "
            f"| {_tool(s.get('chosen'))} | {_num(s.get('scale'))} |"
        )
    return "\n".join(lines) + "\n"


def _fence(text: str) -> str:
    fence = "```"
    while fence in (text or ""):
        fence += "`"
    return f"{fence}text\n{text}\n{fence}\n"


def improved_regressed(
    base: Sequence[dict], treat: Sequence[dict]
) -> tuple[list[tuple[dict, dict]], list[tuple[dict, dict]]]:
    """(improved, regressed) pairs (base record, treated record): base wrong and treated
    right, and the reverse; in base order."""
    by_id = {r["id"]: r for r in treat}
    improved, regressed = [], []
    for b in base:
        t = by_id.get(b["id"])
        if t is None or bool(b["correct"]) == bool(t["correct"]):
            continue
        (improved if t["correct"] else regressed).append((b, t))
    return improved, regressed


def cases_markdown(
    base: Sequence[dict],
    treat: Sequence[dict],
    t_max: int,
    max_cases: int = 5,
    base_name: str = "greedy",
    treat_name: str = "esm",
    delimiter: str | None = "\n\n",
) -> str:
    """Improved and regressed examples side by side; the treated response carries its
    control-point markers (placed at the m-th ``delimiter``)."""
    improved, regressed = improved_regressed(base, treat)
    parts = [
        f"# Cases: {treat_name} vs {base_name}, T_max={t_max}\n",
        f"{len(improved)} improved ({base_name} wrong, {treat_name} right), {len(regressed)} regressed "
        f"({base_name} right, {treat_name} wrong) of {len(base)} examples; up to {max_cases} of each below.\n",
    ]
    for title, pairs in (("Improved", improved), ("Regressed", regressed)):
        parts.append(f"\n## {title} ({len(pairs)})\n")
        if not pairs:
            parts.append("_none_\n")
        for b, t in pairs[:max_cases]:
            parts.append(f"\n### {b['id']}\n\n**Question**\n\n{_fence(b['question'])}\n**Gold:** `{b['gold']}`\n")
            for name, r in ((base_name, b), (treat_name, t)):
                steps, text = r.get("steps") or [], r["response"]
                if steps and delimiter:
                    text = mark_response(text, steps, text_step_offsets(text, steps, delimiter))
                parts.append(
                    f"\n**{name}** — pred `{r.get('pred')}`, {'correct' if r['correct'] else 'wrong'}, "
                    f"{r['tokens_used']} tokens (+{r.get('probe_tokens_used', 0)} probe), "
                    f"finish={r['finish_reason']}\n\n" + _fence(text)
                )
            parts.append(f"\n{treat_name} steps:\n\n" + steps_table(t.get("steps") or []))
    return "".join(parts)


def write_cases(
    base,
    treat,
    out_path: str | Path,
    t_max: int,
    max_cases: int = 5,
    delimiter: str | None = "\n\n",
    treat_name: str = "esm",
) -> Path:
    text = cases_markdown(base, treat, t_max, max_cases, treat_name=treat_name, delimiter=delimiter)
    return atomic_write_text(out_path, text)


def case_markdown(
    examples: Sequence,
    by_method: Mapping[str, Mapping[str, dict]],
    char_offsets: Mapping[tuple[str, str], Sequence[int]],
    t_max: int,
    title: str = "Case study",
) -> str:
    """Per example and method: the response with every control point marked at its place,
    then the steps (retrieved tools, candidate scores, choice). ``by_method[m][id]`` is a
    record; ``char_offsets[(m, id)]`` the char position of each of its steps."""
    parts = [
        f"# {title}, T_max={t_max}\n\nMethods: {', '.join(by_method)}. Markers: "
        "`⟦m=<control point> → <tool> ×<scale>⟧` where the tool's vector starts being injected "
        "(`null`: no steering for that segment).\n"
    ]
    for ex in examples:
        eid = str(ex.id)
        parts.append(f"\n## {eid}\n\n**Question**\n\n{_fence(ex.question)}\n**Gold:** `{ex.gold}`\n")
        for m, recs in by_method.items():
            r = recs.get(eid)
            if r is None:
                parts.append(f"\n### {m}\n\n_no record_\n")
                continue
            steps = r.get("steps") or []
            text = mark_response(r["response"], steps, char_offsets.get((m, eid), [len(r["response"])] * len(steps)))
            err = f", error: {r['error']}" if r.get("error") else ""
            parts.append(
                f"\n### {m}\n\npred `{r.get('pred')}`, **{'correct' if r['correct'] else 'wrong'}**, "
                f"{r['tokens_used']} tokens + {r.get('probe_tokens_used', 0)} probe = "
                f"{r.get('budget_used', r['tokens_used'])} "
                f"budget, finish={r['finish_reason']}{err}\n\n" + _fence(text)
            )
            if m != BASELINE or steps:
                parts.append("\n" + steps_table(steps, max_retrieved=8))
    return "".join(parts)
