"""Python-side state of a decode batch: one :class:`_Row` per row, and the :class:`_HookContext`
that the engine's layer-ℓ hook shares with one forward of the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esm_steer.engine.rows import RowState


@dataclass
class _Row(RowState):
    """Python-side state of one row (the tensors live in the batch, at the row's index)."""

    generator: torch.Generator | None = None
    steer: torch.Tensor | None = None  # [hidden], model dtype and device
    final_hidden: torch.Tensor | None = None  # last_hidden kept when the row leaves the tensors
    # set_impulse: added at the last token's position only, whose forward the next step redoes
    impulse: torch.Tensor | None = None
    last_steer: torch.Tensor | None = None  # the steering the row's last token was forwarded with
    last_prompt_token: int = 0  # the token an impulse at the end of the prompt re-forwards

    def clone(self, generator: torch.Generator) -> _Row:
        return _Row(
            prompt_len=self.prompt_len,
            generator=generator,
            tokens=list(self.tokens),
            logprobs=list(self.logprobs),
            steer=self.steer,  # never modified in place
            impulse=self.impulse,
            last_steer=self.last_steer,
            last_prompt_token=self.last_prompt_token,
            tracker=self.tracker.copy() if self.tracker is not None else None,
            text=self.text,
            at_control_point=self.at_control_point,
        )


class _HookContext:
    """What the layer-ℓ hook reads (steering) and writes (captured hidden) during one forward."""

    def __init__(self, steer: torch.Tensor | None):
        self.steer = steer  # [B, hidden] or None (no row steered: skip the add)
        self.captured: torch.Tensor | None = None  # [B, hidden], pre-steering, last position
