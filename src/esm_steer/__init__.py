"""esm-steer: test-time steering experiments on LLM reasoning.

Public entry points: :func:`load_task` (tasks), :func:`grade` (answer checking).
"""

__version__ = "0.1.0"


def load_task(name, split, data_root=None, max_examples=None, seed=0, **kwargs):
    """Examples of a registered task (see :mod:`esm_steer.data.tasks`)."""
    from esm_steer.data.tasks import load_task as _load

    return _load(name, split, data_root=data_root, max_examples=max_examples, seed=seed, **kwargs)


def grade(response: str, gold: str, task: str) -> bool:
    """True when the response's final answer matches gold (see :mod:`esm_steer.data.grading`)."""
    from esm_steer.data.tasks import grade as _grade

    return _grade(response, gold, task)


__all__ = ["load_task", "grade", "__version__"]
