"""The backend-independent interface every stage calls.

A stage asks an :class:`Engine` for samples, hidden states or prompt logprobs and never
knows which backend runs. Steered decoding (the online ESM policy of docs/method.md) runs
on a :class:`DecodeBatch` from ``engine.start``: the HF backend's own loop over one KV cache,
or vLLM requests that share their prefix through prefix caching.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

FINISH_STOP = "stop"  # EOS or a stop string
FINISH_LENGTH = "length"  # max_new_tokens reached

VLLM_MISSING = "model.backend=vllm needs vLLM: make install-vllm (CPU) or pip install vllm (GPU)"


@dataclass(frozen=True)
class SamplingSpec:
    """How to decode. temperature == 0 means greedy (then top_p and seed are ignored)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def decoded(self) -> int:
        """Sequences to decode per prompt: greedy samples are all equal, so one, copied."""
        return 1 if self.greedy else self.n

    def empty(self, prompts: Sequence[Sequence[int]]) -> list[list[Sample]] | None:
        """The result of a spec that generates nothing (no tokens or n = 0), else None."""
        if self.max_new_tokens > 0 and self.n > 0:
            return None
        return [[Sample([], "", [], FINISH_LENGTH, len(p)) for _ in range(max(self.n, 0))] for p in prompts]

    def fill(self, samples: list[Sample]) -> list[Sample]:
        """A prompt's decoded samples as the n it asked for (copies of the one greedy sample)."""
        return samples if len(samples) == self.n else [samples[0].copy() for _ in range(self.n)]


@dataclass
class Sample:
    """One generated continuation of one prompt."""

    token_ids: list[int]
    text: str
    logprobs: list[float]  # log p of each generated token under the (possibly steered) model
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH
    num_prompt_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def copy(self) -> Sample:
        return Sample(list(self.token_ids), self.text, list(self.logprobs), self.finish_reason, self.num_prompt_tokens)


@dataclass
class EngineInfo:
    """What artifacts record so that a later stage can refuse another model or layer."""

    model_id: str
    num_layers: int
    hidden_size: int
    steer_layer: int
    dtype: str
    backend: str
    extra: dict = field(default_factory=dict)


def chat_prompt_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of chat messages through the tokenizer's chat template.

    Rendered to text first (in transformers 5 ``tokenize=True`` returns a dict), then encoded
    without special tokens, since the template already wrote them.
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_ids(tokenizer, generation_config=None) -> set[int]:
    """Tokens that close the assistant turn: the tokenizer's EOS, the chat turn markers it
    knows, and every EOS of the model's generation config (where generation stops)."""
    ids: set[int] = set()
    for tok in (getattr(tokenizer, "eos_token", None), "<|im_end|>", "<|eot_id|>", "<|end_of_turn|>"):
        if tok:
            i = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(i, int) and i != getattr(tokenizer, "unk_token_id", None):
                ids.add(i)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    extra = getattr(generation_config, "eos_token_id", None)
    ids.update([extra] if isinstance(extra, int) else [int(t) for t in extra or ()])
    return ids


class ChatEncoding:
    """``encode_messages`` / ``encode_chat`` for an engine with a ``tokenizer``."""

    tokenizer: object

    def encode_messages(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, add_generation_prompt)

    def encode_chat(self, user: str, system: str | None = None) -> list[int]:
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": user})
        return self.encode_messages(messages)


