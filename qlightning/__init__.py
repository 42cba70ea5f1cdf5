"""qlightning: quantization as Lightning callbacks."""

import logging as _logging


def _import_torchao_quietly() -> None:
    # torchao 0.18.0 registers its KernelPreference enum as a pytree constant at import, which torch
    # 2.14.1 logs as deprecated on every start ("Enum subclass ... register_constant() ... deprecated"),
    # also on `scripts/train.py --help`. Nothing for a user to act on; remove when torchao stops
    # registering enums (torch now supports them natively).
    pytree_log = _logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(_logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
    finally:
        pytree_log.setLevel(level)


_import_torchao_quietly()
from qlightning.backends import available_backends, get_backend, register_backend
from qlightning.callbacks import PostTrainingQuantization, QuantizationAwareTraining
from qlightning.errors import ExportVerificationError, QuantizationConfigError, UntraceableModelError
from qlightning.exporters import available_formats, export
from qlightning.layers import LayerError, LayerReport, compare_layers
from qlightning.modes import available_modes
from qlightning.monitoring import QParamMonitor
from qlightning.observers import available_observers, register_observer
from qlightning.quantized_engine import quantized_engine

__all__ = [
    "ExportVerificationError",
    "available_formats",
    "compare_layers",
    "LayerError",
    "LayerReport",
    "export",
    "PostTrainingQuantization",
    "QParamMonitor",
    "QuantizationAwareTraining",
    "QuantizationConfigError",
    "UntraceableModelError",
    "available_backends",
    "available_modes",
    "available_observers",
    "get_backend",
    "quantized_engine",
    "register_backend",
    "register_observer",
]
__version__ = "0.1.0"
