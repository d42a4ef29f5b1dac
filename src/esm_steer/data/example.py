"""One question of a task (:class:`Example`) and the data layer's one-line error (:class:`DataError`).

Their own module so that the loaders (:mod:`esm_steer.data.tasks`, :mod:`esm_steer.data.arith`)
and the prompts share them without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class DataError(ValueError):
    """Bad task name, split, file or argument; the message is one line."""


@dataclass
class Example:
    id: str
    question: str
    gold: str
    solution: str | None = None  # gold worked reasoning, where the dataset has one
    choices: list[str] | None = None  # multiple choice: ["A. text", "B. text", ...]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
