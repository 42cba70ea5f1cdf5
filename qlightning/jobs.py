"""The jobs, as plain functions of a Hydra/OmegaConf config (``scripts/train.py`` and
``scripts/quantize.py`` are their shims)."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import qlightning.conf_schema  # noqa: F401  (registers the quant schemas Hydra validates against)
from qlightning.callbacks import PostTrainingQuantization
from qlightning.errors import QuantizationConfigError
from qlightning.exporters.atomic import write_json
from qlightning.models import accuracy

# Keys in a config group that describe the run rather than the object the group builds.
_DATA_INFO_KEYS = ("num_classes", "input_shape")
_QUANT_RUN_KEYS = ("epochs",)


def _build(node: DictConfig, drop: tuple[str, ...] = ()):
    node = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    try:
        return instantiate({k: v for k, v in node.items() if k not in drop})
    except InstantiationException as exc:
        # Surface our own validation errors as themselves, not wrapped in Hydra's.
        if isinstance(exc.__cause__, (QuantizationConfigError, ImportError)):
            raise exc.__cause__ from None
        raise


def state_size_bytes(model: torch.nn.Module) -> int:
    with tempfile.TemporaryFile() as f:
        torch.save(model.state_dict(), f)
        return f.tell()


def latency_ms(model, x, repeats: int = 30) -> float:
    with torch.no_grad():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def _with_output_dir(cfg: DictConfig, output_dir: Path) -> DictConfig:
    # paths.output_dir defaults to Hydra's run directory; the job is told it explicitly, so it also
    # runs from a config composed outside a Hydra app (tests, notebooks).
    cfg = copy.deepcopy(cfg)
    OmegaConf.update(cfg, "paths.output_dir", str(output_dir), force_add=True)
    return cfg


def _loggers_and_callbacks(cfg: DictConfig) -> tuple[list, list]:
    loggers = [_build(node) for node in (cfg.get("logger") or {}).values()]
    callbacks = [_build(node) for node in (cfg.get("callbacks") or {}).values()]
    return loggers, callbacks


def train(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Float baseline, then QAT from it (or PTQ of it), then int8 and its exports; returns (and
    writes) the summary."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = _with_output_dir(cfg, output_dir)
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = _build(cfg.data, drop=_DATA_INFO_KEYS)
    datamodule.setup("fit")
    model = _build(cfg.model)
    quant = _build(cfg.quant, drop=_QUANT_RUN_KEYS)  # bad quant choices fail here, before any training
    _export_into(quant, output_dir)

    if isinstance(quant, PostTrainingQuantization):
        # Train float, then the callback calibrates on the train loader and converts at fit end.
        L.Trainer(**_trainer_args(cfg, cfg.float_epochs), callbacks=[quant]).fit(model, datamodule)
        return _summarize(model, quant, datamodule, output_dir, fake_quant_model=None)

    loggers, callbacks = _loggers_and_callbacks(cfg)
    L.Trainer(**_trainer_args(cfg, cfg.float_epochs)).fit(model, datamodule)
    float_model = copy.deepcopy(model)
    model.hparams.lr = cfg.qat_lr
    args = _trainer_args(cfg, cfg.quant.epochs)
    if loggers:
        args["logger"] = loggers
    L.Trainer(**args, callbacks=[quant, *callbacks]).fit(model, datamodule)
    return _summarize(float_model, quant, datamodule, output_dir, fake_quant_model=model)


def quantize(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Post-training quantization of a trained checkpoint, without training: calibrate on training
    batches through ``trainer.validate``, convert, evaluate on the validation set."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = _with_output_dir(cfg, output_dir)
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r} is not a file; pass the checkpoint to quantize")
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = _build(cfg.data, drop=_DATA_INFO_KEYS)
    datamodule.setup("fit")
    model = _build(cfg.model)
    ptq = _build(cfg.quant, drop=_QUANT_RUN_KEYS)
    _export_into(ptq, output_dir)
    if not isinstance(ptq, PostTrainingQuantization):
        raise QuantizationConfigError(
            f"quantizing a checkpoint needs a post-training config (quant=ptq_static or quant=ptq_dynamic), got "
            f"{type(ptq).__name__}; QAT needs training: use scripts/train.py"
        )
    trainer = L.Trainer(**_trainer_args(cfg, epochs=0), callbacks=[ptq])
    # Calibration data comes from the train split, so the accuracy below is measured on unseen data.
    trainer.validate(model, dataloaders=datamodule.train_dataloader(), ckpt_path=str(ckpt_path), verbose=False)
    return _summarize(model, ptq, datamodule, output_dir, fake_quant_model=None, ckpt_path=str(ckpt_path))


def export_checkpoint(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Export a QAT checkpoint (saved during ``fit`` with QuantizationAwareTraining) without training:
    the callback rebuilds the prepared network, Lightning restores the checkpoint into it, training is
    skipped, and the fit-end passes, conversion and exports run. PTQ configs quantize a float
    checkpoint instead (as ``quantize``) and export the result."""
    output_dir = Path(output_dir)
    formats = [cfg.format] if isinstance(cfg.format, str) else list(cfg.format)
    quant_cfg = OmegaConf.merge(cfg.quant, {"export": formats})
    if quant_cfg.get("_target_") == "qlightning.PostTrainingQuantization":
        return quantize(OmegaConf.merge(cfg, {"quant": quant_cfg}), output_dir)
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r} is not a file; pass the checkpoint to export")
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = _build(cfg.data, drop=_DATA_INFO_KEYS)
    model = _build(cfg.model)
    qat = _build(quant_cfg, drop=_QUANT_RUN_KEYS)
    _export_into(qat, output_dir)
    args = _trainer_args(cfg, epochs=-1)
    args["limit_train_batches"] = 0  # restore and go straight to fit end
    L.Trainer(**args, callbacks=[qat]).fit(model, datamodule, ckpt_path=str(ckpt_path))
    summary = {"ckpt_path": str(ckpt_path), "mode": qat.mode, "backend": qat.backend.name, "exported": qat.exported}
    write_json(output_dir / "summary.json", summary)
    print(format_summary({f"{fmt}": f"{r['path']} ({r['size_bytes']} bytes, SQNR {r['sqnr_db']} dB, "
                          f"top-1 agreement {r['top1_agreement']})" for fmt, r in qat.exported.items()}))
    return summary


