"""Declarative policies: which risk categories fire on a request, and how generation is steered when they do.

A policy file (YAML or JSON) looks like this::

    schema_version: 1
    name: default
    version: "1.0.0"
    taxonomy: {name: AIR-Bench, version: "2024"}
    model: SmolLM2-135M-Instruct          # checked against the loaded model
    sae: smollm2-135m-instruct            # the SAE release its feature ids index
    mode: enforce                         # or monitor: decide and record, never steer
    categories:
      - id: criminal_activities           # stable slug
        taxonomy_code: "l2-criminal"      # the taxonomy's own code (not stable across taxonomy versions)
        label: Criminal activities
        response: refuse                  # or redirect (steer to safe content without refusing)
        detect:
          layer: 10
          features: [812, 3301]
          combine: max                    # over features: max | sum | mean (weights allowed with sum)
          reduce: max                     # over the user's tokens: max | mean
          order: combine_first            # or reduce_first: each feature reduced over tokens, then combined
          threshold: 4.0
        steer:
          - {kind: add, layer: 20, feature: 1290, strength: 6.0, positions: generated}
          - {kind: clamp, layer: 20, feature: 77, value: 0.0, positions: both}
          - {kind: vector, layer: 20, file: vectors.safetensors, key: criminal, strength: 4.0}

Every mapping refuses unknown keys; errors name the file and the field path. ``Policy.content_hash`` is a
SHA-256 over the canonical policy and the bytes of every vector file it references.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import PolicyError

__all__ = [
    "AddAction",
    "Category",
    "ClampAction",
    "Detect",
    "Policy",
    "SteerAction",
    "Taxonomy",
    "VectorAction",
]

SCHEMA_VERSION = 1
Positions = Literal["prompt", "generated", "both"]
_SLUG = r"^[a-z0-9][a-z0-9_\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Taxonomy(_Strict):
    """The public taxonomy category ids come from; codes are only meaningful with its version."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)


class Detect(_Strict):
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
        return self


class _Action(_Strict):
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
    """Add a dense steering vector (SafeSteer-style), read from a safetensors file beside the policy, times
    ``strength``. The vector is used as stored."""

    kind: Literal["vector"]
    file: str
    key: str
    strength: float


SteerAction = Annotated[AddAction | ClampAction | VectorAction, Field(discriminator="kind")]


class Category(_Strict):
    id: str = Field(pattern=_SLUG)
    label: str = Field(min_length=1)
    taxonomy_code: str | None = None
    response: Literal["refuse", "redirect"] = "refuse"
    detect: Detect
    steer: list[SteerAction] = Field(default_factory=list)
    enabled: bool = True
    """A disabled category is neither detected nor steered (deployments switch categories off)."""

    @model_validator(mode="after")
    def _order(self) -> Category:
        for i, a in enumerate(self.steer):
            if a.positions != "generated" and a.layer < self.detect.layer:
                raise ValueError(
                    f"steer[{i}] acts on prompt positions at layer {a.layer}, before detection at layer "
                    f"{self.detect.layer} has decided; use positions: generated or a layer >= {self.detect.layer}"
                )
        return self


