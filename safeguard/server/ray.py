"""Ray Serve: N replicas, each holding its own model, behind the same FastAPI app as ``safeguard serve``.

    safeguard serve --ray --replicas 2 --policy eu=policies/eu.yaml --policy us=policies/us.yaml

Each replica builds the app at start-up (``__serve_build_asgi_app__``) and loads its model in the app's lifespan, so
the model never travels through Ray's object store; Ray's proxy spreads requests over the replicas, and each
replica's micro-batcher batches what reaches it. ``build_deployment`` returns the bound application for
``serve.run`` (or a ``serve run`` config). Needs the ``ray`` extra: ``pip install 'safeguard[ray]'``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .app import ServerConfig, create_app

__all__ = ["build_deployment", "load_pretrained", "serve_ray"]


def _serve() -> Any:
    try:
        from ray import serve
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"Ray Serve is not installed: pip install 'safeguard[ray]' ({exc})") from exc
    return serve


def load_pretrained(model: str | None = None, sae: list[str] | None = None, quantization: str | None = None,
                    device: str | None = None, threads: int | None = None) -> Any:
    """What a replica runs to load its model (``SteeredLLM.from_pretrained``)."""
    import torch

    from ..runtime.llm import SteeredLLM

    if threads:
        torch.set_num_threads(threads)
    return SteeredLLM.from_pretrained(model, sae=sae, quantization=quantization, device=device)


class SafeguardReplica:
    """One Ray Serve replica: the app of ``create_app`` around a model the replica loads itself."""

    def __init__(self, loader: Callable[[], Any], policies: Mapping[str, Any] | None, default_policy: str | None, config: ServerConfig):
        self._args = (loader, dict(policies or {}), default_policy, config)

    def __serve_build_asgi_app__(self) -> Any:
        loader, policies, default_policy, config = self._args
        return create_app(loader, policies, default_policy=default_policy, config=config)


def build_deployment(loader: Callable[[], Any], policies: Mapping[str, Any] | None = None, *, default_policy: str | None = None,
                     config: ServerConfig | None = None, replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Any:
    """The bound Ray Serve application: ``replicas`` copies of the server, each with ``num_cpus`` / ``num_gpus``.
    ``loader`` is a picklable no-argument callable returning a ``SteeredLLM`` (``functools.partial(load_pretrained, ...)``);
    ``policies`` maps names to ``Policy`` objects or files readable on every node."""
    from ..runtime.policy import Policy

    serve = _serve()
    config = config or ServerConfig()
    # loaded here, so a broken file fails before any replica starts and relative paths mean the caller's directory
    policies = {n: Policy.load(Path(p).resolve() if isinstance(p, (str, Path)) and Path(p).is_file() else p) for n, p in (policies or {}).items()}
    cls = serve.ingress()(SafeguardReplica)
    dep = serve.deployment(cls, name="safeguard", num_replicas=replicas, max_ongoing_requests=config.max_queue,
                           ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})
    return dep.bind(loader, dict(policies or {}), default_policy, config)


def serve_ray(load: Mapping[str, Any], policies: Mapping[str, Any] | None, *, default_policy: str | None, config: ServerConfig,
              host: str, port: int, replicas: int, num_cpus: float, num_gpus: float) -> None:
    """``safeguard serve --ray``: start (or join, with ``RAY_ADDRESS``) a Ray cluster, run the deployment, block until Ctrl-C."""
    import ray

    serve = _serve()
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    app = build_deployment(functools.partial(load_pretrained, **load), policies, default_policy=default_policy, config=config,
                           replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus)
    serve.run(app, name="safeguard", route_prefix="/")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
