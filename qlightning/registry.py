"""A name -> entry table with the error users see for an unknown name (backends, observers, export
formats share it)."""

from __future__ import annotations

from typing import Generic, TypeVar

from qlightning.errors import unknown_choice

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        name = entry.name
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if not isinstance(name, str) or name not in self._entries:  # a list is unhashable: check the type first
            raise unknown_choice(self.kind, name, self._entries)
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)
