"""Selecting PyTorch's int8 kernel library (``torch.backends.quantized.engine``)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def quantized_engine(engine: str):
    """Run int8 eager/FX models on ``engine`` ("x86", "fbgemm", "qnnpack") inside the block.

    Several int8 kernels (e.g. ``quantized_resize_cpu_``) have no deterministic variant; under
    ``torch.use_deterministic_algorithms(True)`` (``Trainer(deterministic=True)``) they would raise, so
    inside the block determinism is relaxed to a warning.

    The MHA / TransformerEncoderLayer fast path is off inside the block: its eligibility check (torch
    2.14.1, ``TransformerEncoderLayer.forward``) reads ``linear1.weight.device``, and on torch.ao's
    dynamically quantized Linear ``weight`` is a method, so an int8 ``nn.TransformerEncoder`` raised
    "'function' object has no attribute 'device'". The fast path is a float kernel anyway.
    """
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise RuntimeError(f"quantized engine {engine!r} is not available in this torch build; have {supported}")
    previous = torch.backends.quantized.engine
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.quantized.engine = engine
    torch.backends.mha.set_fastpath_enabled(False)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
        torch.backends.mha.set_fastpath_enabled(fastpath)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


class _EngineScope:
    """Forward hooks running a module inside :func:`quantized_engine` (a plain object, so the model
    still deep-copies and pickles)."""

    def __init__(self, engine: str):
        self.engine = engine
        self._open: list = []  # one entry per forward in progress (re-entrant)

    def enter(self, module, args) -> None:
        scope = quantized_engine(self.engine)
        scope.__enter__()
        self._open.append(scope)

    def exit(self, module, args, output) -> None:
        if self._open:
            self._open.pop().__exit__(None, None, None)

    def __getstate__(self):
        return {"engine": self.engine, "_open": []}


def bind_quantized_engine(model: torch.nn.Module, engine: str) -> torch.nn.Module:
    """Make ``model`` (an eager/FX int8 model) select ``engine`` whenever it runs, so it works as
    handed out: whatever ``torch.backends.quantized.engine`` is, and under
    ``torch.use_deterministic_algorithms(True)``. Returns ``model``."""
    _attach_engine_scope(model, engine)
    if isinstance(model, torch.fx.GraphModule) and not any(
        isinstance(hook, _RebindOnCopy) for hook in model._deepcopy_hooks
    ):
        # torch 2.14's GraphModule.__deepcopy__ drops forward hooks (it keeps only state-dict hooks, see
        # the comment there); its deepcopy hooks run on the copy, so bind the copy again. The hook list
        # is copied along, so copies of copies stay bound.
        model._register_deepcopy_hook(_RebindOnCopy(engine))
    return model


class _RebindOnCopy:
    def __init__(self, engine: str):
        self.engine = engine

    def __call__(self, copied: torch.nn.Module) -> None:
        _attach_engine_scope(copied, self.engine)


def _attach_engine_scope(model: torch.nn.Module, engine: str) -> None:
    scope = _EngineScope(engine)
    model.register_forward_pre_hook(scope.enter)
    # always_call: the engine and determinism settings are restored when forward raises, too.
    model.register_forward_hook(scope.exit, always_call=True)
