"""What a vLLM release breaks of what esm-steer's steering hook reads (``make vllm-drift``, not CI).

Downloads the newest vLLM wheel (or ``--version X``) with ``pip download --no-deps``, unzips its
Python sources and runs :func:`esm_steer.engine.vllm_contract.check_source` on them with ``ast``:
no GPU, no install. Prints one line per break; exit status 1 if any.

    python scripts/vllm_drift.py [--version 0.34.0] [--dir /tmp/vllm-drift]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from esm_steer.engine.vllm_contract import SUPPORTED, check_source, source_version


def download(version: str | None, dest: Path) -> Path:
    spec = f"vllm=={version}" if version else "vllm"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec],
        check=True,
    )
    wheels = sorted(dest.glob("vllm-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download {spec} gave no vllm wheel in {dest}")
    return wheels[-1]


def unzip_sources(wheel: Path, root: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(root, [n for n in z.namelist() if n.startswith("vllm/") and n.endswith(".py")])
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", help="a vLLM release (default: the newest on the index)")
    ap.add_argument("--dir", type=Path, help="download and unzip here (default: a temporary folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = args.dir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        wheel = download(args.version, base)
        root = unzip_sources(wheel, base / wheel.stem)
        problems = check_source(root)
        version = source_version(root) or wheel.name
        if not problems:
            print(f"vLLM {version} ({wheel.name}): keeps everything esm-steer's steering hook reads ({SUPPORTED})")
            return 0
        print(f"vLLM {version} ({wheel.name}) breaks {len(problems)} thing(s) esm-steer's steering hook reads:")
        for p in problems:
            print(f"  {p}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
