"""The transformers backend: its own batched decode loop over one KV cache.

Why not ``model.generate``: the online ESM policy needs step-level control -- a steering
vector per row that can change between steps, layer ℓ's hidden state at the last token of
every step (no extra forward), KV-cache forks for probes and n continuations of one prefix,
and control points detected on decoded text. :class:`HFDecodeBatch` provides these;
:meth:`HFEngine.generate` is a thin loop on top of it.

Layout of a batch: rows are left-padded into one ``DynamicCache`` of common length T, with a
2D attention mask [B, T] (0 on padding and on steps a row sat out) and a per-row next
position (positions count real tokens only, as ``generate`` does). Rows are stable integer
handles mapped to their current batch index; fork and drop are ``index_select`` on the batch
dimension of every cache tensor.

Steering and hidden-state capture share one forward hook on decoder layer ℓ, registered once
per engine (``prepend=True`` so that transformers' own output recording sees the steered
output). Outside a batch forward the hook does nothing, so teacher-forced passes are plain.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from esm_steer.engine.base import FINISH_LENGTH, FINISH_STOP, ChatEncoding, EngineInfo, Sample, SamplingSpec
from esm_steer.esm.segments import SegmentTracker

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tokens of teacher-forced passes per forward (rows x padded length): bounds activation memory.
_TOKENS_PER_FORWARD = 16384
# Positions per lm_head call in prompt_logprobs: bounds the [positions, vocab] logits buffer.
_LOGIT_CHUNK = 1024


def mix_seed(*parts: int | None) -> int:
    """One 63-bit seed from a tuple of ints (e.g. (prompt seed, sample index)).

    Independent streams per tuple; None counts as 0 and negative values wrap."""
    ints = [0 if p is None else int(p) % 2**64 for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1, np.uint64)[0] >> np.uint64(1))


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of a causal LM (Llama, Qwen, Mistral, ... all use model.model.layers)."""
    base = getattr(model, "model", None)
    if base is not None and hasattr(base, "layers"):
        return base.layers
    dec = model.get_decoder()
    if hasattr(dec, "layers"):
        return dec.layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def eos_ids(tokenizer, model) -> set[int]:
    """EOS of the tokenizer plus every EOS of the model's generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(t) for t in extra)
    return ids


class _StopForward(Exception):
    """Raised by a capture hook to skip the layers after the one we need."""


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Temperature + nucleus sampling by inverse CDF, one uniform draw per row from the row's
    own generator (so a row's draws do not depend on its batch neighbours). logits: [b, V] float32."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass before it is below top_p (the first token is always kept)
        cut_sorted = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.masked_fill(torch.zeros_like(cut_sorted).scatter(1, order, cut_sorted), 0.0)
    # the CDF runs in vocabulary order, not sorted order: near-ties that swap places under
    # tiny numeric noise (other batch neighbours, padding) then do not change the draw
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:].contiguous()
    u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators])
    u = u.to(cdf.dtype)[:, None] * total
    idx = torch.searchsorted(cdf, u, right=True)
    # u * total can round up to total: cap at the last token that carries mass
    idx = torch.minimum(idx, torch.searchsorted(cdf, total, right=False)).squeeze(1)
    return idx


@dataclass
class _Row:
    """Python-side state of one row (the tensors live in the batch, at the row's index)."""

    prompt_len: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    steer: torch.Tensor | None = None  # [hidden], model dtype and device
    tracker: SegmentTracker | None = None
    text: str = ""  # decoded pieces, kept only when stop strings are checked
    at_control_point: bool = False
    finish_reason: str | None = None
    final_hidden: torch.Tensor | None = None  # last_hidden kept when the row leaves the tensors

    def clone(self, generator: torch.Generator) -> _Row:
        return _Row(
            prompt_len=self.prompt_len,
            generator=generator,
            tokens=list(self.tokens),
            logprobs=list(self.logprobs),
            steer=self.steer,  # never modified in place
            tracker=self.tracker.copy() if self.tracker is not None else None,
            text=self.text,
            at_control_point=self.at_control_point,
        )


class _HookContext:
    """What the layer-ℓ hook reads (steering) and writes (captured hidden) during one forward."""

    def __init__(self, steer: torch.Tensor | None):
        self.steer = steer  # [B, hidden] or None (no row steered: skip the add)
        self.captured: torch.Tensor | None = None  # [B, hidden], pre-steering, last position


class HFDecodeBatch:
    """Rows decoding together over one KV cache (implements ``base.DecodeBatch``).

    Additions to the protocol: ``step(rows=..., force=...)`` (step a subset; force given
    tokens), ``fork(..., seeds=...)``, ``at_control_point``, ``num_control_points``,
    ``text``, ``prompt_len``, ``last_logits``, ``refresh``; ``max_new_tokens`` and ``stop``
    given to ``start`` finish rows inside ``step`` before their last token is forwarded.
    """

    def __init__(
        self,
        engine: HFEngine,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        segment_delimiter: str | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] = (),
    ):
        if not prompts:
            raise ValueError("start() needs at least one prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("start() got an empty prompt")
        self.engine = engine
        self.device = engine.device
        self.segment_delimiter = segment_delimiter
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self._rows: dict[int, _Row] = {}
        self._order: list[int] = []  # handles in batch order: handle self._order[i] is at index i
        self._index: dict[int, int] = {}
        self._next_handle = 0
        self._steer_mat: torch.Tensor | None = None
        self._steer_dirty = False
        for p, s in zip(prompts, seeds):
            self._add_row(
                _Row(
                    prompt_len=len(p),
                    generator=self._new_generator(s),
                    tracker=SegmentTracker(segment_delimiter) if segment_delimiter else None,
                )
            )
        with torch.inference_mode():
            self._prefill(prompts)

    # ------------------------------------------------------------------ bookkeeping

    def _new_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(int(seed))
        return g

    def _add_row(self, row: _Row) -> int:
        h = self._next_handle
        self._next_handle += 1
        self._rows[h] = row
        self._index[h] = len(self._order)
        self._order.append(h)
        return h

    def _reindex(self) -> None:
        self._index = {h: i for i, h in enumerate(self._order)}

    def _row(self, row: int) -> _Row:
        try:
            return self._rows[row]
        except KeyError:
            raise KeyError(f"unknown or dropped row {row}") from None

    def _live_index(self, row: int) -> int:
        if row not in self._index:
            state = self._row(row)
            raise ValueError(f"row {row} is finished ({state.finish_reason}) and has left the batch")
        return self._index[row]

    def _steer_matrix(self) -> torch.Tensor | None:
        """[B, hidden] steering of the rows in batch order; None when no row is steered."""
        if self._steer_dirty:
            vecs = [self._rows[h].steer for h in self._order]
            if all(v is None for v in vecs):
                self._steer_mat = None
            else:
                zero = torch.zeros(self.engine.hidden_size, dtype=self.engine.dtype, device=self.device)
                self._steer_mat = torch.stack([zero if v is None else v for v in vecs])
            self._steer_dirty = False
        return self._steer_mat

    # ------------------------------------------------------------------ forward passes

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Run the rows' new tokens through the model; update logits and captured hidden."""
        ctx = _HookContext(self._steer_matrix())
        self.engine._hook_ctx = ctx
        try:
            out = self.engine.model(
                input_ids=input_ids,
                attention_mask=self._mask,
                position_ids=position_ids,
                **{self.engine.cache_kwarg: self._cache},
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            self.engine._hook_ctx = None
        self._new_logits = out.logits[:, -1, :].float()
        self._new_hidden = ctx.captured

    def _prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        from transformers import DynamicCache

        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, T), self.engine.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, T - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self._mask = mask
        self._cache = DynamicCache(config=self.engine.model.config)
        # positions count real tokens only (as transformers' generate does for left padding)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self._pos = mask.sum(-1)  # [B] position of each row's next token
        self._forward(ids, positions)
        self._logits, self._hidden = self._new_logits, self._new_hidden

    def _select(self, index: torch.Tensor) -> None:
        """Keep batch entries `index` (may repeat: forks) of every tensor, cache included."""
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        self._pos = self._pos.index_select(0, index)
        self._logits = self._logits.index_select(0, index)
        self._hidden = self._hidden.index_select(0, index)
        self._steer_dirty = True

    def _trim_left(self) -> None:
        """Cut cache columns that are padding for every remaining row (after long rows left)."""
        first = int(self._mask.argmax(-1).min())
        if first == 0:
            return
        layers = getattr(self._cache, "layers", [])
        if not all(type(layer).__name__ == "DynamicLayer" for layer in layers):
            return  # sliding/static layers keep their own geometry
        for layer in layers:
            if layer.is_initialized:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]
        self._mask = self._mask[:, first:]

    def _remove(self, rows: Sequence[int]) -> None:
        """Take rows out of the tensors (their Python state stays readable)."""
        gone = {r for r in rows if r in self._index}
        if not gone:
            return
        for r in gone:
            self._rows[r].final_hidden = self._hidden[self._index[r]].float().cpu()
        keep = [i for i, h in enumerate(self._order) if h not in gone]
        self._order = [self._order[i] for i in keep]
        self._reindex()
        if not self._order:
            self._cache = None
            return
        self._select(torch.tensor(keep, dtype=torch.long, device=self.device))
        self._trim_left()

    # ------------------------------------------------------------------ protocol

    def active_rows(self) -> list[int]:
        return sorted(self._order)  # handles grow with creation

    def tokens(self, row: int) -> list[int]:
        return self._row(row).tokens

    def logprobs(self, row: int) -> list[float]:
        return self._row(row).logprobs

    def finish_reason(self, row: int) -> str | None:
        return self._row(row).finish_reason

    def prompt_len(self, row: int) -> int:
        return self._row(row).prompt_len

    def text(self, row: int) -> str:
        """The row's generated text (special tokens skipped)."""
        return self.engine.tokenizer.decode(self._row(row).tokens, skip_special_tokens=True)

    def at_control_point(self, row: int) -> bool:
        """True when the row's last decoded token completed ≥ 1 delimiter occurrence
        (cleared the next time the row decodes a token)."""
        return self._row(row).at_control_point

    def num_control_points(self, row: int) -> int:
        """Delimiter occurrences in the row's generated text so far (control point 0, the end
        of the prompt, not counted)."""
        tracker = self._row(row).tracker
        if tracker is None:
            raise ValueError("num_control_points needs start(segment_delimiter=...)")
        return tracker.count

    def last_hidden(self, row: int) -> torch.Tensor:
        state = self._row(row)
        if row not in self._index:
            return state.final_hidden
        return self._hidden[self._index[row]].float().cpu()

    def last_logits(self, row: int) -> torch.Tensor:
        """Raw (steered) float32 logits the row's next token will be drawn from ([vocab], on device)."""
        return self._logits[self._live_index(row)]

    def set_steer(self, row: int, vector: torch.Tensor | None) -> None:
        self._live_index(row)
        if vector is not None:
            vector = torch.as_tensor(vector).detach().reshape(-1)
            if vector.numel() != self.engine.hidden_size:
                raise ValueError(
                    f"steering vector has {vector.numel()} values, hidden size is {self.engine.hidden_size}"
                )
            vector = vector.to(device=self.device, dtype=self.engine.dtype)
        self._rows[row].steer = vector
        self._steer_dirty = True

    def fork(self, row: int, n: int, seeds: Sequence[int] | None = None) -> list[int]:
        """n exact copies of `row`. With `seeds`, copy k draws from a fresh generator seeded
        seeds[k] (n independent samples); without, it continues the row's RNG state."""
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"fork: {n} rows but {len(seeds)} seeds")
        return self.fork_many({row: n}, None if seeds is None else {row: seeds})[row]

    def fork_many(
        self, requests: dict[int, int], seeds: dict[int, Sequence[int]] | None = None
    ) -> dict[int, list[int]]:
        """Fork several rows at once ({row: n} -> {row: new rows}) with ONE select of the
        cache, instead of one full cache copy per forked row."""
        index = list(range(len(self._order)))
        new: dict[int, list[int]] = {}
        for row, n in requests.items():
            i = self._live_index(row)
            src = self._rows[row]
            row_seeds = (seeds or {}).get(row)
            new[row] = []
            for k in range(max(n, 0)):
                if row_seeds is not None:
                    g = self._new_generator(row_seeds[k])
                else:
                    g = torch.Generator(device=self.device)
                    g.set_state(src.generator.get_state())
                new[row].append(self._add_row(src.clone(g)))
                index.append(i)
        if any(new.values()):
            with torch.inference_mode():
                self._select(torch.tensor(index, dtype=torch.long, device=self.device))
        return new

    def drop(self, rows: Sequence[int]) -> None:
        """Remove rows for good: out of the tensors and forgotten (handles become invalid)."""
        with torch.inference_mode():
            self._remove(list(rows))
        for r in rows:
            self._rows.pop(r, None)

    def finish(self, row: int, reason: str) -> None:
        state = self._row(row)
        if state.finish_reason is None:
            state.finish_reason = reason
        with torch.inference_mode():
            self._remove([row])

    def step(
        self,
        temperature: float = 0.0,
        top_p: float = 1.0,
        rows: Sequence[int] | None = None,
        force: dict[int, int] | None = None,
    ) -> dict[int, int]:
        """Decode one token for every active row (or only `rows`: the others sit this step out,
        unchanged). `force` maps rows to tokens to emit instead of sampling (tests, replays)."""
        with torch.inference_mode():
            return self._step(temperature, top_p, rows, force or {})

    def refresh(self) -> None:
        """Recompute every row's last processed position with the current steering vectors
        (one extra forward), so that a set_steer also changes the NEXT token's distribution
        rather than the one after. Rows whose vector did not change get the same logits."""
        if not self._order:
            return
        with torch.inference_mode():
            last_col = self._mask[:, -1]
            if not bool(last_col.all()):
                raise ValueError("refresh() needs every row to have decoded in the last step")
            self._cache.crop(-1)
            self._mask = self._mask[:, :-1]
            last = torch.tensor(
                [self._rows[h].tokens[-1] if self._rows[h].tokens else -1 for h in self._order],
                device=self.device,
            )
            if bool((last < 0).any()):
                raise ValueError("refresh() after start(): re-start with the steering instead")
            self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
            self._forward(last[:, None], (self._pos - 1)[:, None])
            self._logits, self._hidden = self._new_logits, self._new_hidden

    def _step(self, temperature, top_p, rows, force) -> dict[int, int]:
        if not self._order:
            return {}
        if rows is None:
            stepping = list(range(len(self._order)))
        else:
            stepping = sorted(self._live_index(r) for r in rows)
            if not stepping:
                return {}
        all_rows = len(stepping) == len(self._order)
        sel = None if all_rows else torch.tensor(stepping, dtype=torch.long, device=self.device)
        logits = self._logits if all_rows else self._logits.index_select(0, sel)

        if temperature <= 0.0:
            chosen = logits.argmax(-1)
        else:
            gens = [self._rows[self._order[i]].generator for i in stepping]
            chosen = _sample(logits, temperature, top_p, gens)
        if force:
            for k, i in enumerate(stepping):
                h = self._order[i]
                if h in force:
                    chosen[k] = int(force[h])
        logp = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None]).squeeze(1)
        chosen_list, logp_list = chosen.tolist(), logp.tolist()

        out: dict[int, int] = {}
        finished: list[int] = []
        for k, i in enumerate(stepping):
            h = self._order[i]
            if self._record(self._rows[h], chosen_list[k], logp_list[k]):
                finished.append(h)
            out[h] = chosen_list[k]
        self._remove(finished)
        if not self._order:
            return out

        # forward the new tokens of the rows still active; rows sitting out get a masked pad
        self._forward_new_tokens(out)
        return out

    def _record(self, state: _Row, tok: int, lp: float) -> bool:
        """Append a decoded token to a row; return True if the row finished."""
        state.at_control_point = False
        if tok in self.engine.eos_token_ids:
            state.finish_reason = FINISH_STOP  # EOS is recorded in neither tokens nor text
            return True
        state.tokens.append(tok)
        state.logprobs.append(lp)
        if state.tracker is not None or self.stop:
            piece = self.engine.tokenizer.decode([tok], skip_special_tokens=False)
            if state.tracker is not None:
                state.at_control_point = state.tracker.feed(piece) > 0
            if self.stop:
                start = max(0, len(state.text) - max(len(s) for s in self.stop) + 1)
                state.text += piece
                if any(s in state.text[start:] for s in self.stop):
                    state.finish_reason = FINISH_STOP
                    return True
        if self.max_new_tokens is not None and len(state.tokens) >= self.max_new_tokens:
            state.finish_reason = FINISH_LENGTH
            return True
        return False

    def _forward_new_tokens(self, out: dict[int, int]) -> None:
        B = len(self._order)
        stepped = [h in out for h in self._order]
        ids = torch.tensor(
            [out[h] if h in out else self.engine.pad_id for h in self._order], dtype=torch.long, device=self.device
        )
        col = torch.tensor(stepped, dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, col[:, None]], dim=1)
        self._forward(ids[:, None], self._pos[:, None])
        self._pos = self._pos + col
        if all(stepped):
            self._logits, self._hidden = self._new_logits, self._new_hidden
        else:  # rows that sat out keep their logits and hidden state
            keep = col.bool()[:, None]
            self._logits = torch.where(keep, self._new_logits, self._logits)
            self._hidden = torch.where(keep, self._new_hidden, self._hidden)
        assert self._logits.shape[0] == B


