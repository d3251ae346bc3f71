"""What every call returns besides its text: which policy decided, what fired, what was applied, how long."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .steering import Decision, RunState, _action

__all__ = ["AppliedSteering", "Decision", "GenerationResult", "ShadowReport", "SteeringReport"]


@dataclass(frozen=True)
class AppliedSteering:
    """One steering action that was applied to a request."""

    category: str
    kind: str
    """``add`` (decoder direction), ``clamp`` (feature activation) or ``vector`` (dense vector)."""
    layer: int
    positions: str
    feature: int | None = None
    strength: float | None = None
    value: float | None = None
    vector: str | None = None
    """For ``vector``: ``file#key``."""
    from_token: int | None = None
    """For a category that fired in the reply: the first generated token (index from 0) steered; ``positions`` is
    then ``generated``."""


@dataclass(frozen=True)
class ShadowReport:
    """What a shadow policy would have done on a request: scored from the same activations, never acted on."""

    policy_name: str
    policy_version: str
    policy_hash: str
    decisions: tuple[Decision, ...] = ()
    action: str = "none"
    """What it would have done: ``block``, ``refuse``, ``redirect``, ``monitor`` or ``none``."""

    @property
    def fired(self) -> tuple[str, ...]:
        return tuple(d.category for d in self.decisions if d.fired)


@dataclass(frozen=True)
class SteeringReport:
    """The truth about one request: the policy and pack that decided, every category's verdict, what was done."""

    policy_name: str | None
    policy_version: str | None
    policy_hash: str | None
    """Covers every byte that changes behaviour: the policy and its extends chain, the pack, vector files, SAE weights."""
    mode: str
    """``enforce``, ``monitor`` (decided, never acted) or ``off`` (steer=False or no policy)."""
    decisions: tuple[Decision, ...] = ()
    applied: tuple[AppliedSteering, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: ``total`` for the call, ``detect`` spent scoring categories (shared by a batch's rows)."""
    pack_id: str | None = None
    pack_hash: str | None = None
    action: str = "none"
    """``block`` (answered with ``message``, nothing generated), ``refuse``, ``redirect``, ``monitor`` (fired, not
    acted on) or ``none``."""
    message: str | None = None
    """The block message, when ``action == "block"``."""
    shadow: tuple[ShadowReport, ...] = ()
    opener: bool = False
    """Whether the reply was started with the pack's refusal opener (forced tokens; ``runtime/openers.py``)."""

    @property
    def fired(self) -> tuple[str, ...]:
        """Ids of the categories that fired."""
        return tuple(d.category for d in self.decisions if d.fired)

    @property
    def steered(self) -> bool:
        return bool(self.applied)

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    def scores(self) -> dict[str, float]:
        return {d.category: d.score for d in self.decisions}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fired"] = list(self.fired)
        for sh, d in zip(self.shadow, out["shadow"], strict=True):
            d["fired"] = list(sh.fired)
        return out

    @classmethod
    def off(cls, total: float = 0.0) -> SteeringReport:
        return cls(None, None, None, "off", timings={"total": total})

    @classmethod
    def from_run(cls, run: RunState, row: int, total: float) -> SteeringReport:
        shadows = tuple(
            ShadowReport(sp.policy.name, sp.policy.version, sp.hash, _decisions(sp, decided), _action(sp, decided, would=True))
            for sp in (run.shadows[row] if run.shadows is not None else ())
            for decided in [run.shadow_decisions[row].get(id(sp), {})]
        )
        p = run.policies[row]
        if p is None:
            return cls(None, None, None, "off", timings={"total": total}, shadow=shadows)
        applied: list[AppliedSteering] = []
        for category, a in run.applied_actions(row):  # exactly what the engine applies
            s = a.spec
            d = run.decisions[row][category]
            where = {"positions": "generated", "from_token": (d.token or 0) + 1} if d.where == "reply" else {"positions": s.positions}
            if s.kind == "add":
                applied.append(AppliedSteering(category, "add", s.layer, feature=s.feature, strength=s.strength, **where))
            elif s.kind == "clamp":
                applied.append(AppliedSteering(category, "clamp", s.layer, feature=s.feature, value=s.value, **where))
            else:
                applied.append(AppliedSteering(category, "vector", s.layer, strength=s.strength, vector=f"{s.file}#{s.key}", **where))
        blocked = run.blocked(row)
        return cls(
            policy_name=p.policy.name,
            policy_version=p.policy.version,
            policy_hash=p.hash,
            mode=p.mode,
            decisions=_decisions(p, run.decisions[row]),
            applied=tuple(applied),
            timings={"total": total, "detect": run.detect_seconds},
            pack_id=p.pack.id if p.pack else None,
            pack_hash=p.pack.content_hash if p.pack else None,
            action=run.action(row),
            message=blocked.message if blocked is not None else None,
            shadow=shadows,
        )


def _decisions(p: Any, decided: dict[str, Decision]) -> tuple[Decision, ...]:
    return tuple(decided[c.id] for c in p.categories if c.id in decided)


@dataclass(frozen=True)
class GenerationResult:
    """A reply and its report."""

    text: str
    report: SteeringReport
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    """``stop`` (end of turn or a stop string), ``length`` (max_new_tokens reached), ``time`` (``max_time`` ran out
    first) or ``content_filter`` (a ``block`` category fired: ``text`` is its message; nothing was generated when it
    fired at the prompt, ``completion_tokens`` tokens up to the firing one when it fired in the reply)."""

    def __str__(self) -> str:
        return self.text
