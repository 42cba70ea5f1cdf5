"""qlightning: quantization as Lightning callbacks."""

from qlightning.backends import available_backends, get_backend, register_backend
from qlightning.callbacks import PostTrainingQuantization, QuantizationAwareTraining
from qlightning.errors import ExportVerificationError, QuantizationConfigError, UntraceableModelError
from qlightning.exporters import available_formats, export
from qlightning.modes import available_modes
from qlightning.monitoring import QParamMonitor
from qlightning.observers import available_observers, register_observer
from qlightning.quantized_engine import quantized_engine

__all__ = [
    "ExportVerificationError",
    "available_formats",
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
