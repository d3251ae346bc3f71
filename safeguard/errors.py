"""Exceptions raised by safeguard.

Every error the library raises on purpose derives from ``SafeguardError``::

    SafeguardError
     ├── PolicyError      (also a ValueError)   a policy file or object is invalid or does not fit
     ├── SAEError         (also a ValueError)   an SAE is missing, malformed, or does not fit the model
     ├── InputError       (also a ValueError)   a prompt or chat history the model cannot take
     ├── DatasetError     (also a ValueError)   a prompt set could not be fetched or read
     ├── ModelLoadError   (also a RuntimeError) a model could not be loaded (offline, missing extra, ...)
     └── TrainingError    (also a RuntimeError) SAE training could not run

Messages say what was wrong, where (file, field) and what would have worked.
"""

from __future__ import annotations

__all__ = ["DatasetError", "InputError", "ModelLoadError", "PolicyError", "SAEError", "SafeguardError", "TrainingError"]


class SafeguardError(Exception):
    """Base class of every error safeguard raises on purpose."""


class PolicyError(SafeguardError, ValueError):
    """A policy is invalid, or does not fit the loaded model and SAEs."""


class SAEError(SafeguardError, ValueError):
    """An SAE could not be loaded or does not fit the model."""


class InputError(SafeguardError, ValueError):
    """A prompt or chat history that cannot be generated from."""


class ModelLoadError(SafeguardError, RuntimeError):
    """A model or tokenizer could not be loaded."""


class DatasetError(SafeguardError, ValueError):
    """A prompt set could not be fetched or read (missing file, bad line, hub offline, ...)."""


class TrainingError(SafeguardError, RuntimeError):
    """SAE training could not run (bad layers, empty corpus, ...)."""
