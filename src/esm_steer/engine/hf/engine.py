"""The transformers engine: model introspection, the layer-ℓ steering hook, ``generate`` on top of
:class:`HFDecodeBatch`, and the teacher-forced passes (hidden states, prompt logprobs)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM

from esm_steer.config import ModelConfig
from esm_steer.engine.base import FINISH_LENGTH, ChatEncoding, EngineInfo, Sample, SamplingSpec, end_of_turn_ids
from esm_steer.engine.hf.batch import HFDecodeBatch
from esm_steer.engine.hf.state import _HookContext
from esm_steer.engine.loading import load_tokenizer, model_path
from esm_steer.engine.precision import DTYPES as DTYPES  # re-exported by engine.hf
from esm_steer.engine.precision import engine_dtype, resolve_device, slowdown_note
from esm_steer.engine.registry import register_engine
from esm_steer.seeds import derive_seed

log = logging.getLogger(__name__)

# Tokens of teacher-forced passes per forward (rows x padded length): bounds activation memory.
_TOKENS_PER_FORWARD = 16384
# Positions per lm_head call in prompt_logprobs: bounds the [positions, vocab] logits buffer.
_LOGIT_CHUNK = 1024


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of a causal LM (Llama, Qwen, Mistral, ... all use model.model.layers)."""
    base = getattr(model, "model", None)
    if base is not None and hasattr(base, "layers"):
        return base.layers
    dec = model.get_decoder()
    if hasattr(dec, "layers"):
        return dec.layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


class _StopForward(Exception):
    """Raised by a capture hook to skip the layers after the one we need."""


