"""Finding the network to quantize inside a LightningModule and the inputs to trace it with."""

from __future__ import annotations

import torch
from torch import nn

from qlightning.errors import QuantizationConfigError


def _candidate_networks(pl_module: nn.Module) -> list[str]:
    # Children without parameters (losses, metrics, activations) are not networks.
    return [name for name, child in pl_module.named_children() if any(True for _ in child.parameters())]


def resolve_network(pl_module: nn.Module, module: str | None) -> str:
    """Name of the LightningModule attribute that holds the network to quantize."""
    candidates = _candidate_networks(pl_module)
    if module is not None:
        child = getattr(pl_module, module, None)
        if not isinstance(child, nn.Module):
            raise QuantizationConfigError(
                f"module={module!r} is not a submodule of {type(pl_module).__name__}; "
                f"its networks are: {candidates or 'none'}"
            )
        return module
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise QuantizationConfigError(
            f"{type(pl_module).__name__} has no child module with parameters to quantize; keep the network "
            "in an attribute (e.g. self.net = MyNet()) and pass module='net'"
        )
    raise QuantizationConfigError(
        f"{type(pl_module).__name__} has several child networks {candidates}; say which one to quantize "
        "with module=<name>"
    )


def check_float_network(network: nn.Module, attr: str) -> None:
    """Refuse a network that already holds quantizers (prepared for QAT/PTQ, or fake-quantized):
    quantizing it again would trace qlightning's own wrappers and fail far from the cause."""
    from qlightning.passes.graph import is_quantizer

    quantizers = [name for name, m in network.named_modules() if is_quantizer(m)]
    if quantizers:
        shown = ", ".join(quantizers[:3]) + (", ..." if len(quantizers) > 3 else "")
        raise QuantizationConfigError(
            f"`{attr}` is already prepared for quantization: it holds {len(quantizers)} quantizers ({shown}). "
            "Quantize the float network (a fresh model, or one restored from a float checkpoint); the int8 model "
            "of a QAT run is `QuantizationAwareTraining.quantized_model`"
        )


def resolve_example_inputs(pl_module, example_inputs) -> tuple:
    inputs = example_inputs if example_inputs is not None else getattr(pl_module, "example_input_array", None)
    if inputs is None:
        raise QuantizationConfigError(
            "quantization needs example inputs to trace and calibrate the network: set "
            "`self.example_input_array` in the LightningModule or pass example_inputs=... to the callback"
        )
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, dict) or not isinstance(inputs, (tuple, list)):
        raise QuantizationConfigError(
            f"example inputs must be a tensor or a tuple of positional inputs, got {type(inputs).__name__}"
        )
    device = next(pl_module.parameters(), torch.empty(0)).device
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
