"""Policies: what a deployment wants, per risk category of a public taxonomy. People write them; they are short
and not tied to a model. A detector pack (``pack.py``) says how one model does it; ``compile.py`` joins the two.

A root policy::

    schema_version: 2
    name: default
    version: "2.0.0"
    taxonomy: {name: AIR-Bench, version: "2024"}   # category ids are this taxonomy's, at this version
    mode: enforce                                   # or monitor: decide and report, never act
    defaults: {response: refuse, sensitivity: standard, message: "I can't help with that."}
    categories:                                     # every category it enforces, by taxonomy slug
      criminal_activities: {}
      self_harm: {response: block, message: "If you are struggling, please reach out to a local helpline."}

A regional policy holds only its differences::

    schema_version: 2
    name: eu
    version: "2.0.0"
    extends: default                 # a shipped policy's name, or a path relative to this file
    categories:
      privacy: {sensitivity: strict, note: "GDPR art. 9 special categories"}

Per category: ``response`` (``refuse`` steers toward refusal with SAE features, ``redirect`` adds a SafeSteer-style
dense vector, ``block`` replies with the category's ``message`` without generating, ``monitor`` decides and
reports only, ``off``), ``sensitivity`` (``relaxed``, ``standard``, ``strict``: operating points the pack
calibrated) or ``max_false_positive_rate``, ``message``, ``note``. An expert may give explicit ``detect`` and
``steer`` blocks (the version-1 schema), which then need no pack.

Version-1 files (``schema_version: 1``: a list of categories, each with explicit ``detect`` and ``steer``) keep
loading: they are read as a version-2 policy whose every category is explicit. Unknown keys are refused
everywhere, numbers must be finite, and errors name the file and the field path.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import PolicyError
from ._files import contained_path, read_yaml, stat_key

__all__ = [
    "AddAction",
    "CategoryRule",
    "ClampAction",
    "Defaults",
    "Detect",
    "Policy",
    "SteerAction",
    "Taxonomy",
    "VectorAction",
    "shipped_policies",
]

SCHEMA_VERSION = 2
SLUG = r"^[a-z0-9][a-z0-9_\-]*$"
DEFAULT_MESSAGE = "I can't help with that."
MAX_POLICY_BYTES = 256 * 1024
_MAX_EXTENDS = 8
Positions = Literal["prompt", "generated", "both"]
Response = Literal["refuse", "redirect", "block", "monitor", "off"]
Sensitivity = Literal["relaxed", "standard", "strict"]


class Strict(BaseModel):
    """Every mapping a person or a tool writes: unknown keys refused, frozen, finite numbers only."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Taxonomy(Strict):
    """The public taxonomy category ids come from; codes are only meaningful with its version."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)


class Detect(Strict):
    """How a category's score is computed from SAE feature activations over the user's tokens."""

    layer: int = Field(ge=0)
    features: list[int] = Field(min_length=1)
    weights: list[float] | None = None
    """Per-feature weights; with ``combine: sum`` the score is a weighted sum."""
    combine: Literal["max", "sum", "mean"] = "max"
    reduce: Literal["max", "mean"] = "max"
    order: Literal["combine_first", "reduce_first"] = "combine_first"
    """``combine_first``: each token gets a score (the features combined), then the scores are reduced over the
    user's tokens. ``reduce_first``: each feature is reduced over the user's tokens, then the features are
    combined: the form of a linear probe on pooled activations (``safeguard select`` writes it with
    ``reduce: max``). With ``reduce: mean`` and ``combine: sum`` or ``mean`` the two orders agree."""
    turns: Annotated[Literal["last", "all"], Field(exclude_if=lambda v: v == "all")] = "all"
    """Which user tokens are read: ``all`` (every user message of the conversation) or ``last`` (only the last user
    message's tokens, read in context: the model has seen the earlier turns). For a single-turn prompt they are the
    same. ``all`` is left out of the dump, so files written before this field existed keep their hash."""
    last_weights: Annotated[list[float] | None, Field(exclude_if=lambda v: v is None)] = None
    """Optional, with ``combine: sum`` and ``order: reduce_first``: a second weight per feature for its activation at the
    last token the category reads (the last position of its user-token mask, ``turns`` deciding which), added to the
    pooled score: ``sum_i weights[i] * reduce(f_i) + sum_i last_weights[i] * f_i(last)``, the form of one probe on pooled
    and last-token features (``safeguard select`` writes it). Left out of the dump when unset, so older files keep their
    hash. A pack category with it cannot watch the reply (a reply has no last user token)."""
    window: Annotated[int | None, Field(ge=1, exclude_if=lambda v: v is None)] = None
    """Optional: read only the last ``window`` of the tokens ``turns`` chooses (the end of the message, where a
    jailbreak template puts the request it wraps; ``safeguard select --window`` writes it). A message of at most
    ``window`` tokens is read whole, so its score is unchanged. Left out of the dump when unset, so older files keep
    their hash."""
    threshold: float

    @field_validator("features")
    @classmethod
    def _ids(cls, v: list[int]) -> list[int]:
        if any(f < 0 for f in v):
            raise ValueError("feature ids are non-negative integers")
        if len(set(v)) != len(v):
            raise ValueError("feature ids must be distinct")
        return v

    @model_validator(mode="after")
    def _weights(self) -> Detect:
        if self.weights is not None:
            if len(self.weights) != len(self.features):
                raise ValueError(f"weights has {len(self.weights)} entries but features has {len(self.features)}")
            if self.combine != "sum":
                raise ValueError("weights are only used with combine: sum")
        if self.last_weights is not None:
            if self.weights is None or self.combine != "sum" or self.order != "reduce_first":
                raise ValueError("last_weights needs weights, combine: sum and order: reduce_first (one probe on pooled and last-token features)")
            if len(self.last_weights) != len(self.features):
                raise ValueError(f"last_weights has {len(self.last_weights)} entries but features has {len(self.features)}")
        return self


class _Action(Strict):
    layer: int = Field(ge=0)
    positions: Positions = "both"
    """Where steering applies: the prompt's tokens (during prefill), generated tokens, or both."""


class AddAction(_Action):
    """Add a feature's decoder direction, scaled to unit norm, times ``strength`` (residual-stream units)."""

    kind: Literal["add"]
    feature: int = Field(ge=0)
    strength: float


class ClampAction(_Action):
    """Set a feature's activation to ``value``: adds ``(value - f(h)) * W_dec[feature]`` (0 ablates it)."""

    kind: Literal["clamp"]
    feature: int = Field(ge=0)
    value: float


class VectorAction(_Action):
    """Add a dense steering vector (SafeSteer-style), read from a safetensors file in the folder of the file
    that names it, times ``strength``. The vector is used as stored."""

    kind: Literal["vector"]
    file: str = Field(min_length=1)
    key: str
    strength: float


SteerAction = Annotated[AddAction | ClampAction | VectorAction, Field(discriminator="kind")]


class Defaults(Strict):
    """What a category gets unless it says otherwise."""

    response: Response = "refuse"
    sensitivity: Sensitivity = "standard"
    message: str = Field(default=DEFAULT_MESSAGE, min_length=1)
    """The reply of a ``block`` category without a message of its own."""
    watch_reply: Annotated[bool, Field(exclude_if=lambda v: v is True)] = True
    """Also score the reply while it is generated, for the categories whose pack gives a ``reply`` threshold (a
    category that fires in the reply gets its response from the next token on). ``false`` decides at the prompt only."""
    opener: bool = True
    """Whether ``refuse`` categories start the reply with the pack's refusal opener (when the pack gives one)."""


class CategoryRule(Strict):
    """One category's entry in a policy. Unset fields come from ``defaults`` (and from the policy extended)."""

    response: Response | None = None
    sensitivity: Sensitivity | None = None
    max_false_positive_rate: float | None = Field(default=None, ge=0, le=1)
    """Instead of a named sensitivity: the pack's operating point with at most this false-positive rate."""
    message: str | None = Field(default=None, min_length=1)
    opener: bool | None = None
    """``refuse`` only: ``false`` turns the pack's refusal opener off for this category (default: ``defaults.opener``)."""
    note: str | None = None
    """Why: free text for reviewers, never interpreted."""
    watch_reply: Annotated[bool | None, Field(exclude_if=lambda v: v is None)] = None
    """This category's reply detection on or off (unset: ``defaults.watch_reply``); needs the pack's ``reply`` threshold."""
    label: str | None = None
    taxonomy_code: str | None = None
    detect: Detect | None = None
    """Expert override: this detector instead of the pack's (its threshold replaces the sensitivity)."""
    steer: list[SteerAction] | None = None
    """Expert override: these actions instead of the pack's refusal actions or redirect vector."""
    base_dir: Annotated[str | None, Field(exclude=True)] = None
    """Folder that ``steer``'s vector files resolve against (that of the file that gave ``steer``)."""

    @model_validator(mode="after")
    def _one_threshold(self) -> CategoryRule:
        if self.sensitivity is not None and self.max_false_positive_rate is not None:
            raise ValueError("give sensitivity or max_false_positive_rate, not both")
        if self.detect is not None and (self.sensitivity is not None or self.max_false_positive_rate is not None):
            raise ValueError("an explicit detect block carries its own threshold; drop sensitivity / max_false_positive_rate")
        return self


class Policy(Strict):
    """A validated, resolved policy (its ``extends`` chain merged). Build it with ``Policy.load`` (a shipped name,
    a path, or a Policy), ``Policy.from_file`` or ``Policy.from_dict``."""

    schema_version: Literal[2] = SCHEMA_VERSION
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    description: str = ""
    extends: str | None = None
    """The policy this one was written as a difference from (already merged in)."""
    taxonomy: Taxonomy
    mode: Literal["enforce", "monitor"] = "enforce"
    defaults: Defaults = Field(default_factory=Defaults)
    shadow: list[str] = Field(default_factory=list)
    """Policies (shipped names or paths) whose detectors are scored on every request and reported, never acted on."""
    categories: dict[str, CategoryRule] = Field(min_length=1)
    model: str | None = None
    """For explicit ``detect``/``steer`` blocks: the model whose SAE feature ids they name (checked at load)."""
    sae: str | None = None
    """For explicit blocks: the SAE release their feature ids index."""
    provenance: dict[str, Any] = Field(default_factory=dict)
    """How the policy was made: recorded, never interpreted."""
    base_dir: Annotated[str | None, Field(exclude=True)] = None
    chain: Annotated[tuple[tuple[str, str], ...], Field(exclude=True)] = ()
    """(file, SHA-256 of its bytes) for the file and every file it extends, leaf first."""

    @field_validator("categories")
    @classmethod
    def _slugs(cls, v: dict[str, CategoryRule]) -> dict[str, CategoryRule]:
        return check_slugs(v)

    @model_validator(mode="after")
    def _explicit(self) -> Policy:
        if any(r.detect is not None or r.steer for r in self.categories.values()) and (self.model is None or self.sae is None):
            raise ValueError("explicit detect/steer blocks name SAE features: set the policy's 'model' and 'sae' fields")
        for slug, r in self.categories.items():
            for a in r.steer or ():
                if isinstance(a, VectorAction):
                    contained_path(r.base_dir or self.base_dir or ".", a.file, where=f"categories.{slug}.steer")
        return self

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, policy: Policy | str | Path) -> Policy:
        """A Policy as it is, a shipped policy by name (``"eu"``), or a policy file (cached by path, size and mtime)."""
        if isinstance(policy, Policy):
            return policy
        if not isinstance(policy, (str, Path)):
            raise PolicyError(f"a policy is a Policy, a shipped policy's name ({', '.join(shipped_policies()) or 'none ship'}) or a file path, "
                              f"not {type(policy).__name__}")
        return cls.from_file(_locate(str(policy)) if is_shipped_name(policy) else policy)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Read, merge (``extends``) and validate a policy file; a ``PolicyError`` names the file and the field."""
        p = Path(path).expanduser()
        key = stat_key(p)
        with _lock:
            hit = _cache.get(key) if key else None
            if hit is not None and all(stat_key(Path(f)) == k for f, k in hit[1]):
                return hit[0]
        merged, chain = _merged(p, depth=0, seen=())
        source = str(p) if len(chain) == 1 else f"{p} (merged with {', '.join(f for f, _ in chain[1:])})"
        out = cls.from_dict(merged, source=source, base_dir=str(p.resolve().parent), chain=tuple(chain))
        if key:
            with _lock:
                _cache[key] = (out, [(f, stat_key(Path(f))) for f, _ in chain])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>", base_dir: str | None = None, chain: tuple[tuple[str, str], ...] = ()) -> Policy:
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: a policy is a mapping, not {type(data).__name__}")
        if _is_v1(data):
            data = _from_v1(data, source)
        if data.get("extends") is not None and not chain:
            raise PolicyError(f"{source}: 'extends' is resolved when loading a file; use Policy.from_file or Policy.load")
        data = {**data, "categories": _with_base(data.get("categories"), base_dir)}
        try:
            return cls.model_validate({**data, "base_dir": base_dir, "chain": chain})
        except ValidationError as exc:
            raise PolicyError(describe_validation(exc, source, "policy")) from None

    def with_defaults(self, name: str, **defaults: Any) -> Policy:
        """This policy under another ``name`` with some of its ``defaults`` replaced, validated like any policy: a
        variant to measure beside it, e.g. ``policy.with_defaults("default-no-reply", watch_reply=False)``."""
        data = {**self.model_dump(mode="json"), "name": name, "defaults": {**self.defaults.model_dump(mode="json"), **defaults}}
        return Policy.from_dict(data, source=f"{self.name} with defaults {defaults}", base_dir=self.base_dir, chain=self.chain)

    def to_yaml(self) -> str:
        import yaml

        body = self.model_dump(mode="json", exclude_defaults=True)
        return yaml.safe_dump({"schema_version": self.schema_version, **body}, sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.to_yaml(), encoding="utf-8")
        return p

    # ---------------------------------------------------------------------------------------- identity
    @cached_property
    def content_hash(self) -> str:
        """SHA-256 of the resolved policy, of every file in its ``extends`` chain and of the vector files its
        explicit blocks use. (The pack and the SAE weights join it when it is compiled for a model.)"""
        body = self.model_dump(mode="json")
        if body["defaults"]["opener"] is True:  # policies that leave openers as they are hash as before the field existed
            del body["defaults"]["opener"]
        for rule in body["categories"].values():
            if rule.get("opener") is None:
                rule.pop("opener", None)
        h = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
        for _, digest in self.chain:
            h.update(digest.encode())
        for slug, r in sorted(self.categories.items()):
            for a in r.steer or ():
                if isinstance(a, VectorAction):
                    path = self.vector_path(slug, a)
                    h.update(path.read_bytes() if path.is_file() else b"<missing>")
        return h.hexdigest()

    @property
    def short_hash(self) -> str:
        return self.content_hash[:12]

    def vector_path(self, category: str, action: VectorAction) -> Path:
        r = self.categories[category]
        return contained_path(r.base_dir or self.base_dir or ".", action.file, where=f"policy {self.name!r}: categories.{category}.steer")

    def rule(self, category: str) -> CategoryRule:
        if category not in self.categories:
            raise PolicyError(f"policy {self.name!r} has no category {category!r}; it has {sorted(self.categories)}")
        return self.categories[category]

    def response_of(self, category: str) -> str:
        return self.rule(category).response or self.defaults.response

    def sensitivity_of(self, category: str) -> str | float:
        """A level name, or the rule's own max_false_positive_rate; ``explicit`` for an explicit detect block."""
        r = self.rule(category)
        if r.detect is not None:
            return "explicit"
        if r.max_false_positive_rate is not None:
            return r.max_false_positive_rate
        return r.sensitivity or self.defaults.sensitivity

    def opener_of(self, category: str) -> bool:
        """Whether this category's refusals may start with the pack's opener."""
        r = self.rule(category)
        return self.defaults.opener if r.opener is None else r.opener

    def message_of(self, category: str) -> str:
        return self.rule(category).message or self.defaults.message

    def watches_reply(self, category: str) -> bool:
        r = self.rule(category)
        return r.watch_reply if r.watch_reply is not None else self.defaults.watch_reply

    @property
    def enforced(self) -> list[str]:
        """Category ids whose response is not ``off``."""
        return [c for c in self.categories if self.response_of(c) != "off"]

    def __repr__(self) -> str:
        ext = f", extends={self.extends!r}" if self.extends else ""
        return f"Policy(name={self.name!r}, version={self.version!r}{ext}, mode={self.mode!r}, categories={len(self.categories)}, hash={self.short_hash})"


