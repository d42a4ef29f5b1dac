"""Online strategies: what the policy does at a control point, one registered class per variant.

:class:`~esm_steer.esm.online.OnlinePolicy` owns the decode loop (control points, probes, the
budget); a strategy answers the two questions that tell the variants apart:

- ``retrieve``: where a control point's candidate tools come from (the memory, or the
  library's top-Q tools);
- ``act``: what happens to them: return ``[null, tool_1, ..., tool_L]`` to be probed, or steer
  (or not) at once and return None.

``esm`` is the full method, ``no_memory`` and ``no_probing`` its ablations, ``static`` the
one-vector baseline (docs/method.md, "Online"). A new variant is one subclass registered under
its name; ``eval.methods`` / ``eval.ablations`` list it, and ``online=<name>`` (its
``conf/online/<name>.yaml``) makes it the method ``esm`` runs as. An installed package adds
strategies through the ``esm_steer.strategies`` entry-point group: its module is imported the
first time a name is not found, so ``esm-eval eval.methods=[greedy,<name>]`` finds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import ClassVar

from esm_steer.config import ConfigError
from esm_steer.esm.policy import STATIC_MEAN, candidates_of, score, static_vector
from esm_steer.esm.retrieve import GATE_NO_TOOLS, GATE_OK, Retrieval
from esm_steer.registry import registrar

STRATEGIES: dict[str, type[Strategy]] = {}
ENTRY_POINTS = "esm_steer.strategies"  # installed packages' strategy modules (pyproject entry points)


# class decorator: register an online strategy under ``name`` (a method name of eval)
register_strategy = registrar(STRATEGIES, "online strategy", "name")


def strategy_class(name: str, key: str = "online.variant") -> type[Strategy]:
    """The strategy registered under ``name``; one line naming ``key`` and the options if none."""
    if name not in STRATEGIES:
        for ep in entry_points(group=ENTRY_POINTS):
            ep.load()  # the module registers its classes
    if name not in STRATEGIES:
        raise ConfigError(f"{key}: unknown online strategy {name!r} (registered: {', '.join(STRATEGIES)})")
    return STRATEGIES[name]


def own_keys(exclude: Sequence[str] = ()) -> set[str]:
    """online.* keys owned by the registered strategies not named in ``exclude``."""
    return {k for name, cls in STRATEGIES.items() if name not in exclude for k in cls.own_keys}


class Strategy:
    """The full method's behaviour; a variant overrides what differs.

    Args:
        policy: the :class:`~esm_steer.esm.online.OnlinePolicy` that calls it (its ``cfg`` is
            the online config, ``library``/``memory`` the artifacts).
    """

    name: ClassVar[str] = ""
    # keys of online.* that only this strategy reads (a record of another method ignores them)
    own_keys: ClassVar[tuple[str, ...]] = ()
    uses_memory: ClassVar[bool] = True  # retrieves from the memory (its null anchors included)

    def __init__(self, policy) -> None:
        self.policy = policy

    def retrieve(self, batch, examples) -> list[Retrieval]:
        """One memory search for every example at a control point."""
        return self.policy.search_memory(batch, examples)

    def act(self, batch, ex, step: dict, ret: Retrieval) -> list[dict] | None:
        """The candidates to probe, or None after a gate sent the row to null."""
        cfg = self.policy.cfg
        tools = ret.tools[: cfg.L]
        if ret.gate != GATE_OK or not tools:
            step["gate"] = ret.gate if ret.gate != GATE_OK else GATE_NO_TOOLS
            batch.set_steer(ex.row, None)  # null for this segment
            return None
        return candidates_of(tools, ret.null_A_hat if cfg.null_score == "anchors" else 0.0)


@register_strategy("esm")
class ESM(Strategy):
    """Retrieve, probe the L best tools and null, steer with the best (docs/method.md)."""


@register_strategy("no_memory")
class NoMemory(Strategy):
    """Ablation: the candidates are always the library's L highest-Q tools (Â = Q), no retrieval."""

    uses_memory = False

    def retrieve(self, batch, examples) -> list[Retrieval]:
        return self.policy.top_by_q(examples)


@register_strategy("no_probing")
class NoProbing(Strategy):
    """Ablation: Score = beta·Â, chosen without decoding a probe."""

    def act(self, batch, ex, step: dict, ret: Retrieval) -> list[dict] | None:
        candidates = super().act(batch, ex, step, ret)
        if candidates is not None:
            score(candidates, self.policy.cfg.beta, self.policy.cfg.rho)
            self.policy.choose(batch, ex, step, candidates, ex.row)
        return None


@register_strategy("static")
class Static(Strategy):
    """Baseline: the same k_scale·v at every control point (online.static_vector), no retrieval
    and no probe."""

    own_keys = ("static_vector",)
    uses_memory = False

    def __init__(self, policy) -> None:
        super().__init__(policy)
        self.tool, mean = static_vector(policy.library, policy.cfg.static_vector)
        if mean is not None:
            policy.add_vector(STATIC_MEAN, mean)

    def retrieve(self, batch, examples) -> list[Retrieval]:
        return self.policy.top_by_q(examples)  # only its gate is used: an empty library steers nothing

    def act(self, batch, ex, step: dict, ret: Retrieval) -> None:
        p = self.policy
        if self.tool is None:
            step["gate"] = GATE_NO_TOOLS
            batch.set_steer(ex.row, None)
            return None
        scale = float(p.cfg.k_scale)
        vec = p.vector(self.tool)
        step["chosen"] = self.tool
        step["scale"] = scale
        step["inject_norm"] = float((vec * scale).norm()) if scale != 0.0 else 0.0
        p.inject(batch, ex.row, vec if scale != 0.0 else None, scale)
        return None
