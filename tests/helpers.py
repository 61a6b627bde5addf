"""Helpers shared by the tests (conftest.py holds only fixtures and session setup)."""

from __future__ import annotations

import os

_SCALE = {"explore": 10}


def examples(n: int) -> int:
    """A test's hypothesis example count under the active profile (10x with HYPOTHESIS_PROFILE=explore)."""
    return n * _SCALE.get(os.environ.get("HYPOTHESIS_PROFILE", ""), 1)
