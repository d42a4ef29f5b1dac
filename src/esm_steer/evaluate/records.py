"""Per-example eval records: building them from a generation, naming where they go, resuming them.

One record per (method, example) in ``eval/<tag>/per_example.jsonl``::

    id, question, gold, response, pred, correct, finish_reason,
    tokens_used, probe_tokens_used, budget_used, steps, wall_s [, method, token_ids, error]

``steps`` is the online policy's per-control-point log ([] for greedy), made JSON-safe.
``wall_s`` is this example's share of its chunk's generation time, so a resumed run still
sums to the method's total generation time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from esm_steer import provenance
from esm_steer.config import BASELINE
from esm_steer.esm import artifacts
from esm_steer.esm.strategies import own_keys
from esm_steer.io import JsonlAppender
from esm_steer.runtime import grade

FINISH_ERROR = "error"  # generation raised; the record keeps the message in "error"
RECORD_FIELDS = (
    "id",
    "question",
    "gold",
    "response",
    "pred",
    "correct",
    "finish_reason",
    "tokens_used",
    "probe_tokens_used",
    "budget_used",
    "steps",
)


def method_tag(method: str, t_max: int, tag: str | None = None) -> str:
    """``<method>_T<T>``, prefixed by ``eval.tag`` when set."""
    base = f"{method}_T{int(t_max)}"
    return f"{tag}_{base}" if tag else base


def per_example_path(run_dir: str | Path, tag: str) -> Path:
    return Path(run_dir) / artifacts.EVAL_DIR / tag / artifacts.PER_EXAMPLE


def jsonable(x: Any) -> Any:
    """Plain JSON types from tuples, numpy/torch scalars and arrays, dataclasses; NaN -> None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy / torch scalars and arrays
        return jsonable(x.tolist())
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    return x


def build_record(
    example,
    response: str,
    finish_reason: str,
    tokens_used: int,
    grader: str,
    probe_tokens_used: int = 0,
    budget_used: int | None = None,
    steps: Iterable[dict] | None = None,
    wall_s: float = 0.0,
    token_ids: list[int] | None = None,
    error: str | None = None,
    method: str | None = None,
) -> dict:
    """One per-example record, graded by ``grader`` (task.grader, or a task name); grading
    never raises (a broken response is simply wrong, with the grader's error recorded)."""
    response = response or ""
    correct, pred, grading_error = grade(response, example.gold, grader)
    error = error or grading_error
    rec = {
        "id": str(example.id),
        "question": example.question,
        "gold": example.gold,
        "response": response,
        "pred": pred,
        "correct": correct,
        "finish_reason": finish_reason,
        "tokens_used": int(tokens_used),
        "probe_tokens_used": int(probe_tokens_used),
        "budget_used": int(budget_used if budget_used is not None else tokens_used + probe_tokens_used),
        "steps": jsonable(list(steps or [])),
        "wall_s": float(wall_s),
    }
    if method is not None:
        rec["method"] = method
    if token_ids is not None:
        rec["token_ids"] = [int(t) for t in token_ids]
    if error:
        rec["error"] = error
    return rec


def record_from_sample(example, sample, grader: str, **kw) -> dict:
    """A greedy :class:`~esm_steer.engine.base.Sample` -> record (no probes, no steps)."""
    return build_record(
        example, sample.text, sample.finish_reason, len(sample.token_ids), grader, token_ids=sample.token_ids, **kw
    )


def record_from_online(example, result, grader: str, **kw) -> dict:
    """An online policy ``OnlineResult`` -> record."""
    return build_record(
        example,
        result.text,
        result.finish_reason,
        result.tokens_used,
        grader,
        probe_tokens_used=result.probe_tokens_used,
        budget_used=result.budget_used,
        steps=result.steps,
        token_ids=getattr(result, "token_ids", None),
        **kw,
    )


def error_record(example, grader: str, message: str, **kw) -> dict:
    """A generation that raised: recorded as wrong so that the run goes on."""
    return build_record(example, "", FINISH_ERROR, 0, grader, error=message, **kw)


# ---------------------------------------------------------------- resuming safely


def fingerprint(cfg, methods: Sequence[str], artifact_dir: str | Path | None) -> dict:
    """What a record depends on: a resumed run must not mix records made under other settings
    (the tag names only method and T_max; online.* knobs, model, prompt live here). The steered
    layer matters to the online methods only: greedy records are shared across layers."""
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    online = any(m != BASELINE for m in methods)
    fp = {
        "methods": list(methods),
        "T_max": int(cfg.decode.max_new_tokens),
        "model": {
            k: cfg.model[k] for k in ("name_or_path", "gguf_file", "dtype", *(("steer_layer",) if online else ()))
        },
        "task": {k: cfg.task[k] for k in ("dataset", "eval_split", "difficulty", "num_synthetic", "grader", "prompt")},
        **({"split": "val", "val_split": cfg.task.val_split} if cfg.eval.get("split") == "val" else {}),  # != test
        "prompt": plain(cfg.prompt),
        "seed": int(cfg.seed),
    }
    if online:
        # variant: the method names it; a strategy's own keys matter to it only (static_vector)
        foreign = own_keys(exclude=methods)
        fp["online"] = {k: v for k, v in plain(cfg.online).items() if k != "variant" and k not in foreign}
        fp["control_points"] = plain(cfg.control_points)
        fp["artifact_run_dir"] = str(Path(artifact_dir).resolve()) if artifact_dir else None
    return jsonable(fp)


def open_records(path: str | Path, fp: dict, key: Any = "id") -> JsonlAppender:
    """The resumable record log at ``path``; RunError (one line) when records already there
    were made under another fingerprint, so a rerun never silently mixes settings."""
    path = Path(path)
    appender = JsonlAppender(path, key=key)
    provenance.check_or_write(
        path.parent / artifacts.FINGERPRINT,
        fp,
        f"{path} holds {len(appender.records)} records",
        "set eval.tag, use a new run (outputs.run_id), or delete that dir",
        check=bool(appender.records),
    )
    return appender
