"""esm-steer: test-time steering experiments on LLM reasoning.

Public entry points: :func:`load_task` (tasks), :func:`grade` (answer checking).
"""

__version__ = "0.1.0"


from esm_steer.data.tasks import grade, load_task

__all__ = ["load_task", "grade", "__version__"]
