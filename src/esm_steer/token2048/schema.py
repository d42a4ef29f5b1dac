"""The token-2048 artifacts: file names, parquet schemas, provenance metadata.

The seed's columns come first with the seed's names; extra columns follow them. Every file
carries, in its parquet metadata, the config values that made it (``META_KEY``), so that a
resumed or later stage refuses an artifact made with another model, task or size, naming the
key and both values. Beside each file, ``<file>.manifest.json`` holds its size and sha256; every
read checks them first, so a cut or altered file stops the run with one line naming the file
and the command that rebuilds it (``esm_steer.provenance``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from esm_steer import provenance
from esm_steer.io import atomic_save

STAGE1 = "stage1_output.parquet"
STAGE2 = "stage2_input.parquet"
STAGE3 = "stage3_output.parquet"
FINAL = "final_best.parquet"
SUMMARY = "summary.json"
PLOT = "accuracy_distribution.png"
STAGE1_PARTS = "stage1_parts"
STAGE3_PARTS = "stage3_parts"

META_KEY = b"esm_steer.token2048"

# the token2048 stage that writes each file (parts: by their dir)
MAKER = {
    STAGE1: "sample",
    STAGE1_PARTS: "sample",
    STAGE2: "prepare",
    STAGE3: "continue",
    STAGE3_PARTS: "continue",
    FINAL: "select",
}

_ids = pa.list_(pa.int32())

# the seed's columns, in the seed's order
SEED_COLUMNS = {
    STAGE1: ["question_id", "question", "ground_truth", "sample_id", "token_2048"],
    STAGE3: ["question_id", "sample_id", "continuation_id", "token_2048", "full_rollout", "ground_truth", "is_correct"],
    FINAL: ["question_id", "question", "ground_truth", "best_sample_id", "best_token_2048", "best_acc", "all_accs"],
}

SCHEMAS: dict[str, pa.Schema] = {
    STAGE1: pa.schema(
        [
            ("question_id", pa.int64()),
            ("question", pa.string()),
            ("ground_truth", pa.string()),
            ("sample_id", pa.int64()),
            ("token_2048", pa.string()),
            ("example_id", pa.string()),  # the task's id of the question
            ("prompt_ids", _ids),  # chat-templated question, ending with the assistant header
            ("prefix_ids", _ids),  # the generated prefix (EOS excluded)
            ("prefix_finished", pa.bool_()),  # EOS before prefix_tokens
            ("error", pa.string()),  # null unless the generation failed
        ]
    ),
    STAGE2: pa.schema(
        [
            ("question_id", pa.int64()),
            ("question", pa.string()),
            ("ground_truth", pa.string()),
            ("sample_id", pa.int64()),
            ("token_2048", pa.string()),
            ("continuation_prompt", pa.string()),  # text rendering of the ids, for reading only
            ("continuation_prompt_ids", _ids),  # prompt ids + prefix ids, no end-of-turn token
            ("num_prompt_tokens", pa.int64()),  # prefix ids = continuation_prompt_ids[num_prompt_tokens:]
            ("example_id", pa.string()),
            ("prefix_finished", pa.bool_()),
            ("error", pa.string()),
        ]
    ),
    STAGE3: pa.schema(
        [
            ("question_id", pa.int64()),
            ("sample_id", pa.int64()),
            ("continuation_id", pa.int64()),
            ("token_2048", pa.string()),
            ("full_rollout", pa.string()),
            ("ground_truth", pa.string()),
            ("is_correct", pa.bool_()),
            ("continuation", pa.string()),  # the generated part only ("" for a finished prefix)
            ("num_continuation_tokens", pa.int64()),
            ("finish_reason", pa.string()),  # stop | length | prefix_finished | error
            ("prefix_finished", pa.bool_()),
            ("pred", pa.string()),  # the extracted answer
            ("error", pa.string()),
        ]
    ),
    FINAL: pa.schema(
        [
            ("question_id", pa.int64()),
            ("question", pa.string()),
            ("ground_truth", pa.string()),
            ("best_sample_id", pa.int64()),
            ("best_token_2048", pa.string()),
            ("best_acc", pa.float64()),
            ("all_accs", pa.list_(pa.float64())),  # by sample id
            ("best_prefix_finished", pa.bool_()),
            ("num_errors", pa.int64()),  # failed continuations of this question (counted wrong)
        ]
    ),
}


def table(kind: str, rows: list[dict], meta: dict) -> pa.Table:
    """Rows -> a table with the kind's exact schema and the provenance metadata."""
    schema = provenance.with_parquet_meta(SCHEMAS[kind], META_KEY, meta)
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(cols, schema=schema)


def rebuild(path: Path) -> str:
    """How to rebuild one file: delete it and rerun the stage that writes it (a stage skips
    outputs that exist)."""
    path = Path(path)
    out = path.parent.parent if path.parent.name in MAKER else path.parent
    stage = MAKER.get(path.name) or MAKER.get(path.parent.name) or "all"
    return f"rm -f {path} && " + provenance.command("token2048", out.resolve().parent.name, stage=stage)


def save(path: Path, writer: Callable[[str], None]) -> Path:
    """Atomic write through ``writer(tmp)``, with the file's size and hash beside it."""

    def write_sealed(tmp: str) -> None:
        writer(tmp)
        provenance.seal_file(path, rebuild(path), written=tmp)

    atomic_save(path, write_sealed)
    provenance.remember(path)
    return path


def write(path: Path, tbl: pa.Table) -> Path:
    """Atomic parquet write (temp file + rename): a killed stage never leaves half a file."""
    return save(path, lambda tmp: pq.write_table(tbl, tmp))


def verify(path: Path) -> None:
    """ArtifactError (one line) when the file is missing, cut short or altered."""
    provenance.verify_file(path, rebuild(path))


def intact(path: Path) -> bool:
    try:
        verify(path)
        return True
    except provenance.ArtifactError:
        return False


def read_meta(path: Path) -> dict:
    verify(path)
    return provenance.parquet_meta(path, META_KEY, rebuild(path))


def check_meta(path: Path, expected: dict) -> dict:
    """The file's metadata; RunError (one line naming the file and the keys) when the file is damaged
    or a key of ``expected`` differs (``provenance.check_same``)."""
    verify(path)
    return provenance.check_parquet_meta(path, META_KEY, expected, rebuild(path))


def require(path: Path, expected: dict) -> dict:
    """An input artifact that must exist, be intact and match this run's config."""
    return check_meta(path, expected)


def read(path: Path, columns: list[str] | None = None) -> pa.Table:
    verify(path)
    with provenance.reading(path, rebuild(path)):
        return pq.read_table(path, columns=columns)


def to_rows(tbl: pa.Table) -> list[dict[str, Any]]:
    return tbl.to_pylist()
