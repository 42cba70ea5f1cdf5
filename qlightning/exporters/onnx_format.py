"""ONNX (QDQ) export of a converted PT2E program, and running it in ONNX Runtime.

The program's ``quantized_decomposed`` quantize/dequantize ops become ONNX QuantizeLinear /
DequantizeLinear around float ops, the layout ONNX Runtime fuses into integer kernels (QLinearConv,
QGemm, QLinearAdd, ...). The batch dimension is dynamic and named ``batch``. A quantizer whose integer
range is narrower than its dtype (FBGEMM's 7-bit activations) gets a ``Clip`` of its integers after
``QuantizeLinear``, which has no range of its own (:mod:`qlightning.passes.quant_range`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# ONNX ops that only move or reshape data: neither "quantized" nor "float" compute.
_PLUMBING = {
    "QuantizeLinear", "DequantizeLinear", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Shape",
    "Gather", "Constant", "Identity", "Cast", "Slice", "Split", "Concat", "ConstantOfShape", "Expand",
}

# What a reduced-range quantizer's integer clamp after QuantizeLinear is exported as.
_INTEGER_CLAMPS = {"Clip", "Min", "Max"}

# Per-node debugging text torch.onnx (2.14.1, dynamo exporter) writes: the Python stack trace (with the
# training machine's file paths) and the FX node's printout. On the zoo's ViT it was 353 KB of a 518 KB
# int8 file, so its size ratio read 0.68 with every weight in int8 (issue 17). Module names
# (``namespace``, ``pkg.torch.onnx.name_scopes``) stay: they say which layer a node belongs to.
_DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def write(converted: torch.nn.Module, example_inputs: tuple, path: Path) -> None:
    import onnx

    from qlightning.modes.base import batch_of_two, dynamic_batch

    example_inputs = batch_of_two(example_inputs)
    # The ONNX optimizer logs every initializer it deduplicates at INFO; Hydra apps show INFO.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from qlightning.passes.quant_range import clamp_to_quant_range

    # On a copy: the converted program stays the torch model the file is checked against.
    gm = copy.deepcopy(converted.graph_module)
    clamp_to_quant_range(gm)
    dynamic = dynamic_batch(example_inputs, torch.export.Dim("batch"))
    program = torch.export.export(gm, example_inputs, dynamic_shapes=dynamic)
    onnx_program = torch.onnx.export(program, example_inputs, dynamo=True, optimize=True, verbose=False)
    model = onnx_program.model_proto
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = "batch"
    strip_debug_metadata(model)
    onnx.save(model, str(path))


def strip_debug_metadata(model) -> None:
    """Drop :data:`_DEBUG_METADATA` from every node of ``model`` (an ``onnx.ModelProto``), in place."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key not in _DEBUG_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def runtime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def run(path: Path, inputs: tuple) -> np.ndarray:

    session = _session(path)
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    outputs = session.run(None, feeds)
    return np.concatenate([o.reshape(o.shape[0], -1) if o.ndim else o.reshape(1, 1) for o in outputs], axis=1)


_SESSIONS: dict = {}


def _session(path: Path):
    import onnxruntime as ort

    key = (str(path), path.stat().st_mtime_ns)
    if key not in _SESSIONS:
        _SESSIONS.clear()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        _SESSIONS[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def op_counts(path: Path) -> tuple[int, int]:
    """(quantized, float) compute ops: an op is quantized when an input comes from DequantizeLinear
    (ONNX Runtime fuses DQ -> op -> Q into its integer kernel). A clamp of QuantizeLinear's integers
    (a reduced range: ``Clip``, or ``Min`` / ``Max`` where the ONNX optimizer turned a one-sided Clip
    into them) is part of the quantization, not compute."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    quantized = floating = 0
    for node in graph.node:
        if node.op_type in _PLUMBING:
            continue
        if node.op_type in _INTEGER_CLAMPS and producers.get(node.input[0]) == "QuantizeLinear":
            producers.update({out: "QuantizeLinear" for out in node.output})  # still Q's integers
            continue
        if any(producers.get(i) == "DequantizeLinear" for i in node.input):
            quantized += 1
        else:
            floating += 1
    return quantized, floating


def float_size_bytes(path: Path) -> int:
    """Size of the same file with its 8-bit initializers stored as fp32 (as the float network's weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    eight_bit = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    extra = sum(3 * int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in eight_bit)
    return path.stat().st_size + extra
