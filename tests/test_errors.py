"""The one error tree: every error class is exported, derives from SafeguardError and keeps its built-in base."""

from __future__ import annotations

import pytest

import safeguard
from safeguard import errors


@pytest.mark.parametrize(("name", "builtin"), [
    ("PolicyError", ValueError), ("SAEError", ValueError), ("InputError", ValueError), ("DatasetError", ValueError),
    ("SelectionError", ValueError), ("EvaluationError", ValueError), ("SteeringError", RuntimeError), ("ModelLoadError", RuntimeError),
    ("UnsupportedModelError", TypeError), ("TrainingError", RuntimeError),
])
def test_every_error_is_exported_a_safeguard_error_and_keeps_its_builtin_base(name, builtin):
    cls = getattr(safeguard, name)
    assert cls is getattr(errors, name) and name in safeguard.__all__ and name in errors.__all__
    assert issubclass(cls, safeguard.SafeguardError) and issubclass(cls, builtin)
    assert name in errors.__doc__, "the tree in errors.py's docstring names every class"


def test_the_tree_lists_every_class():
    assert set(errors.__all__) == {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}


@pytest.mark.parametrize("batch_size", [0, -1, "a", 2.0, True])
def test_batch_size_must_be_a_positive_integer(llm, batch_size):
    from safeguard import InputError

    with pytest.raises(InputError, match="batch_size"):
        llm.batch(["hi"], batch_size=batch_size, max_new_tokens=2)
    with pytest.raises(InputError, match="batch_size"):
        llm.classify(["hi"], batch_size=batch_size)


@pytest.mark.parametrize("steer", ["no", 0, None])
def test_steer_must_be_a_bool(llm, steer):
    from safeguard import InputError

    with pytest.raises(InputError, match="steer must be True or False"):
        llm.generate("hi", steer=steer, max_new_tokens=2)
