"""The decode batch of the transformers backend: rows over one KV cache (layout: ``esm_steer.engine.hf``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import DynamicCache

from esm_steer.engine.hf.sampling import _sample
from esm_steer.engine.hf.state import _HookContext, _Row
from esm_steer.engine.rows import RowAccess, check_prompts, record_token
from esm_steer.engine.segments import SegmentTracker


class HFDecodeBatch(RowAccess):
    """Rows decoding together over one KV cache (implements ``base.DecodeBatch``).

    A step decodes exactly one token per stepping row. Additions to the protocol:
    ``step(force=...)`` (emit given tokens), ``fork(..., seeds=...)``, ``prompt_len``,
    ``last_logits``; ``max_new_tokens`` and ``stop`` given to ``start`` finish rows inside
    ``step`` before their last token is forwarded. ``engine`` is the :class:`HFEngine`.
    """

    def __init__(
        self,
        engine,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        segment_delimiter: str | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] = (),
    ):
        check_prompts(prompts)
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
                    last_prompt_token=int(p[-1]),
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

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, steer: torch.Tensor | None = None) -> None:
        """Run the rows' new tokens through the model; update logits and captured hidden.
        ``steer``: [B, hidden] for this forward instead of the rows' own steering."""
        ctx = _HookContext(self._steer_matrix() if steer is None else steer)
        with self.engine.steering(ctx):
            out = self.engine.model(
                input_ids=input_ids,
                attention_mask=self._mask,
                position_ids=position_ids,
                **{self.engine.cache_kwarg: self._cache},
                use_cache=True,
                logits_to_keep=1,
            )
        self._new_logits = out.logits[:, -1, :].float()
        self._new_hidden = ctx.captured

    def _prefill(self, prompts: Sequence[Sequence[int]]) -> None:
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

    def last_hidden(self, row: int) -> torch.Tensor:
        state = self._row(row)
        if row not in self._index:
            return state.final_hidden
        return self._hidden[self._index[row]].float().cpu()

    def last_logits(self, row: int) -> torch.Tensor:
        """Raw (steered) float32 logits the row's next token will be drawn from ([vocab], on device)."""
        return self._logits[self._live_index(row)]

    def _scaled(self, vector: torch.Tensor, scale: float) -> torch.Tensor:
        vector = torch.as_tensor(vector).detach().reshape(-1).float() * float(scale)
        if vector.numel() != self.engine.hidden_size:
            raise ValueError(f"steering vector has {vector.numel()} values, hidden size is {self.engine.hidden_size}")
        return vector.to(device=self.device, dtype=self.engine.dtype)

    def set_steer(self, row: int, vector: torch.Tensor | None, scale: float = 1.0) -> None:
        self._live_index(row)
        self._rows[row].steer = None if vector is None else self._scaled(vector, scale)
        self._steer_dirty = True

    def set_impulse(self, row: int, vector: torch.Tensor | None, scale: float = 1.0) -> None:
        """scale·vector at the row's last token only: the next step first redoes that token's
        forward with it (its KV and the row's next-token logits change), then samples."""
        self._live_index(row)
        self._rows[row].impulse = None if vector is None else self._scaled(vector, scale)

    def _redo_impulses(self, stepping: list[int]) -> None:
        """Forward again the last token of every stepping row with a pending impulse, the
        impulse added at layer ℓ. The token's old cache column is masked out for that row and a
        new column, at the same position, takes its place (other rows get a masked pad)."""
        hits = [i for i in stepping if self._rows[self._order[i]].impulse is not None]
        if not hits:
            return
        B = len(self._order)
        ids = torch.full((B,), self.engine.pad_id, dtype=torch.long)
        steer = torch.zeros(B, self.engine.hidden_size, dtype=self.engine.dtype, device=self.device)
        col = torch.zeros(B, dtype=torch.long)
        for i in hits:
            state = self._rows[self._order[i]]
            ids[i] = state.tokens[-1] if state.tokens else state.last_prompt_token
            steer[i] = state.impulse if state.last_steer is None else state.impulse + state.last_steer
            col[i] = 1
            state.impulse = None
            last = int(self._mask[i].nonzero().max())
            self._mask[i, last] = 0
        col = col.to(self.device)
        self._mask = torch.cat([self._mask, col[:, None]], dim=1)
        self._forward(ids.to(self.device)[:, None], (self._pos - 1).clamp(min=0)[:, None], steer=steer)
        keep = col.bool()[:, None]
        self._logits = torch.where(keep, self._new_logits, self._logits)
        self._hidden = torch.where(keep, self._new_hidden, self._hidden)

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
        max_tokens: Mapping[int, int] | None = None,
        force: dict[int, int] | None = None,
    ) -> dict[int, int]:
        """Decode one token for every active row (or only `rows`: the others sit this step out,
        unchanged). One token is within every ``max_tokens`` limit (>= 1 by the protocol).
        `force` maps rows to tokens to emit instead of sampling (tests, replays)."""
        if max_tokens and min(max_tokens.values()) < 1:
            raise ValueError(f"step(max_tokens=...) needs limits >= 1, got {dict(max_tokens)}")
        with torch.inference_mode():
            return self._step(temperature, top_p, rows, force or {})

    def _step(self, temperature, top_p, rows, force) -> dict[int, int]:
        if not self._order:
            return {}
        if rows is None:
            stepping = list(range(len(self._order)))
        else:
            stepping = sorted(self._live_index(r) for r in rows)
            if not stepping:
                return {}
        self._redo_impulses(stepping)
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
            state = self._rows[h]
            eos = self.engine.eos_token_ids
            if record_token(
                state, chosen_list[k], logp_list[k], eos, self.engine.tokenizer, self.stop, self.max_new_tokens
            ):
                finished.append(h)
            out[h] = chosen_list[k]
        self._remove(finished)
        if not self._order:
            return out

        # forward the new tokens of the rows still active; rows sitting out get a masked pad
        self._forward_new_tokens(out)
        return out

    def _forward_new_tokens(self, out: dict[int, int]) -> None:
        B = len(self._order)
        stepped = [h in out for h in self._order]
        ids = torch.tensor(
            [out[h] if h in out else self.engine.pad_id for h in self._order], dtype=torch.long, device=self.device
        )
        col = torch.tensor(stepped, dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, col[:, None]], dim=1)
        for h in out:
            self._rows[h].last_steer = self._rows[h].steer
        self._forward(ids[:, None], self._pos[:, None])
        self._pos = self._pos + col
        if all(stepped):
            self._logits, self._hidden = self._new_logits, self._new_hidden
        else:  # rows that sat out keep their logits and hidden state
            keep = col.bool()[:, None]
            self._logits = torch.where(keep, self._new_logits, self._logits)
            self._hidden = torch.where(keep, self._new_hidden, self._hidden)
        assert self._logits.shape[0] == B
