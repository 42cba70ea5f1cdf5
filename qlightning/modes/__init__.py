"""Quantization modes (eager, FX, PT2E). Import one through ``registry.get_mode``."""

from qlightning.modes.registry import available_modes, get_mode

__all__ = ["available_modes", "get_mode"]
