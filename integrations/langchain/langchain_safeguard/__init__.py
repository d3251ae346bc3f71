"""LangChain integration of safeguard: ``ChatSafeguard``, a chat model steered per request by SAE-feature policies, and
``SafeguardGuard``, a policy's detectors screening the requests of any other chat model."""

from importlib.metadata import PackageNotFoundError, version

from ._convert import REPORT_EVENT, REPORT_KEY
from ._loading import clear_shared, shared_llm
from .chat_models import ChatSafeguard
from .guard import DEFAULT_REFUSAL, SafeguardGuard

try:
    __version__ = version("langchain-safeguard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["DEFAULT_REFUSAL", "REPORT_EVENT", "REPORT_KEY", "ChatSafeguard", "SafeguardGuard", "__version__", "clear_shared", "shared_llm"]
