"""OpenVINO IR (``.xml`` + ``.bin`` beside it): the converted PT2E program goes out as ONNX QDQ (the
ONNX exporter's layout), ``openvino.convert_model`` reads that, and ``openvino.save_model`` writes
the IR with fp32 (not fp16-compressed) float constants. OpenVINO's low-precision transformations
run the quantized Convolution / MatMul layers in u8/i8. Verification compiles the IR for CPU with
f32 inference precision (no bf16 on AMX machines), so differences are quantization, not float format.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

# Layers whose runtime precision says whether OpenVINO runs them on integers.
_COMPUTE = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"}


def weights_path(path: Path) -> Path:
    """Where the ``.bin`` of the IR at ``path`` lives: beside a published ``net.xml`` as ``net.bin``;
    beside a staged ``.net.xml.<random>.xml.tmp`` as ``<staged>.bin`` (the exporter's convention)."""
    path = Path(path)
    return path.with_suffix(".bin") if path.suffix == ".xml" else Path(f"{path}.bin")


def write(converted: torch.nn.Module, example_inputs: tuple, path: Path) -> None:
    import openvino as ov

    from qlightning.exporters import onnx_format

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".openvino-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_format.write_qdq(converted, example_inputs, onnx_path)
        model = ov.convert_model(str(onnx_path))
        # save_model names the .bin after the .xml; the exporter keeps staged names of its own.
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        os.replace(Path(tmp) / "model.bin", weights_path(path))
        os.replace(Path(tmp) / "model.xml", path)


def _compiled(path: Path):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path), str(weights_path(path)))
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def run(path: Path, inputs: tuple) -> np.ndarray:
    compiled = _compiled(path)
    result = compiled([x.detach().cpu().numpy() for x in inputs])
    return np.asarray(result[compiled.outputs[0]])


def _layer_precisions(path: Path) -> Counter:
    runtime = _compiled(path).get_runtime_model()
    return Counter(
        (str(op.get_rt_info()["layerType"].astype(str)), str(op.get_rt_info()["runtimePrecision"].astype(str)))
        for op in runtime.get_ops()
    )


def op_counts(path: Path) -> tuple[int, int]:
    """(compute layers OpenVINO runs in u8/i8, compute layers it runs in float)."""
    quantized = floating = 0
    for (layer, precision), count in _layer_precisions(path).items():
        if layer in _COMPUTE:
            if precision in ("u8", "i8"):
                quantized += count
            else:
                floating += count
    return quantized, floating


def float_size_bytes(path: Path) -> int:
    """The IR's size with its 8-bit constants stored as fp32."""
    import openvino as ov

    model = ov.Core().read_model(str(path), str(weights_path(path)))
    eight_bit = sum(
        op.get_byte_size()
        for op in model.get_ops()
        if op.get_type_name() == "Constant" and op.get_element_type() in (ov.Type.i8, ov.Type.u8)
    )
    return path.stat().st_size + weights_path(path).stat().st_size + 3 * eight_bit


def runtime_version() -> str:
    import openvino as ov

    return ov.get_version()
