"""One place that decides whether something on the Hugging Face hub can be had, fast and with a clear error.

Offline (``HF_HUB_OFFLINE=1``) the hub libraries would raise deep inside a download; unreachable without
that variable they retry for about 25 s. Both become one error, within seconds, that says what to fetch.
"""

from __future__ import annotations

import os


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def is_cached(repo_id: str, filename: str, *, repo_type: str = "model") -> bool:
    """Whether ``filename`` of ``repo_id`` is in the local hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    return isinstance(found, str)


def require_hub(repo_id: str, *, what: str, how: str, error: type[Exception], repo_type: str = "model") -> None:
    """Raise ``error`` unless the hub is reachable for ``repo_id``; call only when it is not cached.

    Gated or missing repositories count as reachable: the hub answered, and the loader that follows
    reports the precise reason.
    """
    if hub_offline():
        raise error(f"{what} {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {how}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=5)
    except (GatedRepoError, RepositoryNotFoundError):
        return
    except Exception as exc:  # every network failure means the same here
        raise error(f"{what} {repo_id!r} is not cached and the Hugging Face hub cannot be reached ({type(exc).__name__}); {how}") from exc
