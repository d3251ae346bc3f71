"""Detector packs: how one model and its SAE detect and steer each risk category.

A policy says *what* a deployment wants per category (refuse, redirect, block, monitor, off; how sensitive);
a pack says *how* one model does it. ``safeguard select`` writes packs; people write policies. A pack::

    schema_version: 1
    id: smollm2-135m-instruct                # stable pack id, named in every report
    model: SmolLM2-135M-Instruct             # checked against the loaded model
    sae: smollm2-135m-instruct               # the SAE release its feature ids index
    taxonomy: {name: AIR-Bench, version: "2024"}
    measured: true                           # false: hand-written starting point, nothing measured
    levels:                                  # what each named sensitivity means
      relaxed:  {max_false_positive_rate: 0.0, description: "..."}
      standard: {max_false_positive_rate: 0.0, description: "..."}
      strict:   {max_false_positive_rate: 0.02, description: "..."}
    refusal:                                 # the refusal steering actions, defined once
      - {kind: add, layer: 20, feature: 1558, strength: 140.3, positions: prompt}
    # or, with an opener forced as the first tokens of a refused reply (see runtime/openers.py):
    # refusal:
    #   opener: "I'm sorry, but I can't help with that."   # one line, at most 120 characters
    #   after_opener: steer                                # or end: the reply is the opener alone
    #   steer: [{kind: add, layer: 20, feature: 1558, strength: 140.3, positions: prompt}]
    redirect: {file: pack.vectors.safetensors, layer: 20, strength: 1.0, positions: both}   # a key per category
    provenance: pack.provenance.json         # command, data, versions, date (sidecar, beside the pack)
    categories:
      criminal_activities:
        label: Criminal Activities
        detect: {layer: 10, features: [3930, 1385], weights: [0.05, -0.06], combine: sum, reduce: max, order: reduce_first,
                 turns: last}                # last: the last user message's tokens, in context; all (default): every user token
        levels:                              # the threshold of each level, with what was measured there
          relaxed:  {threshold: 5.3, fpr: 0.0, recall: 0.41}
          standard: {threshold: 4.8, fpr: 0.0, recall: 0.50}
          strict:   {threshold: 3.9, fpr: 0.019, recall: 0.62}
        curve:                               # for policies that state max_false_positive_rate themselves
          - {max_false_positive_rate: 0.0, threshold: 4.8, fpr: 0.0, recall: 0.50}
          - {max_false_positive_rate: 0.01, threshold: 4.2, fpr: 0.009, recall: 0.57}
        reply: {threshold: 6.0}              # optional: also score the reply as it is generated (see ReplyDetect)
      # a detector may also weigh its features at the last token it reads (the last user token, in context):
      #   detect: {..., weights: [0.05, 0.0], last_weights: [0.0, 0.02], combine: sum, reduce: max, order: reduce_first}
      # score = sum_i weights[i] * max_t f_i(t) + sum_i last_weights[i] * f_i(last); such a category has no `reply`
      # and may read only the end of the message: `window: 64` keeps the last 64 of the tokens `turns` chooses (where a
      # jailbreak template puts the request it wraps); a message of at most 64 tokens is read whole
      # (a reply has no last user token: the pack refuses the combination)

``fpr`` and ``recall`` are measured on the validation part of selection's data (``null`` where nothing was
measured). Files a pack names must lie in its own folder. Packs ship beside the SAEs they index
(``safeguard/bundled/<sae release>/pack.yaml``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import PolicyError
from ._files import contained_path, read_yaml, stat_key
from .names import same_model
from .policy import SLUG, AddAction, ClampAction, Detect, Strict, Taxonomy, VectorAction, check_slugs, describe_validation

__all__ = ["LEVELS", "OperatingPoint", "Pack", "PackCategory", "Refusal", "ReplyDetect", "bundled_packs", "find_pack"]

LEVELS = ("relaxed", "standard", "strict")
PACK_SCHEMA_VERSION = 1
MAX_PACK_BYTES = 4 * 1024 * 1024
_BUNDLED = Path(__file__).resolve().parent.parent / "bundled"


class OperatingPoint(Strict):
    """A detection threshold and what was measured there on validation prompts."""

    threshold: float
    fpr: float | None = Field(default=None, ge=0, le=1)
    """Share of validation benign prompts on which this category fired (``null``: not measured)."""
    recall: float | None = Field(default=None, ge=0, le=1)
    """Share of this category's validation harmful prompts on which it fired (``null``: not measured)."""
    max_false_positive_rate: float | None = Field(default=None, ge=0, le=1)
    """On a curve: the target this threshold was chosen for."""


class PackDetect(Detect):
    """A category's detector; its thresholds live in the category's ``levels`` and ``curve``."""

    threshold: float | None = None  # type: ignore[assignment]


