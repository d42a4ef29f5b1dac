"""esm-steer's vLLM general plugin: steering-aware prefix-cache block hashing in every vLLM process.

vLLM loads each ``vllm.general_plugins`` entry point (pyproject) in the front end, in the
EngineCore process and in every worker, before any request is hashed. The scheduler, and with it
the block hasher, runs in EngineCore when vLLM runs one (``VLLM_ENABLE_V1_MULTIPROCESSING=1``, the
GPU default), where the front end's patch cannot reach. The patch changes no hash of a request
without esm-steer's steering keys, so other users of the same vLLM install see plain vLLM.
"""

from __future__ import annotations

from esm_steer.engine.vllm_steer import patch_block_hashing


def register() -> None:
    """Entry point ``esm_steer = esm_steer.engine.vllm_plugin:register`` (may run more than once)."""
    patch_block_hashing()
