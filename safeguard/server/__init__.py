"""``safeguard serve``: an OpenAI-compatible server (FastAPI + uvicorn) with per-request policies and micro-batching.

Needs the ``serve`` extra: ``pip install 'safeguard[serve]'`` (``safeguard[ray]`` for Ray Serve replicas)."""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"safeguard.server needs the 'serve' extra: pip install 'safeguard[serve]' ({exc})") from exc

from .app import MODEL_PREFIX, PolicyTable, ServerConfig, config_from_env, create_app
from .batcher import IterationBatcher, MicroBatcher, Settings

__all__ = ["MODEL_PREFIX", "IterationBatcher", "MicroBatcher", "PolicyTable", "ServerConfig", "Settings", "config_from_env", "create_app"]