def check_slugs(categories: dict[str, Any]) -> dict[str, Any]:
    """Category ids are taxonomy slugs; a mapping with any other key is refused (a pydantic validator's body)."""
    bad = [k for k in categories if not re.match(SLUG, k)]
    if bad:
        raise ValueError(f"category ids must be taxonomy slugs (lower case, digits, '_' or '-'): {[_key(k) for k in bad]}")
    return categories


# --------------------------------------------------------------------------------------------- files
_cache: dict[tuple[str, int, int], tuple[Policy, list[tuple[str, Any]]]] = {}
_lock = threading.Lock()
_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


def is_shipped_name(text: Any) -> bool:
    """A string that names a shipped policy rather than a path (``"eu"``, not ``"eu.yaml"`` or ``"./eu"``)."""
    return isinstance(text, str) and bool(_NAME.match(text)) and not Path(text).exists()


def shipped_dir() -> Path:
    """Where the shipped policies live (the package ``safeguard.policies``; ``policies/`` in a source tree)."""
    try:
        found = Path(str(resources.files("safeguard.policies")))
        if found.is_dir() and any(found.glob("*.yaml")):
            return found
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "policies"


def shipped_policies() -> list[str]:
    """Names of the policies that ship with safeguard (``Policy.load("eu")``)."""
    return sorted(p.stem for p in shipped_dir().glob("*.yaml"))


