"""LiteRT (TFLite) flatbuffer through litert-torch's converter, run in ai-edge-litert's Interpreter.

The converted PT2E program comes with float weights behind quantize/dequantize pairs
(``fold_quantize=False``): litert-torch's converter rejects ``dequantize`` of an int8 constant
(litert-torch issue 400, the QAT models that "fail to convert"). The batch dimension is fixed
(litert-torch 0.10 cannot lower a dynamic batch through reshapes) to the batch ``write`` is given,
``export(batch_size=1)`` by default, the batch an on-device app runs; ``run`` feeds other batch sizes
in chunks of it. With int8 model inputs/outputs the float inputs are
quantized with the input tensor's qparams and the outputs dequantized, as an app would.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# Ops that compute (rather than move data); quantized when their first input is int8.
_COMPUTE = {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL", "ADD", "MUL", "SUB",
            "AVERAGE_POOL_2D", "MEAN"}
_WEIGHTED = {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED"}
# Integer tensor types of quantized model inputs and outputs (int16: 16x8 models).
_INTEGER = (np.int8, np.uint8, np.int16)


_MATMULS = (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)


def outer_product_matmuls(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` (same parameters, a new graph) with every matmul whose contracted dimension is 1 written
    as the broadcast multiply it is: ``(..., M, 1) @ (..., 1, N) == (..., M, 1) * (..., 1, N)``, the same
    product of the same two numbers (exact), and matmul broadcasts batch dimensions as ``mul`` does.

    LiteRT's converter (litert-torch 0.10) breaks such a matmul: at batch 1 it makes the right operand a
    2-D ``tfl.batch_matmul`` input, and tfl-optimize's FuseReshapesAroundBatchMatMulLHS then folds the
    following view into the matmul, leaving a rank-3 operand with a rank-4 result, which its verifier
    rejects ("'tfl.batch_matmul' op found invalid output rank, expected 3 but got 4"). timm's
    efficientvit_m0 at 32x32 input reaches one token (H = W = 1) in its last two stages, where
    ``v @ attn.transpose(-2, -1)`` contracts over that one token. The float model converts (no
    quantize op after the view there); the quantized one failed in QAT and PTQ alike."""
    graph = copy.deepcopy(gm.graph)
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _MATMULS:
            continue
        a, b = node.args[:2]
        va = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
        vb = b.meta.get("val") if isinstance(b, torch.fx.Node) else None
        if va is None or vb is None or va.dim() < 2 or vb.dim() < 2 or va.shape[-1] != 1:
            continue
        with graph.inserting_before(node):
            mul = graph.call_function(torch.ops.aten.mul.Tensor, (a, b))
        mul.meta = dict(node.meta)
        node.replace_all_uses_with(mul)
        graph.erase_node(node)
        changed = True
    if not changed:
        return gm
    rewritten = torch.fx.GraphModule(gm, graph)
    rewritten.meta.update(gm.meta)
    return rewritten


