"""``QParamMonitor``: scale / zero-point curves of every quantizer, their drift, and the freeze state."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from qlightning.errors import QuantizationConfigError
from qlightning.monitoring.names import network_order, quantizer_names

DRIFT_IMAGE_TAG = "quant/drift_per_layer"
# Per-channel scales and zero points as histograms: qparams_per_channel/<name>/scale (and /zero_point).
PER_CHANNEL_PREFIX = "qparams_per_channel"
FREEZE_TAGS = ("quant/observers_frozen", "quant/bn_frozen")
# log_every_n_steps=None: about AUTO_POINTS logs over the run, at least one every MAX_AUTO_INTERVAL
# steps (Lightning's own default interval). The default job's 69 QAT steps gave 2 points at 50.
AUTO_POINTS = 100
MAX_AUTO_INTERVAL = 50


def auto_interval(total_steps: float) -> int:
    """The logging interval that gives about :data:`AUTO_POINTS` points over ``total_steps``."""
    if not math.isfinite(total_steps) or total_steps <= 0:
        return MAX_AUTO_INTERVAL
    return int(min(MAX_AUTO_INTERVAL, max(1, total_steps // AUTO_POINTS)))


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QuantizationConfigError(f"{name} must be an integer >= 1, got {value!r}")


class QParamMonitor(Callback):
    """Logs, every ``log_every_n_steps`` training steps (``None``: about 100 points over the run, at
    least one every 50 steps), for every quantizer of the network that a
    :class:`~qlightning.QuantizationAwareTraining` callback in the same Trainer prepared:

    - ``qparams/<name>/scale`` and ``qparams/<name>/zero_point`` (per-channel: the mean, plus the
      values as a histogram ``qparams_per_channel/<name>/scale`` / ``.../zero_point`` when
      ``histograms`` and the logger is TensorBoard);
    - ``qparams_drift/<name>/scale``: relative change of the scale since the previous log
      (``||s - s_prev|| / ||s_prev||``);
    - ``quant/observers_frozen`` and ``quant/bn_frozen`` (0/1) at each epoch end and at the step where
      either changes (the step before it too, so the curve steps where freezing happened); with
      TensorBoard also a custom-scalars layout grouping the curves by layer and a labelled image of
      drift per quantizer over epochs.

    ``<name>`` says what the quantizer guards: ``conv1.weight``, ``conv1.output``, ``input``; the
    same activation has the same name in every mode (PT2E's quantizer after ``relu(bn(conv1(x)))`` is
    ``conv1.output``, as in eager and FX, which fuse the three into ``conv1``).

    ``auto_freeze=True`` freezes the observers (through the QAT callback, so checkpoints record it)
    once every quantizer's drift has stayed below ``drift_threshold`` for ``patience`` consecutive
    logs, and logs ``quant/auto_freeze_step``. Rank zero logs; every rank freezes.
    """

    def __init__(self, log_every_n_steps: int | None = None, histograms: bool = True, *, auto_freeze: bool = False,
                 drift_threshold: float = 1e-3, patience: int = 3):
        if log_every_n_steps is not None:
            _positive_int("log_every_n_steps", log_every_n_steps)
        _positive_int("patience", patience)
        if not (isinstance(drift_threshold, (int, float)) and drift_threshold > 0 and math.isfinite(drift_threshold)):
            raise QuantizationConfigError(f"drift_threshold must be a positive number, got {drift_threshold!r}")
        self.log_every_n_steps = log_every_n_steps
        self.histograms = histograms
        self.auto_freeze = auto_freeze
        self.drift_threshold = float(drift_threshold)
        self.patience = patience

        self.auto_frozen_at_step: int | None = None
        self._stable_logs = 0
        self._qat = None
        self._previous: dict[str, torch.Tensor] = {}
        self._epoch_drift: dict[str, list[float]] = {}
        self._drift_rows: list[dict[str, float]] = []  # one per epoch: mean drift per quantizer
        self._last_logged_step: int | None = None
        self._layout_written = False
        self._named: dict[str, torch.nn.Module] | None = None
        self._named_for = None
        self._every = log_every_n_steps or MAX_AUTO_INTERVAL
        self._freeze_state: tuple[float, float] | None = None  # (observers, bn) as last logged
        self._freeze_logged_step: int | None = None

    # -- setup ------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from qlightning.callbacks import QuantizationAwareTraining

        qats = [cb for cb in trainer.callbacks if isinstance(cb, QuantizationAwareTraining)]
        if not qats:
            raise QuantizationConfigError(
                "QParamMonitor logs the quantizers a QuantizationAwareTraining callback prepares: add one to the "
                "same Trainer(callbacks=[QuantizationAwareTraining(...), QParamMonitor(...)])"
            )
        self._qat = qats[0]
        self._named = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here the train loader is loaded already: estimating the steps costs nothing and logs nothing.
        self._every = self.log_every_n_steps or auto_interval(trainer.estimated_stepping_batches)

    def _quantizers(self) -> dict[str, torch.nn.Module]:
        # Found once per prepared network: walking the graph for names on every log costs more than
        # reading the qparams.
        qat = self._qat
        if self._named is None or self._named_for is not qat.prepared_network:
            pairs = qat._impl.quantizers(qat.prepared_network)
            names = quantizer_names(qat.prepared_network, pairs)
            named: dict[str, torch.nn.Module] = {}
            for _, module in pairs:
                named.setdefault(names[id(module)], module)
            # Network order: the custom-scalars categories and the drift image's rows read top to bottom.
            self._named = {name: named[name] for name in network_order(qat.prepared_network, list(named))}
            self._named_for = qat.prepared_network
        return self._named

    # -- per step ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx) -> None:
        # The schedule freezes at epoch start and auto_freeze after a log: either shows at the next batch.
        if self._qat is not None and self._qat.prepared_network is not None:
            self._log_freeze_state(trainer)

    def _log_freeze_state(self, trainer: Trainer) -> None:
        """``quant/observers_frozen`` and ``quant/bn_frozen`` at the step where they change, the value
        before it at the step before, so the curve is a step where it happened (an epoch-end point
        alone read 0.5 after TensorBoard's smoothing, issue 18)."""
        state = (float(self._qat.observers_frozen), float(self._qat.bn_frozen))
        if state == self._freeze_state:
            return
        # The batch about to run becomes step global_step + 1, the step its qparams are logged at.
        step = trainer.global_step + 1
        if self._freeze_state is not None and state[0] > self._freeze_state[0]:
            # Drift across the freeze measures the steps before it: start comparing frozen logs afresh.
            self._previous.clear()
        if trainer.is_global_zero:
            if self._freeze_state is not None and self._freeze_logged_step != step - 1:
                self._log_freeze(trainer, self._freeze_state, step - 1)
            self._log_freeze(trainer, state, step)
        self._freeze_state = state

    def _log_freeze(self, trainer: Trainer, state: tuple[float, float], step: int) -> None:
        self._log(trainer, dict(zip(FREEZE_TAGS, state)), {}, step)
        self._freeze_logged_step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._qat is None or self._qat.prepared_network is None:
            return
        if self._last_logged_step is not None and step - self._last_logged_step < self._every:
            return
        self._last_logged_step = step
        from qlightning.passes.exact_qparams import current_qparams

        metrics: dict[str, float] = {}
        drifts: list[float] = []
        histograms: dict[str, torch.Tensor] = {}
        for name, module in self._quantizers().items():
            scale, zero_point = (t.detach().float().cpu().flatten() for t in current_qparams(module))
            metrics[f"qparams/{name}/scale"] = scale.mean().item()
            metrics[f"qparams/{name}/zero_point"] = zero_point.mean().item()
            if scale.numel() > 1:
                # A tag of its own: TensorBoard (2.21) keeps one plugin per tag, so a histogram written under
                # the scalar's tag never reached the Histograms / Distributions dashboards (issue 18).
                histograms[f"{PER_CHANNEL_PREFIX}/{name}/scale"] = scale
                histograms[f"{PER_CHANNEL_PREFIX}/{name}/zero_point"] = zero_point
            previous = self._previous.get(name)
            if previous is not None and previous.shape == scale.shape:
                drift = (scale - previous).norm().item() / max(previous.norm().item(), 1e-12)
                metrics[f"qparams_drift/{name}/scale"] = drift
                drifts.append(drift)
                self._epoch_drift.setdefault(name, []).append(drift)
            self._previous[name] = scale.clone()
        if trainer.is_global_zero:
            self._log(trainer, metrics, histograms, step)
        if self.auto_freeze and drifts:
            self._update_auto_freeze(trainer, max(drifts), step)

    def _update_auto_freeze(self, trainer: Trainer, worst_drift: float, step: int) -> None:
        if self._qat.observers_frozen:
            return
        self._stable_logs = self._stable_logs + 1 if worst_drift < self.drift_threshold else 0
        if self._stable_logs >= self.patience:
            self._qat.freeze_observers()
            self.auto_frozen_at_step = step
            rank_zero_info(
                f"qlightning: auto_freeze froze the observers at step {step}: every scale drifted less than "
                f"{self.drift_threshold:g} for {self.patience} logs"
            )
            if trainer.is_global_zero:
                self._log(trainer, {"quant/auto_freeze_step": float(step)}, {}, step)

    # -- per epoch --------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._qat is None or self._qat.prepared_network is None:
            return
        self._drift_rows.append({name: float(np.mean(v)) for name, v in self._epoch_drift.items()})
        self._epoch_drift = {}
        if not trainer.is_global_zero:
            return
        self._log_freeze(trainer, (float(self._qat.observers_frozen), float(self._qat.bn_frozen)), trainer.global_step)
        for logger in self._tensorboards(trainer):
            logger.experiment.add_image(DRIFT_IMAGE_TAG, self._drift_image(), trainer.current_epoch, dataformats="HWC")

    # -- output -----------------------------------------------------------------------------------
    @staticmethod
    def _tensorboards(trainer: Trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def _log(self, trainer: Trainer, metrics: dict, histograms: dict, step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for logger in self._tensorboards(trainer):
            if not self._layout_written:
                logger.experiment.add_custom_scalars(self._layout())
            if self.histograms:
                for tag, values in histograms.items():
                    logger.experiment.add_histogram(tag, values, step)
        if self._tensorboards(trainer):
            self._layout_written = True

    def _layout(self) -> dict:
        """Custom scalars: one category per layer, with its scale, zero point and drift charts."""
        layers: dict[str, dict[str, list]] = {}
        for name in self._quantizers():
            layer = name.rsplit(".", 1)[0] if "." in name else name
            charts = layers.setdefault(layer, {})
            charts[f"{name} scale"] = ["Multiline", [f"qparams/{name}/scale"]]
            charts[f"{name} zero point"] = ["Multiline", [f"qparams/{name}/zero_point"]]
            charts[f"{name} drift"] = ["Multiline", [f"qparams_drift/{name}/scale"]]
        layers["freezing"] = {"frozen": ["Multiline", ["quant/observers_frozen", "quant/bn_frozen"]]}
        return layers

    def _drift_grid(self) -> tuple[list[str], np.ndarray]:
        """Row names (network order) and log10 of each epoch's mean drift, clipped to [-6, 0]; NaN where
        a quantizer had no drift logged in that epoch."""
        logged = {n for row in self._drift_rows for n in row}
        names = [n for n in self._quantizers() if n in logged] + sorted(logged - set(self._quantizers()))
        grid = np.full((max(len(names), 1), max(len(self._drift_rows), 1)), np.nan)
        for col, row in enumerate(self._drift_rows):
            for r, name in enumerate(names):
                if name in row:
                    grid[r, col] = math.log10(min(max(row[name], 1e-6), 1.0))
        return names, grid

    def _drift_image(self) -> np.ndarray:
        """Heat map, one labelled row per quantizer (network order) and one column per epoch: the mean
        relative scale drift of the epoch's logs on a log scale, dark (<= 1e-6, frozen) to bright
        (>= 1); an epoch without a log for a quantizer is grey, not "no drift"."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names, grid = self._drift_grid()
        figure = Figure(figsize=(2.8 + 0.45 * grid.shape[1] + 0.06 * max(map(len, names), default=0),
                                 1.3 + 0.26 * grid.shape[0]), dpi=130)
        FigureCanvasAgg(figure)
        axis = figure.add_subplot()
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#bbbbbb")
        shown = axis.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-6, vmax=0, aspect="auto",
                            interpolation="nearest")
        axis.set_yticks(range(len(names)), names, fontsize=8)
        axis.set_xticks(range(grid.shape[1]), [str(e) for e in range(grid.shape[1])], fontsize=8)
        axis.set_xlabel("epoch (grey: no log)", fontsize=8)
        axis.set_title("scale drift per quantizer", fontsize=9)
        bar = figure.colorbar(shown, ax=axis, fraction=0.08, pad=0.03)
        bar.set_label("log10 mean relative drift\n(-6: frozen / stable)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        figure.tight_layout()
        figure.canvas.draw()
        return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"stable_logs": self._stable_logs, "auto_frozen_at_step": self.auto_frozen_at_step,
                "drift_rows": self._drift_rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stable_logs = state_dict.get("stable_logs", 0)
        self.auto_frozen_at_step = state_dict.get("auto_frozen_at_step")
        self._drift_rows = list(state_dict.get("drift_rows", []))
