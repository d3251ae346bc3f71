"""LangChain's standard chat model suites (langchain-tests) against ChatSafeguard on the embedded model.

Capability flags are what ChatSafeguard really does: text in, text out, usage metadata; no tool calling,
no structured output, no images/audio/PDF, no per-call model override.
"""

from __future__ import annotations

from typing import Any

import pytest
from _embedded import embedded_params
from langchain_safeguard import ChatSafeguard
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests


class _Flags:
    @property
    def chat_model_class(self) -> type[ChatSafeguard]:
        return ChatSafeguard

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False


class TestChatSafeguardUnit(_Flags, ChatModelUnitTests):
    """Construction and parameters only: nothing here loads the model."""

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {}


@pytest.mark.slow
class TestChatSafeguardIntegration(_Flags, ChatModelIntegrationTests):
    """Real generations on the embedded model, 8 new tokens each."""

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {**embedded_params(), "max_tokens": 8}