class ReplyDetect(Strict):
    """Detection on the reply while it is generated: the category's detector (same features, weights, combine and
    order) scores the generated tokens so far (per feature, or per token for ``combine_first``, a running max), and
    the category fires when that score reaches ``threshold`` (calibrated on benign replies)."""

    threshold: float


class Level(Strict):
    max_false_positive_rate: float | None = Field(default=None, ge=0, le=1)
    description: str = ""


class PackCategory(Strict):
    label: str = Field(min_length=1)
    taxonomy_code: str | None = None
    detect: PackDetect
    levels: dict[str, OperatingPoint]
    curve: list[OperatingPoint] = Field(default_factory=list)
    reply: Annotated[ReplyDetect | None, Field(exclude_if=lambda v: v is None)] = None
    """Optional: watch the reply as it is generated (policies may switch it off with ``watch_reply: false``)."""

    @model_validator(mode="after")
    def _reply_needs_pooling_only(self) -> PackCategory:
        if self.reply is not None and self.detect.last_weights is not None:
            raise ValueError("reply watching is not defined for a detector with detect.last_weights (a reply has no last user token to "
                             "read); drop the category's reply entry, or last_weights")
        return self

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: dict[str, OperatingPoint]) -> dict[str, OperatingPoint]:
        missing = [lv for lv in LEVELS if lv not in v]
        if missing:
            raise ValueError(f"every level needs a threshold; missing {missing}")
        unknown = sorted(set(v) - set(LEVELS))
        if unknown:
            raise ValueError(f"unknown levels {unknown}; levels are {list(LEVELS)}")
        return v

    @field_validator("curve")
    @classmethod
    def _curve(cls, v: list[OperatingPoint]) -> list[OperatingPoint]:
        if any(p.max_false_positive_rate is None for p in v):
            raise ValueError("every curve point states its max_false_positive_rate")
        targets = [p.max_false_positive_rate for p in v]
        if targets != sorted(set(targets)):  # type: ignore[type-var]
            raise ValueError("curve points must have distinct max_false_positive_rate in increasing order")
        return v

    def threshold_for(self, max_fpr: float, *, where: str) -> OperatingPoint:
        """The curve point with the largest target that does not exceed ``max_fpr`` (never more permissive)."""
        ok = [p for p in self.curve if p.max_false_positive_rate is not None and p.max_false_positive_rate <= max_fpr + 1e-12]
        if not ok:
            have = [p.max_false_positive_rate for p in self.curve]
            raise PolicyError(f"{where}: max_false_positive_rate {max_fpr} is below every operating point this pack measured ({have or 'none'}); "
                              "use a named sensitivity or a larger rate")
        return ok[-1]


class Redirect(Strict):
    """SafeSteer-style dense vectors, one per category (keyed by slug), in a safetensors file beside the pack."""

    file: str = Field(min_length=1)
    layer: int = Field(ge=0)
    strength: float
    positions: Literal["prompt", "generated", "both"] = "both"


RefusalAction = Annotated[AddAction | ClampAction | VectorAction, Field(discriminator="kind")]
"""A refusal action: an SAE feature's decoder direction added or its activation clamped, or a dense vector (the
dense refusal direction, say) read from a safetensors file beside the pack."""


class Refusal(Strict):
    """How the pack's model refuses: the steering actions, and optionally an opener forced as the reply's first
    tokens (``runtime/openers.py``). A plain list of actions in the file is read as ``{steer: [...]}``."""

    steer: list[RefusalAction] = Field(min_length=1)
    opener: str | None = None
    """One line of at most 120 characters in the model's own refusal style; ``null``: no opener."""
    after_opener: Literal["steer", "end"] = "steer"
    """What follows the opener: ``steer``, the model goes on under the refusal steering; ``end``, the reply ends
    with the opener (end of turn). Selection measures which reads better for the pack's model."""

    @field_validator("opener")
    @classmethod
    def _opener(cls, v: str | None) -> str | None:
        from .openers import check_opener

        return None if v is None else check_opener(v)

    @model_validator(mode="after")
    def _ends_an_opener(self) -> Refusal:
        if self.after_opener == "end" and self.opener is None:
            raise ValueError("after_opener: end needs an opener (the reply would be empty); give refusal.opener or drop after_opener")
        return self


