"""The sampler of the transformers backend: one generator per row, inverse-CDF nucleus draws."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
