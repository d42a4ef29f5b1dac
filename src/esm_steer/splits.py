"""Honest splits: question normalisation and hashing, the seeded carve, and the overlap refusal.

Every task has three disjoint question sets: mining (``task.train_split``), validation
(``task.val_split``) and test (``task.eval_split``). A split read from a source file that it
shares with other splits gets the rows whose seeded hash of the normalised question falls in
its share (``task.carve``): a row's split depends on its own text alone, so adding rows never
moves others, and subsampling (``max_*_examples``) happens after the carve.

esm-mine stores the hashes of the questions it mined on in ``mine/questions.json``; esm-eval
and esm-case refuse artifacts whose mining questions overlap the questions they evaluate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from esm_steer.config import ConfigError
from esm_steer.io import atomic_write_json
from esm_steer.runs import RunError

log = logging.getLogger(__name__)

QUESTIONS_FILE = "questions.json"  # under mine/
NORMALISATION = "nfkc+casefold+whitespace, sha256[:16]"  # recorded next to the hashes


def normalise_question(text: str) -> str:
    """The question as compared across splits: NFKC, case-folded, whitespace collapsed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", str(text)).casefold()).strip()


def question_hash(text: str) -> str:
    """A stable hash (not Python's salted hash()) of the normalised question."""
    return hashlib.sha256(normalise_question(text).encode()).hexdigest()[:16]


def carve_point(text: str, seed: int) -> float:
    """The question's place in [0, 1) for the carve with ``seed``: uniform, fixed by text and seed."""
    digest = hashlib.sha256(f"{int(seed)}\x00{normalise_question(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def carve_source(carve: Mapping | None, split: str) -> tuple[str, dict | None]:
    """(source split, {our split: share} of that source) for ``split``; a split the carve
    does not name is read whole from the source split of its own name: (split, None)."""
    for source, shares in (carve or {}).items():
        if split in (shares or {}):
            return str(source), {str(k): float(v) for k, v in shares.items()}
    return split, None


def check_carve(carve: Mapping | None, key: str = "task.carve") -> None:
    """Shares in (0, 1] summing to at most 1, and no split carved from two sources."""
    seen: dict[str, str] = {}
    for source, shares in (carve or {}).items():
        if not isinstance(shares, Mapping) or not shares:
            raise ConfigError(f"{key}.{source} must map our split names to shares, e.g. {{train: 0.9, val: 0.1}}")
        for split, share in shares.items():
            if split in seen:
                raise ConfigError(f"{key}: split {split!r} is carved from both {seen[split]!r} and {source!r}")
            seen[split] = str(source)
            if not 0 < float(share) <= 1:
                raise ConfigError(f"{key}.{source}.{split}={share!r} is out of range: 0 < share <= 1")
        if sum(float(v) for v in shares.values()) > 1 + 1e-9:
            raise ConfigError(f"{key}.{source}: shares sum to {sum(float(v) for v in shares.values()):g} > 1")


def carve_assign(questions: Sequence[str], shares: Mapping[str, float], seed: int) -> list[str | None]:
    """Each question's split under ``shares`` (consecutive intervals of [0, 1) in the given
    order); None for the part beyond the shares' sum, which no split uses."""
    bounds, acc = [], 0.0
    for split, share in shares.items():
        acc += float(share)
        bounds.append((acc, split))
    out = []
    for q in questions:
        u = carve_point(q, seed)
        out.append(next((s for hi, s in bounds if u < hi), None))
    return out


# ---------------------------------------------------------------- mined questions and the refusal


def write_mined_questions(mine_dir: str | Path, examples: Iterable, split_record: dict | None = None) -> Path:
    """mine/questions.json: the sorted hashes of the mining questions and the split they came from."""
    hashes = sorted({question_hash(ex.question) for ex in examples})
    record = {"normalisation": NORMALISATION, "split": split_record, "n": len(hashes), "hashes": hashes}
    return atomic_write_json(Path(mine_dir) / QUESTIONS_FILE, record)


def check_no_overlap(
    artifact_dir: str | Path | None, examples: Sequence, what: str = "eval", allow: bool = False
) -> int:
    """RunError (one line) when questions of ``examples`` were mined on by the run that made the
    artifacts in ``artifact_dir``; a warning when that run recorded no mining questions. With
    ``allow`` (eval.allow_mining_overlap: STIR's own split) a warning instead, and the count is
    returned so that the tables can mark it."""
    if artifact_dir is None:
        return 0
    path = Path(artifact_dir) / "mine" / QUESTIONS_FILE
    if not path.is_file():
        log.warning(
            "%s has no mine/%s (mined before it was recorded): cannot check that its mining questions "
            "are disjoint from the %s questions",
            artifact_dir,
            QUESTIONS_FILE,
            what,
        )
        return 0
    mined = set(json.loads(path.read_text()).get("hashes") or [])
    hits = [ex for ex in examples if question_hash(ex.question) in mined]
    if hits and allow:
        log.warning(
            "eval.allow_mining_overlap=true: %d of the %d %s questions were mined on by %s: not a held-out "
            "result (the tables' mined_overlap column says so)",
            len(hits),
            len(examples),
            what,
            artifact_dir,
        )
        return len(hits)
    if hits:
        raise RunError(
            f"artifacts in {artifact_dir} were mined on {len(hits)} of the {len(examples)} {what} questions "
            f"(e.g. id {hits[0].id}; see mine/{QUESTIONS_FILE}): evaluate another split (eval.split) or use "
            "artifacts mined on task.train_split"
        )
    return 0
