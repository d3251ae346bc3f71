"""Sparse autoencoders: loading them through sae-lens, checking they fit the model, and slicing the few
encoder columns a policy needs.

An SAE is read at the output of one decoder layer (its hook point). Policies name features by
``(layer, feature id)``; ``SAESet`` maps each layer to the one SAE loaded there.

Detection must not run the full SAE when a handful of features decide: ``FeatureEncoder`` keeps only the
needed encoder columns (standard, gated and JumpReLU architectures) and computes exactly what
``sae.encode(x)[..., ids]`` computes. Architectures whose activation couples features (top-k) fall back
to the full encoder and index it.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .._hub import is_cached, require_hub
from .._sae_lens import import_sae_lens
from ..errors import SAEError
from .names import same_model

__all__ = [
    "BUNDLED_RELEASE",
    "FeatureEncoder",
    "LoadedSAE",
    "SAESet",
    "bundled_sae_dirs",
    "layer_of_hook",
    "load_sae",
    "load_saes",
]

log = logging.getLogger("safeguard")

BUNDLED_RELEASE = "smollm2-135m-instruct"
_BUNDLED_ROOT = Path(__file__).resolve().parent.parent / "bundled" / BUNDLED_RELEASE
_SLICEABLE = {"standard", "gated", "jumprelu"}
_HOOK_PATTERNS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),
    (re.compile(r"^model\.layers\.(\d+)(?:\.output)?$"), 0),
)


def layer_of_hook(hook_name: str) -> int:
    """The decoder layer whose *output* a hook point reads: ``blocks.N.hook_resid_post`` and
    ``model.layers.N`` are layer N, ``blocks.N.hook_resid_pre`` is layer N-1."""
    for pattern, shift in _HOOK_PATTERNS:
        if m := pattern.match(hook_name):
            layer = int(m.group(1)) + shift
            if layer < 0:
                break
            return layer
    raise SAEError(
        f"hook point {hook_name!r} is not a residual-stream hook safeguard can steer; supported: "
        "'blocks.N.hook_resid_post', 'blocks.N.hook_resid_pre' (N >= 1), 'model.layers.N'"
    )


@dataclass(eq=False)
class LoadedSAE:
    """An sae-lens SAE with what safeguard needs to know about it."""

    sae: Any
    release: str
    """Which SAE release this is; policies name it in their ``sae`` field."""
    layer: int
    hook_name: str
    model_name: str | None
    """The model the SAE declares it was trained on, when it declares one."""
    source: str
    info: dict[str, Any] = field(default_factory=dict)
    """The ``safeguard.json`` sidecar of a bundled or locally trained SAE (command, metrics, ...)."""

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def architecture(self) -> str:
        return str(self.sae.cfg.architecture())

    @cached_property
    def identity(self) -> str:
        """SHA-256 of the SAE's architecture, hook and every weight's bytes, computed once: a policy's hash changes
        when the weights it reads do, even under the same release name."""
        import hashlib

        h = hashlib.sha256(f"{self.architecture}|{self.hook_name}|{self.d_in}|{self.d_sae}".encode())
        for name, t in sorted(self.sae.state_dict().items()):
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def decoder_rows(self, features: Sequence[int]) -> torch.Tensor:
        """Decoder directions of ``features``, shape (k, d_in), as stored (not renormalised)."""
        return self.sae.W_dec.detach()[list(features)].float()

    def encoder(self, features: Sequence[int]) -> FeatureEncoder:
        return FeatureEncoder(self, features)

    def check_fits(self, model_name: str, hidden_size: int, num_layers: int) -> None:
        """Raise ``SAEError`` if this SAE cannot read the model; warn when the model cannot be checked."""
        if self.d_in != hidden_size:
            raise SAEError(
                f"SAE {self.release!r} ({self.source}) reads vectors of size d_in={self.d_in}, but model "
                f"{model_name!r} has hidden size {hidden_size}: it was trained for another model"
            )
        if not 0 <= self.layer < num_layers:
            raise SAEError(
                f"SAE {self.release!r} hooks layer {self.layer} ({self.hook_name}), but model {model_name!r} "
                f"has decoder layers 0..{num_layers - 1}"
            )
        if self.model_name is None:
            warnings.warn(
                f"SAE {self.release!r} does not declare its model; it fits {model_name!r} by shape only",
                stacklevel=3,
            )
        elif not same_model(self.model_name, model_name):
            raise SAEError(
                f"SAE {self.release!r} was trained on {self.model_name!r}, not on the loaded model {model_name!r}"
            )


class FeatureEncoder:
    """Activations of a few features of one SAE, equal to ``sae.encode(x)[..., features]``."""

    def __init__(self, sae: LoadedSAE, features: Sequence[int]):
        ids = [int(f) for f in features]
        bad = [f for f in ids if not 0 <= f < sae.d_sae]
        if bad:
            raise SAEError(f"features {bad} are outside SAE {sae.release!r} (layer {sae.layer}, d_sae={sae.d_sae})")
        self.features = ids
        s = sae.sae
        self._sae = s
        self._arch = sae.architecture
        self._norm = s.cfg.normalize_activations
        self._sliced = self._arch in _SLICEABLE and self._norm in {"none", "layer_norm"}
        self.dtype = s.W_enc.dtype
        if not self._sliced:
            return
        index = torch.tensor(ids, dtype=torch.long, device=s.W_enc.device)
        w = s.W_enc.detach()[:, index]
        self._b_dec = s.b_dec.detach() if s.cfg.apply_b_dec_to_input else None
        if self._arch == "gated":
            self._w_gate = w
            self._b_gate = s.b_gate.detach()[index]
            self._w_mag = w * s.r_mag.detach()[index].exp()
            self._b_mag = s.b_mag.detach()[index]
        else:
            self._w = w
            self._b = s.b_enc.detach()[index]
            self._threshold = s.threshold.detach()[index] if self._arch == "jumprelu" else None

    def to(self, device: torch.device) -> FeatureEncoder:
        if self._sliced:
            for name, value in list(vars(self).items()):
                if isinstance(value, torch.Tensor):
                    setattr(self, name, value.to(device))
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., len(features)) in the SAE's dtype."""
        if not self._sliced:
            return self._sae.encode(x.to(self._sae.W_enc.device))[..., self.features]
        x = x.to(self.dtype)
        if self._norm == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        if self._b_dec is not None:
            x = x - self._b_dec
        if self._arch == "gated":
            gate = (x @ self._w_gate + self._b_gate) > 0
            return gate.to(x.dtype) * torch.relu(x @ self._w_mag + self._b_mag)
        pre = x @ self._w + self._b
        acts = torch.relu(pre)
        if self._threshold is not None:
            acts = acts * (pre > self._threshold).to(acts.dtype)
        return acts


