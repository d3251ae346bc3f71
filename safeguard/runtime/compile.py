"""Policy x pack -> what the engine runs: per category a detector with a threshold, a response and its actions.

``resolve(policy, pack)`` needs no model: ``safeguard policy show`` and ``check`` use it. ``SteeredLLM`` then
turns the result into tensors for its SAEs (``steering.CompiledPolicy``), adding the SAE weights' identity to the
hash every report carries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ..errors import PolicyError
from .names import same_model
from .pack import Pack
from .policy import Detect, Policy, SteerAction, VectorAction

__all__ = ["ResolvedCategory", "ResolvedPolicy", "resolve"]


@dataclass(frozen=True)
class ResolvedCategory:
    """One enforced category as the engine sees it."""

    id: str
    label: str
    response: str
    """``refuse``, ``redirect``, ``block`` or ``monitor`` (``off`` categories are dropped)."""
    detect: Detect
    steer: tuple[Any, ...]
    """``(action, folder its vector file resolves against or None)`` pairs."""
    sensitivity: str
    """``relaxed`` / ``standard`` / ``strict``, ``max_fpr=R``, or ``explicit``."""
    message: str | None = None
    """The reply of a ``block`` category."""
    fpr: float | None = None
    """False-positive rate the pack measured at this threshold (validation benign prompts)."""
    recall: float | None = None
    note: str | None = None
    reply_threshold: float | None = None
    """Set when the category also watches the reply as it is generated (the pack's ``reply`` threshold, the policy's
    ``watch_reply`` on); ``None``: decided at the prompt only."""
    opener: str | None = None
    """The text forced as the start of this category's refusals (the pack's ``refusal.opener``, unless the policy
    turns it off); ``None`` for other responses and for explicit ``steer`` blocks."""
    opener_ends: bool = False
    """The reply ends with the opener (the pack's ``refusal.after_opener: end``)."""

    @property
    def threshold(self) -> float:
        return self.detect.threshold


@dataclass(frozen=True)
class ResolvedPolicy:
    policy: Policy
    pack: Pack | None
    categories: tuple[ResolvedCategory, ...]
    model: str | None
    """The model the feature ids index (the pack's, or the policy's own for explicit blocks)."""
    sae: str | None

    @property
    def hash(self) -> str:
        """The policy's hash (extends chain and explicit vector files) joined with the pack's (pack and vectors)."""
        h = hashlib.sha256(self.policy.content_hash.encode())
        h.update((self.pack.content_hash if self.pack else "no-pack").encode())
        return h.hexdigest()

    @property
    def mode(self) -> str:
        return self.policy.mode

    def category(self, cid: str) -> ResolvedCategory:
        for c in self.categories:
            if c.id == cid:
                return c
        raise KeyError(cid)


def resolve(policy: Policy, pack: Pack | None) -> ResolvedPolicy:
    """Join a policy with a pack. Raises ``PolicyError`` naming the category and what is missing."""
    where = f"policy {policy.name!r}"
    if pack is not None and (pack.taxonomy.name, pack.taxonomy.version) != (policy.taxonomy.name, policy.taxonomy.version):
        raise PolicyError(f"{where} uses taxonomy {policy.taxonomy.name} {policy.taxonomy.version}, but pack {pack.id!r} was made for "
                          f"{pack.taxonomy.name} {pack.taxonomy.version}; category ids are not comparable across taxonomy versions")
    if pack is not None and policy.model is not None and not same_model(policy.model, pack.model):
        raise PolicyError(f"{where}: field 'model' is {policy.model!r}, but pack {pack.id!r} is for {pack.model!r}")
    out: list[ResolvedCategory] = []
    for cid, rule in policy.categories.items():
        response = rule.response or policy.defaults.response
        if response == "off":
            continue
        pc = pack.categories.get(cid) if pack is not None else None
        explicit_detect = rule.detect is not None
        if not explicit_detect and pc is None:
            have = sorted(pack.categories) if pack is not None else []
            raise PolicyError(f"{where}: categories.{cid}: " + (f"pack {pack.id!r} has no detector for it; it has {have}" if pack is not None else
                              "no detector pack is loaded for this model, and the category gives no explicit detect block"))
        fpr = recall = None
        if explicit_detect:
            detect, sens = rule.detect, "explicit"
        else:
            sensitivity = policy.sensitivity_of(cid)
            if isinstance(sensitivity, float):
                point = pc.threshold_for(sensitivity, where=f"{where}: categories.{cid}")
                sens = f"max_fpr={sensitivity:g}"
            else:
                point = pc.levels[sensitivity]
                sens = sensitivity
            detect = Detect(**{**pc.detect.model_dump(), "threshold": point.threshold})
            fpr, recall = point.fpr, point.recall
        steer: list[tuple[SteerAction, str | None]] = []
        if rule.steer is not None:
            steer = [(a, rule.base_dir or policy.base_dir) for a in rule.steer]
        elif response == "refuse":
            if pack is None:
                raise PolicyError(f"{where}: categories.{cid} refuses, but no pack is loaded and it gives no explicit steer block")
            steer = [(a, pack.base_dir if isinstance(a, VectorAction) else None) for a in pack.refusal.steer]
        elif response == "redirect":
            if pack is None or pack.redirect is None:
                raise PolicyError(f"{where}: categories.{cid} redirects, but " + (f"pack {pack.id!r} ships no redirect vectors" if pack is not None
                                  else "no pack is loaded") + "; use response: refuse or block, or give an explicit steer block")
            r = pack.redirect
            steer = [(VectorAction(kind="vector", layer=r.layer, file=r.file, key=cid, strength=r.strength, positions=r.positions), pack.base_dir)]
        for i, (a, _) in enumerate(steer):
            if a.positions != "generated" and a.layer < detect.layer:
                raise PolicyError(f"{where}: categories.{cid}.steer[{i}] acts on prompt positions at layer {a.layer}, before detection at layer "
                                  f"{detect.layer} has decided; use positions: generated or a layer >= {detect.layer}")
        label = rule.label or (pc.label if pc is not None else cid.replace("_", " ").capitalize())
        reply = pc.reply.threshold if pc is not None and pc.reply is not None and not explicit_detect and policy.watches_reply(cid) else None
        opener = pack.refusal.opener if pack is not None and response == "refuse" and rule.steer is None and policy.opener_of(cid) else None
        out.append(ResolvedCategory(cid, label, response, detect, tuple(steer) if response in ("refuse", "redirect") else (), sens,
                                    policy.message_of(cid) if response == "block" else None, fpr, recall, rule.note, reply_threshold=reply,
                                    opener=opener, opener_ends=opener is not None and pack.refusal.after_opener == "end"))
    explicit = any(r.detect is not None or r.steer is not None for r in policy.categories.values())
    if explicit and pack is not None and policy.sae is not None and policy.sae != pack.sae:
        raise PolicyError(f"{where}: field 'sae' is {policy.sae!r}, but pack {pack.id!r} indexes {pack.sae!r}")
    if pack is not None:
        return ResolvedPolicy(policy, pack, tuple(out), pack.model, pack.sae)
    return ResolvedPolicy(policy, None, tuple(out), policy.model, policy.sae)

