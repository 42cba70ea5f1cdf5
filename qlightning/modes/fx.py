"""FX graph mode: symbolic trace, QConfigMapping + BackendConfig, ``prepare_qat_fx``/``convert_fx``."""

from __future__ import annotations

import copy

import torch.ao.quantization as tq
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

from qlightning.backends import Backend
from qlightning.modes import _ao
from qlightning.modes.base import QuantMode
from qlightning.observers import get_observer
from qlightning.quantized_engine import quantized_engine
from qlightning.spec import QuantRecipe


def qat_qconfig_mapping(recipe: QuantRecipe, engine: str) -> tq.QConfigMapping:
    """Our QConfig everywhere, except ops with fixed output ranges (sigmoid, tanh, softmax...),
    which keep PyTorch's fixed-qparams fake quantizers: their range is known, not observed."""
    defaults = tq.get_default_qat_qconfig_mapping(engine)
    mapping = tq.QConfigMapping().set_global(_ao.qat_qconfig(recipe))
    for op, qconfig in defaults.object_type_qconfigs.items():
        if qconfig is not None and isinstance(qconfig.activation(), tq.FixedQParamsFakeQuantize):
            mapping.set_object_type(op, qconfig)
    return mapping


class FxMode(QuantMode):
    name = "fx"

    def prepare_qat(self, network, example_inputs, recipe: QuantRecipe, backend: Backend, **_):
        mapping = qat_qconfig_mapping(recipe, backend.engine)
        backend_config = backend.fx_backend_config()
        try:
            prepared = prepare_qat_fx(network.train(), mapping, example_inputs, backend_config=backend_config)
        except Exception as exc:  # noqa: BLE001 - symbolic tracing raises many exception types
            raise self.untraceable(network, exc) from exc
        # Kept for convert: FX needs the same mapping and backend config on both sides.
        prepared.meta["qlightning_qconfig_mapping"] = mapping
        if get_observer(recipe.observer).learnable:
            _ao.seed_lsq(prepared, example_inputs)
        return prepared

    def convert(self, prepared, backend):
        model = copy.deepcopy(prepared).cpu().eval()
        with quantized_engine(backend.engine):
            return convert_fx(
                model,
                qconfig_mapping=prepared.meta.get("qlightning_qconfig_mapping"),
                backend_config=backend.fx_backend_config(),
            )

    def quantizers(self, prepared):
        return _ao.quantizers(prepared)

    def set_observers_enabled(self, prepared, enabled):
        _ao.set_observers_enabled(prepared, enabled)

    def freeze_bn(self, prepared):
        _ao.freeze_bn(prepared)

    def enforce_frozen_bn(self, prepared):
        _ao.enforce_frozen_bn(prepared)

    def bn_modules_or_nodes(self, prepared):
        return _ao.batchnorms(prepared)
