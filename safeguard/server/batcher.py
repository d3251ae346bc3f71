"""The server's batcher is the engine's: see ``safeguard.runtime.continuous`` (the default, iteration-level) and
``safeguard.runtime.batching`` (the window micro-batcher); kept here for imports."""

from __future__ import annotations

from ..runtime.batching import Job, MicroBatcher, Settings
from ..runtime.continuous import IterationBatcher

__all__ = ["IterationBatcher", "Job", "MicroBatcher", "Settings"]
