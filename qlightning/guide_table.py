"""The quantization guide's nine-cell table (eager / FX / PT2E x PTQ static / PTQ dynamic / QAT) on the
real Fashion-MNIST, with qlightning's callbacks.

One float network is trained once and every cell starts from a copy of it, so each mode's three cells
share the same float training. Accuracies are on the 10,000-image test set: float, int8 in torch and,
for static PTQ and QAT, the exported ONNX file in ONNX Runtime.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch

from qlightning.callbacks import PostTrainingQuantization, QuantizationAwareTraining
from qlightning.jobs import latency_ms, onnx_accuracy, onnx_latency_ms, state_size_bytes
from qlightning.models import GuideNet, ImageClassifier, accuracy

MODES = ("eager", "fx", "pt2e")
METHODS = ("ptq_static", "ptq_dynamic", "qat")

# The guide's published cells (MNIST, float -> int8; QAT float -> fake-quant -> int8), in points.
GUIDE_RESULTS = {
    ("eager", "ptq_static"): (89.73, None, 87.74), ("eager", "ptq_dynamic"): (88.93, None, 88.91),
    ("eager", "qat"): (88.69, 90.30, 90.21),
    ("fx", "ptq_static"): (90.52, None, 89.98), ("fx", "ptq_dynamic"): (89.99, None, 90.06),
    ("fx", "qat"): (87.08, 90.28, 90.53),
    ("pt2e", "ptq_static"): (90.25, None, 89.41), ("pt2e", "ptq_dynamic"): (90.25, None, 90.01),
    ("pt2e", "qat"): (90.25, 91.05, 90.74),
}


CHOICES = (
    "Why these settings: float training is Adam at lr 1e-3, batch 64, 4 epochs on all 54,000 training images (the "
    "other 6,000 validate): the guide's 10-unit bottleneck network reaches the float accuracy above (issue 16 reports about 77 % "
    "after 3 epochs on 20,000 images, and dead bottleneck ReLUs at lr 3e-3). QAT fine-tunes that network for 2 epochs "
    "at lr 1e-4 with BatchNorm frozen from its second epoch and observers frozen for it; part of QAT's gain over float "
    "is those 2 extra epochs of training. Static PTQ calibrates a histogram observer on 32 training batches (2,048 "
    "images). The backend is x86 for every mode, so the three modes differ only in how they capture the network."
)


@dataclass(frozen=True)
class TableConfig:
    """What the table trains; defaults fit the whole table in under 20 minutes on 2 CPU cores."""

    float_epochs: int = 4
    float_lr: float = 1e-3
    qat_epochs: int = 2
    qat_lr: float = 1e-4
    batch_size: int = 64
    train_size: int | None = None  # all 54,000 training images
    calibration_batches: int = 32
    backend: str = "x86"
    observer_ptq: str = "histogram"
    observer_qat: str = "moving_average_minmax"
    hidden: int = 10  # the guide's bottleneck
    seed: int = 0


@dataclass
class Cell:
    mode: str
    method: str
    float_acc: float
    int8_acc: float
    fake_quant_acc: float | None = None
    onnx_acc: float | None = None
    float_size_bytes: int = 0
    int8_size_bytes: int = 0
    onnx_size_bytes: int | None = None
    float_latency_ms: float = 0.0
    int8_latency_ms: float = 0.0
    onnx_latency_ms: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _trainer(**overrides) -> L.Trainer:
    # Lightning's defaults, bar the progress bar (a table script prints one line per cell) and the
    # logger / checkpoints (nothing here reads them).
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return L.Trainer(**{**kwargs, **overrides})


def train_float(datamodule, config: TableConfig) -> ImageClassifier:
    L.seed_everything(config.seed, verbose=False)
    model = ImageClassifier(GuideNet(hidden=config.hidden), input_shape=(1, 28, 28), lr=config.float_lr)
    _trainer(max_epochs=config.float_epochs).fit(model, datamodule)
    return model


def _test_accuracy(model, datamodule) -> float:
    return round(accuracy(model, datamodule.test_dataloader()), 2)


def run_cell(mode: str, method: str, float_model: ImageClassifier, datamodule, config: TableConfig) -> Cell:
    """One cell: quantize a copy of ``float_model`` with ``method`` in ``mode`` and measure it."""
    start = time.perf_counter()
    model = copy.deepcopy(float_model)
    test = datamodule.test_dataloader()
    example = next(iter(test))[0][:1]
    export_dir = tempfile.mkdtemp(prefix=f"guide-{mode}-{method}-")
    fake_quant_acc = None
    if method == "qat":
        callback = QuantizationAwareTraining(mode, config.backend, config.observer_qat, freeze_bn_epoch=1,
                                             freeze_observers_epoch=config.qat_epochs - 1, export=["onnx"],
                                             export_dir=export_dir)
        model.hparams.lr = config.qat_lr
        L.seed_everything(config.seed, verbose=False)
        _trainer(max_epochs=config.qat_epochs, callbacks=[callback]).fit(model, datamodule)
        fake_quant_acc = _test_accuracy(model, datamodule)
    else:
        dynamic = method == "ptq_dynamic"
        callback = PostTrainingQuantization(mode, config.backend, config.observer_ptq, dynamic=dynamic,
                                            calibration_batches=config.calibration_batches,
                                            export=None if dynamic else ["onnx"], export_dir=export_dir)
        # Calibrate on training batches (the validate route of PostTrainingQuantization); test data stays unseen.
        _trainer(limit_val_batches=config.calibration_batches, callbacks=[callback]).validate(
            model, dataloaders=datamodule.train_dataloader(), verbose=False)
    int8 = callback.quantized_model
    float_net = float_model.net.eval()
    cell = Cell(
        mode=mode, method=method, float_acc=_test_accuracy(float_model, datamodule), int8_acc=_test_accuracy(int8, datamodule),
        fake_quant_acc=fake_quant_acc, float_size_bytes=state_size_bytes(float_net), int8_size_bytes=state_size_bytes(int8),
        float_latency_ms=round(latency_ms(float_net, example), 3), int8_latency_ms=round(latency_ms(int8, example), 3),
    )
    if "onnx" in callback.exported:
        report = callback.exported["onnx"]
        path = Path(export_dir) / report["path"]
        cell.onnx_acc = round(onnx_accuracy(path, test), 2)
        cell.onnx_size_bytes = report["size_bytes"]
        cell.onnx_latency_ms = round(onnx_latency_ms(path, example), 3)
    cell.seconds = round(time.perf_counter() - start, 1)
    return cell


def goal_misses(cells: list[Cell]) -> list[str]:
    """The issue's goals, in points on the 10,000-image test set; each miss as a sentence."""
    by_key = {(c.mode, c.method): c for c in cells}
    misses = []
    for c in cells:
        where = f"{c.mode} {c.method}"
        if c.method == "qat":
            if c.int8_acc < c.float_acc - 0.2:
                misses.append(f"{where}: int8 {c.int8_acc} < float {c.float_acc} - 0.2")
            static = by_key.get((c.mode, "ptq_static"))
            if static is not None and c.int8_acc < static.int8_acc:
                misses.append(f"{where}: int8 {c.int8_acc} < PTQ static {static.int8_acc}")
        if c.method == "ptq_static" and c.int8_acc < c.float_acc - 0.5:
            misses.append(f"{where}: int8 {c.int8_acc} < float {c.float_acc} - 0.5")
        if c.method == "ptq_dynamic" and c.int8_acc < c.float_acc - 0.2:
            misses.append(f"{where}: int8 {c.int8_acc} < float {c.float_acc} - 0.2")
        if c.onnx_acc is not None and abs(c.onnx_acc - c.int8_acc) > 0.1:
            misses.append(f"{where}: ONNX Runtime {c.onnx_acc} vs torch int8 {c.int8_acc} (> 0.1 apart)")
    return misses


