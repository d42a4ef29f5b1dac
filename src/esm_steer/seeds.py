"""The one seed function: a stable integer seed from any tuple of parts.

Every random draw in the package is seeded from (cfg.seed, what is drawn ...), hashed here.
Python's ``hash()`` is salted per process; a keyed hash is not, so a resumed, sharded or
rebatched run draws exactly what one uninterrupted process would.
"""

from __future__ import annotations

import hashlib
from typing import Any

SEED_BITS = 63  # fits torch.Generator.manual_seed, numpy and vLLM's per-request seed


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from (run seed, stage, question id, sample index, ...). None counts as
    0, so an unset part and 0 draw alike; the order of the parts matters."""
    text = "\x1f".join("0" if p is None else str(p) for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)