def write(converted: torch.nn.Module, example_inputs: tuple, path: Path) -> None:
    import litert_torch

    for name in ("litert_torch", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    # The converter reads one thing from quant_config: that the graph's Q/DQ are static
    # (qdq_conversion_mode="STATIC"), so it fuses them into int8 kernels instead of keeping
    # QUANTIZE / DEQUANTIZE around float ops. The quantizer itself is not run again.
    static = QuantConfig(pt2e_quantizer=PT2EQuantizer().set_global(get_symmetric_quantization_config()))
    graph_module = outer_product_matmuls(converted.graph_module)
    edge = litert_torch.convert(graph_module, tuple(x.cpu() for x in example_inputs), quant_config=static)
    edge.export(str(path))
    widen_16x8_biases(path)


# LiteRT's 16x8 kernels and the bias type they take (tflite/kernels: DEPTHWISE_CONV_2D requires int64;
# CONV_2D, FULLY_CONNECTED and TRANSPOSE_CONV take int64 as well).
_INT64_BIAS_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"}


def widen_16x8_biases(path: Path) -> int:
    """Store the int32 biases of ops on int16 inputs as int64, in place; returns how many changed.

    litert-torch 0.10's converter gives 16x8 convolutions int32 biases, which LiteRT refuses when it
    prepares the model ("depthwise_conv.cc:177 bias->type != kTfLiteInt64 (INT32 != INT64)"). Same
    values, wider type; a bias the converter saturated at int32's limit cannot be recovered, so that
    raises instead."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    widened = 0
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            if op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode)) not in _INT64_BIAS_OPS:
                continue
            inputs = list(op.inputs)
            if len(inputs) < 3 or inputs[2] < 0 or subgraph.tensors[inputs[0]].type != schema.TensorType.INT16:
                continue
            bias = subgraph.tensors[inputs[2]]
            if bias.type != schema.TensorType.INT32:
                continue
            values = np.frombuffer(bytes(model.buffers[bias.buffer].data), dtype=np.int32)
            if values.size and np.abs(values.astype(np.int64)).max() >= np.iinfo(np.int32).max:
                raise ValueError(f"a 16x8 bias of {path.name} saturated int32 in the converter; it cannot be widened")
            model.buffers[bias.buffer].data = np.frombuffer(values.astype(np.int64).tobytes(), dtype=np.uint8)
            bias.type = schema.TensorType.INT64
            widened += 1
    if widened:
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        path.write_bytes(builder.Output())
    return widened


def _interpreter(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=2)


def _to_input(detail: dict, x: np.ndarray) -> np.ndarray:
    if detail["dtype"] in _INTEGER:
        scale, zero_point = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(detail["dtype"])
    return x.astype(detail["dtype"])


def _from_output(detail: dict, y: np.ndarray) -> np.ndarray:
    if detail["dtype"] in _INTEGER:
        scale, zero_point = detail["quantization"]
        return (y.astype(np.float32) - zero_point) * scale
    return y.astype(np.float32)


def run(path: Path, inputs: tuple) -> np.ndarray:
    interpreter = _interpreter(path)
    interpreter.allocate_tensors()
    input_details, output = interpreter.get_input_details(), interpreter.get_output_details()[0]
    batch = int(input_details[0]["shape"][0])
    arrays = [x.detach().cpu().numpy().astype(np.float32) for x in inputs]
    total = arrays[0].shape[0]
    results = []
    for start in range(0, total, batch):
        for detail, array in zip(input_details, arrays):
            chunk = array[start : start + batch]
            if chunk.shape[0] < batch:  # pad the last chunk to the model's batch, trimmed below
                chunk = np.concatenate([chunk, np.zeros((batch - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)])
            interpreter.set_tensor(detail["index"], _to_input(detail, chunk))
        interpreter.invoke()
        results.append(_from_output(output, interpreter.get_tensor(output["index"])))
    return np.concatenate(results)[:total]


def _ops(path: Path) -> tuple[list[dict], dict[int, dict]]:
    interpreter = _interpreter(path)
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return interpreter._get_ops_details(), tensors


def op_counts(path: Path) -> tuple[int, int]:
    """(compute ops on int8 / int16 inputs, compute ops on float inputs)."""
    quantized = floating = 0
    ops, tensors = _ops(path)
    for op in ops:
        if op["op_name"] not in _COMPUTE or len(op["inputs"]) == 0 or op["inputs"][0] < 0:
            continue
        if tensors[op["inputs"][0]]["dtype"] in _INTEGER:
            quantized += 1
        else:
            floating += 1
    return quantized, floating


def float_size_bytes(path: Path) -> int:
    """The file's size with the int8 weights of conv / fully-connected ops stored as fp32."""
    ops, tensors = _ops(path)
    eight_bit = 0
    for op in ops:
        if op["op_name"] in _WEIGHTED and len(op["inputs"]) > 1:
            weight = tensors[op["inputs"][1]]
            if weight["dtype"] == np.int8:
                eight_bit += int(np.prod(weight["shape"]))
    return path.stat().st_size + 3 * eight_bit


def runtime_version() -> str:
    from importlib.metadata import version

    return f"ai-edge-litert {version('ai-edge-litert')}, litert-torch {version('litert-torch')}"
