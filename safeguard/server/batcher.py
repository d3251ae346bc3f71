"""The server's micro-batcher is the engine's: see ``safeguard.runtime.batching`` (kept here for imports)."""

from __future__ import annotations

from ..runtime.batching import Job, MicroBatcher, Settings

__all__ = ["Job", "MicroBatcher", "Settings"]
