"""PT2 export: the converted program saved with ``torch.export.save`` (loadable with ``torch.export.load``;
lowerable with inductor or ExecuTorch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def write(converted: torch.nn.Module, example_inputs: tuple, path: Path) -> None:
    from qlightning.modes.base import batch_of_two, dynamic_batch

    example_inputs = batch_of_two(example_inputs)
    dynamic = dynamic_batch(example_inputs, torch.export.Dim("batch"))
    program = torch.export.export(converted.graph_module, example_inputs, dynamic_shapes=dynamic)
    with open(path, "wb") as f:
        torch.export.save(program, f)


def _load(path: Path):
    # An open file, not the path: the exporter verifies a staged file whose name ends in ``.tmp``, and
    # torch 2.14.1's ``torch.export.load`` warns "Unable to load package" for any path not ending in
    # ``.pt2`` (a buffer is accepted quietly).
    with open(path, "rb") as f:
        return torch.export.load(f)


def runtime_version() -> str:
    return torch.__version__


def run(path: Path, inputs: tuple) -> np.ndarray:
    module = _load(path).module()
    with torch.no_grad():
        out = module(*inputs)
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    return np.concatenate([o.reshape(o.shape[0], -1).numpy() for o in outputs], axis=1)


# Ops whose second argument is a weight.
_WEIGHTED = {"aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.linear.default",
             "aten.conv_transpose2d.input"}


def op_counts(path: Path) -> tuple[int, int]:
    program = _load(path)
    dequantized = set()
    quantized = floating = 0
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "quantized_decomposed" in name:
            if "dequantize" in name:
                dequantized.add(node)
            continue
        weight = node.args[1] if name in _WEIGHTED and len(node.args) > 1 else None
        # A layer kept float (skip=) reads a dequantized activation but a float weight.
        if any(arg in dequantized for arg in node.all_input_nodes) and (weight is None or weight in dequantized):
            quantized += 1
        elif "aten." in name and not any(s in name for s in ("view", "reshape", "flatten", "sym_size", "getitem")):
            floating += 1
    return quantized, floating


def float_size_bytes(path: Path) -> int:
    program = _load(path)
    extra = sum(3 * t.numel() for t in program.state_dict.values() if t.dtype in (torch.int8, torch.uint8))
    extra += sum(3 * t.numel() for t in program.constants.values()
                 if isinstance(t, torch.Tensor) and t.dtype in (torch.int8, torch.uint8))
    return path.stat().st_size + extra
