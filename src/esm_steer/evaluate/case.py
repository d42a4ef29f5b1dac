"""Stage ``case``: a few examples, several methods, a Markdown file with every step shown.

``eval.example_ids`` names examples by id, or by integer position in the eval split as eval
sees it (after ``task.max_eval_examples``). Writes ``eval/<name>/per_example.jsonl`` (one
record per method and example, resumable) and ``cases/<name>.md``, where
``<name> = <tag>_<methods joined by _>_T<T>`` and ``tag`` defaults to ``case``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from omegaconf import DictConfig

from esm_steer import runtime
from esm_steer.engine import require_steering
from esm_steer.evaluate import case_markdown as cases
from esm_steer.evaluate import records as R
from esm_steer.evaluate.methods import check_methods, generate_records, make_generator, online_methods
from esm_steer.evaluate.offline import resolve_artifact_dir
from esm_steer.io import atomic_write_text
from esm_steer.runs import Run, RunError
from esm_steer.splits import check_no_overlap

log = logging.getLogger(__name__)


def case_name(cfg: DictConfig) -> str:
    return f"{cfg.eval.tag or 'case'}_{'_'.join(cfg.eval.methods)}_T{int(cfg.decode.max_new_tokens)}"


def pick_examples(examples: Sequence, wanted: Sequence, full: Sequence | None = None) -> list:
    """Examples by id (in ``examples``, else in ``full``: the whole split), else by integer
    position in ``examples``; an unknown one -> RunError listing a few valid ids."""
    by_id = {str(ex.id): ex for ex in examples}
    full_by_id = {str(ex.id): ex for ex in (full or [])}
    out = []
    for w in wanted:
        w = str(w).strip()
        if w in by_id:
            out.append(by_id[w])
        elif w in full_by_id:
            out.append(full_by_id[w])
        elif w.lstrip("-").isdigit() and 0 <= int(w) < len(examples):
            out.append(examples[int(w)])
        else:
            few = ", ".join(str(ex.id) for ex in list(examples)[:5])
            raise RunError(
                f"eval.example_ids: unknown example {w!r}; use ids such as {few} or positions 0..{len(examples) - 1}"
            )
    seen, uniq = set(), []
    for ex in out:
        if str(ex.id) not in seen:
            seen.add(str(ex.id))
            uniq.append(ex)
    return uniq


def step_char_offsets(record: dict, tokenizer=None, delimiter: str = "\n\n") -> list[int]:
    """Char position in the response of each step's token offset: the length of the decoded
    first ``offset`` kept tokens. Without token ids (or a step without an offset), the char
    position after the m-th delimiter."""
    steps = record.get("steps") or []
    text, ids = record["response"], record.get("token_ids")
    by_text = cases.text_step_offsets(text, steps, delimiter)
    out = []
    for s, fallback in zip(steps, by_text):
        off = s.get("offset")
        if off is not None and ids is not None and tokenizer is not None:
            prefix = tokenizer.decode(ids[: int(off)], skip_special_tokens=True)
            out.append(min(len(prefix), len(text)))
        else:
            out.append(fallback)
    return out


def run(cfg: DictConfig, run: Run, engine=None) -> dict:
    """esm-case. ``engine`` lets tests pass a tiny model. Returns {method: {id: record}}."""
    if not cfg.eval.example_ids:
        raise RunError(
            "esm-case needs eval.example_ids, e.g. eval.example_ids=[0,6] (ids or positions in the eval split)"
        )
    t_max = int(cfg.decode.max_new_tokens)
    methods = list(cfg.eval.methods)
    check_methods(cfg, keys=("eval.methods",))
    require_steering(cfg.model if engine is None else engine, online_methods(methods))
    examples_all = runtime.load_examples(cfg, runtime.eval_split(cfg))
    wanted = [str(w) for w in cfg.eval.example_ids]
    full = None
    if any(w not in {str(e.id) for e in examples_all} and not w.isdigit() for w in wanted):
        full = runtime.load_examples(cfg, runtime.eval_split(cfg), max_examples=None)
    examples = pick_examples(examples_all, wanted, full)

    artifact_dir = None
    if online_methods(methods):
        artifact_dir = resolve_artifact_dir(cfg, run)
        log.info("offline artifacts (library/, memory/) read from %s", artifact_dir)
    check_no_overlap(artifact_dir, examples, "case")  # never score questions the artifacts were mined on

    engine = engine if engine is not None else runtime.build_engine(cfg)
    prompts = runtime.prompt_ids(engine, cfg, examples)
    name = case_name(cfg)
    appender = R.open_records(
        R.per_example_path(run.dir, name),
        R.fingerprint(cfg, methods, artifact_dir),
        key=lambda r: (r["method"], r["id"]),
    )
    cache: dict = {}
    for m in methods:
        generate, to_record = make_generator(m, engine, cfg, artifact_dir, cache)
        generate_records(
            examples,
            prompts,
            generate,
            to_record,
            appender,
            cfg.task.grader,
            int(cfg.model.batch_size),
            method=m,
            key=lambda ex, m=m: (m, str(ex.id)),
            desc=f"case {m}",
        )

    by_method: dict[str, dict[str, dict]] = {m: {} for m in methods}
    for r in appender.records:
        if r["method"] in by_method:
            by_method[r["method"]][r["id"]] = r
    tok = getattr(engine, "tokenizer", None)
    delim = str(cfg.control_points.segment_delimiter)
    offsets = {(m, eid): step_char_offsets(r, tok, delim) for m, recs in by_method.items() for eid, r in recs.items()}
    md = cases.case_markdown(examples, by_method, offsets, t_max, title=f"Case study {name}")
    if artifact_dir is not None:
        md += f"\n---\nartifacts: `{artifact_dir}`\n"
    path = atomic_write_text(run.path("cases", f"{name}.md"), md)
    log.info("case file: %s (%d examples x %d methods)", path, len(examples), len(methods))
    for eid in [str(e.id) for e in examples]:
        log.info(
            "  %s: %s",
            eid,
            "  ".join(f"{m}={'✓' if by_method[m].get(eid, {}).get('correct') else '✗'}" for m in methods),
        )
    return by_method
