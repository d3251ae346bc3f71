"""One stable content hash for cache keys: the same parts give the same key on every run and platform."""

from __future__ import annotations

import hashlib
import json


def stable_hash(*parts: object) -> str:
    """SHA-256 hex digest of ``parts``, each as canonical JSON (sorted keys; other objects by ``str``)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()
