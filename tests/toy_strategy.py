"""A variant registered from outside the package, as a user adds one: one class, one decorator."""

from __future__ import annotations

from esm_steer.esm.strategies import Strategy, register_strategy


@register_strategy("first_retrieved")
class FirstRetrieved(Strategy):
    """Toy: steer with the first retrieved tool at full scale, without probing."""

    def act(self, batch, ex, step, ret):
        candidates = super().act(batch, ex, step, ret)
        if candidates is not None:
            for j, c in enumerate(candidates):
                c["logprob"], c["score"] = None, float(j == 1)
            self.policy.choose(batch, ex, step, candidates, ex.row)
        return None
