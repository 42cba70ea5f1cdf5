"""The default job, as a plain function of a Hydra/OmegaConf config (``scripts/train.py`` is its shim)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qlightning.errors import QuantizationConfigError
from qlightning.models import accuracy
from qlightning.quantized_engine import quantized_engine

# Keys in a config group that describe the run rather than the object the group builds.
_DATA_INFO_KEYS = ("num_classes", "input_shape")
_QUANT_RUN_KEYS = ("epochs",)


def _build(node: DictConfig, drop: tuple[str, ...] = ()):
    node = OmegaConf.to_container(node, resolve=True)
    try:
        return instantiate({k: v for k, v in node.items() if k not in drop})
    except InstantiationException as exc:
        # Surface our own validation errors as themselves, not wrapped in Hydra's.
        if isinstance(exc.__cause__, QuantizationConfigError):
            raise exc.__cause__ from None
        raise


def _state_size_bytes(model: torch.nn.Module) -> int:
    with tempfile.TemporaryFile() as f:
        torch.save(model.state_dict(), f)
        return f.tell()


def _latency_ms(model, x, repeats: int = 30) -> float:
    with torch.no_grad():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def train(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Float baseline, then QAT from it, then int8; returns (and writes) the summary."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = _build(cfg.data, drop=_DATA_INFO_KEYS)
    datamodule.setup("fit")
    model = _build(cfg.model)
    qat = _build(cfg.quant, drop=_QUANT_RUN_KEYS)  # bad quant choices fail here, before any training

    L.Trainer(**_trainer_args(cfg, cfg.float_epochs)).fit(model, datamodule)
    val = datamodule.val_dataloader()
    float_acc = accuracy(model, val)
    example = next(iter(val))[0][:1]
    float_latency = _latency_ms(model.net, example)
    float_size = _state_size_bytes(model.net)

    model.hparams.lr = cfg.qat_lr
    L.Trainer(**_trainer_args(cfg, cfg.quant.epochs), callbacks=[qat]).fit(model, datamodule)
    fake_quant_acc = accuracy(model, val)
    with quantized_engine(qat.backend.engine):
        int8 = qat.quantized_model
        int8_acc = accuracy(int8, val)
        int8_latency = _latency_ms(int8, example)
        with torch.no_grad():
            agreement = _top1_agreement(model, int8, val)
    summary = {
        "mode": qat.mode,
        "backend": qat.backend.name,
        "observer": qat.observer,
        "float_acc": round(float_acc, 2),
        "fake_quant_acc": round(fake_quant_acc, 2),
        "int8_acc": round(int8_acc, 2),
        "int8_runtime": f"torch {torch.__version__} ({'PT2E Q/DQ graph' if qat.mode == 'pt2e' else qat.backend.engine + ' int8 kernels'})",
        "top1_agreement": round(agreement, 4),
        "float_size_bytes": float_size,
        "int8_size_bytes": _state_size_bytes(int8),
        "float_latency_ms": round(float_latency, 3),
        "int8_latency_ms": round(int8_latency, 3),
    }
    _write_json_atomically(output_dir / "summary.json", summary)
    print(format_summary(summary))
    return summary


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
