"""Every public function of `funcpeft` documents its arguments and its result (Google style, with tensor shapes)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest

import funcpeft


def _public_functions() -> list[str]:
    """Names in `funcpeft.__all__` bound to functions (classes, type aliases and constants excluded)."""
    return sorted(n for n in funcpeft.__all__ if inspect.isfunction(inspect.unwrap(getattr(funcpeft, n))))


def _missing_sections(fn: Callable[..., Any]) -> list[str]:
    """The sections `fn`'s docstring lacks: `Args:` (unless it takes no parameters) and `Returns:`."""
    doc = inspect.getdoc(fn) or ""
    sections = set(re.findall(r"^(\w+):$", doc, flags=re.MULTILINE))
    wanted = (["Args"] if inspect.signature(fn).parameters else []) + ["Returns"]
    return [s for s in wanted if s not in sections]


def test_the_check_covers_the_public_functions() -> None:
    names = _public_functions()
    assert {"get_peft_model", "merge", "value_and_grad", "velora_update", "alora_offsets"} <= set(names)
    assert "LoraConfig" not in names and "AdapterTree" not in names


@pytest.mark.parametrize("name", _public_functions())
def test_public_function_has_args_and_returns_sections(name: str) -> None:
    missing = _missing_sections(getattr(funcpeft, name))
    assert not missing, f"funcpeft.{name}'s docstring lacks {', '.join(s + ':' for s in missing)}"


def test_a_docstring_without_a_section_is_caught() -> None:
    def documented(x: int) -> int:
        """One line.

        Args:
            x: a number.

        Returns:
            x.
        """
        return x

    def no_returns(x: int) -> int:
        """One line.

        Args:
            x: a number.
        """
        return x

    def no_args(x: int) -> int:
        """One line. `Args:` and `Returns:` named inline are not sections."""
        return x

    def no_parameters() -> int:
        """One line.

        Returns:
            1.
        """
        return 1

    assert _missing_sections(documented) == []
    assert _missing_sections(no_returns) == ["Returns"]
    assert _missing_sections(no_args) == ["Args", "Returns"]
    assert _missing_sections(no_parameters) == []