def _export_into(callback, output_dir: Path) -> None:
    # Exports go to the run directory unless the config names another place.
    if getattr(callback, "export", None) and callback.export_dir is None:
        callback.export_dir = str(Path(output_dir) / "quantized")


def _summarize(float_model, callback, datamodule, output_dir: Path, fake_quant_model, **extra) -> dict:
    val = datamodule.val_dataloader()
    example = next(iter(val))[0][:1]
    float_net = getattr(float_model, callback.network_name)
    ptq = isinstance(callback, PostTrainingQuantization)
    # The int8 model selects its backend's engine itself (bind_quantized_engine).
    int8 = callback.quantized_model
    int8_acc = accuracy(int8, val)
    int8_latency = latency_ms(int8, example)
    with torch.no_grad():
        agreement = _top1_agreement(float_model if ptq else fake_quant_model, int8, val)
    runtime = "PT2E Q/DQ graph" if callback.mode == "pt2e" else f"{callback.backend.engine} int8 kernels"
    if ptq:
        method = "ptq_dynamic" if callback.dynamic else f"ptq_static ({callback.calibrated_batches} batches)"
    else:
        method = "qat"
    summary = {
        **extra,
        "method": method,
        "mode": callback.mode,
        "backend": callback.backend.name,
        "observer": callback.observer,
        "float_acc": round(accuracy(float_model, val), 2),
        # PTQ has no fake-quantized training model; its int8 model is compared with the float one.
        "fake_quant_acc": None if fake_quant_model is None else round(accuracy(fake_quant_model, val), 2),
        "int8_acc": round(int8_acc, 2),
        "int8_runtime": f"torch {torch.__version__} ({runtime})",
        "top1_agreement": round(agreement, 4),
        "agreement_reference": "float" if ptq else "fake_quant",
        "float_size_bytes": state_size_bytes(float_net),
        "int8_size_bytes": state_size_bytes(int8),
        "float_latency_ms": round(latency_ms(float_net.eval(), example), 3),
        "int8_latency_ms": round(int8_latency, 3),
        "exported": {fmt: str(Path(callback.export_dir) / r["path"]) for fmt, r in callback.exported.items()},
    }
    if "onnx" in callback.exported:
        onnx_path = Path(callback.export_dir) / callback.exported["onnx"]["path"]
        report = callback.exported["onnx"]
        summary.update(
            onnx_int8_acc=round(onnx_accuracy(onnx_path, val), 2),
            onnx_latency_ms=round(onnx_latency_ms(onnx_path, example), 3),
            onnx_size_bytes=report["size_bytes"],
            onnx_sqnr_db=report["sqnr_db"],
            onnx_top1_agreement=report["top1_agreement"],
        )
    write_json(output_dir / "summary.json", summary)
    print(format_summary(summary))
    return summary


def onnx_accuracy(path: Path, dataloader) -> float:
    """Top-1 accuracy of the exported file, run in ONNX Runtime (the target runtime)."""
    from qlightning.exporters import onnx_format

    correct = total = 0
    for x, y in dataloader:
        correct += int((torch.from_numpy(onnx_format.run(path, (x,))).argmax(1) == y).sum())
        total += y.numel()
    return 100.0 * correct / total


def onnx_latency_ms(path: Path, x) -> float:
    from qlightning.exporters import onnx_format

    return latency_ms(lambda inputs: onnx_format.run(path, (inputs,)), x)


def _trainer_args(cfg: DictConfig, epochs: int) -> dict:
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    args.pop("_target_", None)
    args["max_epochs"] = epochs
    return args


def _top1_agreement(reference, candidate, dataloader) -> float:
    reference.eval()
    same = total = 0
    for x, _ in dataloader:
        same += (reference(x).argmax(1) == candidate(x).argmax(1)).sum().item()
        total += len(x)
    return same / total


def format_summary(summary: dict) -> str:
    width = max(len(k) for k in summary)
    lines = [f"{'qlightning summary':^{width + 30}}", "-" * (width + 30)]
    lines += [f"{key:<{width}}  {value}" for key, value in summary.items()]
    return "\n".join(lines)
