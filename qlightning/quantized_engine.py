"""Selecting PyTorch's int8 kernel library (``torch.backends.quantized.engine``)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def quantized_engine(engine: str):
    """Run int8 eager/FX models on ``engine`` ("x86", "fbgemm", "qnnpack") inside the block."""
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise RuntimeError(f"quantized engine {engine!r} is not available in this torch build; have {supported}")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
