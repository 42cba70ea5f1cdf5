"""Validation shared by the quantization callbacks: choices are checked in ``__init__``, so a typo
fails before any data is loaded or any training step is spent."""

from __future__ import annotations

from typing import Sequence

from qlightning.backends import Backend, get_backend
from qlightning.errors import QuantizationConfigError, unknown_choice
from qlightning.modes.registry import validate_mode
from qlightning.observers import get_observer
from qlightning.spec import QuantRecipe

WEIGHT_SCHEMES = ("per_channel_symmetric", "per_channel_affine", "per_tensor_symmetric", "per_tensor_affine")
ACTIVATION_SCHEMES = ("per_tensor_affine", "per_tensor_symmetric")


def check_epoch(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise QuantizationConfigError(f"{name} must be None or an epoch number >= 0, got {value!r}")


def _scheme(kind: str, value: str, valid: Sequence[str]) -> tuple[bool, bool]:
    """(symmetric, per_channel) of a scheme name."""
    if value not in valid:
        raise unknown_choice(f"{kind} scheme", value, valid)
    return value.endswith("symmetric"), value.startswith("per_channel")


def build_recipe(
    mode: str, backend: str, observer: str, weight_scheme: str, activation_scheme: str
) -> tuple[Backend, QuantRecipe]:
    """Check every choice and return the backend and the recipe the modes consume."""
    validate_mode(mode)
    backend_obj = get_backend(backend)
    if mode not in backend_obj.modes:
        raise QuantizationConfigError(
            f"backend {backend!r} does not support mode {mode!r}; it supports {sorted(backend_obj.modes)}"
        )
    if mode == "pt2e":  # the FX BackendConfigs are torch.ao's; the PT2E quantizers may be a pip extra's
        backend_obj.check_installed()
    get_observer(observer)
    w_sym, w_pc = _scheme("weight", weight_scheme, WEIGHT_SCHEMES)
    a_sym, a_pc = _scheme("activation", activation_scheme, ACTIVATION_SCHEMES)
    recipe = QuantRecipe(
        activation=backend_obj.activation.with_scheme(symmetric=a_sym, per_channel=a_pc),
        weight=backend_obj.weight.with_scheme(symmetric=w_sym, per_channel=w_pc),
        observer=observer,
    )
    return backend_obj, recipe


def check_modules_to_fuse(mode: str, modules_to_fuse) -> None:
    if modules_to_fuse is not None and mode != "eager":
        raise QuantizationConfigError(
            f"modules_to_fuse applies to mode='eager' only; mode={mode!r} fuses from its BackendConfig/Quantizer"
        )
    if modules_to_fuse is not None and (
        isinstance(modules_to_fuse, str)
        or not all(not isinstance(g, str) and all(isinstance(n, str) for n in g) for g in modules_to_fuse)
    ):
        raise QuantizationConfigError(
            f"modules_to_fuse must be a list of groups of submodule names, e.g. [['conv1', 'bn1', 'relu1']], "
            f"got {modules_to_fuse!r}"
        )


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise QuantizationConfigError(f"{name} must be True or False, got {value!r}")
