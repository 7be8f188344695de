"""Shared fixtures: one tiny model in the released layout per test session (make-tiny takes seconds)."""

from __future__ import annotations

import pytest

from k4trt.weights.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "weights", seed=0).root
