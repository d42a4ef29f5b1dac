"""Tasks (loaders), prompt templates, and grading (answer extraction + equivalence)."""

from esm_steer.data.grading import compute_score_dapo, extract_answer, grade, is_equiv
from esm_steer.data.prompts import PROMPTS, build_messages, render_prompt_ids
from esm_steer.data.tasks import TASKS, DataError, Example, TaskSpec, load_task

__all__ = [
    "TASKS",
    "PROMPTS",
    "DataError",
    "Example",
    "TaskSpec",
    "load_task",
    "build_messages",
    "render_prompt_ids",
    "grade",
    "extract_answer",
    "is_equiv",
    "compute_score_dapo",
]
