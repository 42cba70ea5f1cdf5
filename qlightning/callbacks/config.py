"""Validation shared by the quantization callbacks: choices are checked in ``__init__``, so a typo
fails before any data is loaded or any training step is spent."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from qlightning.backends import Backend, available_backends, get_backend
from qlightning.errors import QuantizationConfigError, unknown_choice
from qlightning.modes.registry import validate_mode
from qlightning.observers import get_observer
from qlightning.spec import DTYPE_RANGES, QuantRecipe, TensorQuantSpec

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


def activation_scheme_name(spec: TensorQuantSpec) -> str:
    return "per_tensor_symmetric" if spec.symmetric else "per_tensor_affine"


def _activation_spec(backend: Backend, mode: str, dtype: str | None, scheme: str | None) -> TensorQuantSpec:
    """The activation spec for ``activation_dtype`` / ``activation_scheme`` (``None``: the backend's)."""
    if dtype is None or dtype == backend.activation.dtype:
        spec, schemes = backend.activation, ACTIVATION_SCHEMES
    else:
        if dtype not in DTYPE_RANGES:
            raise unknown_choice("activation dtype", dtype, DTYPE_RANGES)
        wide = backend.wide_activation(dtype)
        if wide is None:
            runners = [name for name in available_backends() if get_backend(name).wide_activation(dtype)]
            raise QuantizationConfigError(
                f"backend {backend.name!r} runs activations as {backend.activation_dtypes}, not "
                f"activation_dtype={dtype!r}; backends whose runtime executes {dtype} activations: {runners}"
            )
        if mode != "pt2e":
            raise QuantizationConfigError(
                f"activation_dtype={dtype!r} needs mode='pt2e': torch.ao's eager and FX modes quantize "
                f"activations to quint8/qint8 only (torch 2.14.1); got mode={mode!r}"
            )
        spec, schemes = wide.spec, wide.schemes
    if scheme is None:
        return spec
    a_sym, a_pc = _scheme("activation", scheme, ACTIVATION_SCHEMES)
    if scheme not in schemes:
        raise QuantizationConfigError(
            f"backend {backend.name!r} runs {spec.dtype} activations only as {list(schemes)}, got "
            f"activation_scheme={scheme!r} ({backend.wide_activation(spec.dtype).note})"
        )
    return spec.with_scheme(symmetric=a_sym, per_channel=a_pc)


def build_recipe(
    mode: str, backend: str, observer: str, weight_scheme: str, activation_scheme: str | None,
    activation_dtype: str | None = None,
) -> tuple[Backend, QuantRecipe]:
    """Check every choice and return the backend and the recipe the modes consume.

    ``activation_dtype=None`` is the backend's 8-bit type; ``activation_scheme=None`` the backend's
    scheme for the chosen type (LiteRT's int16 activations are symmetric, its int8 ones affine)."""
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
    recipe = QuantRecipe(
        activation=_activation_spec(backend_obj, mode, activation_dtype, activation_scheme),
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


def check_compile(mode: str, observer: str, value) -> dict[str, Any] | None:
    """``torch.compile`` options for ``compile=`` (``True``: none), or ``None`` when off."""
    if value is False:
        return None
    if value is True:
        options = {}
    elif isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        options = dict(value)
    else:
        raise QuantizationConfigError(
            f"compile must be True, False or a dict of torch.compile options (e.g. {{'mode': 'max-autotune'}}), "
            f"got {value!r}"
        )
    from qlightning.modes.registry import get_mode

    impl = get_mode(mode)
    if not impl.compiles_training:
        raise QuantizationConfigError(
            f"compile=True trains through torch.compile in mode='pt2e' only, got mode={mode!r}: eager and FX "
            f"quantizers come from torch.ao.quantization, which is deprecated; use mode='pt2e', or compile=False"
        )
    impl.check_compilable(observer)
    return options


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise QuantizationConfigError(f"{name} must be True or False, got {value!r}")
