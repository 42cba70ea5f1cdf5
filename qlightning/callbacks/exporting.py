"""Export at the end of a callback's work: validated formats, default directory, check batches."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from qlightning.errors import QuantizationConfigError
from qlightning.exporters import export, get_format

CHECK_BATCHES = 4


def check_export_formats(export_formats, backend: str) -> tuple[str, ...]:
    """The formats to export to, checked before any training: known names, installed extras, and
    runtimes that run ``backend``'s integer layout."""
    if export_formats is None:
        return ()
    if isinstance(export_formats, str) or not all(isinstance(f, str) for f in export_formats):
        raise QuantizationConfigError(f"export must be a list of format names, e.g. ['onnx'], got {export_formats!r}")
    for name in export_formats:
        # Unknown names fail now, listing the valid ones; so does a format whose extra is missing.
        get_format(name).check_backend(backend)
        get_format(name).check_installed()
    return tuple(export_formats)


def first_element_inputs(batch) -> tuple:
    """Model inputs of a batch: the batch itself if it is a tensor, else its first element
    (the ``(x, y)`` convention of supervised datasets)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    raise QuantizationConfigError(
        f"cannot tell the model inputs in a batch of type {type(batch).__name__}; pass "
        "batch_to_inputs=<callable returning a tuple of forward() arguments>"
    )


def export_dir_for(trainer: Trainer, export_dir) -> Path:
    if export_dir is not None:
        return Path(export_dir)
    return Path(trainer.log_dir or trainer.default_root_dir) / "quantized"


def check_inputs_from(trainer: Trainer, batch_to_inputs=first_element_inputs) -> list[tuple]:
    """A few validation batches of the trainer's datamodule, when it has one."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return []
    try:
        loader = datamodule.val_dataloader()
        return [batch_to_inputs(b) for b in itertools.islice(loader, CHECK_BATCHES)]
    except Exception as exc:  # noqa: BLE001 - checks fall back to the example inputs
        rank_zero_warn(f"export checks use the example inputs only: no validation batches ({exc})")
        return []


def pass_check_inputs(trainer: Trainer, batch_to_inputs=first_element_inputs, batches: int = 2) -> tuple | None:
    """A few validation batches joined into one input tuple, for the fit-end passes to verify
    themselves on real data; None without a validation loader."""
    checks = check_inputs_from(trainer, batch_to_inputs)[:batches]
    if not checks or not all(isinstance(x, torch.Tensor) for c in checks for x in c):
        return None
    return tuple(torch.cat([c[i] for c in checks]) for i in range(len(checks[0])))


def export_formats(trainer: Trainer, network, example_inputs, formats, export_dir, name: str, backend: str,
                   batch_to_inputs=first_element_inputs) -> dict[str, dict]:
    """Export ``network`` in every format (rank zero only); returns the reports by format."""
    if not formats or not trainer.is_global_zero:
        return {}
    directory = export_dir_for(trainer, export_dir)
    checks = check_inputs_from(trainer, batch_to_inputs)
    reports = {}
    for fmt in formats:
        path = directory / f"{name}{get_format(fmt).suffix}"
        reports[fmt] = export(network, example_inputs, fmt, path, check_inputs=checks, backend=backend)
        sqnr = reports[fmt]["sqnr_db"]
        rank_zero_info(f"qlightning: exported {path} (SQNR {sqnr if isinstance(sqnr, str) else f'{sqnr:.1f}'} dB "
                       "against the torch fake-quant model)")
    return reports
