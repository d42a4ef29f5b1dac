"""esm-steer: test-time steering experiments on LLM reasoning.

Public entry points: :func:`load_task` (tasks), :func:`grade` (answer checking).
"""

__version__ = "0.1.0"

import os

# First, before anything loads torch (libgomp reads it once, at load): OpenMP threads that
# spin-wait collapse when another process holds a core (2 threads, b=1 decode: 0.5-2.7 s per
# step against 58-106 ms passive, README Performance); a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from esm_steer.data.tasks import grade, load_task  # noqa: E402

__all__ = ["load_task", "grade", "__version__"]