class Pack(Strict):
    """A validated detector pack. Load it with ``Pack.load(path)`` (cached by path, size and mtime)."""

    schema_version: Literal[1] = PACK_SCHEMA_VERSION
    id: str = Field(pattern=SLUG)
    model: str = Field(min_length=1)
    sae: str = Field(min_length=1)
    taxonomy: Taxonomy
    measured: bool = False
    description: str = ""
    levels: dict[str, Level]
    refusal: Refusal
    redirect: Redirect | None = None
    provenance: str | None = None
    """File name of the provenance sidecar (JSON) beside the pack."""
    categories: dict[str, PackCategory] = Field(min_length=1)
    base_dir: Annotated[str, Field(exclude=True)] = "."
    raw_hash: Annotated[str, Field(exclude=True)] = ""
    """SHA-256 of the pack file's bytes (set by ``load``)."""

    @field_validator("refusal", mode="before")
    @classmethod
    def _refusal(cls, v: Any) -> Any:
        return {"steer": v} if isinstance(v, list) else v

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: dict[str, Level]) -> dict[str, Level]:
        if sorted(v) != sorted(LEVELS):
            raise ValueError(f"levels must be exactly {list(LEVELS)}")
        return v

    @field_validator("categories")
    @classmethod
    def _slugs(cls, v: dict[str, PackCategory]) -> dict[str, PackCategory]:
        return check_slugs(v)

    @model_validator(mode="after")
    def _files(self) -> Pack:
        for name in (self.redirect.file if self.redirect else None, self.provenance, *self._refusal_files()):
            if name is not None:
                contained_path(self.base_dir, name, where=f"pack {self.id!r}")
        return self

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, pack: Pack | str | Path) -> Pack:
        if isinstance(pack, Pack):
            return pack
        if not isinstance(pack, (str, Path)):
            raise PolicyError(f"a pack is a Pack or a path to a pack YAML file, not {type(pack).__name__}")
        p = Path(pack).expanduser()
        if p.is_dir() and (p / "pack.yaml").is_file():
            p = p / "pack.yaml"
        key = stat_key(p)
        with _lock:
            if key is not None and key in _cache:
                return _cache[key]
        data, raw = read_yaml(p, what="detector pack", max_bytes=MAX_PACK_BYTES)
        if not isinstance(data, dict):
            raise PolicyError(f"{p}: a detector pack holds a mapping with keys id, model, sae, categories, ... (got {type(data).__name__})")
        try:
            out = cls.model_validate({**data, "base_dir": str(p.parent.resolve()), "raw_hash": hashlib.sha256(raw).hexdigest()})
        except ValidationError as exc:
            raise PolicyError(describe_validation(exc, str(p), "detector pack")) from None
        if key is not None:
            with _lock:
                _cache[key] = out
        return out

    @property
    def source(self) -> Path:
        return Path(self.base_dir) / "pack.yaml"

    def file(self, name: str) -> Path:
        return contained_path(self.base_dir, name, where=f"pack {self.id!r}")

    @cached_property
    def content_hash(self) -> str:
        """SHA-256 of the canonical pack and of the redirect vector file's bytes (provenance excluded: it changes nothing)."""
        import json

        body = self.model_dump(mode="json")
        if body["refusal"].get("after_opener") == "steer":  # the default hashes as it did before the field existed
            del body["refusal"]["after_opener"]
        if self.refusal.opener is None:  # a pack without an opener hashes as it did when the section was a list
            body["refusal"] = body["refusal"]["steer"]
        h = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
        for name in dict.fromkeys([*([self.redirect.file] if self.redirect is not None else []), *self._refusal_files()]):
            vec = self.file(name)
            h.update(vec.read_bytes() if vec.is_file() else b"<missing>")
        return h.hexdigest()

    def _refusal_files(self) -> list[str]:
        """The vector files the refusal actions read (a dense refusal direction), in order."""
        return list(dict.fromkeys(a.file for a in self.refusal.steer if isinstance(a, VectorAction)))

    @property
    def short_hash(self) -> str:
        return self.content_hash[:12]

    def provenance_data(self) -> dict[str, Any]:
        import json

        if self.provenance is None:
            return {}
        path = self.file(self.provenance)
        if not path.is_file():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def fits(self, model_name: str, sae_release: str | None) -> bool:
        return same_model(self.model, model_name) and (sae_release is None or self.sae == sae_release)

    def __repr__(self) -> str:
        return (f"Pack(id={self.id!r}, model={self.model!r}, sae={self.sae!r}, categories={len(self.categories)}, measured={self.measured}, "
                f"hash={self.short_hash})")


_cache: dict[tuple[str, int, int], Pack] = {}
_lock = threading.Lock()


def bundled_packs() -> Iterator[Pack]:
    """The packs that ship with safeguard (``safeguard/bundled/*/pack.yaml``)."""
    for path in sorted(_BUNDLED.glob("*/pack.yaml")):
        yield Pack.load(path)


def find_pack(model_name: str, sae_release: str | None) -> Pack | None:
    """The shipped pack for this model and SAE release, if one ships."""
    for pack in bundled_packs():
        if pack.fits(model_name, sae_release):
            return pack
    return None
