"""Shared test helpers."""

from __future__ import annotations

import pytest


def reset_accelerate() -> None:
    """Each launch is a fresh process in real use; in-process runs must drop accelerate's singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Opt-in (training tests): accelerate state reset before and after the test."""
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny BERT-shaped text encoder folder (tests/fixtures_prepared.py), one per test module."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures_prepared import write_tiny_text_model

    return write_tiny_text_model(tmp_path_factory.mktemp("tiny") / "bert")
