"""The per-layer error report of a converted model (:func:`qlightning.compare_layers`), written where
users look: ``<export_dir>/layers.json`` and every logger (scalars ``quant/layer_sqnr/<layer>``,
``quant/layer_own_sqnr/<layer>`` and ``quant/layer_skip_gain/<layer>``; in TensorBoard also a bar chart
image, ``quant/layer_sqnr``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

LAYERS_FILE = "layers.json"
CHART_TAG = "quant/layer_sqnr"


def layer_metrics(report) -> dict[str, float]:
    """Finite SQNRs as logger scalars (an exact layer's ``inf`` is not a plottable point)."""
    metrics = {}
    for layer in report:
        for tag, value in ((f"quant/layer_sqnr/{layer.name}", layer.sqnr_db),
                           (f"quant/layer_own_sqnr/{layer.name}", layer.own_sqnr_db),
                           (f"quant/layer_skip_gain/{layer.name}", layer.skip_gain_db)):
            if math.isfinite(value):
                metrics[tag] = float(value)
    return metrics


def layer_chart(report) -> np.ndarray:
    """One row per layer in execution order, two panels: on the left the SQNR end to end (what the
    layer's output carries) and of the layer alone (the error it adds itself); on the right how many dB
    the network's output gains when only that layer is kept float (``skip``): the longest bar there is
    the layer to skip first."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [layer.name for layer in report]
    def finite(values):
        return [v if math.isfinite(v) else np.nan for v in values]
    end_to_end = finite([layer.sqnr_db for layer in report])
    alone = finite([layer.own_sqnr_db for layer in report])
    gain = finite([layer.skip_gain_db for layer in report])
    figure = Figure(figsize=(9, 1.5 + 0.32 * max(len(names), 1)), dpi=120)
    FigureCanvasAgg(figure)
    sqnr_axis, gain_axis = figure.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    rows = np.arange(len(names))
    sqnr_axis.barh(rows - 0.2, end_to_end, height=0.4, label="end to end", color="#4c72b0")
    sqnr_axis.barh(rows + 0.2, alone, height=0.4, label="layer alone (float input)", color="#dd8452")
    sqnr_axis.set_yticks(rows, names, fontsize=7)
    sqnr_axis.invert_yaxis()  # execution order, top to bottom (shared with the gain panel)
    sqnr_axis.set_xlabel("SQNR against the float network (dB, higher is better)", fontsize=8)
    sqnr_axis.set_title("quantization error per layer", fontsize=9)
    # Below the axis: inside, it covered the last layers' bars.
    sqnr_axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2, frameon=False)
    colors = ["#55a868" if g >= 0 else "#c44e52" for g in np.nan_to_num(gain)]
    gain_axis.barh(rows, gain, height=0.6, color=colors)
    gain_axis.axvline(0, color="black", linewidth=0.6)
    gain_axis.set_xlabel("output SQNR gain if kept float (dB)", fontsize=8)
    gain_axis.set_title("skip=[layer] buys", fontsize=9)
    for axis in (sqnr_axis, gain_axis):
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def publish_layer_report(trainer: Trainer, report, directory: Path | None) -> Path | None:
    """Log the report to every logger and, given a directory, write ``layers.json`` there (atomically);
    rank zero only. Returns the file written."""
    if not trainer.is_global_zero:
        return None
    from qlightning.exporters.atomic import write_text_atomic

    path = None
    if directory is not None:
        path = Path(directory) / LAYERS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, report.to_json())
    metrics = layer_metrics(report)
    for logger in trainer.loggers:
        if metrics:
            logger.log_metrics(metrics, step=trainer.global_step)
        if isinstance(logger, TensorBoardLogger) and len(report):
            logger.experiment.add_image(CHART_TAG, layer_chart(report), trainer.global_step, dataformats="HWC")
    worst = report.worst(1)
    rank_zero_info(f"qlightning: per-layer error{f' in {path}' if path else ' logged'}" + (
        f"; keeping {worst[0].name} float would gain the output {worst[0].skip_gain_db:+.1f} dB SQNR"
        if worst and math.isfinite(worst[0].skip_gain_db) else ""))
    return path


def report_layers(trainer: Trainer, name: str, float_network: Callable[[], nn.Module], quantized: nn.Module,
                  example_inputs: tuple, export: Sequence[str], export_dir, batch_to_inputs=None):
    """What both callbacks do after conversion: :func:`qlightning.compare_layers` of ``quantized`` against
    the network ``float_network()`` builds, on the first validation batch (else the example inputs),
    published (:func:`publish_layer_report`; ``layers.json`` beside the exports, only when exporting).
    ``None``, with a warning, when the report cannot be made: it is a diagnostic, and the int8 model and
    its exports stand without it."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    from qlightning.callbacks.exporting import check_inputs_from, export_dir_for, first_element_inputs
    from qlightning.layers import compare_layers

    checks = check_inputs_from(trainer, batch_to_inputs or first_element_inputs)
    inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in (checks[0] if checks else example_inputs))
    try:
        report = compare_layers(float_network(), quantized, inputs)
    except Exception as exc:  # noqa: BLE001 - a diagnostic: the int8 model and exports stand without it
        rank_zero_warn(f"qlightning: no per-layer error report for `{name}` ({type(exc).__name__}: {exc}); "
                       "the int8 model and its exports are unaffected")
        return None
    publish_layer_report(trainer, report, export_dir_for(trainer, export_dir) if export else None)
    return report
