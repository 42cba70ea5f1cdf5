"""Export formats. A format is a module-level ``write``/``run``/``op_counts``/``float_size_bytes``/
``runtime_version`` quintet, imported only when used; a new format is one ``register_format`` call."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from qlightning.registry import Registry, require_modules


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str
    module: str  # implements write(converted, example_inputs, path), run(path, inputs) -> ndarray, ...
    runtime: str  # what runs the file in verification
    # pip extra that brings the runtime/converter, named in the error when it is missing
    extra: str | None = None
    required_modules: tuple[str, ...] = ()
    # Files written beside the main one (OpenVINO's .bin): staged as ``<staged><suffix>``, published
    # as ``path.with_suffix(suffix)``, before the main file.
    companion_suffixes: tuple[str, ...] = ()
    # Whether the converter takes int8 weight constants (convert_pt2e's fold_quantize=True).
    folded_weights: bool = True
    # Backends whose integer layout the runtime executes (None: any). LiteRT's XNNPACK delegate
    # refuses uint8 activations ("unsupported zero-point value (-128) for UINT8 tensor"), which every
    # backend but `tflite` produces (measured with ai-edge-litert 2.x, 2026-11-25).
    backends: frozenset[str] | None = None
    # Whether the file has a fixed batch dimension (litert-torch 0.10 cannot lower a dynamic batch
    # through reshapes): such files are written for ``export(batch_size=...)``, default 1, the batch
    # an on-device app runs.
    fixed_batch: bool = False

    def check_installed(self) -> None:
        """Raise ImportError naming the pip extra when the format's converter/runtime is missing."""
        require_modules(f"format={self.name!r}", self.required_modules, self.extra)

    def check_backend(self, backend: str) -> None:
        """Raise QuantizationConfigError when files of this format cannot run a ``backend`` model."""
        if self.backends is not None and backend not in self.backends:
            from qlightning.errors import QuantizationConfigError

            raise QuantizationConfigError(
                f"export format {self.name!r} cannot run models quantized for backend {backend!r} "
                f"({self.runtime} would refuse its integer layout); train with backend in {sorted(self.backends)} "
                f"to export {self.name!r}, or export backend {backend!r} models to another format"
            )

    def load(self):
        self.check_installed()
        return importlib.import_module(self.module)


_FORMATS: Registry[ExportFormat] = Registry("export format")


def register_format(fmt: ExportFormat) -> ExportFormat:
    return _FORMATS.register(fmt)


def get_format(name: str) -> ExportFormat:
    return _FORMATS.get(name)


def available_formats() -> list[str]:
    return _FORMATS.names()


register_format(ExportFormat("onnx", ".onnx", "qlightning.exporters.onnx_format", "onnxruntime",
                             required_modules=("onnx", "onnxruntime", "onnxscript")))
register_format(ExportFormat("pt2", ".pt2", "qlightning.exporters.pt2_format", "torch"))
register_format(ExportFormat("tflite", ".tflite", "qlightning.exporters.tflite_format", "ai-edge-litert",
                             extra="tflite", required_modules=("litert_torch", "ai_edge_litert"), folded_weights=False,
                             backends=frozenset({"tflite"}), fixed_batch=True))
register_format(ExportFormat("openvino", ".xml", "qlightning.exporters.openvino_format", "openvino", extra="openvino",
                             required_modules=("openvino", "onnx", "onnxscript"), companion_suffixes=(".bin",)))
