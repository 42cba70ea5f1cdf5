"""Quantization backends. Importing this package registers the built-in ones."""

from qlightning.backends import fbgemm, onnxruntime, openvino, qnnpack, tflite, x86  # noqa: F401  (registration side effects)
from qlightning.backends.registry import (
    Backend,
    available_backends,
    get_backend,
    register_backend,
)

__all__ = ["Backend", "available_backends", "get_backend", "register_backend"]
