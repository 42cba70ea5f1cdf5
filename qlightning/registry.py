"""A name -> entry table with the error users see for an unknown name (backends, observers, export
formats share it)."""

from __future__ import annotations

from typing import Generic, TypeVar

from qlightning.errors import unknown_choice

T = TypeVar("T")


def require_modules(owner: str, modules, extra: str | None) -> None:
    """Raise ImportError naming ``owner`` (e.g. ``format='tflite'``) and the pip extra that brings
    the missing ``modules``."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        hint = f"pip install 'qlightning[{extra}]'" if extra else f"install {', '.join(missing)}"
        raise ImportError(f"{owner} needs {', '.join(missing)}, which is not installed: {hint}")


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
