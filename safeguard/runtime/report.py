"""What every call returns besides its text: which policy decided, what fired, what was applied, how long."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .steering import Decision, RunState

__all__ = ["AppliedSteering", "Decision", "GenerationResult", "SteeringReport"]


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


@dataclass(frozen=True)
class SteeringReport:
    """The truth about one request: the policy that decided, every category's verdict, the steering applied."""

    policy_name: str | None
    policy_version: str | None
    policy_hash: str | None
    mode: str
    """``enforce``, ``monitor`` (decided, never steered) or ``off`` (steer=False or no policy)."""
    decisions: tuple[Decision, ...] = ()
    applied: tuple[AppliedSteering, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: ``total`` for the call, ``detect`` spent scoring categories (shared by a batch's rows)."""

    @property
    def fired(self) -> tuple[str, ...]:
        """Ids of the categories that fired."""
        return tuple(d.category for d in self.decisions if d.fired)

    @property
    def steered(self) -> bool:
        return bool(self.applied)

    def scores(self) -> dict[str, float]:
        return {d.category: d.score for d in self.decisions}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fired"] = list(self.fired)
        return out

    @classmethod
    def off(cls, total: float = 0.0) -> SteeringReport:
        return cls(None, None, None, "off", timings={"total": total})

    @classmethod
    def from_run(cls, run: RunState, row: int, total: float) -> SteeringReport:
        p = run.policies[row]
        if p is None:
            return cls.off(total)
        decisions = tuple(run.decisions[row][c.id] for c in p.categories if c.id in run.decisions[row])
        applied: list[AppliedSteering] = []
        for category, a in run.applied_actions(row):  # exactly what the engine applies
            s = a.spec
            if s.kind == "add":
                applied.append(AppliedSteering(category, "add", s.layer, s.positions, feature=s.feature, strength=s.strength))
            elif s.kind == "clamp":
                applied.append(AppliedSteering(category, "clamp", s.layer, s.positions, feature=s.feature, value=s.value))
            else:
                applied.append(AppliedSteering(category, "vector", s.layer, s.positions, strength=s.strength, vector=f"{s.file}#{s.key}"))
        return cls(
            policy_name=p.policy.name,
            policy_version=p.policy.version,
            policy_hash=p.hash,
            mode=p.policy.mode,
            decisions=decisions,
            applied=tuple(applied),
            timings={"total": total, "detect": run.detect_seconds},
        )


@dataclass(frozen=True)
class GenerationResult:
    """A reply and its report."""

    text: str
    report: SteeringReport
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    """``stop`` (end of turn or a stop string), ``length`` (max_new_tokens reached) or ``time`` (``max_time`` ran out first)."""

    def __str__(self) -> str:
        return self.text