@runtime_checkable
class Engine(Protocol):
    """The small model interface of lm-evaluation-harness, for this package's needs."""

    info: EngineInfo
    tokenizer: object  # a transformers tokenizer (chat template, decode)
    supports_steering: bool  # True when ``start`` gives a steerable DecodeBatch (the online policy)

    def encode_chat(self, user: str, system: str | None = None) -> list[int]:
        """Prompt token ids: the chat template applied with add_generation_prompt=True."""

    def generate(
        self,
        prompts: Sequence[list[int]],
        spec: SamplingSpec,
        prompt_seeds: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """spec.n samples for each prompt (token ids). Result[i] holds prompt i's samples.

        Sampling randomness: sample j of prompt i draws from its own generator seeded with
        (prompt_seeds[i], j) when given, else (spec.seed, i, j), so a prompt's samples do not
        depend on which other prompts share its batch (resumable stages rely on this; the
        vLLM backend can only seed the engine and documents the difference)."""

    def hidden_states(self, sequences: Sequence[list[int]], layer: int | None = None) -> list[torch.Tensor]:
        """Teacher-forced residual-stream output of decoder layer `layer` (default: steer
        layer) for every token: one float32 CPU tensor [len(seq), hidden] per sequence."""

    def prompt_logprobs(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t = 1..len-1 of each sequence (teacher-forced)."""

    def start(
        self, prompts: Sequence[list[int]], segment_delimiter: str | None = None, max_new_tokens: int | None = None
    ) -> DecodeBatch:
        """A steerable :class:`DecodeBatch` of the prompts, one row per prompt in order (only
        where ``supports_steering``). Rows finish at ``max_new_tokens`` generated tokens;
        ``segment_delimiter`` turns on ``at_control_point``."""

    def close(self) -> None:
        """Free the model (GPU memory, vLLM workers)."""


@runtime_checkable
class DecodeBatch(Protocol):
    """Rows decoding together, step by step, each with its own steering (docs/method.md, "Online").

    Created by ``engine.start(prompts)``. Row ids are stable integer handles: they survive
    forks and drops of other rows. A step decodes at least one token per stepping row and
    stops each row at its next event: EOS, ``max_new_tokens``, a token that completes the
    segment delimiter, or the row's ``max_tokens`` limit. The HF batch decodes exactly one
    token per step; the vLLM batch runs each row to its next event in one request. A policy
    that re-checks the events after every step is therefore the same on both.
    """

    def active_rows(self) -> list[int]:
        """Rows still decoding, in creation order."""

    def step(
        self,
        temperature: float = 0.0,
        top_p: float = 1.0,
        rows: Sequence[int] | None = None,
        max_tokens: Mapping[int, int] | None = None,
    ) -> dict[int, int]:
        """Decode for every active row (only `rows`: the others sit this step out, unchanged),
        each with its own steering. ``max_tokens[row]`` (>= 1) bounds the tokens a row decodes
        in this step. Returns {row: last token decoded}. A row that emits EOS is marked finished
        (reason "stop") and leaves active_rows(); its EOS token is recorded in neither tokens
        nor text."""

    def tokens(self, row: int) -> list[int]:
        """Generated token ids of the row so far (prompt excluded)."""

    def logprobs(self, row: int) -> list[float]:
        """log p of each generated token, under the distribution it was decoded from
        (after the row's steering; before temperature/top_p)."""

    def at_control_point(self, row: int) -> bool:
        """True when the row's last decoded token completed >= 1 delimiter occurrence
        (``start(segment_delimiter=...)``; cleared when the row decodes again)."""

    def last_hidden(self, row: int) -> torch.Tensor:
        """Layer-ℓ residual output at the row's last token, BEFORE the row's own steering
        vector is added (float32 CPU [hidden]). Steering enters at layer ℓ's output, so this is
        the unsteered model's state on the row's tokens."""

    def set_steer(self, row: int, vector: torch.Tensor | None, scale: float = 1.0) -> None:
        """scale·vector is added to layer ℓ's output at every position this row decodes from
        now on (None: no steering; such a row is bit-identical to an unhooked model)."""

    def set_impulse(self, row: int, vector: torch.Tensor | None, scale: float = 1.0) -> None:
        """scale·vector is added to layer ℓ's output at the row's last token only (the control
        point's position: the end of the prompt, or the last decoded token), on top of whatever
        steered it: that position is computed again before the row's next token is drawn, and
        every later position attends to its steered KV (online.inject=impulse)."""

    def fork(self, row: int, n: int) -> list[int]:
        """n new rows that are exact copies of `row` (tokens, logprobs, steering, KV cache or
        its prefix-cache key). The prefix is not re-encoded. The original row stays active."""

    def fork_many(self, requests: Mapping[int, int]) -> dict[int, list[int]]:
        """``fork`` of several rows at once: {row: n} -> {row: its n new rows}."""

    def drop(self, rows: Sequence[int]) -> None:
        """Remove rows (their cache is freed); finished rows may be dropped too."""

    def finish(self, row: int, reason: str) -> None:
        """Mark a row finished by the caller (e.g. budget reached: FINISH_LENGTH)."""

    def finish_reason(self, row: int) -> str | None:
        """None while the row is active."""