class HFEngine(ChatEncoding):
    """transformers backend (implements ``base.Engine``); CPU or GPU."""

    supports_steering = True

    def __init__(
        self,
        model,
        tokenizer,
        steer_layer: int | None = None,
        batch_size: int = 16,
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
        self.eos_token_ids = eos_ids(tokenizer, model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.info = EngineInfo(
            model_id=model_id or getattr(cfg, "_name_or_path", "") or type(model).__name__,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            steer_layer=self.steer_layer,
            dtype=str(self.dtype).removeprefix("torch."),
            backend="hf",
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
        from transformers import AutoModelForCausalLM

        from esm_steer.engine.loading import load_tokenizer, model_path

        if getattr(model_cfg, "num_threads", None):
            torch.set_num_threads(int(model_cfg.num_threads))
        dtype_name = str(model_cfg.dtype)
        if dtype_name not in DTYPES:
            raise ValueError(f"model.dtype={dtype_name} must be one of {sorted(DTYPES)}")
        device = str(getattr(model_cfg, "device", "auto") or "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        path, model_id = model_path(model_cfg)
        trust = bool(getattr(model_cfg, "trust_remote_code", False))
        log.info("loading %s (%s) on %s", model_id, dtype_name, device)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype_name], trust_remote_code=trust)
        tokenizer = load_tokenizer(path)
        return cls(
            model.to(device),
            tokenizer,
            steer_layer=model_cfg.steer_layer,
            batch_size=int(getattr(model_cfg, "batch_size", 16)),
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

        Row i samples from a generator seeded mix_seed(prompt_seeds[i], 0), else
        mix_seed(mix_seed(seed, i), 0) (seed defaults to the engine seed), which is what
        ``generate`` uses for sample 0 of a prompt."""
        if prompt_seeds is None:
            base = self.seed if seed is None else seed
            prompt_seeds = [mix_seed(base, i) for i in range(len(prompts))]
        if len(prompt_seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_seeds)} prompt_seeds")
        seeds = [mix_seed(s, 0) for s in prompt_seeds]
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
        pseeds = list(prompt_seeds) if prompt_seeds is not None else [mix_seed(base, i) for i in range(len(prompts))]
        if len(pseeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(pseeds)} prompt_seeds")
        results: list[list[Sample]] = [[] for _ in prompts]
        if spec.max_new_tokens <= 0 or spec.n <= 0:
            for i, p in enumerate(prompts):
                results[i] = [Sample([], "", [], FINISH_LENGTH, len(p)) for _ in range(max(spec.n, 0))]
            return results
        # greedy samples are all equal: decode one and copy it (unless a callback may steer)
        n_decode = 1 if spec.greedy and on_control_point is None else spec.n
        per_chunk = max(1, self.batch_size // n_decode)
        for lo in range(0, len(prompts), per_chunk):
            idx = list(range(lo, min(lo + per_chunk, len(prompts))))
            samples = self._generate_chunk(
                [prompts[i] for i in idx], [pseeds[i] for i in idx], spec, n_decode, segment_delimiter, on_control_point
            )
            for i, s in zip(idx, samples):
                results[i] = s if n_decode == spec.n else [_copy_sample(s[0]) for _ in range(spec.n)]
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
            rows.append([h] + batch.fork(h, n - 1, seeds=[mix_seed(s, j) for j in range(1, n)]))
        while batch.active_rows():
            batch.step(spec.temperature, spec.top_p)
            if on_control_point is not None:
                for r in batch.active_rows():
                    if batch.at_control_point(r):
                        on_control_point(batch, r)
        return [[self._to_sample(batch, r, spec.stop) for r in rs] for rs in rows]

    def _to_sample(self, batch: HFDecodeBatch, row: int, stop: Sequence[str]) -> Sample:
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


def _copy_sample(s: Sample) -> Sample:
    return Sample(list(s.token_ids), s.text, list(s.logprobs), s.finish_reason, s.num_prompt_tokens)
