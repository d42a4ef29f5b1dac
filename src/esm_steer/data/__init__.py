"""Tasks (loaders), prompt templates, and grading (answer extraction + equivalence)."""

from esm_steer.data.grading import compute_score_dapo, extract_answer, is_equiv
from esm_steer.data.prompts import PROMPTS, build_messages
from esm_steer.data.tasks import TASKS, DataError, Example, TaskSpec, grade, kind_for_task, load_task

__all__ = [
    "TASKS",
    "PROMPTS",
    "DataError",
    "Example",
    "TaskSpec",
    "load_task",
    "build_messages",
    "grade",
    "kind_for_task",
    "extract_answer",
    "is_equiv",
    "compute_score_dapo",
]
