"""``QuantizationAwareTraining``: turns ``trainer.fit`` into quantization-aware training."""

from __future__ import annotations

import copy
import weakref
from typing import Any, Mapping, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from qlightning.callbacks.config import (
    activation_scheme_name,
    build_recipe,
    check_compile,
    check_epoch,
    check_flag,
    check_modules_to_fuse,
)
from qlightning.callbacks.exporting import check_export_formats, export_formats, pass_check_inputs
from qlightning.callbacks.observation import ObservationPause, pause_observation
from qlightning.callbacks.target import check_float_network, resolve_example_inputs, resolve_network
from qlightning.distributed import sync_quantizer_statistics, sync_running_stats
from qlightning.errors import QuantizationConfigError
from qlightning.modes.registry import get_mode
from qlightning.skip import SkipEntry, check_skip, resolve_skip, skip_labels
from qlightning.observers import available_observers, get_observer


# Bumped when the checkpointed callback state changes shape; older states must still load.
STATE_VERSION = 1


class QuantizationAwareTraining(Callback):
    """Quantization-aware training in ``eager``, ``fx`` or ``pt2e`` mode.

    Args:
        mode: ``"eager"``, ``"fx"`` or ``"pt2e"``.
        backend: a registered backend (``qlightning.backends.available_backends()``).
        observer: a registered observer (``qlightning.observers.available_observers()``).
        module: attribute of the LightningModule holding the network; found automatically when the
            module has exactly one child with parameters.
        example_inputs: inputs to trace with; default ``pl_module.example_input_array``.
        freeze_bn_epoch: from this epoch on BatchNorm uses (and stops updating) its running stats.
        freeze_observers_epoch: from this epoch on qparams stop changing; fake quantization stays on.
        weight_scheme / activation_scheme: override the backend's default schemes (``activation_scheme=None``:
            the backend's scheme for the activation dtype).
        activation_dtype: ``None`` for the backend's 8-bit activations, or a 16-bit type its runtime executes
            with 8-bit weights (A16W8: ``"int16"`` for ``onnxruntime`` and ``tflite``, ``"uint16"`` for
            ``onnxruntime``); ``mode="pt2e"`` only.
        modules_to_fuse: eager mode only: groups of submodule names to fuse, instead of the ones found.
        skip: layers kept float in training, the int8 model and every export: module names as in the
            network's ``named_modules()`` (``"fc2"``), ``re:``-prefixed regular expressions matching whole
            names, or ``nn.Module`` classes (``"class:<import path>"`` in configs). A skipped layer keeps its
            fusion group (conv-bn-relu) float with it; :attr:`skipped_layers` lists what was kept float.
        fold_bn: at fit end, fold BatchNorm into the QAT conv/linear layers before conversion.
        merge_relu: at fit end, merge ReLU/clamp into the following quantizer's qparams (FX, PT2E).
        layer_report: at fit end, measure each quantized layer's error against the float network with the
            trained weights (:func:`qlightning.compare_layers`, on a validation batch) into :attr:`layers`,
            log it (``quant/layer_sqnr/<layer>``; a bar chart in TensorBoard) and, with ``export``, write
            ``<export_dir>/layers.json``.
        compile: train the prepared network through ``torch.compile`` (``mode="pt2e"``; observers ``minmax``
            and ``moving_average_minmax``): ``True``, or a dict of ``torch.compile`` options. The quantizers
            get branch-free forwards (same state, same qparams), the first training batch runs uncompiled
            (per-channel observers size their buffers on it), and evaluation stays uncompiled; compiling
            costs time on the first compiled step (see ``docs/benchmarks.md`` for when it pays).
        export / export_dir: formats to export at fit end (``["onnx"]``, ``"pt2"``) under ``export_dir``
            (default ``<trainer.log_dir>/quantized``); each file is verified in its runtime against the
            fake-quantized network and gets a ``.report.json`` (:func:`qlightning.export`).

    After ``fit`` the int8 model is in :attr:`quantized_model` (a converted copy; the LightningModule
    keeps its fake-quantized network and can be trained further).
    """

    def __init__(
        self,
        mode: str = "pt2e",
        backend: str = "x86",
        observer: str = "moving_average_minmax",
        *,
        module: str | None = None,
        example_inputs: Any = None,
        freeze_bn_epoch: int | None = None,
        freeze_observers_epoch: int | None = None,
        weight_scheme: str = "per_channel_symmetric",
        activation_scheme: str | None = None,
        activation_dtype: str | None = None,
        modules_to_fuse: Sequence[Sequence[str]] | None = None,
        skip: Sequence[SkipEntry] | None = None,
        fold_bn: bool = True,
        layer_report: bool = True,
        merge_relu: bool = True,
        compile: bool | Mapping[str, Any] = False,
        export: Sequence[str] | None = None,
        export_dir: str | None = None,
    ):
        self.backend, self.recipe = build_recipe(
            mode, backend, observer, weight_scheme, activation_scheme, activation_dtype
        )
        self.mode, self.observer = mode, observer
        if get_observer(observer).calibration_only:
            usable = [o for o in available_observers() if not get_observer(o).calibration_only]
            raise QuantizationConfigError(
                f"observer {observer!r} is a calibration method of post-training quantization (a search over a "
                f"histogram when the model is converted), not for QAT, which updates its qparams every step: use "
                f"PostTrainingQuantization(observer={observer!r}), or one of {usable} for QAT"
            )
        check_epoch("freeze_bn_epoch", freeze_bn_epoch)
        check_epoch("freeze_observers_epoch", freeze_observers_epoch)
        check_modules_to_fuse(mode, modules_to_fuse)
        self.skip = check_skip(skip)
        # Module names of the network kept float, found at setup (fusion partners included).
        self.skipped_layers: tuple[str, ...] = ()
        check_flag("fold_bn", fold_bn)
        check_flag("layer_report", layer_report)
        self.layer_report = layer_report
        # The per-layer error of the int8 model against the float network with the trained weights.
        self.layers = None
        self._float_template: nn.Module | None = None
        # torch.compile options, or None when training runs uncompiled.
        self.compile_options = check_compile(mode, observer, compile)
        check_flag("merge_relu", merge_relu)
        self.fold_bn, self.merge_relu = fold_bn, merge_relu
        self.export = check_export_formats(export, self.backend.name)
        self.export_dir = export_dir
        # Reports of the files exported at the last fit end, by format.
        self.exported: dict[str, dict] = {}
        self.weight_scheme = weight_scheme
        self.activation_scheme = activation_scheme_name(self.recipe.activation)
        self.activation_dtype = self.recipe.activation.dtype
        self.module = module
        self.example_inputs = example_inputs
        self.freeze_bn_epoch = freeze_bn_epoch
        self.freeze_observers_epoch = freeze_observers_epoch
        self.modules_to_fuse = modules_to_fuse

        self.quantized_model: nn.Module | None = None
        # The trained network after the fit-end passes (BN folded, clamps merged), fake-quantized:
        # what exporters start from.
        self.finalized_network: nn.Module | None = None
        self._example: tuple | None = None
        self.observers_frozen = False
        self.bn_frozen = False
        self._impl = None
        self._attr: str | None = None
        self._prepared: nn.Module | None = None
        self._rank_synced: tuple[list, list] | None = None
        self._trainer: Trainer | None = None
        # Set while a non-train stage (summary, sanity check, validate, test, predict) has observation paused.
        self._paused: ObservationPause | None = None

    # -- identity ---------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, backend=self.backend.name, observer=self.observer)

    def _config(self) -> dict:
        return {
            "mode": self.mode,
            "backend": self.backend.name,
            "observer": self.observer,
            "weight_scheme": self.weight_scheme,
            "activation_scheme": self.activation_scheme,
            "activation_dtype": self.activation_dtype,
            "skip": skip_labels(self.skip),
        }

    def _check_config_matches(self, state: dict, source: str) -> None:
        for key, value in self._config().items():
            if key in state and state[key] != value:
                raise QuantizationConfigError(
                    f"{source} was trained with {key}={state[key]!r} but this QuantizationAwareTraining has "
                    f"{key}={value!r}; use the same quantization config to resume"
                )

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def network_name(self) -> str | None:
        """The LightningModule attribute holding the network this callback quantizes (after setup)."""
        return self._attr

    @property
    def prepared_network(self) -> nn.Module | None:
        """The fake-quantized network being trained (``None`` before setup)."""
        return self._prepared

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._prepared is not None and getattr(pl_module, self._attr, None) is self._prepared:
            # fit called again: keep training the prepared network
            self._pause_observation()
            return
        self._attr = resolve_network(pl_module, self.module)
        example_inputs = resolve_example_inputs(pl_module, self.example_inputs)
        self._example = example_inputs
        self._impl = get_mode(self.mode)
        network = getattr(pl_module, self._attr)
        check_float_network(network, self._attr)
        self.skipped_layers = resolve_skip(network, self.skip)
        # The architecture, for the float twin of the trained weights the per-layer report compares against
        # (preparing may rewrite the network in place: eager fuses and wraps it).
        self._float_template = copy.deepcopy(network).cpu() if self.layer_report else None
        prepared = self._impl.prepare_qat(
            network, example_inputs, self.recipe, self.backend, modules_to_fuse=self.modules_to_fuse,
            skip=self.skipped_layers,
        )
        if self.compile_options is not None:
            self._impl.compile_training(prepared, self.compile_options)
        # Replacing the attribute before optimizers exist makes configure_optimizers see the
        # prepared parameters (the fused, fake-quantized ones, LSQ scales included).
        setattr(pl_module, self._attr, prepared)
        self._prepared = prepared
        # The schedule's state belongs to the network: a callback reused on a new model starts unfrozen.
        self.observers_frozen = self.bn_frozen = False
        self._trainer = trainer
        # Under DDP, what every step must reduce over ranks: the quantizers and BN running statistics.
        self._rank_synced = (
            (self._impl.quantizers(prepared), _running_stats(prepared)) if trainer.world_size > 1 else None
        )
        prepared.register_load_state_dict_pre_hook(_CallbackHook(self, "_on_network_state_load"))
        prepared.register_load_state_dict_post_hook(_CallbackHook(self, "_on_network_state_loaded"))
        rank_zero_info(
            f"qlightning: prepared `{self._attr}` for QAT (mode={self.mode}, backend={self.backend.name}, "
            f"observer={self.observer}, {len(self._impl.quantizers(prepared))} quantizers"
            f"{', training compiled' if self.compile_options is not None else ''})"
        )
        # Lightning's model summary and sanity check run forwards before training starts.
        self._pause_observation()

    # -- quantizers observe in the train stage only -------------------------------------------------
    def _pause_observation(self) -> None:
        if self._prepared is not None and self._paused is None:
            self._paused = pause_observation(self._impl, self._prepared)

    def _resume_observation(self) -> None:
        if self._paused is None:
            return
        self._paused.restore()
        self._paused = None
        if self.observers_frozen:  # frozen while paused (a restored checkpoint, or by hand)
            self._impl.set_observers_enabled(self._prepared, False)

    def _on_network_state_loaded(self, module, incompatible_keys) -> None:
        # A restored checkpoint brings its own observer flags: those are the state to return to.
        if self._paused is not None:
            self._paused = None
            self._pause_observation()

    def _on_network_state_load(self, module, state_dict, prefix, *args) -> None:
        # Lightning restores the model before any callback state, so a checkpoint from another quant
        # config would fail with a wall of mismatched keys: name the real cause first.
        incoming = {key[len(prefix) :] for key in state_dict if key.startswith(prefix)}
        if incoming == set(module.state_dict()):
            return
        ckpt_path = getattr(self._trainer, "ckpt_path", None)
        if ckpt_path:
            self._check_checkpoint_config(ckpt_path)

    def _check_checkpoint_config(self, ckpt_path) -> None:
        from lightning.fabric.utilities.cloud_io import _load

        states = checkpointed_states(_load(ckpt_path, map_location="cpu", weights_only=False))
        if not states:
            raise QuantizationConfigError(
                f"checkpoint {ckpt_path} holds no QuantizationAwareTraining state: it was not saved during QAT "
                "with qlightning; resume QAT only from QAT checkpoints"
            )
        for state in states:
            self._check_config_matches(state, f"checkpoint {ckpt_path}")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A schedule past the run's end silently does nothing (an Optuna search sampled
        # freeze_observers_epoch=3 for a 3-epoch run, issue 18): say so before training.
        last_epoch = trainer.max_epochs - 1 if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        for name, epoch in (("freeze_observers_epoch", self.freeze_observers_epoch), ("freeze_bn_epoch", self.freeze_bn_epoch)):
            if epoch is not None and last_epoch is not None and epoch > last_epoch and trainer.current_epoch <= last_epoch:
                rank_zero_warn(
                    f"{name}={epoch} but this fit ends after epoch {last_epoch} (max_epochs={trainer.max_epochs}): "
                    f"it never applies; use an epoch from 0 to {last_epoch}, or None"
                )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.freeze_observers_epoch is not None and epoch >= self.freeze_observers_epoch:
            self.freeze_observers()
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            self.freeze_bn()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.bn_frozen:
            self._impl.enforce_frozen_bn(self._prepared)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resume_observation()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Like BatchNorm in eval, quantizers only read their statistics outside training: validation
        # data must not move qparams (nor, under DDP, move them apart on each rank).
        self._pause_observation()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:  # the sanity check's pause lasts until training starts
            self._resume_observation()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause_observation()

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resume_observation()

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause_observation()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resume_observation()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._resume_observation()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._rank_synced is not None:
            quantizers, running_stats = self._rank_synced
            sync_quantizer_statistics(quantizers)
            if not self.bn_frozen:
                sync_running_stats(running_stats)

    def freeze_observers(self) -> None:
        """Stop qparam updates now (the schedule calls this at ``freeze_observers_epoch``)."""
        if not self.observers_frozen:
            rank_zero_info("qlightning: freezing observers")
        self._impl.set_observers_enabled(self._prepared, False)
        self.observers_frozen = True

    def freeze_bn(self) -> None:
        """Freeze BatchNorm statistics now (the schedule calls this at ``freeze_bn_epoch``)."""
        if not self.bn_frozen:
            rank_zero_info("qlightning: freezing BatchNorm statistics")
        self._impl.freeze_bn(self._prepared)
        self.bn_frozen = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Teardown has already moved the module to CPU; convert works on a CPU copy either way.
        if self._prepared is None:
            return
        self._resume_observation()  # fit may end without a train stage (max_epochs already reached)
        self.finalized_network = self._impl.finalize(
            self._prepared, self._example, fold_bn=self.fold_bn, merge_relu=self.merge_relu,
            share_split=self.backend.shared_split_qparams,
            keep_shared_quantizers=self.backend.same_scale_concat, check_inputs=pass_check_inputs(trainer),
        )
        self.quantized_model = self._impl.convert(self.finalized_network, self.backend)
        self.exported = export_formats(trainer, self.finalized_network, self._example, self.export, self.export_dir,
                                       self._attr, self.backend.name)
        if self.layer_report and self._float_template is not None:
            self._report_layers(trainer)

    def _report_layers(self, trainer: Trainer) -> None:
        from qlightning.layers import trained_float_network
        from qlightning.monitoring.layer_report import report_layers

        self.layers = report_layers(trainer, self._attr,
                                    lambda: trained_float_network(self._float_template, self._prepared),
                                    self.quantized_model, self._example, self.export, self.export_dir)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **self._config(),
            "observers_frozen": self.observers_frozen,
            "bn_frozen": self.bn_frozen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_config_matches(state_dict, "the checkpoint")
        # Observer flags live in the model's buffers (restored with its state_dict); these two
        # only record where the schedule stood, and older states without them mean "not frozen".
        if state_dict.get("observers_frozen", False) and self._prepared is not None:
            self.freeze_observers()
        if state_dict.get("bn_frozen", False) and self._prepared is not None:
            self.freeze_bn()


def checkpointed_states(checkpoint: dict) -> list[dict]:
    """The QuantizationAwareTraining states a loaded Lightning checkpoint holds (empty: not a QAT checkpoint)."""
    return [v for k, v in checkpoint.get("callbacks", {}).items() if str(k).startswith(QuantizationAwareTraining.__name__)]


class _CallbackHook:
    """A state-dict hook of the prepared network that calls back into the callback.

    Through a weak reference: a bound method would make every deepcopy of the network (the fit-end
    passes copy it) copy this callback and its trainer too, which under DDP holds locks. Copies and
    pickles of the network carry an inert hook (``torch.save(model)`` works; a copy is not the
    network the callback trains)."""

    def __init__(self, callback, method: str):
        self._callback, self._method = weakref.ref(callback), method

    def __call__(self, *args):
        callback = self._callback() if self._callback is not None else None
        if callback is not None:
            getattr(callback, self._method)(*args)

    def __getstate__(self):
        return {"_callback": None, "_method": self._method}


def _running_stats(network: nn.Module) -> list[torch.Tensor]:
    return [b for name, b in network.named_buffers() if name.endswith(("running_mean", "running_var"))]
