"""Structured configs for the ``quant`` group, registered in Hydra's ConfigStore.

The choices are enums built from the registries, so a typo such as ``quant.observer=minmaxx`` fails
when Hydra composes the config, naming the valid values, before any data is loaded. Each YAML in
``conf/quant/`` starts from one of these schemas (``defaults: [qat_schema, _self_]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from hydra.core.config_store import ConfigStore

from qlightning.backends import available_backends
from qlightning.callbacks.config import ACTIVATION_SCHEMES, WEIGHT_SCHEMES
from qlightning.exporters import available_formats
from qlightning.modes import available_modes
from qlightning.observers import available_observers, get_observer
from qlightning.spec import DTYPE_RANGES


def _choices(name: str, values) -> type[Enum]:
    return Enum(name, {v: v for v in values})


Mode = _choices("Mode", available_modes())
BackendName = _choices("BackendName", available_backends())
ObserverName = _choices("ObserverName", available_observers())
# QAT refuses the calibration methods of PTQ (percentile, entropy, mse): a QAT config fails at compose time.
QatObserverName = _choices(
    "QatObserverName", [o for o in available_observers() if not get_observer(o).calibration_only]
)
WeightScheme = _choices("WeightScheme", WEIGHT_SCHEMES)
ActivationScheme = _choices("ActivationScheme", ACTIVATION_SCHEMES)
ActivationDtype = _choices("ActivationDtype", sorted(DTYPE_RANGES))
ExportFormatName = _choices("ExportFormatName", available_formats())


@dataclass
class _QuantSchema:
    """Fields both callbacks take."""

    mode: Mode = Mode.pt2e
    backend: BackendName = BackendName.x86
    weight_scheme: WeightScheme = WeightScheme.per_channel_symmetric
    # null: the backend's scheme for the activation dtype (LiteRT's int16 activations are symmetric).
    activation_scheme: Optional[ActivationScheme] = None
    # null: the backend's 8-bit activations; int16 / uint16: A16W8 where the backend's runtime runs it.
    activation_dtype: Optional[ActivationDtype] = None
    merge_relu: bool = True
    # Layers kept float: module names, 're:'-prefixed regular expressions, 'class:<import path>' entries.
    skip: list[str] = field(default_factory=list)
    export: list[ExportFormatName] = field(default_factory=lambda: [ExportFormatName.onnx])
    export_dir: Optional[str] = None


@dataclass
class QatSchema(_QuantSchema):
    _target_: str = "qlightning.QuantizationAwareTraining"
    observer: QatObserverName = QatObserverName.moving_average_minmax
    freeze_bn_epoch: Optional[int] = None
    freeze_observers_epoch: Optional[int] = None
    fold_bn: bool = True
    # At fit end: per-layer SQNR against the float network with the trained weights (layers.json, loggers).
    layer_report: bool = True
    # Train through torch.compile (mode pt2e; observers minmax / moving_average_minmax). A dict of
    # torch.compile options is accepted from Python; configs take the switch.
    compile: bool = False
    # Run length of the QAT phase (read by the job, not a callback argument).
    epochs: int = 3


@dataclass
class PtqSchema(_QuantSchema):
    _target_: str = "qlightning.PostTrainingQuantization"
    observer: ObserverName = ObserverName.histogram
    dynamic: bool = False
    calibration_batches: int = 32
    # observer=percentile only: the share of values, in %, each activation range keeps, in (50, 100];
    # null: 99.99. PostTrainingQuantization checks the range and refuses it with other observers.
    percentile: Optional[float] = None
    # After conversion: per-layer SQNR against float, logged and written to <export_dir>/layers.json.
    layer_report: bool = True
    # Accuracy-aware fallback: layers move to float while `monitor` (logged in validation_step, higher is
    # better) is more than max_accuracy_drop (its units) below float; null: off.
    max_accuracy_drop: Optional[float] = None
    monitor: Optional[str] = None
    max_float_layers: int = 5


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="quant", name="qat_schema", node=QatSchema)
    store.store(group="quant", name="ptq_schema", node=PtqSchema)


register()