class Policy(_Strict):
    """A validated policy. Build it with ``Policy.from_file`` or ``Policy.model_validate``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    description: str = ""
    taxonomy: Taxonomy
    model: str = Field(min_length=1)
    """The model the policy was made for (its canonical name, e.g. SmolLM2-135M-Instruct)."""
    sae: str = Field(min_length=1)
    """The SAE release its feature ids index."""
    mode: Literal["enforce", "monitor"] = "enforce"
    categories: list[Category] = Field(min_length=1)
    provenance: dict[str, Any] = Field(default_factory=dict)
    """How the policy was made (data, split, seed, scores, date): recorded, never interpreted."""
    base_dir: Annotated[str | None, Field(exclude=True)] = None
    """Folder that relative vector files resolve against (the policy file's folder)."""

    @field_validator("categories")
    @classmethod
    def _unique(cls, v: list[Category]) -> list[Category]:
        seen: set[str] = set()
        for c in v:
            if c.id in seen:
                raise ValueError(f"category id {c.id!r} appears twice")
            seen.add(c.id)
        return v

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Read and validate a YAML or JSON policy; a ``PolicyError`` names the file and the field."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise PolicyError(f"policy file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise PolicyError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
        if not isinstance(data, dict):
            raise PolicyError(f"{p}: a policy file holds a mapping with keys name, version, taxonomy, ... (got {type(data).__name__})")
        return cls.from_dict(data, source=str(p), base_dir=str(p.parent.resolve()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>", base_dir: str | None = None) -> Policy:
        try:
            return cls.model_validate({**data, "base_dir": base_dir})
        except ValidationError as exc:
            raise PolicyError(_describe(exc, source)) from exc

    @classmethod
    def load(cls, policy: Policy | str | Path) -> Policy:
        return policy if isinstance(policy, Policy) else cls.from_file(policy)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.to_yaml(), encoding="utf-8")
        return p

    # ------------------------------------------------------------------------------------------ identity
    def vector_path(self, action: VectorAction) -> Path:
        p = Path(action.file)
        return p if p.is_absolute() else Path(self.base_dir or ".") / p

    @property
    def content_hash(self) -> str:
        """SHA-256 of the canonical policy (provenance included) and of every vector file it uses."""
        h = hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode())
        for c in self.categories:
            for a in c.steer:
                if isinstance(a, VectorAction):
                    path = self.vector_path(a)
                    h.update(path.read_bytes() if path.is_file() else b"<missing>")
        return h.hexdigest()

    @property
    def short_hash(self) -> str:
        return self.content_hash[:12]

    @property
    def active_categories(self) -> list[Category]:
        return [c for c in self.categories if c.enabled]

    def category(self, category_id: str) -> Category:
        for c in self.categories:
            if c.id == category_id:
                return c
        raise KeyError(f"policy {self.name!r} has no category {category_id!r}; it has {[c.id for c in self.categories]}")

    def layers(self) -> set[int]:
        """Every layer the policy detects or steers at."""
        out: set[int] = set()
        for c in self.active_categories:
            out.add(c.detect.layer)
            out.update(a.layer for a in c.steer)
        return out

    def __repr__(self) -> str:
        return f"Policy(name={self.name!r}, version={self.version!r}, mode={self.mode!r}, categories={[c.id for c in self.categories]}, hash={self.short_hash})"

    # ------------------------------------------------------------------------------------------- checks
    def check_against(self, *, model_name: str, num_layers: int, saes: Any, source: str | None = None) -> None:
        """Raise ``PolicyError`` unless every layer and feature exists for this model and SAE set."""
        where = source or f"policy {self.name!r}"
        if _canon(self.model) != _canon(model_name):
            raise PolicyError(f"{where}: field 'model' is {self.model!r}, but the loaded model is {model_name!r}")
        for i, c in enumerate(self.categories):
            refs: list[tuple[str, int, int | None]] = [(f"categories[{i}].detect", c.detect.layer, f) for f in c.detect.features]
            for j, a in enumerate(c.steer):
                refs.append((f"categories[{i}].steer[{j}]", a.layer, getattr(a, "feature", None)))
            for field_path, layer, feature in refs:
                if not 0 <= layer < num_layers:
                    raise PolicyError(f"{where}: {field_path}.layer is {layer}, but the model has layers 0..{num_layers - 1}")
                if feature is None:
                    continue
                if layer not in saes:
                    raise PolicyError(f"{where}: {field_path} uses SAE features at layer {layer}, but SAEs are loaded at layers {sorted(saes)}")
                sae = saes[layer]
                if sae.release != self.sae:
                    raise PolicyError(f"{where}: field 'sae' is {self.sae!r}, but the SAE at layer {layer} is {sae.release!r}")
                if not 0 <= feature < sae.d_sae:
                    raise PolicyError(f"{where}: {field_path} names feature {feature}, but the SAE at layer {layer} has features 0..{sae.d_sae - 1}")
            for j, a in enumerate(c.steer):
                if isinstance(a, VectorAction) and not self.vector_path(a).is_file():
                    raise PolicyError(f"{where}: categories[{i}].steer[{j}].file {a.file!r} does not exist (looked at {self.vector_path(a)})")


def _canon(name: str) -> str:
    return name.rsplit("/", 1)[-1].lower()


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid policy ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''})"]
    for err in exc.errors():
        path = _loc(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling; unknown keys are refused)"
        elif err["type"] == "missing":
            msg = "field required"
        elif "expected" in err.get("ctx", {}):
            msg = f"{msg} (valid: {err['ctx']['expected']})"
        lines.append(f"  - {path}: {msg}")
    return "\n".join(lines)


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("add", "clamp", "vector"):  # the discriminated union's branch name
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"
