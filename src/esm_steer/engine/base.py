"""The backend-independent interface every stage calls.

A stage asks an :class:`Engine` for samples, hidden states or prompt logprobs and never
knows which backend runs. Steered decoding (the online ESM policy, KV-cache forking)
needs step-level control and lives on the HF backend's :class:`DecodeBatch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

FINISH_STOP = "stop"  # EOS or a stop string
FINISH_LENGTH = "length"  # max_new_tokens reached


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

    def close(self) -> None:
        """Free the model (GPU memory, vLLM workers)."""


@runtime_checkable
class DecodeBatch(Protocol):
    """Rows decoding together over one KV cache, step by step (HF backend).

    Created by ``engine.start(prompts)`` which prefills the prompts (left padding). Row ids
    are stable integer handles: they survive forks and drops of other rows. Used by the
    online ESM policy (control points, probes, per-row steering) and by ``generate``.
    """

    def active_rows(self) -> list[int]:
        """Rows still decoding, in creation order."""

    def step(self, temperature: float = 0.0, top_p: float = 1.0) -> dict[int, int]:
        """Decode one token for every active row (each with its own steering vector).
        Returns {row: token_id}. A row that emits EOS is marked finished (reason "stop")
        and leaves active_rows(); its EOS token is recorded in neither tokens nor text."""

    def tokens(self, row: int) -> list[int]:
        """Generated token ids of the row so far (prompt excluded)."""

    def logprobs(self, row: int) -> list[float]:
        """log p of each generated token, under the distribution it was decoded from
        (after the row's steering; before temperature/top_p)."""

    def last_hidden(self, row: int) -> torch.Tensor:
        """Layer-ℓ residual output at the row's last processed token, BEFORE the row's own
        steering vector is added (float32 CPU [hidden]). Free: captured during the step."""

    def set_steer(self, row: int, vector: torch.Tensor | None) -> None:
        """Vector added to layer ℓ's output at every position this row decodes from now on
        (None: no steering; such a row is bit-identical to an unhooked model)."""

    def fork(self, row: int, n: int) -> list[int]:
        """n new rows that are exact copies of `row` (KV cache, tokens, logprobs, steering).
        The prefix is not re-encoded. The original row stays active."""

    def drop(self, rows: Sequence[int]) -> None:
        """Remove rows (their cache is freed); finished rows may be dropped too."""

    def finish(self, row: int, reason: str) -> None:
        """Mark a row finished by the caller (e.g. budget reached: FINISH_LENGTH)."""

    def finish_reason(self, row: int) -> str | None:
        """None while the row is active."""
