"""Selecting PyTorch's int8 kernel library (``torch.backends.quantized.engine``)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def quantized_engine(engine: str):
    """Run int8 eager/FX models on ``engine`` ("x86", "fbgemm", "qnnpack") inside the block.

    Several int8 kernels (e.g. ``quantized_resize_cpu_``) have no deterministic variant; under
    ``torch.use_deterministic_algorithms(True)`` (``Trainer(deterministic=True)``) they would raise, so
    inside the block determinism is relaxed to a warning.
    """
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise RuntimeError(f"quantized engine {engine!r} is not available in this torch build; have {supported}")
    previous = torch.backends.quantized.engine
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.backends.quantized.engine = engine
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)
