"""Backend registry. A backend says which integer ranges its kernels accept and how each mode
expresses that: an FX ``BackendConfig``, a PT2E ``Quantizer`` and the eager/FX int8 engine.

Factories import ``torch.ao`` / ``torchao`` lazily, so importing a backend never touches a mode that a
future torch may have removed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from qlightning.registry import Registry, require_modules
from qlightning.spec import TensorQuantSpec

ALL_MODES = frozenset({"eager", "fx", "pt2e"})


@dataclass(frozen=True)
class WideActivation:
    """A 16-bit activation type the backend's runtime executes with its 8-bit weights (A16W8)."""

    # Its integer range and default scheme.
    spec: TensorQuantSpec
    # The activation schemes the runtime takes for it.
    schemes: tuple[str, ...]
    # How the runtime runs it, for error messages and docs.
    note: str = ""


@dataclass(frozen=True)
class Backend:
    name: str
    # ``torch.backends.quantized.engine`` that runs eager/FX int8 models for this backend.
    engine: str
    activation: TensorQuantSpec
    weight: TensorQuantSpec
    fx_backend_config: Callable[[], Any]
    # Builds a torchao PT2E Quantizer from a torchao ``QuantizationConfig``.
    pt2e_quantizer: Callable[[Any], Any]
    modes: frozenset = field(default=ALL_MODES)
    # The runtime needs a split's outputs to share its input's qparams (ONNX Runtime, TFLite).
    shared_split_qparams: bool = False
    # Whether PyTorch's int8 kernels (``engine``) run this layout; if not, FX converts through PT2E.
    torch_int8_kernels: bool = True
    description: str = ""
    # The runtime's concat needs one scale on its inputs and output (LiteRT's CONCATENATION): the ReLU
    # merge then leaves clamps whose input quantizer the concat shares.
    same_scale_concat: bool = False
    # FX traces nn.SiLU as x * sigmoid(x), so the runtime's integer sigmoid and mul kernels run it.
    fx_silu_as_sigmoid_mul: bool = False
    # 16-bit activation types (A16W8) the runtime executes, by dtype name; PT2E only.
    wide_activations: tuple[tuple[str, WideActivation], ...] = ()
    # pip extra bringing the modules its quantizer needs (checked when a callback is constructed)
    extra: str | None = None
    required_modules: tuple[str, ...] = ()

    @property
    def activation_dtypes(self) -> list[str]:
        """The activation dtypes this backend takes: its 8-bit one first, then the 16-bit ones."""
        return [self.activation.dtype] + [name for name, _ in self.wide_activations]

    def wide_activation(self, dtype: str) -> WideActivation | None:
        return dict(self.wide_activations).get(dtype)

    def check_installed(self) -> None:
        """Raise ImportError naming the pip extra when a module the backend's quantizer needs is missing."""
        require_modules(f"backend={self.name!r}", self.required_modules, self.extra)


_BACKENDS: Registry[Backend] = Registry("backend")


def register_backend(backend: Backend) -> Backend:
    return _BACKENDS.register(backend)


def get_backend(name: str) -> Backend:
    return _BACKENDS.get(name)


def available_backends() -> list[str]:
    return _BACKENDS.names()


def _build_fx_backend_config(module: str, function: str):
    import importlib

    # BackendConfig.set_backend_pattern_config needs this submodule loaded, and nothing in
    # ``torch.ao.quantization.backend_config`` imports it.
    importlib.import_module("torch.ao.quantization.backend_config.utils")
    return getattr(importlib.import_module(module), function)()


def fx_backend_config(module: str, function: str) -> Callable[[], Any]:
    """A factory for one of torch.ao's FX BackendConfigs, imported only when called. A partial of a
    module-level function, not a closure: callbacks holding a Backend must pickle (``ddp_spawn``)."""
    return functools.partial(_build_fx_backend_config, module, function)


def x86_inductor_quantizer(config):
    """The torchao PT2E quantizer for x86 CPUs, configured with our specs."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    return X86InductorQuantizer().set_global(config)