def _accuracies(c: Cell) -> str:
    steps = [f"{c.float_acc:.2f}"] + ([f"{c.fake_quant_acc:.2f}"] if c.fake_quant_acc is not None else [])
    text = " -> ".join(steps + [f"{c.int8_acc:.2f}"]) + f" ({c.int8_acc - c.float_acc:+.2f})"
    return text + (f"; ORT {c.onnx_acc:.2f}" if c.onnx_acc is not None else "")


def _guide(mode: str, method: str) -> str:
    f, fq, q = GUIDE_RESULTS[(mode, method)]
    return " -> ".join([f"{f:.2f}"] + ([f"{fq:.2f}"] if fq is not None else []) + [f"{q:.2f}"]) + f" ({q - f:+.2f})"


def markdown(cells: list[Cell], config: TableConfig, command: str, machine: str, minutes: float) -> str:
    by_key = {(c.mode, c.method): c for c in cells}
    names = {"eager": "eager", "fx": "FX", "pt2e": "PT2E"}
    lines = [
        "# The guide's nine cells on the real Fashion-MNIST",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Date: {time.strftime('%Y-%m-%d')}; whole table {minutes:.1f} min.",
        "",
        "Accuracy in percent on the 10,000-image Fashion-MNIST test set: float -> int8 (QAT: float -> fake-quant -> "
        "int8), the change in points, and for static PTQ and QAT the exported ONNX file in ONNX Runtime. Every cell "
        "starts from one float training (so a mode's three cells share it). The guide's cells (MNIST) below for "
        "comparison.",
        "",
        "| mode | PTQ static | PTQ dynamic | QAT |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        row = [_accuracies(by_key[(mode, m)]) if (mode, m) in by_key else "not run" for m in METHODS]
        lines.append(f"| {names[mode]} (qlightning) | " + " | ".join(row) + " |")
    for mode in MODES:
        lines.append(f"| {names[mode]} (guide, MNIST) | " + " | ".join(_guide(mode, m) for m in METHODS) + " |")
    lines += ["", "Sizes (state dict; ONNX file) and latency (batch 1, median of 30, 2 threads):", "",
              "| cell | float size | int8 size | ONNX size | float ms | int8 torch ms | ORT ms | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        onnx_size = f"{c.onnx_size_bytes / 1024:.1f} KiB" if c.onnx_size_bytes else "-"
        onnx_ms = f"{c.onnx_latency_ms:.3f}" if c.onnx_latency_ms is not None else "-"
        lines.append(f"| {names[c.mode]} {c.method} | {c.float_size_bytes / 1024:.1f} KiB | {c.int8_size_bytes / 1024:.1f} KiB "
                     f"| {onnx_size} | {c.float_latency_ms:.3f} | {c.int8_latency_ms:.3f} | {onnx_ms} | {c.seconds} |")
    misses = goal_misses(cells)
    lines += ["", "Goals (QAT int8 >= float - 0.2 and >= PTQ static; PTQ static >= float - 0.5; dynamic >= float - 0.2; "
              "ORT within 0.1 of torch int8): " + ("all met." if not misses else "missed:"), ""]
    lines += [f"- {m}" for m in misses]
    lines += ["", "Configuration: " + ", ".join(f"{k}={v}" for k, v in asdict(config).items()), "", CHOICES, ""]
    return "\n".join(lines)
