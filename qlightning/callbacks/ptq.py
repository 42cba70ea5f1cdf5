"""``PostTrainingQuantization``: int8 from a trained float network, by calibration or dynamically."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from qlightning.calibration import DEFAULT_PERCENTILE, check_percentile
from qlightning.callbacks.config import build_recipe, check_flag, check_modules_to_fuse
from qlightning.callbacks.fallback import (
    FallbackResult, FallbackStep, check_fallback_options, check_fallback_setup, check_monitor_logged, validation_loader,
    validated_metric,
)
from qlightning.callbacks.exporting import check_export_formats, export_formats, first_element_inputs, pass_check_inputs
from qlightning.callbacks.target import check_float_network, resolve_example_inputs, resolve_network
from qlightning.distributed import sync_quantizer_statistics
from qlightning.errors import QuantizationConfigError
from qlightning.modes.registry import get_mode
from qlightning.skip import SkipEntry, check_skip, resolve_skip
from qlightning.observers import available_observers, get_observer

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RNN = (nn.RNNBase, nn.RNNCellBase)
_DYNAMIC = (nn.Linear, *_RNN)


@contextlib.contextmanager
def _normal_tensors():
    """No autograd, but not inference mode: Lightning validates under ``torch.inference_mode``, whose
    tensors cannot be updated in place later, and observers and the int8 model must stay usable
    (further calibration, export) outside it."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class PostTrainingQuantization(Callback):
    """Post-training quantization in ``eager``, ``fx`` or ``pt2e`` mode.

    Static (default): observers are inserted into a copy of the trained network, which then sees
    ``calibration_batches`` batches, and is converted to int8. The batches are either

    * the train loader's, when ``trainer.fit`` ends (train float, then quantize), or
    * the batches of ``trainer.validate(...)``, so a trained checkpoint is quantized without training
      (``trainer.validate(model, datamodule, ckpt_path=...)``).

    Dynamic (``dynamic=True``): Linear / LSTM / GRU weights become int8 and their input activations
    are quantized at run time; no calibration. Done at the end of ``fit`` or ``validate``.

    The LightningModule keeps its float network; the int8 copy is :attr:`quantized_model`.

    Args:
        mode, backend, observer, module, example_inputs, weight_scheme, activation_scheme, activation_dtype,
            modules_to_fuse: as for :class:`~qlightning.QuantizationAwareTraining` (``observer`` must
            be one that calibrates: not ``"lsq"``, which learns its qparams by training). PTQ also takes
            the calibration methods ``"percentile"``, ``"entropy"`` (KL divergence, TensorRT's) and
            ``"mse"``, which pick each activation range from a histogram of the calibration data
            (:mod:`qlightning.calibration`); weights keep min/max.
        percentile: with ``observer="percentile"``: the share of observed values, in %, each activation
            range keeps, in (50, 100] (default 99.99; 100 is min/max).
        skip: layers kept float, as for :class:`~qlightning.QuantizationAwareTraining` (static and dynamic).
        dynamic: dynamic instead of static quantization.
        calibration_batches: number of batches to calibrate static quantization on.
        batch_to_inputs: turns a batch into the network's positional inputs; default: the batch if
            it is a tensor, else its first element.
        export / export_dir: formats to export the int8 model to (``["onnx"]``, ``"pt2"``) when it is
            made, under ``export_dir`` (default ``<trainer.log_dir>/quantized``); each file is verified
            in its runtime and gets a ``.report.json`` (:func:`qlightning.export`).
        merge_relu: after calibration, merge ReLU/clamp into the following quantizer's qparams
            (FX, PT2E; BatchNorm is already folded when PTQ inserts its observers).
        layer_report: after conversion, measure each quantized layer's error against the float network
            (:func:`qlightning.compare_layers`, on a validation batch) into :attr:`layers`, log it
            (``quant/layer_sqnr/<layer>`` scalars; a bar chart in TensorBoard) and, with ``export``, write
            ``<export_dir>/layers.json``.
        max_accuracy_drop / monitor / max_float_layers: accuracy-aware fallback. After conversion the int8
            model is validated with the LightningModule's own ``validation_step`` on the validation loader;
            while ``monitor`` (a metric it logs, higher is better) is more than ``max_accuracy_drop`` (in the
            metric's units: 0.003 is 0.3 points of an accuracy logged as a fraction) below the float
            network's, the layer whose float fallback gains the output most (``report.worst``) moves to float and the
            network is calibrated (on the same batches) and converted again, up to ``max_float_layers``
            layers. The search is in :attr:`fallback`, logged, and in ``summary.json``.
    """

    def __init__(
        self,
        mode: str = "pt2e",
        backend: str = "x86",
        observer: str = "histogram",
        dynamic: bool = False,
        calibration_batches: int = 32,
        *,
        percentile: float | None = None,
        module: str | None = None,
        example_inputs: Any = None,
        weight_scheme: str = "per_channel_symmetric",
        activation_scheme: str | None = None,
        activation_dtype: str | None = None,
        modules_to_fuse: Sequence[Sequence[str]] | None = None,
        skip: Sequence[SkipEntry] | None = None,
        batch_to_inputs: Callable[[Any], tuple] | None = None,
        merge_relu: bool = True,
        layer_report: bool = True,
        max_accuracy_drop: float | None = None,
        monitor: str | None = None,
        max_float_layers: int = 5,
        export: Sequence[str] | None = None,
        export_dir: str | None = None,
    ):
        self.backend, self.recipe = build_recipe(
            mode, backend, observer, weight_scheme, activation_scheme, activation_dtype
        )
        self.activation_dtype = self.recipe.activation.dtype
        if get_observer(observer).learnable:
            calibrating = [o for o in available_observers()
                           if not get_observer(o).learnable and not get_observer(o).calibration_only]
            methods = [o for o in available_observers() if get_observer(o).calibration_only]
            raise QuantizationConfigError(
                f"observer {observer!r} learns its qparams by gradient descent, which needs training: use "
                f"QuantizationAwareTraining, or one of the calibrating observers {calibrating} or calibration "
                f"methods {methods} for PTQ"
            )
        if percentile is not None and "percentile" not in get_observer(observer).options:
            raise QuantizationConfigError(
                f"percentile={percentile!r} applies to observer='percentile' only, got observer={observer!r}"
            )
        # The share of values the activation ranges keep; None unless observer="percentile".
        self.percentile: float | None = None
        if "percentile" in get_observer(observer).options:
            self.percentile = check_percentile(DEFAULT_PERCENTILE if percentile is None else percentile)
            self.recipe = dataclasses.replace(self.recipe, observer_options=(("percentile", self.percentile),))
        if not isinstance(dynamic, bool):
            raise QuantizationConfigError(f"dynamic must be True or False, got {dynamic!r}")
        if dynamic and self.recipe.activation.bits != 8:
            raise QuantizationConfigError(
                f"activation_dtype={activation_dtype!r} needs static quantization (dynamic=False): dynamic PTQ "
                "quantizes activations at run time with 8-bit int8 kernels"
            )
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise QuantizationConfigError(
                f"calibration_batches must be an integer >= 1, got {calibration_batches!r}"
            )
        check_modules_to_fuse(mode, modules_to_fuse)
        self.skip = check_skip(skip)
        # Module names of the network kept float, found at setup (fusion partners included).
        self.skipped_layers: tuple[str, ...] = ()
        check_flag("merge_relu", merge_relu)
        self.merge_relu = merge_relu
        check_flag("layer_report", layer_report)
        self.layer_report = layer_report
        check_fallback_options(max_accuracy_drop, monitor, max_float_layers)
        self.max_accuracy_drop, self.monitor, self.max_float_layers = max_accuracy_drop, monitor, max_float_layers
        # The accuracy-aware fallback's search (float metric, each conversion's layers and metric).
        self.fallback: FallbackResult | None = None
        self._calibration_inputs: list[tuple] = []
        # The per-layer error of the last int8 model (qlightning.compare_layers), when layer_report is on.
        self.layers = None
        self.export = check_export_formats(export, self.backend.name)
        if self.export and dynamic and mode != "pt2e":
            raise QuantizationConfigError(
                f"dynamic PTQ in mode={mode!r} makes torch.ao dynamic int8 modules, which the exporters cannot read; "
                "use mode='pt2e' to export dynamic PTQ"
            )
        if dynamic and "onnx" in self.export:
            # torch.onnx (2.14) has no translation for quantized_decomposed.choose_qparams, the run-time
            # qparams of dynamic quantization; found when the export failed at step 3/3.
            raise QuantizationConfigError(
                "dynamic PTQ cannot be exported to ONNX (torch.onnx cannot translate run-time qparams); export "
                "static PTQ/QAT models to ONNX, or dynamic ones with export=['pt2']"
            )
        self.export_dir = export_dir
        # Reports of the files exported by the last quantization, by format.
        self.exported: dict[str, dict] = {}
        if batch_to_inputs is not None and not callable(batch_to_inputs):
            raise QuantizationConfigError(f"batch_to_inputs must be callable, got {type(batch_to_inputs).__name__}")
        self.mode, self.observer, self.dynamic = mode, observer, dynamic
        self.calibration_batches = calibration_batches
        self.module = module
        self.example_inputs = example_inputs
        self.modules_to_fuse = modules_to_fuse
        self.batch_to_inputs = batch_to_inputs or first_element_inputs

        self.quantized_model: nn.Module | None = None
        # The calibrated network after the passes (clamps merged), observers frozen: what exporters
        # start from (static PTQ only).
        self.finalized_network: nn.Module | None = None
        # Batches the observers saw in the last calibration.
        self.calibrated_batches = 0
        self._impl = None
        self._attr: str | None = None
        self._example: tuple | None = None
        self._observed: nn.Module | None = None
        self._quantized_this_run = False
        self._trainer: Trainer | None = None

    @property
    def network_name(self) -> str | None:
        """The LightningModule attribute holding the network this callback quantizes (after setup)."""
        return self._attr

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, backend=self.backend.name, dynamic=self.dynamic)

    # -- setup: every check that can be made before training or validation starts -----------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        self._quantized_this_run = False
        self._trainer = trainer
        self._attr = resolve_network(pl_module, self.module)
        self._example = resolve_example_inputs(pl_module, self.example_inputs)
        self._impl = get_mode(self.mode)
        network = getattr(pl_module, self._attr)
        check_float_network(network, self._attr)
        self.skipped_layers = resolve_skip(network, self.skip)
        if self.max_accuracy_drop is not None:
            check_fallback_setup(trainer, pl_module, stage)
            self._calibration_inputs = []
        self._check_layers(network)
        if stage == "fit":
            # Quantization happens after training: find out now if the network cannot be captured
            # (or, in eager mode, run in int8), rather than after the last epoch.
            self._quantize_without_data(network) if self.dynamic else self._prepare(network)

    def _check_layers(self, network: nn.Module) -> None:
        # The guide's "choosing a quantization mode": advice, not a refusal.
        layers = list(network.modules())
        name = type(network).__name__
        if self.dynamic:
            if not any(isinstance(m, _DYNAMIC) for m in layers):
                raise QuantizationConfigError(
                    f"dynamic quantization has nothing to quantize in {name}: it applies to Linear, LSTM, GRU "
                    "and RNN layers only; use static quantization (dynamic=False) for this network"
                )
            if any(isinstance(m, _CONV) for m in layers):
                rank_zero_warn(
                    f"{name} has convolutions, which dynamic quantization leaves in float (there are no dynamic "
                    "int8 convolution kernels); static quantization (dynamic=False) is recommended for "
                    "convolutional networks"
                )
        elif any(isinstance(m, _RNN) for m in layers):
            rank_zero_warn(
                f"{name} has recurrent layers (LSTM/GRU/RNN), which have no static int8 kernels and stay float "
                "in static quantization; dynamic quantization (dynamic=True) is recommended for recurrent networks"
            )

    def _prepare(self, network: nn.Module) -> nn.Module:
        with _normal_tensors():
            return self._impl.prepare_ptq(
                network, self._example, self.recipe, self.backend, modules_to_fuse=self.modules_to_fuse,
                skip=self.skipped_layers,
            )

    def _quantize_without_data(self, network: nn.Module) -> nn.Module:
        with _normal_tensors():
            return self._impl.quantize_dynamic(network, self._example, self.recipe, self.backend,
                                               skip=self.skipped_layers)

    # -- fit route: calibrate on the train loader when training ends ------------------------------
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        network = getattr(pl_module, self._attr)
        if self.dynamic:
            self._finish(self._within_budget(self._quantize_without_data(network)))
            return
        loader = trainer.train_dataloader
        if loader is None:
            raise QuantizationConfigError("static PTQ at the end of fit needs the train dataloader, and there is none")
        if not isinstance(loader, Iterable) or isinstance(loader, (dict, list, tuple)):
            raise QuantizationConfigError(
                f"static PTQ calibrates on a single train dataloader, got {type(loader).__name__}; "
                "calibrate with trainer.validate(...) instead"
            )
        self._observed = self._prepare(network)
        self.calibrated_batches = 0
        for batch in loader:
            if self.calibrated_batches >= self.calibration_batches:
                break
            self._calibrate(trainer.strategy.batch_to_device(batch))
        self._convert()

    # -- validate route: calibrate on the batches of trainer.validate ------------------------------
    @staticmethod
    def _validating(trainer: Trainer) -> bool:
        return trainer.state.fn == TrainerFn.VALIDATING

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not in setup: the checkpoint passed to validate(ckpt_path=...) is loaded by now.
        if self._validating(trainer) and not self.dynamic:
            self._observed = self._prepare(getattr(pl_module, self._attr))
            self.calibrated_batches = 0

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Lightning skips the whole validation loop, hooks included, when it has no batch to run.
        if stage == "validate" and not self._quantized_this_run:
            raise QuantizationConfigError(
                "PostTrainingQuantization quantized nothing: trainer.validate ran no batch (empty dataloader or "
                "limit_val_batches=0), so there was no "
                + ("validation run to quantize at" if self.dynamic else "calibration data")
            )

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._observed is not None and self.calibrated_batches < self.calibration_batches:
            self._calibrate(batch)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.max_accuracy_drop is not None and trainer.is_global_zero:
            # The sanity check (fit) or validate's own run: the metric the fallback reads must be logged.
            check_monitor_logged(trainer, self.monitor)
        if not self._validating(trainer):
            return
        if self.dynamic:
            self._finish(self._within_budget(self._quantize_without_data(getattr(pl_module, self._attr))))
        else:
            self._convert()

    # -- shared -------------------------------------------------------------------------------------
    def _calibrate(self, batch) -> None:
        inputs = self.batch_to_inputs(batch)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        with _normal_tensors():
            self._observed(*inputs)
        self.calibrated_batches += 1
        if self.max_accuracy_drop is not None:  # the fallback calibrates again on the same batches
            self._calibration_inputs.append(tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs))

    def _convert(self) -> None:
        observed, self._observed = self._observed, None
        if self.calibrated_batches == 0:
            raise QuantizationConfigError(
                "static PTQ saw no calibration batch (the dataloader was empty): observers have no ranges to "
                "convert from"
            )
        if self.calibrated_batches < self.calibration_batches:
            rank_zero_warn(
                f"calibrated on {self.calibrated_batches} batches, fewer than calibration_batches="
                f"{self.calibration_batches}: the dataloader ran out"
            )
        # Under DDP each rank calibrated on its own shard: reduce the statistics over all ranks
        # so that every rank converts the same model.
        sync_quantizer_statistics(self._impl.observers(observed))
        self._finish(self._within_budget(self._finalize_and_convert(observed)))

    def _finalize_and_convert(self, observed: nn.Module) -> nn.Module:
        with _normal_tensors():
            self.finalized_network = self._impl.finalize(
                observed, self._example, fold_bn=False, merge_relu=self.merge_relu,
                share_split=self.backend.shared_split_qparams,
                keep_shared_quantizers=self.backend.same_scale_concat,
                check_inputs=pass_check_inputs(self._trainer, self.batch_to_inputs),
            )
            return self._impl.convert(self.finalized_network, self.backend)

    def _requantize(self, network: nn.Module) -> nn.Module:
        """Quantize ``network`` again with the current :attr:`skipped_layers`, on the stored batches."""
        if self.dynamic:
            return self._quantize_without_data(network)
        observed = self._prepare(network)
        with _normal_tensors():
            for inputs in self._calibration_inputs:
                observed(*inputs)
        return self._finalize_and_convert(observed)

    def _within_budget(self, quantized: nn.Module) -> nn.Module:
        """The accuracy-aware fallback (``max_accuracy_drop``); returns the int8 model it settles on."""
        if self.max_accuracy_drop is None:
            return quantized
        from qlightning.callbacks.exporting import check_inputs_from
        from qlightning.layers import compare_layers

        trainer = self._trainer
        pl_module = trainer.lightning_module
        float_network = getattr(pl_module, self._attr)
        loader = validation_loader(trainer)

        def evaluate(network) -> float:
            return validated_metric(pl_module, self._attr, network, loader, self.monitor, trainer.limit_val_batches)

        checks = check_inputs_from(trainer, self.batch_to_inputs)
        inputs = checks[0] if checks else self._example
        result = FallbackResult(self.monitor, evaluate(float_network), self.max_accuracy_drop,
                                [FallbackStep(self.skipped_layers, evaluate(quantized))])
        added: list[str] = []
        while not result.within_budget and len(added) < self.max_float_layers:
            report = compare_layers(float_network, quantized, inputs)
            ranked = [layer.name for layer in report.worst(len(report))]
            before = self.skipped_layers
            for name in ranked:  # the first whose fallback changes what stays float
                candidate = resolve_skip(float_network, [*self.skip, *added, name])
                if candidate != before:
                    added.append(name)
                    self.skipped_layers = candidate
                    break
            else:
                break  # every quantized layer is float already, or none could be ranked
            quantized = self._requantize(float_network)
            result.steps.append(FallbackStep(self.skipped_layers, evaluate(quantized), added[-1]))
            rank_zero_info(f"qlightning: fallback moved `{added[-1]}` to float: {self.monitor} "
                           f"{result.steps[-1].metric:.4g} (float {result.float_metric:.4g})")
        self.fallback = result
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                for index, step in enumerate(result.steps):
                    logger.log_metrics({"quant/fallback/metric": step.metric,
                                        "quant/fallback/float_layers": float(len(step.float_layers))}, step=index)
                logger.log_metrics({"quant/fallback/float_metric": result.float_metric}, step=0)
        if not result.within_budget:
            rank_zero_warn(
                f"accuracy-aware fallback stopped {result.drop:.4g} below the float {self.monitor} "
                f"({result.float_metric:.4g}), beyond max_accuracy_drop={self.max_accuracy_drop} after moving "
                f"{len(added)} layer(s) to float (max_float_layers={self.max_float_layers}); the int8 model kept is "
                "the last one tried"
            )
        return quantized

    def _finish(self, quantized: nn.Module) -> None:
        self.quantized_model = quantized
        self._quantized_this_run = True
        source = self.finalized_network if not self.dynamic else quantized
        with _normal_tensors():
            self.exported = export_formats(self._trainer, source, self._example, self.export, self.export_dir,
                                           self._attr, self.backend.name, self.batch_to_inputs)
            if self.layer_report:
                self._report_layers(quantized)
        how = "dynamic" if self.dynamic else f"static, calibrated on {self.calibrated_batches} batches"
        rank_zero_info(
            f"qlightning: post-training quantized `{self._attr}` (mode={self.mode}, backend={self.backend.name}, {how})"
        )

    def _report_layers(self, quantized: nn.Module) -> None:
        from qlightning.monitoring.layer_report import report_layers

        float_network = getattr(self._trainer.lightning_module, self._attr)
        self.layers = report_layers(self._trainer, self._attr, lambda: float_network, quantized, self._example,
                                    self.export, self.export_dir, self.batch_to_inputs)