def _locate(name: str) -> Path:
    path = shipped_dir() / f"{name}.yaml"
    if not path.is_file():
        raise PolicyError(f"no shipped policy is named {name!r}; shipped: {shipped_policies()}; or pass a path to a policy file")
    return path


_TOP = {"schema_version", "name", "version", "description", "extends", "taxonomy", "mode", "defaults", "shadow", "categories", "model", "sae", "provenance"}


def _merged(p: Path, *, depth: int, seen: tuple[str, ...]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The file's mapping merged over the policy it extends, and the chain of (file, sha256) leaf first."""
    data, raw = read_yaml(p, what="policy", max_bytes=MAX_POLICY_BYTES)
    if not isinstance(data, dict):
        raise PolicyError(f"{p}: a policy file holds a mapping with keys name, version, taxonomy, categories, ... (got {type(data).__name__})")
    if _is_v1(data):
        return _from_v1(data, str(p)), [(str(p), hashlib.sha256(raw).hexdigest())]
    unknown = sorted(str(k) for k in data if k not in _TOP)
    if unknown:
        raise PolicyError(f"{p}: unknown field(s) {[_key(k) for k in unknown]} (check their spelling; valid: {sorted(_TOP)})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise PolicyError(f"{p}: schema_version is {data.get('schema_version')!r}; this safeguard reads 2 (and 1, explicit policies)")
    cats = data.get("categories")
    if cats is not None and not isinstance(cats, dict):
        raise PolicyError(f"{p}: categories is a mapping of taxonomy slug to its settings (got {type(cats).__name__})")
    data = {**data, "categories": _with_base(cats, str(p.resolve().parent))}
    chain = [(str(p), hashlib.sha256(raw).hexdigest())]
    parent = data.get("extends")
    if parent is None:
        return data, chain
    if not isinstance(parent, str) or not parent:
        raise PolicyError(f"{p}: extends names a shipped policy or a path relative to this file")
    if depth >= _MAX_EXTENDS:
        raise PolicyError(f"{p}: extends chain is longer than {_MAX_EXTENDS} files")
    if _NAME.match(parent) and not (p.parent / parent).is_file():
        try:
            parent_path = _locate(parent)
        except PolicyError as exc:
            raise PolicyError(f"{p}: extends: {exc}") from None
    else:
        parent_path = contained_path(p.parent, parent, where=f"{p}: extends")
    if str(parent_path.resolve()) in seen or parent_path.resolve() == p.resolve():
        raise PolicyError(f"{p}: extends {parent!r} forms a cycle")
    base, base_chain = _merged(parent_path, depth=depth + 1, seen=(*seen, str(p.resolve())))
    if "taxonomy" in data and base.get("taxonomy") is not None and data["taxonomy"] != base["taxonomy"]:
        raise PolicyError(f"{p}: taxonomy {data['taxonomy']} differs from that of {parent!r} ({base['taxonomy']}); category ids are not "
                          "comparable across taxonomies")
    merged: dict[str, Any] = {k: v for k, v in base.items() if k not in ("name", "version", "description", "provenance", "shadow")}
    merged["description"] = base.get("description", "")
    for k, v in data.items():
        if k == "defaults" and isinstance(v, dict) and isinstance(base.get("defaults"), dict):
            merged[k] = {**base["defaults"], **v}
        elif k == "categories":
            out = dict(base.get("categories") or {})
            for slug, rule in (v or {}).items():
                if isinstance(rule, dict) and isinstance(out.get(slug), dict):
                    r = {**out[slug], **rule}
                    if "sensitivity" in rule:  # a child's named level replaces the parent's explicit rate, and back
                        r.pop("max_false_positive_rate", None) if "max_false_positive_rate" not in rule else None
                    if "max_false_positive_rate" in rule and "sensitivity" not in rule:
                        r.pop("sensitivity", None)
                    out[slug] = r
                else:
                    out[slug] = rule
            merged[k] = out
        else:
            merged[k] = v
    return merged, chain + base_chain


def _with_base(cats: Any, base_dir: str | None) -> Any:
    """Record, in each rule that gives ``steer``, the folder its vector files resolve against."""
    if not isinstance(cats, dict):
        return cats
    out = {}
    for slug, rule in cats.items():
        if isinstance(rule, dict) and "base_dir" in rule and not isinstance(rule.get("steer"), list):
            raise PolicyError(f"categories.{slug}.base_dir: unknown field (check its spelling; unknown keys are refused)")
        if isinstance(rule, dict) and rule.get("steer") and "base_dir" not in rule and base_dir is not None:
            rule = {**rule, "base_dir": base_dir}
        out[slug] = rule
    return out


def _is_v1(data: dict[str, Any]) -> bool:
    return data.get("schema_version") == 1 or ("schema_version" not in data and isinstance(data.get("categories"), list))


def _from_v1(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A version-1 policy (explicit detect/steer per category, as a list) in the version-2 shape."""
    cats = data.get("categories")
    if not isinstance(cats, list):
        raise PolicyError(f"{source}: a version-1 policy's categories is a list (got {type(cats).__name__})")
    out: dict[str, Any] = {}
    allowed = {"id", "label", "taxonomy_code", "response", "detect", "steer", "enabled"}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or "id" not in c:
            raise PolicyError(f"{source}: categories[{i}] needs an 'id'")
        extra = sorted(str(k) for k in c if k not in allowed)
        if extra:
            raise PolicyError(f"{source}: categories[{i}].{extra[0]}: unknown field (check its spelling; unknown keys are refused)")
        cid = c["id"]
        if not isinstance(cid, str) or cid in out:
            raise PolicyError(f"{source}: categories[{i}].id {cid!r} must be a string that appears once")
        if "detect" not in c:
            raise PolicyError(f"{source}: categories[{i}].detect: field required")
        rule = {k: v for k, v in c.items() if k not in ("id", "enabled")}
        rule.setdefault("steer", [])
        if c.get("enabled", True) is False:
            rule["response"] = "off"
        out[cid] = rule
    if not out:
        raise PolicyError(f"{source}: categories: at least one category is needed")
    top = {k: v for k, v in data.items() if k != "categories"}
    return {**top, "schema_version": SCHEMA_VERSION, "categories": out}


def describe_validation(exc: ValidationError, source: str, what: str) -> str:
    """A pydantic error as lines of ``field.path: what was wrong`` (never the offending values)."""
    lines = [f"{source}: invalid {what} ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''})"]
    for err in exc.errors():
        path = _loc(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling; unknown keys are refused)"
        elif err["type"] == "missing":
            msg = "field required"
        elif err["type"] == "finite_number":
            msg = "must be a finite number (NaN and infinity are refused)"
        elif "expected" in err.get("ctx", {}) and err["type"] != "literal_error":
            msg = f"{msg} (valid: {err['ctx']['expected']})"
        lines.append(f"  - {path}: {msg}")
    return "\n".join(lines)


_KEY = re.compile(r"^[A-Za-z_][\w\-]{0,63}$")


def _key(part: Any) -> str:
    """A key as it may appear in an error: a field-like name, else a placeholder (never file contents)."""
    return str(part) if _KEY.match(str(part)) else "<a key that is not a field name>"


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("add", "clamp", "vector"):  # the discriminated union's branch name
            continue
        else:
            out += f".{_key(part)}" if out else _key(part)
    return out or "<root>"
