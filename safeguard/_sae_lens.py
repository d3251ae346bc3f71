"""Importing sae-lens without importing bitsandbytes.

sae-lens imports transformer-lens, whose attention and MLP modules import bitsandbytes at import time whenever
transformers reports it installed. On a CPU, importing bitsandbytes prints ``Failed to load CPU gemm_4bit_forward
from kernels-community: No module named 'kernels'`` to stderr, so every plain CPU load printed it although nothing
was quantised. safeguard uses only sae-lens' SAE classes and trainer, never transformer-lens' own 4-bit models,
so sae-lens is imported while transformers' ``is_bitsandbytes_available`` answers no. bitsandbytes is then
imported only when ``quantization="4bit"`` or ``"8bit"`` is asked for (transformers imports it to quantise).
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType

__all__ = ["import_sae_lens"]

_lock = threading.Lock()


def import_sae_lens() -> ModuleType:
    """``import sae_lens``, without importing bitsandbytes along the way. Call it before any ``from sae_lens ...``."""
    if "sae_lens" in sys.modules:
        return sys.modules["sae_lens"]
    with _lock:
        if "sae_lens" in sys.modules or "transformer_lens" in sys.modules or "bitsandbytes" in sys.modules:
            return importlib.import_module("sae_lens")  # too late or not needed: import as it is
        import transformers.utils as utils
        from transformers.utils import import_utils

        real = import_utils.is_bitsandbytes_available

        def unavailable(*args: object, **kwargs: object) -> bool:
            return False

        utils.is_bitsandbytes_available = import_utils.is_bitsandbytes_available = unavailable
        try:
            return importlib.import_module("sae_lens")
        finally:
            utils.is_bitsandbytes_available = import_utils.is_bitsandbytes_available = real
            for name, module in list(sys.modules.items()):  # modules that bound the stand-in get the real check back
                if name.startswith(("transformer_lens", "sae_lens")) and getattr(module, "is_bitsandbytes_available", None) is unavailable:
                    module.is_bitsandbytes_available = real
