"""What ``safeguard serve`` runs: parse ``--policy NAME=FILE`` flags, load the model, start uvicorn (or Ray Serve)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import PolicyError

__all__ = ["parse_policy_flags", "serve_uvicorn"]


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
