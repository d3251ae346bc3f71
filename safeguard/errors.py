"""Exceptions raised by safeguard.

Every error a caller can cause derives from ``SafeguardError`` and names the argument, field or file at fault::

    SafeguardError
     ├── PolicyError        (also a ValueError)   a policy file or object is invalid or does not fit
     ├── SAEError           (also a ValueError)   an SAE is missing, malformed, or does not fit the model
     ├── InputError         (also a ValueError)   a prompt, chat history or generation argument the model cannot take
     ├── DatasetError       (also a ValueError)   a prompt set could not be fetched or read
     ├── SelectionError     (also a ValueError)   `safeguard select` cannot choose features with these arguments
     ├── EvaluationError    (also a ValueError)   `safeguard eval` cannot build or run its sets with these arguments
     ├── SteeringError      (also a RuntimeError) the engine cannot steer this forward pass (beam search, ...)
     ├── ModelLoadError     (also a RuntimeError) a model could not be loaded (offline, missing extra, ...)
     │    └── UnsupportedModelError (also a TypeError) a model whose decoder layers safeguard cannot find
     └── TrainingError      (also a RuntimeError) SAE training could not run

Each subclass keeps the built-in base its errors had before it existed, so ``except ValueError`` (or
``TypeError`` / ``RuntimeError``) around older code still catches them.
Messages say what was wrong, where (argument, file, field) and what would have worked.
"""

from __future__ import annotations

__all__ = [
    "DatasetError",
    "EvaluationError",
    "InputError",
    "ModelLoadError",
    "PolicyError",
    "SAEError",
    "SafeguardError",
    "SelectionError",
    "SteeringError",
    "TrainingError",
    "UnsupportedModelError",
]


class SafeguardError(Exception):
    """Base class of every error safeguard raises on purpose."""


class PolicyError(SafeguardError, ValueError):
    """A policy is invalid, or does not fit the loaded model and SAEs."""


class SAEError(SafeguardError, ValueError):
    """An SAE could not be loaded or does not fit the model."""


class InputError(SafeguardError, ValueError):
    """A prompt, chat history or generation argument (stop, temperature, seed, ...) that cannot be generated from."""


class ModelLoadError(SafeguardError, RuntimeError):
    """A model or tokenizer could not be loaded."""


class UnsupportedModelError(ModelLoadError, TypeError):
    """A model safeguard cannot steer: its decoder layers are not where Llama-style models keep them."""


class DatasetError(SafeguardError, ValueError):
    """A prompt set could not be fetched or read (missing file, bad line, hub offline, ...)."""


class TrainingError(SafeguardError, RuntimeError):
    """SAE training could not run (bad layers, empty corpus, ...)."""


class SelectionError(SafeguardError, ValueError):
    """Feature selection (``safeguard select``) cannot run with the arguments it was given."""


class EvaluationError(SafeguardError, ValueError):
    """Policy evaluation (``safeguard eval``) cannot run with the arguments it was given."""


class SteeringError(SafeguardError, RuntimeError):
    """The steering engine met a forward pass it cannot steer (a batch of another size: beam search, ...)."""