def bundled_sae_dirs() -> list[Path]:
    """The SAEs shipped for the embedded model, one folder per layer."""
    if not _BUNDLED_ROOT.is_dir():
        return []
    return sorted(p for p in _BUNDLED_ROOT.iterdir() if (p / "cfg.json").is_file())


def _from_disk(path: Path, device: str, dtype: str) -> LoadedSAE:
    import_sae_lens()
    from sae_lens import SAE

    if not (path / "cfg.json").is_file():
        raise SAEError(f"{path} is not an SAE folder: it has no cfg.json (sae-lens' save_model writes cfg.json and sae_weights.safetensors)")
    try:
        sae = SAE.load_from_disk(str(path), device=device, dtype=dtype)
    except Exception as exc:
        raise SAEError(f"could not load the SAE in {path}: {type(exc).__name__}: {exc}") from exc
    info: dict[str, Any] = {}
    sidecar = path / "safeguard.json"
    if sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text())
        except json.JSONDecodeError as exc:
            raise SAEError(f"{sidecar} is not valid JSON: line {exc.lineno}: {exc.msg}") from exc
    meta = sae.cfg.metadata
    hook = info.get("hook_name") or meta.hook_name
    if not hook:
        raise SAEError(f"the SAE in {path} names no hook point (cfg.metadata.hook_name); safeguard cannot tell which layer it reads")
    return LoadedSAE(
        sae=sae,
        release=str(info.get("release") or path.parent.name),
        layer=layer_of_hook(str(hook)),
        hook_name=str(hook),
        model_name=info.get("model") or meta.model_name,
        source=str(path),
        info=info,
    )


