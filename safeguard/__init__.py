"""safeguard: guardrails inside the forward pass.

Steer an open-weight LLM's refusal behaviour with sparse-autoencoder features chosen by declarative
policies, per request and per batch row.
"""

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    DatasetError,
    EvaluationError,
    InputError,
    ModelLoadError,
    PolicyError,
    SAEError,
    SafeguardError,
    SelectionError,
    SteeringError,
    TrainingError,
    UnsupportedModelError,
)
from .runtime.batching import BatchingConfig
from .runtime.llm import SteeredLLM, TextStream
from .runtime.policy import Policy
from .runtime.report import AppliedSteering, Decision, GenerationResult, SteeringReport
from .runtime.steering import steering

try:
    __version__ = version("safeguard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AppliedSteering",
    "BatchingConfig",
    "DatasetError",
    "Decision",
    "EvaluationError",
    "GenerationResult",
    "InputError",
    "ModelLoadError",
    "Policy",
    "PolicyError",
    "SAEError",
    "SafeguardError",
    "SelectionError",
    "SteeredLLM",
    "SteeringError",
    "SteeringReport",
    "TextStream",
    "TrainingError",
    "UnsupportedModelError",
    "__version__",
    "steering",
]
