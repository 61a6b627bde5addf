"""Tied parameters: every parameter name of a model, its canonical (first) name, and the names tied to it.

`base` trees hold a tied weight once, under its canonical name; a tie broken by a merge (a modules_to_save
copy replacing one of the tied names) shows as an explicit entry for the other name (see funcpeft.merge).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


class Names:
    """Every parameter name of the model, its canonical (first) name, and the names tied to it."""

    def __init__(self, aliases: Iterable[tuple[str, str]]):
        """aliases: (every parameter name, its canonical name), e.g. PeftFunction.aliases."""
        self.aliases = tuple(aliases)
        self.canon = dict(self.aliases)
        self.group: dict[str, list[str]] = {}
        for alias, canon in self.aliases:
            self.group.setdefault(canon, []).append(alias)

    def read(self, tree: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """A parameter's value in a base tree: its own entry, else its canonical name's (what `fn` uses)."""
        if name in tree:
            return tree[name]
        canon = self.canon.get(name)
        if canon is None or canon not in tree:
            raise KeyError(f"the base tree has no entry for parameter {name!r} (nor for its tied name {canon!r})")
        return tree[canon]

    def write_shared(self, tree: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        """Set `name` the way PEFT's in-place write does: every name sharing its tensor sees the new value."""
        tree[name if name in tree else self.canon[name]] = value

    def write_own(self, tree: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        """Set only `name`; names tied to it keep their current value (as explicit entries)."""
        canon = self.canon[name]
        if name == canon:
            for other in self.group[canon]:
                if other != canon and other not in tree:
                    tree[other] = tree[canon]
        tree[name] = value

    def restore(self, tree: dict[str, torch.Tensor], base: Mapping[str, torch.Tensor], name: str) -> None:
        """Put `name` back as it is in `base`, dropping entries `write_own` added that `base` lacks."""
        if name in base:
            tree[name] = base[name]
        else:
            tree.pop(name, None)
        if name == self.canon[name]:
            for other in self.group[name]:
                if other not in base:
                    tree.pop(other, None)
