"""Moved to `funcpeft.testing.strategies` (this path keeps working)."""

from .testing.strategies import *  # noqa: F403
