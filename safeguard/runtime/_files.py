"""Reading the files a deployment hands to safeguard (policies, detector packs) without trusting them.

A file is read only if it is a regular file under a size cap and valid UTF-8; YAML is parsed with anchors and
aliases refused (a few hundred bytes of nested aliases expand into gigabytes); errors name the file, never echo
its contents. Paths a file refers to must stay inside that file's own folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import PolicyError

__all__ = ["contained_path", "read_yaml", "stat_key"]


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors (``&a``) and aliases (``*a``) before anything is expanded."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise yaml.YAMLError(f"anchors and aliases are not allowed (line {mark.line + 1}, column {mark.column + 1})")
        return super().compose_node(parent, index)


# YAML 1.2 booleans: only true/false. In YAML 1.1 `response: off` would read as False, and `no`/`on` likewise.
_NoAliasLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_NoAliasLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(path: str | Path, *, what: str, max_bytes: int, error: type[Exception] = PolicyError) -> tuple[Any, bytes]:
    """Parse a YAML (or JSON) file; returns the data and the raw bytes (for hashing). Every failure is ``error``."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise error(f"{what} {str(p)!r} is a directory; pass the YAML file inside it")
    if not p.is_file():
        raise error(f"{what} file {str(p)!r} does not exist")
    size = p.stat().st_size
    if size > max_bytes:
        raise error(f"{p}: {size} bytes is more than a {what} may hold ({max_bytes} bytes)")
    raw = p.read_bytes()[: max_bytes + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{p}: not UTF-8 text (byte {exc.start}); a {what} is a YAML file") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc) if type(exc) is yaml.YAMLError else "syntax error")
        raise error(f"{p}: not valid YAML{where}: {problem}") from None
    return data, raw


def contained_path(base: str | Path, relative: str, *, where: str, error: type[Exception] = PolicyError) -> Path:
    """``base/relative``, refused unless it is a relative path that stays inside ``base``."""
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith("~"):
        raise error(f"{where}: {relative!r} must be a path relative to the file's folder, not an absolute path")
    root = Path(base).resolve()
    full = (root / rel).resolve()
    if not full.is_relative_to(root):
        raise error(f"{where}: {relative!r} points outside the file's folder {root}")
    return full


def stat_key(path: str | Path) -> tuple[str, int, int] | None:
    """(resolved path, mtime in ns, size): the key file caches use, so an edited file is read again; None if missing."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        return None
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)
