"""Writing files so that a reader never sees half of one: write beside the target, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def staged_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path in ``path``'s directory; the caller writes there, and :func:`publish`
    moves it into place. Whatever is still staged when the block exits (an error, a failed check)
    is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def publish(staged: Path, path: str | os.PathLike) -> None:
    """Atomically replace ``path`` with the staged file (same directory, so ``os.replace`` is atomic)."""
    os.replace(staged, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with staged_path(path) as tmp:
        tmp.write_text(text)
        publish(tmp, path)


def write_json(path: str | os.PathLike, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
