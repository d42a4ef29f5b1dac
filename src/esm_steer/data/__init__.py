"""Tasks (yaml + row parser, loaders), prompt templates, and grading (answer extraction + equivalence)."""

from esm_steer.data.grading import compute_score_dapo, extract_answer, is_equiv
from esm_steer.data.prompts import PROMPTS, build_messages
from esm_steer.data.rows import ROW_PARSERS, SkipRow, parse_rows
from esm_steer.data.sources import read_rows
from esm_steer.data.tasks import TASKS, DataError, Example, TaskSpec, grade, kind_for_task, load_task, subsample

__all__ = [
    "TASKS",
    "ROW_PARSERS",
    "PROMPTS",
    "DataError",
    "Example",
    "TaskSpec",
    "SkipRow",
    "load_task",
    "parse_rows",
    "read_rows",
    "subsample",
    "build_messages",
    "grade",
    "kind_for_task",
    "extract_answer",
    "is_equiv",
    "compute_score_dapo",
]
