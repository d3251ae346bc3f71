"""The policy a request may pick: a name or a ``Policy`` object, never a file.

A per-request policy comes from ``config["configurable"]["policy"]`` or a call's ``policy=`` (``invoke``, ``bind``),
which a service often fills from its users' input. So it is a registered name (the model's or guard's ``policies``
mapping), a shipped policy's name (``eu``, ``us``, ``default``) or a ``Policy``; a string that is none of these is
refused without touching the file system. Files are for the developer, at construction time: ``policy=`` and
``policies={name: file}``, or ``Policy.load(path)`` in code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from safeguard import Policy, PolicyError
from safeguard.runtime.policy import shipped_dir, shipped_policies

__all__ = ["registered_policies", "request_policy"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-.]{0,63}$")


def registered_policies(specs: Mapping[str, Any] | None) -> dict[str, Policy]:
    """Load a ``{name: Policy | file | shipped name}`` mapping given at construction time (files allowed here)."""
    out: dict[str, Policy] = {}
    for name, spec in (specs or {}).items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise PolicyError(f"policies: name {name!r} must be lower-case letters, digits, '-', '_' or '.'")
        out[name] = Policy.load(spec)
    return out


def request_policy(value: Any, registered: Mapping[str, Policy]) -> Policy | None:
    """A per-request policy: ``None``, a ``Policy``, a registered name or a shipped name; anything else is a
    ``PolicyError`` that lists the names (and never reads or echoes a file)."""
    if value is None or isinstance(value, Policy):
        return value
    if isinstance(value, str) and value in registered:
        return registered[value]
    if isinstance(value, str) and _NAME.match(value) and value in shipped_policies():
        return Policy.from_file(shipped_dir() / f"{value}.yaml")  # the shipped file, never one in the working directory
    known = sorted(set(registered) | set(shipped_policies()))
    shown = repr(value[:40] + ("..." if len(value) > 40 else "")) if isinstance(value, str) else type(value).__name__
    raise PolicyError(f"policy {shown}: a request picks a policy by name ({', '.join(known) or 'none registered'}) or passes a Policy "
                      "object, never a file path; register files at construction time (policies={'name': 'path.yaml'})")
