"""Accuracy-aware fallback: layers move to float, most harmful first, until the int8 model's validated
metric is within ``max_accuracy_drop`` of the float network's (NNCF's accuracy control, AIMET's
AutoQuant). The metric is the LightningModule's own: its ``validation_step`` runs on the validation
loader with the network attribute pointing at the model under test."""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import asdict, dataclass, field

import lightning as L
import torchmetrics
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden

from qlightning.errors import QuantizationConfigError


@dataclass(frozen=True)
class FallbackStep:
    """One conversion of the search: the layers it kept float and the metric its int8 model scored."""

    float_layers: tuple[str, ...]
    metric: float
    added: str | None = None  # the layer this step moved to float (None: the first conversion)


@dataclass
class FallbackResult:
    monitor: str
    float_metric: float
    max_accuracy_drop: float
    steps: list[FallbackStep] = field(default_factory=list)

    @property
    def drop(self) -> float:
        return self.float_metric - self.steps[-1].metric

    @property
    def within_budget(self) -> bool:
        return self.drop <= self.max_accuracy_drop

    def to_dict(self) -> dict:
        return {"monitor": self.monitor, "float_metric": self.float_metric, "max_accuracy_drop": self.max_accuracy_drop,
                "drop": self.drop, "within_budget": self.within_budget,
                "float_layers": list(self.steps[-1].float_layers), "steps": [asdict(s) for s in self.steps]}


def check_fallback_options(max_accuracy_drop, monitor, max_float_layers) -> None:
    """``__init__`` validation."""
    if max_accuracy_drop is None:
        if monitor is not None:
            raise QuantizationConfigError(
                f"monitor={monitor!r} is read by the accuracy-aware fallback only: set max_accuracy_drop too"
            )
        return
    if (isinstance(max_accuracy_drop, bool) or not isinstance(max_accuracy_drop, numbers.Real)
            or not math.isfinite(max_accuracy_drop) or max_accuracy_drop < 0):
        raise QuantizationConfigError(
            f"max_accuracy_drop must be a number >= 0 in the monitored metric's units (e.g. 0.003 for 0.3 points "
            f"of an accuracy logged as a fraction), got {max_accuracy_drop!r}"
        )
    if not isinstance(monitor, str) or not monitor:
        raise QuantizationConfigError(
            "max_accuracy_drop needs monitor=<name of a metric the LightningModule logs in validation_step, "
            f"higher is better> (e.g. 'val/acc'), got monitor={monitor!r}"
        )
    if isinstance(max_float_layers, bool) or not isinstance(max_float_layers, int) or max_float_layers < 1:
        raise QuantizationConfigError(f"max_float_layers must be an integer >= 1, got {max_float_layers!r}")


def check_fallback_setup(trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
    """Refuse what would make the fallback fail after calibration, before any data is seen."""
    if not is_overridden("validation_step", pl_module):
        raise QuantizationConfigError(
            f"max_accuracy_drop validates the int8 model with {type(pl_module).__name__}.validation_step, which it "
            "does not define; define it (logging the monitored metric) or drop max_accuracy_drop"
        )
    if stage == "fit" and not trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined():
        raise QuantizationConfigError(
            "max_accuracy_drop validates the int8 model on the validation loader, and this fit has none: pass "
            "val_dataloaders=... or a datamodule with val_dataloader()"
        )
    if trainer.world_size > 1:
        raise QuantizationConfigError(
            "max_accuracy_drop is not supported under DDP yet (each rank would validate its own shard and could "
            "keep different layers float); quantize in one process, or drop max_accuracy_drop"
        )


def _not_logged(monitor: str, logged) -> QuantizationConfigError:
    return QuantizationConfigError(
        f"monitor={monitor!r} is not logged in validation_step; logged metrics: {sorted(logged) or 'none'}"
    )


def check_monitor_logged(trainer: Trainer, monitor: str) -> None:
    """After the first validation run (the sanity check, or validate's own run): the metric must be there."""
    if monitor not in trainer.callback_metrics:
        raise _not_logged(monitor, trainer.callback_metrics)


def validation_loader(trainer: Trainer):
    loaders = trainer.val_dataloaders
    if loaders is None and trainer.datamodule is not None:
        loaders = trainer.datamodule.val_dataloader()
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise QuantizationConfigError("max_accuracy_drop needs a validation loader, and there is none")
    return loaders


def validated_metric(pl_module: LightningModule, attr: str, network, loader, monitor: str, limit) -> float:
    """``monitor`` as the LightningModule's ``validation_step`` logs it with ``network`` in ``attr``.

    On a copy of the LightningModule, in a trainer of its own: validating inside another trainer's hook
    must leave that trainer's module, loggers and progress bars untouched (hence no logger, bar or
    summary here: they would print and log an internal evaluation as if it were the user's run)."""
    probe = copy.deepcopy(pl_module)
    setattr(probe, attr, network)
    # Lightning caches id(metric) -> attribute name for torchmetrics logged with self.log; the copy's
    # metrics have new ids (Lightning 2.6: "Could not find the LightningModule attribute").
    probe._metric_attributes = None
    # The copy also carries its torchmetrics' running state: called from on_validation_end, the
    # LightningModule's accuracy still held the float run's counts, and the int8 model scored their average.
    for module in probe.modules():
        if isinstance(module, torchmetrics.Metric):
            module.reset()
    evaluator = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=limit)
    results = evaluator.validate(probe, dataloaders=loader, verbose=False)
    metrics = results[0] if results else {}
    if monitor not in metrics:
        raise _not_logged(monitor, metrics)
    return float(metrics[monitor])