@register_engine("hf")
class HFEngine(ChatEncoding):
    """transformers backend (implements ``base.Engine``); CPU or GPU."""

    supports_steering = True
    steering_hint = ""  # it always steers

    @classmethod
    def steers(cls, model_cfg=None) -> bool:
        return True

    @classmethod
    def prompts_per_call(cls, model_cfg, n: int) -> int:
        """prompts × n rows decode at once: keep that near model.batch_size."""
        return max(1, int(getattr(model_cfg, "batch_size", ModelConfig.batch_size)) // n)

    @classmethod
    def check_available(cls) -> None:
        return None  # transformers is a dependency

    def hidden_states_source(self) -> str:
        return "hf"  # teacher-forced forward passes of this model

    def __init__(
        self,
        model,
        tokenizer,
        steer_layer: int | None = None,
        batch_size: int = ModelConfig.batch_size,
        model_id: str | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if self.device != next(model.parameters()).device:
            self.model.to(self.device)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.dtype = next(model.parameters()).dtype
        cfg = model.config
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.hidden_size = int(cfg.hidden_size)
        self.steer_layer = self.num_layers // 2 if steer_layer is None else int(steer_layer)
        if not 0 <= self.steer_layer < self.num_layers:
            raise ValueError(f"model.steer_layer={steer_layer} outside [0, {self.num_layers - 1}]")
        self.eos_token_ids = end_of_turn_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.info = EngineInfo(
            model_id=model_id or getattr(cfg, "_name_or_path", "") or type(model).__name__,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            steer_layer=self.steer_layer,
            dtype=str(self.dtype).removeprefix("torch."),
            backend=self.backend_name,
        )
        # transformers 5.24 renamed forward(past_key_values=) to cache= (the old name warns)
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._hook_ctx: _HookContext | None = None
        self._hook = self.layers[self.steer_layer].register_forward_hook(self._steer_hook, prepend=True)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, model_cfg, seed: int = 0) -> HFEngine:
        """Load from a ``ModelConfig`` (or a DictConfig with its fields)."""
        if getattr(model_cfg, "num_threads", None):
            torch.set_num_threads(int(model_cfg.num_threads))
        device = resolve_device(getattr(model_cfg, "device", "auto"))
        choice = engine_dtype(model_cfg, warn=False)  # auto: from the device (engine/precision.py)
        path, model_id = model_path(model_cfg)
        trust = bool(getattr(model_cfg, "trust_remote_code", False))
        log.info("loading %s (%s) on %s", model_id, choice.name, device)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=choice.torch_dtype, trust_remote_code=trust)
        if choice.warning:
            c = model.config
            shape = (32, int(c.hidden_size), int(getattr(c, "intermediate_size", 4 * c.hidden_size)))
            log.warning("%s; %s", choice.warning, slowdown_note(choice.torch_dtype, *shape))  # the one warning
        tokenizer = load_tokenizer(path)
        return cls(
            model.to(device),
            tokenizer,
            steer_layer=model_cfg.steer_layer,
            batch_size=int(getattr(model_cfg, "batch_size", ModelConfig.batch_size)),
            model_id=model_id,
            device=device,
            seed=seed,
        )

    def close(self) -> None:
        self._hook.remove()
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ prompts

    # encode_messages / encode_chat: ChatEncoding

    # ------------------------------------------------------------------ the layer-ℓ hook

    @contextmanager
    def steering(self, ctx: _HookContext) -> Iterator[_HookContext]:
        """The layer-ℓ hook adds ``ctx.steer`` and records ``ctx.captured`` during this block's
        forward passes (a batch's forward), and nothing outside it."""
        self._hook_ctx = ctx
        try:
            yield ctx
        finally:
            self._hook_ctx = None

    def _steer_hook(self, module, args, output):
        ctx = self._hook_ctx
        if ctx is None:
            return None
        hs = output[0] if isinstance(output, tuple) else output
        ctx.captured = hs[:, -1, :].clone()  # before this row's steering is added
        if ctx.steer is None:
            return None  # no row steered: leave the output untouched (bit-identical)
        hs = hs + ctx.steer[:, None, :]
        return (hs,) + tuple(output[1:]) if isinstance(output, tuple) else hs

    # ------------------------------------------------------------------ decoding

    def start(
        self,
        prompts: Sequence[Sequence[int]],
        segment_delimiter: str | None = None,
        seed: int | None = None,
        prompt_seeds: Sequence[int] | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] = (),
    ) -> HFDecodeBatch:
        """Prefill `prompts` (one row each, handles 0..len-1) and return the decode batch.

        Row i samples from a generator seeded derive_seed(prompt_seeds[i], 0), else
        derive_seed(derive_seed(seed, i), 0) (seed defaults to the engine seed), which is what
        ``generate`` uses for sample 0 of a prompt."""
        if prompt_seeds is None:
            base = self.seed if seed is None else seed
            prompt_seeds = [derive_seed(base, i) for i in range(len(prompts))]
        if len(prompt_seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_seeds)} prompt_seeds")
        seeds = [derive_seed(s, 0) for s in prompt_seeds]
        return HFDecodeBatch(self, prompts, seeds, segment_delimiter, max_new_tokens, stop)

    def generate(
        self,
        prompts: Sequence[list[int]],
        spec: SamplingSpec,
        prompt_seeds: Sequence[int] | None = None,
        segment_delimiter: str | None = None,
        on_control_point: Callable[[HFDecodeBatch, int], None] | None = None,
    ) -> list[list[Sample]]:
        """spec.n samples per prompt. Prompts are prefilled once; the n samples are KV forks.

        `on_control_point(batch, row)` is called after every step at which a row completed a
        `segment_delimiter` occurrence (it may set_steer the row, fork, finish, ...)."""
        if on_control_point is not None and not segment_delimiter:
            raise ValueError("on_control_point needs segment_delimiter")
        base = self.seed if spec.seed is None else spec.seed
        pseeds = list(prompt_seeds) if prompt_seeds is not None else [derive_seed(base, i) for i in range(len(prompts))]
        if len(pseeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(pseeds)} prompt_seeds")
        empty = spec.empty(prompts)
        if empty is not None:
            return empty
        results: list[list[Sample]] = [[] for _ in prompts]
        # greedy samples are all equal: decode one and copy it (unless a callback may steer)
        n_decode = spec.decoded if on_control_point is None else spec.n
        per_chunk = max(1, self.batch_size // n_decode)
        for lo in range(0, len(prompts), per_chunk):
            idx = list(range(lo, min(lo + per_chunk, len(prompts))))
            samples = self._generate_chunk(
                [prompts[i] for i in idx], [pseeds[i] for i in idx], spec, n_decode, segment_delimiter, on_control_point
            )
            for i, s in zip(idx, samples):
                results[i] = spec.fill(s)
        return results

    def _generate_chunk(self, prompts, pseeds, spec, n, segment_delimiter, on_control_point):
        batch = self.start(
            prompts,
            segment_delimiter=segment_delimiter,
            prompt_seeds=pseeds,
            max_new_tokens=spec.max_new_tokens,
            stop=spec.stop,
        )
        rows: list[list[int]] = []
        for h, s in zip(list(batch.active_rows()), pseeds):
            rows.append([h] + batch.fork(h, n - 1, seeds=[derive_seed(s, j) for j in range(1, n)]))
        while batch.active_rows():
            batch.step(spec.temperature, spec.top_p)
            if on_control_point is not None:
                for r in batch.active_rows():
                    if batch.at_control_point(r):
                        on_control_point(batch, r)
        return [[self.to_sample(batch, r, spec.stop) for r in rs] for rs in rows]

    def to_sample(self, batch: HFDecodeBatch, row: int, stop: Sequence[str]) -> Sample:
        tokens = list(batch.tokens(row))
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s and s in text]
        if cuts:
            text = text[: min(cuts)]
        return Sample(
            token_ids=tokens,
            text=text,
            logprobs=list(batch.logprobs(row)),
            finish_reason=batch.finish_reason(row) or FINISH_LENGTH,
            num_prompt_tokens=batch.prompt_len(row),
        )

    # ------------------------------------------------------------------ teacher-forced passes

    def _chunks(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """Index groups of similar length whose padded size stays under _TOKENS_PER_FORWARD."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        groups, cur = [], []
        for i in order:
            longest = len(sequences[i])  # sorted: the new one is the longest
            if cur and (len(cur) + 1) * longest > _TOKENS_PER_FORWARD or len(cur) >= max(self.batch_size, 1) * 4:
                groups.append(cur)
                cur = []
            cur.append(i)
        if cur:
            groups.append(cur)
        return groups

    def _padded(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, mask and positions (0..len-1 on real tokens)."""
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
        pos = torch.arange(T).expand(len(seqs), T)
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    def hidden_states(self, sequences: Sequence[list[int]], layer: int | None = None) -> list[torch.Tensor]:
        """Teacher-forced layer output (unsteered): float32 CPU [len, hidden] per sequence.
        The forward stops after `layer` (the later layers are not needed)."""
        layer = self.steer_layer if layer is None else int(layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.num_layers - 1}]")
        out: list[torch.Tensor | None] = [None] * len(sequences)
        captured: list[torch.Tensor] = []

        def capture(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        for group in self._chunks(sequences):
            seqs = [sequences[i] for i in group]
            if max(len(s) for s in seqs) == 0:
                for i in group:
                    out[i] = torch.zeros((0, self.hidden_size))
                continue
            ids, mask, pos = self._padded(seqs)
            handle = self.layers[layer].register_forward_hook(capture)
            captured.clear()
            try:
                with torch.inference_mode():
                    self.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            except _StopForward:
                pass
            finally:
                handle.remove()
            hs = captured[0].float().cpu()
            for k, i in enumerate(group):
                out[i] = hs[k, : len(sequences[i])].clone()
        return out  # type: ignore[return-value]

    def prompt_logprobs(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t), t = 1..len-1, teacher-forced and unsteered."""
        out: list[list[float]] = [[] for _ in sequences]
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        for group in self._chunks(sequences):
            seqs = [sequences[i] for i in group]
            if max(len(s) for s in seqs) < 2:
                continue
            ids, mask, pos = self._padded(seqs)
            with torch.inference_mode():
                final = self.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
                hs = final.last_hidden_state
                for k, i in enumerate(group):
                    n = len(sequences[i])
                    if n < 2:
                        continue
                    targets = ids[k, 1:n]
                    vals = []
                    for lo in range(0, n - 1, _LOGIT_CHUNK):
                        hi = min(lo + _LOGIT_CHUNK, n - 1)
                        logits = head(hs[k, lo:hi]).float()
                        if softcap:
                            logits = torch.tanh(logits / softcap) * softcap
                        lp = torch.log_softmax(logits, dim=-1).gather(1, targets[lo:hi, None]).squeeze(1)
                        vals.append(lp)
                    out[i] = torch.cat(vals).tolist()
        return out
