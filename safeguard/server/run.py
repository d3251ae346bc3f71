"""What ``safeguard serve`` runs: parse ``--policy NAME=FILE`` flags, load the model, start uvicorn (or Ray Serve)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import PolicyError

__all__ = ["parse_policy_flags", "serve_command", "serve_uvicorn"]


def parse_policy_flags(flags: Sequence[str] | None) -> dict[str, str]:
    """``["eu=policies/eu.yaml", "us"]`` -> ``{"eu": "policies/eu.yaml", "us": "us"}`` (a bare name is passed to
    ``Policy.load`` as it is). Names must be unique."""
    out: dict[str, str] = {}
    for flag in flags or ():
        name, sep, spec = flag.partition("=")
        name, spec = name.strip(), (spec.strip() if sep else name.strip())
        if not name or not spec:
            raise PolicyError(f"--policy {flag!r}: expected NAME=FILE, e.g. --policy eu=policies/eu.yaml")
        if name in out:
            raise PolicyError(f"--policy {flag!r}: the name {name!r} is given twice")
        out[name] = spec
    return out


def serve_uvicorn(app: Any, *, host: str, port: int, graceful_timeout: float = 30.0, log_level: str = "info") -> None:
    """Run until SIGINT/SIGTERM; in-flight requests get ``graceful_timeout`` seconds to finish."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout, access_log=False)


def serve_command(*, host: str, port: int, policy: Sequence[str] | None, default_policy: str | None, api_key: str | None,
                  model: str | None, sae: Sequence[str] | None, quantization: str | None, device: str | None, max_tokens: int,
                  timeout: float, max_queue: int, max_body: int, batching: bool, batch_window_ms: float, max_batch: int, ray: bool,
                  replicas: int, replica_cpus: float, replica_gpus: float, threads: int | None, **_: Any) -> bool:
    """``safeguard serve``: False (after printing why) when the policies, limits or model are unusable."""
    import sys

    from ..errors import SafeguardError
    from ..runtime.policy import Policy
    from .app import ServerConfig, create_app

    try:
        # loaded before the model, with absolute paths (a Ray replica's working directory may differ)
        policies = {name: Policy.load(Path(spec).resolve() if Path(spec).is_file() else spec) for name, spec in parse_policy_flags(policy).items()}
        config = ServerConfig(api_key=api_key or None, max_body_bytes=max_body, max_tokens=max_tokens,
                              default_max_tokens=min(256, max_tokens), request_timeout_s=timeout, max_queue=max_queue,
                              batching=batching, batch_window_s=batch_window_ms / 1000, max_batch=max_batch)
        load = dict(model=model, sae=list(sae) if sae else None, quantization=quantization, device=device, threads=threads)
        if ray:
            from .ray import serve_ray

            serve_ray(load, policies, default_policy=default_policy, config=config, host=host, port=port, replicas=replicas,
                      num_cpus=replica_cpus, num_gpus=replica_gpus)
            return True
        from .ray import load_pretrained  # no Ray needed: only the loader

        app = create_app(load_pretrained(**load), policies, default_policy=default_policy, config=config)
    except (SafeguardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    serve_uvicorn(app, host=host, port=port)
    return True