def _from_registry(release: str, sae_id: str | None, device: str, dtype: str) -> LoadedSAE:
    import_sae_lens()
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = sorted(r for r in directory if release.split("-")[0] in r)[:8]
        raise SAEError(f"SAE release {release!r} is not in sae-lens' registry; similar releases: {close}")
    entry = directory[release]
    if sae_id is None:
        if len(entry.saes_map) != 1:
            raise SAEError(f"release {release!r} has several SAEs; name one as '{release}:ID' with ID in {sorted(entry.saes_map)}")
        sae_id = next(iter(entry.saes_map))
    if sae_id not in entry.saes_map:
        raise SAEError(f"ID {sae_id!r} not found in release {release!r}. Valid IDs are {sorted(entry.saes_map)}")
    folder = entry.saes_map[sae_id]
    if not is_cached(entry.repo_id, f"{folder}/cfg.json") and not is_cached(entry.repo_id, "cfg.json"):
        require_hub(
            entry.repo_id,
            what=f"SAE {release}:{sae_id} (hub repo)",
            how=(
                f"download it where the hub is reachable (`huggingface-cli download {entry.repo_id}`), then copy "
                "~/.cache/huggingface/hub here, or save it with sae.save_model(DIR) and pass sae=DIR"
            ),
            error=SAEError,
        )
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except Exception as exc:
        raise SAEError(f"could not load SAE {release}:{sae_id}: {type(exc).__name__}: {exc}") from exc
    hook = sae.cfg.metadata.hook_name or sae_id
    return LoadedSAE(
        sae=sae,
        release=release,
        layer=layer_of_hook(str(hook)),
        hook_name=str(hook),
        model_name=sae.cfg.metadata.model_name or entry.model,
        source=f"sae-lens:{release}:{sae_id}",
    )


SAESpec = Any  # str | os.PathLike | sae_lens.SAE | LoadedSAE


def load_sae(spec: SAESpec, *, device: str | torch.device = "cpu", dtype: str = "float32") -> LoadedSAE:
    """Load one SAE from a folder (sae-lens format), ``"release"`` or ``"release:sae_id"`` of sae-lens'
    registry, an ``sae_lens.SAE`` object, or pass a ``LoadedSAE`` through."""
    device = str(device)
    if isinstance(spec, LoadedSAE):
        return spec
    if hasattr(spec, "W_dec") and hasattr(spec, "cfg"):
        hook = spec.cfg.metadata.hook_name
        if not hook:
            raise SAEError("the SAE object names no hook point (cfg.metadata.hook_name); set it to e.g. 'blocks.12.hook_resid_post'")
        return LoadedSAE(sae=spec, release=str(spec.cfg.metadata.get("release", "in-memory")), layer=layer_of_hook(str(hook)),
                         hook_name=str(hook), model_name=spec.cfg.metadata.model_name, source="in-memory")
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        return _from_disk(path, device, dtype)
    if "/" in text and ":" not in text:
        raise SAEError(f"SAE folder {text!r} does not exist (for sae-lens' registry use 'release' or 'release:sae_id')")
    release, _, sae_id = text.partition(":")
    return _from_registry(release, sae_id or None, device, dtype)


class SAESet(Mapping[int, LoadedSAE]):
    """The SAEs a ``SteeredLLM`` reads, one per decoder layer."""

    def __init__(self, saes: Iterable[LoadedSAE]):
        by_layer: dict[int, LoadedSAE] = {}
        for s in saes:
            if s.layer in by_layer:
                raise SAEError(f"two SAEs read layer {s.layer} ({by_layer[s.layer].source} and {s.source}); keep one per layer")
            by_layer[s.layer] = s
        self._by_layer = dict(sorted(by_layer.items()))

    def __getitem__(self, layer: int) -> LoadedSAE:
        return self._by_layer[layer]

    def __iter__(self):
        return iter(self._by_layer)

    def __len__(self) -> int:
        return len(self._by_layer)

    def __repr__(self) -> str:
        inner = ", ".join(f"{layer}: {s.release} d_sae={s.d_sae}" for layer, s in self._by_layer.items())
        return f"SAESet({{{inner}}})"


def load_saes(specs: SAESpec | Sequence[SAESpec] | None, *, device: str | torch.device = "cpu", dtype: str = "float32") -> SAESet:
    """Load several SAEs; ``None`` means the SAEs bundled for the embedded model."""
    if specs is None:
        dirs = bundled_sae_dirs()
        if not dirs:
            raise SAEError(f"no bundled SAE found under {_BUNDLED_ROOT}; reinstall safeguard or pass sae=FOLDER")
        specs = dirs
    elif isinstance(specs, (str, Path)) or not isinstance(specs, Sequence):
        specs = [specs]
    expanded: list[SAESpec] = []
    for s in specs:  # a folder of per-layer SAE folders stands for all of them
        p = Path(str(s)).expanduser() if isinstance(s, (str, Path)) else None
        if p is not None and p.is_dir() and not (p / "cfg.json").is_file():
            children = sorted(c for c in p.iterdir() if (c / "cfg.json").is_file())
            expanded.extend(children or [s])
        else:
            expanded.append(s)
    return SAESet(load_sae(s, device=device, dtype=dtype) for s in expanded)
