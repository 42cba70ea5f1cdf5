"""The jobs, as plain functions of a Hydra/OmegaConf config (``scripts/train.py`` and
``scripts/quantize.py`` are their shims)."""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

import qlightning.conf_schema  # noqa: F401  (registers the quant schemas Hydra validates against)
from qlightning.callbacks import PostTrainingQuantization
from qlightning.callbacks.qat import checkpointed_states
from qlightning.errors import QuantizationConfigError
from qlightning.exporters.atomic import publish, staged_path, write_json
from qlightning.latency import interleaved_calls_ms, ort_session
from qlightning.models import accuracy
from qlightning.spec import SIXTEEN_BIT_DTYPES

# Keys in a config group that describe the run rather than the object the group builds.
_DATA_INFO_KEYS = ("num_classes", "input_shape")
_QUANT_RUN_KEYS = ("epochs",)
# Latency in the summary: fixed threads, warm-up, enough calls for a median and its spread.
LATENCY_THREADS = 2
LATENCY_WARMUP = 10
LATENCY_ROUNDS = 50


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


def latency_ms(model, x, repeats: int = LATENCY_ROUNDS) -> float:
    """Median batch-``len(x)`` latency of ``model`` (a callable) in ms, at :data:`LATENCY_THREADS` threads."""
    return latency_stats({"model": lambda: model(x)}, rounds=repeats)["model"]["median"]


def latency_stats(calls: dict, rounds: int = LATENCY_ROUNDS) -> dict[str, dict[str, float]]:
    """Median and interquartile range (ms) of each zero-argument call, at :data:`LATENCY_THREADS` torch
    threads, the calls taking turns so that load changes hit all of them alike (two runs of one config
    under load read 0.088 and 159.988 ms with 30 back-to-back calls at whatever threads, issue 18)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    try:
        with torch.no_grad():
            return interleaved_calls_ms(calls, warmup=LATENCY_WARMUP, rounds=rounds)
    finally:
        torch.set_num_threads(threads)


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


def _check_run_lengths(cfg: DictConfig) -> None:
    # Each phase has its own length; a trainer-wide max_epochs would say neither (issue 18).
    trainer = cfg.get("trainer") or {}
    for key in ("max_epochs", "min_epochs", "max_steps"):
        if trainer.get(key) not in (None, -1):
            raise QuantizationConfigError(
                f"trainer.{key}={trainer.get(key)} is set by the job for each phase: use float_epochs=N (the float "
                "baseline) and quant.epochs=N (QAT) instead"
            )


def train(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Float baseline, then QAT from it (or PTQ of it), then int8 and its exports; returns (and
    writes) the summary. ``cfg.ckpt_path`` (a QAT checkpoint) resumes the QAT phase from it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = _with_output_dir(cfg, output_dir)
    _check_run_lengths(cfg)
    quiet_framework_noise()
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = _build(cfg.data, drop=_DATA_INFO_KEYS)
    datamodule.setup("fit")
    model = _build(cfg.model)
    quant = _build(cfg.quant, drop=_QUANT_RUN_KEYS)  # bad quant choices fail here, before any training
    resume = cfg.get("ckpt_path")
    if resume:
        check_qat_checkpoint(resume)
    _export_into(quant, output_dir)

    if isinstance(quant, PostTrainingQuantization):
        # Train float, then the callback calibrates on the train loader and converts at fit end.
        phase(f"float training, {cfg.float_epochs} epochs, then {describe(quant)}")
        args = _trainer_args(cfg, cfg.float_epochs, output_dir)
        L.Trainer(**args, callbacks=[quant, *_checkpointing(args, output_dir, "float")]).fit(model, datamodule)
        return _summarize(model, quant, datamodule, output_dir, fake_quant_model=None)

    loggers, callbacks = _loggers_and_callbacks(cfg)
    float_ckpt = float_baseline(cfg, model, datamodule, output_dir)
    float_model = copy.deepcopy(model)
    model.hparams.lr = cfg.qat_lr
    phase(f"{describe(quant)}, {cfg.quant.epochs} epochs" + (f", resumed from {resume}" if resume else ""))
    args = _trainer_args(cfg, cfg.quant.epochs, output_dir)
    if loggers:
        args["logger"] = loggers
    # The float phase printed the model summary of this network already.
    args["enable_model_summary"] = False
    trainer = L.Trainer(**args, callbacks=[quant, *callbacks, *_checkpointing(args, output_dir, "qat")])
    trainer.fit(model, datamodule, ckpt_path=resume or None)
    summary = _summarize(float_model, quant, datamodule, output_dir, fake_quant_model=model,
                         float_ckpt_path=str(float_ckpt))
    log_summary(trainer.loggers, cfg, summary)
    return summary


def float_baseline(cfg: DictConfig, model, datamodule, output_dir: Path) -> Path:
    """Train the float baseline, or load it from ``cfg.paths.cache_dir`` when a run with the same model,
    data, seed, trainer and epochs trained it before (every job of a quant sweep shares it, issue 18).
    Returns the checkpoint it came from."""
    key = hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create({
        "model": cfg.model, "data": cfg.data, "trainer": cfg.trainer, "seed": cfg.seed, "epochs": cfg.float_epochs,
        "versions": [str(torch.__version__), str(L.__version__)],
    }), resolve=True).encode()).hexdigest()[:16]
    cache_dir = cfg.paths.get("cache_dir")
    cached = Path(cache_dir) / f"float-{key}.ckpt" if cache_dir else None
    if cached is not None and cached.is_file():
        phase(f"float baseline: {cfg.float_epochs} epochs, reused from {cached} (same model, data, seed, trainer)")
        model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True)["state_dict"])
        return cached
    phase(f"float baseline, {cfg.float_epochs} epochs")
    args = _trainer_args(cfg, cfg.float_epochs, output_dir)
    trainer = L.Trainer(**args, callbacks=_checkpointing(args, output_dir, "float"))
    trainer.fit(model, datamodule)
    last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    path = Path(last) if last else output_dir / "float_baseline.ckpt"
    if not last:
        trainer.save_checkpoint(path, weights_only=True)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with staged_path(cached) as staged:  # parallel sweep jobs may write it at the same time
            shutil.copyfile(path, staged)
            publish(staged, cached)
    return path


def check_qat_checkpoint(ckpt_path) -> dict:
    """The QuantizationAwareTraining state a checkpoint holds; a clear error when it holds none."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r} is not a file")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise QuantizationConfigError(f"ckpt_path={str(ckpt_path)!r} is not a readable checkpoint: {exc}") from exc
    states = checkpointed_states(checkpoint)
    if not states:
        raise QuantizationConfigError(
            f"checkpoint {ckpt_path} holds no QuantizationAwareTraining state: it is not a QAT checkpoint (quantize a "
            "float checkpoint with scripts/quantize.py ckpt_path=...)"
        )
    return states[0]


def _checkpointing(trainer_args: dict, output_dir: Path, phase_name: str) -> list:
    # In the run directory, one folder per phase: Lightning's default (./checkpoints without a logger)
    # put every sweep job's checkpoints in one folder of the current directory (issue 18).
    if not trainer_args.get("enable_checkpointing", True):
        return []
    return [ModelCheckpoint(dirpath=output_dir / "checkpoints" / phase_name, filename="epoch{epoch}",
                            auto_insert_metric_name=False, save_last=True)]


def quantize(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Post-training quantization of a trained checkpoint, without training: calibrate on training
    batches through ``trainer.validate``, convert, evaluate on the validation set."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = _with_output_dir(cfg, output_dir)
    quiet_framework_noise()
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
    phase(f"{describe(ptq)} of {ckpt_path}")
    trainer = L.Trainer(**_trainer_args(cfg, 0, output_dir), callbacks=[ptq])
    # Calibration data comes from the train split, so the accuracy below is measured on unseen data.
    trainer.validate(model, dataloaders=datamodule.train_dataloader(), ckpt_path=str(ckpt_path), verbose=False)
    return _summarize(model, ptq, datamodule, output_dir, fake_quant_model=None, ckpt_path=str(ckpt_path))


# What a QAT checkpoint records of its quant config (QuantizationAwareTraining.state_dict).
_CHECKPOINTED_QUANT_KEYS = ("mode", "backend", "observer", "weight_scheme", "activation_scheme", "activation_dtype",
                            "skip")


def export_checkpoint(cfg: DictConfig, output_dir: str | Path, overrides: tuple[str, ...] = ()) -> dict:
    """Export a QAT checkpoint (saved during ``fit`` with QuantizationAwareTraining) without training:
    the callback rebuilds the prepared network, Lightning restores the checkpoint into it, training is
    skipped, and the fit-end passes, conversion and exports run. The quant config comes from the
    checkpoint, except keys named in ``overrides`` (the command line's). PTQ configs quantize a float
    checkpoint instead (as ``quantize``) and export the result."""
    output_dir = Path(output_dir)
    quiet_framework_noise()
    formats = [cfg.format] if isinstance(cfg.format, str) else list(cfg.format)
    quant_cfg = OmegaConf.merge(cfg.quant, {"export": formats})
    if quant_cfg.get("_target_") == "qlightning.PostTrainingQuantization":
        return quantize(OmegaConf.merge(cfg, {"quant": quant_cfg}), output_dir)
    state = check_qat_checkpoint(cfg.ckpt_path)
    if not any(o.split("=")[0].lstrip("+~") == "quant" for o in overrides):
        # The checkpoint knows how it was trained; asking the user to repeat it invited mismatches (issue 18).
        named = {o.split("=")[0].lstrip("+~").removeprefix("quant.") for o in overrides if o.lstrip("+~").startswith("quant.")}
        quant_cfg = OmegaConf.merge(quant_cfg, {k: state[k] for k in _CHECKPOINTED_QUANT_KEYS if k in state and k not in named})
    ckpt_path = Path(cfg.ckpt_path)
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = _build(cfg.data, drop=_DATA_INFO_KEYS)
    model = _build(cfg.model)
    qat = _build(quant_cfg, drop=_QUANT_RUN_KEYS)
    _export_into(qat, output_dir)
    phase(f"export of {ckpt_path} ({describe(qat)}) to {', '.join(formats)}")
    args = _trainer_args(cfg, -1, output_dir)
    args["limit_train_batches"] = 0  # restore and go straight to fit end
    args["enable_checkpointing"] = False
    L.Trainer(**args, callbacks=[qat]).fit(model, datamodule, ckpt_path=str(ckpt_path))
    summary = {"ckpt_path": str(ckpt_path), "mode": qat.mode, "backend": qat.backend.name, "observer": qat.observer,
               "exported": qat.exported}
    write_json(output_dir / "summary.json", summary)
    lines = [f"{'qlightning export':^60}", "-" * 60]
    for fmt, report in qat.exported.items():
        lines.append(f"{fmt:<10} {Path(qat.export_dir) / report['path']}  {_kib(report['size_bytes'])}, SQNR "
                     f"{_db(report['sqnr_db'])} vs the torch model, top-1 agreement {_percent(report['top1_agreement'], 100)}")
    print("\n".join(lines))
    return summary


def _export_into(callback, output_dir: Path) -> None:
    # Exports go to the run directory unless the config names another place.
    if getattr(callback, "export", None) and callback.export_dir is None:
        callback.export_dir = str(Path(output_dir) / "quantized")


def _summarize(float_model, callback, datamodule, output_dir: Path, fake_quant_model, **extra) -> dict:
    val = datamodule.val_dataloader()
    example = next(iter(val))[0][:1]
    float_net = getattr(float_model, callback.network_name).eval()
    ptq = isinstance(callback, PostTrainingQuantization)
    # The int8 model selects its backend's engine itself (bind_quantized_engine).
    int8 = callback.quantized_model
    with torch.no_grad():
        agreement = _top1_agreement(float_model if ptq else fake_quant_model, int8, val)
    if callback.mode == "pt2e":
        # torch runs PT2E's converted graph as written: dequantize -> float op -> quantize, a
        # reference of the numerics, slower than float; the int8 kernels are the exported runtime's.
        runtime = "PT2E reference Q/DQ graph, not int8 kernels"
    else:
        runtime = f"{callback.backend.engine} int8 kernels"
    if ptq:
        method = "ptq_dynamic" if callback.dynamic else f"ptq_static ({callback.calibrated_batches} batches)"
    else:
        method = "qat"
    calls = {"float": lambda: float_net(example), "int8": lambda: int8(example)}
    onnx_path = Path(callback.export_dir) / callback.exported["onnx"]["path"] if "onnx" in callback.exported else None
    if onnx_path is not None:
        session = ort_session(onnx_path, threads=LATENCY_THREADS)
        feed = {session.get_inputs()[0].name: example.numpy()}
        calls["onnx"] = lambda: session.run(None, feed)
    latency = latency_stats(calls)
    summary = {
        **extra,
        "method": method,
        "mode": callback.mode,
        "backend": callback.backend.name,
        "observer": callback.observer,
        "activation_dtype": callback.activation_dtype,
        "skipped_layers": list(callback.skipped_layers),
        # PTQ: the layers whose float fallback would gain the output most (qlightning.compare_layers), worst first.
        "worst_layers": [layer.name for layer in callback.layers.worst(3)] if getattr(callback, "layers", None) else None,
        # PTQ with max_accuracy_drop: the float metric, each conversion's float layers and metric.
        "fallback": callback.fallback.to_dict() if getattr(callback, "fallback", None) else None,
        "float_acc": round(accuracy(float_model, val), 2),
        # PTQ has no fake-quantized training model; its int8 model is compared with the float one.
        "fake_quant_acc": None if fake_quant_model is None else round(accuracy(fake_quant_model, val), 2),
        "int8_acc": round(accuracy(int8, val), 2),
        "int8_runtime": f"torch {torch.__version__} ({runtime})",
        "top1_agreement": round(agreement, 4),
        "agreement_reference": "float" if ptq else "fake_quant",
        "val_samples": sum(len(y) for _, y in val),
        "float_size_bytes": state_size_bytes(float_net),
        "int8_size_bytes": state_size_bytes(int8),
        "float_latency_ms": round(latency["float"]["median"], 3),
        "float_latency_ms_iqr": round(latency["float"]["iqr"], 3),
        "int8_latency_ms": round(latency["int8"]["median"], 3),
        "int8_latency_ms_iqr": round(latency["int8"]["iqr"], 3),
        "latency_threads": LATENCY_THREADS,
        "latency_repeats": LATENCY_ROUNDS,
        "latency_method": (f"batch 1, median and interquartile range of {LATENCY_ROUNDS} calls after {LATENCY_WARMUP} "
                           f"warm-up, models taking turns, {LATENCY_THREADS} threads (torch and ONNX Runtime)"),
        "exported": {fmt: str(Path(callback.export_dir) / r["path"]) for fmt, r in callback.exported.items()},
    }
    if onnx_path is not None:
        report = callback.exported["onnx"]
        summary.update(
            onnx_int8_acc=round(onnx_accuracy(onnx_path, val), 2),
            onnx_runtime=f"onnxruntime {report['runtime_version']} ("
                         + ("float ops between 16-bit Q/DQ: no 16-bit integer kernels on CPU"
                            if report.get("activation_dtype") in SIXTEEN_BIT_DTYPES else "int8 kernels")
                         + f", weights {report.get('weight_dtype')})",
            onnx_latency_ms=round(latency["onnx"]["median"], 3),
            onnx_latency_ms_iqr=round(latency["onnx"]["iqr"], 3),
            onnx_size_bytes=report["size_bytes"],
            onnx_sqnr_db=report["sqnr_db"] if isinstance(report["sqnr_db"], str) else round(report["sqnr_db"], 2),
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
    session = ort_session(path, threads=LATENCY_THREADS)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return latency_stats({"onnx": lambda: session.run(None, feed)})["onnx"]["median"]


def _trainer_args(cfg: DictConfig, epochs: int, output_dir: Path | None = None) -> dict:
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    args.pop("_target_", None)
    args = {k: v for k, v in args.items() if not (k in ("max_epochs", "min_epochs", "max_steps") and v is None)}
    args["max_epochs"] = epochs
    if output_dir is not None:
        # Lightning writes what it writes without a logger (lightning_logs/, checkpoints/) under here, not
        # in the current directory.
        args.setdefault("default_root_dir", str(output_dir))
    return args


def _top1_agreement(reference, candidate, dataloader) -> float:
    reference.eval()
    same = total = 0
    for x, _ in dataloader:
        same += (reference(x).argmax(1) == candidate(x).argmax(1)).sum().item()
        total += len(x)
    return same / total


# -- what the terminal shows ----------------------------------------------------------------------

def phase(text: str) -> None:
    """One line before a phase's progress bar, so a person knows what the bar is for."""
    print(f"\n== qlightning: {text}", flush=True)


def describe(callback) -> str:
    if isinstance(callback, PostTrainingQuantization):
        kind = "dynamic PTQ" if callback.dynamic else f"static PTQ ({callback.calibration_batches} calibration batches)"
    else:
        kind = "QAT"
    wide = f", {callback.activation_dtype} activations" if callback.recipe.activation.bits != 8 else ""
    return f"{kind}, mode {callback.mode}, backend {callback.backend.name}, observer {callback.observer}{wide}"


class _DropNoise(logging.Filter):
    """Lightning's lines that say nothing about this job: device availability (CPU job), the
    litlogger advertisement, and the fit-stop reason the phase line already gave."""

    PATTERNS = (re.compile(r"^(GPU|TPU|HPU|IPU) available"), re.compile(r"litlogger"),
                re.compile(r"^`Trainer\.fit` stopped: `max_epochs="))

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p.search(record.getMessage()) for p in self.PATTERNS)


def quiet_framework_noise() -> None:
    """Keep the jobs' terminal to progress bars and lines that matter (issue 18: 12 of 45 lines were
    framework noise). Only for the jobs: library users keep Lightning's messages."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in target.filters):
            target.addFilter(_DropNoise())
    # lightning 2.6.6's own pytree helper calls an API torch 2.14.1 deprecated; nothing for a user to do.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def log_summary(loggers, cfg: DictConfig, summary: dict) -> None:
    """The run's results reach every Lightning logger as metrics (``summary/<key>``), and the
    TensorBoard HPARAMS tab gets the quant config as hyperparameters with those metrics."""
    metrics = {f"summary/{k}": float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k in _LOGGED_SUMMARY_KEYS}
    quant = OmegaConf.to_container(cfg.quant, resolve=True, enum_to_str=True)
    params = {f"quant.{k}": (",".join(map(str, v)) if isinstance(v, list) else v)
              for k, v in quant.items() if not k.startswith("_") and k != "export_dir"}
    params.update({"float_epochs": cfg.float_epochs, "qat_lr": cfg.qat_lr, "seed": cfg.seed,
                   "model": OmegaConf.select(cfg, "model.net._target_", default=None) or cfg.model.get("_target_"),
                   "data": cfg.data.get("_target_")})
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=metrics)  # logs the metrics as scalars too
        else:
            logger.log_hyperparams(params)
            logger.log_metrics(metrics, step=0)
        logger.save()


_LOGGED_SUMMARY_KEYS = ("float_acc", "fake_quant_acc", "int8_acc", "onnx_int8_acc", "top1_agreement",
                        "float_size_bytes", "int8_size_bytes", "onnx_size_bytes", "float_latency_ms",
                        "int8_latency_ms", "onnx_latency_ms", "onnx_sqnr_db")


def _kib(n) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KiB"


def _ms(value, iqr=None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ms" + (f" ± {iqr / 2:.3f}" if iqr is not None else "")


def _percent(value, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.2f} %"


def _db(value) -> str:
    return "inf dB" if value == "inf" else f"{float(value):.1f} dB"


def format_summary(summary: dict) -> str:
    """The summary as a person reads it: one row per model (where it ran, accuracy, size, latency),
    then agreement and files."""
    ptq = summary.get("agreement_reference") == "float"
    # The quantized rows say what they hold: "int8", or "A16W8" for 16-bit activations with int8 weights.
    quantized = "A16W8" if summary.get("activation_dtype") in SIXTEEN_BIT_DTYPES else "int8"
    rows = [("float (fp32)", "torch", summary.get("float_acc"), summary.get("float_size_bytes"),
             summary.get("float_latency_ms"), summary.get("float_latency_ms_iqr")),
            ("fake-quant (QAT)", "torch", summary.get("fake_quant_acc"), None, None, None),
            (quantized, summary.get("int8_runtime", "torch"), summary.get("int8_acc"), summary.get("int8_size_bytes"),
             summary.get("int8_latency_ms"), summary.get("int8_latency_ms_iqr"))]
    if ptq:
        rows.pop(1)  # PTQ trains no fake-quantized model
    if "onnx_int8_acc" in summary:
        rows.append((f"{quantized} ONNX", summary.get("onnx_runtime", "onnxruntime"), summary["onnx_int8_acc"],
                     summary.get("onnx_size_bytes"), summary.get("onnx_latency_ms"), summary.get("onnx_latency_ms_iqr")))
    method = "QAT" if summary.get("method") == "qat" else summary.get("method")
    head = (f"qlightning summary: {method}, mode {summary.get('mode')}, backend "
            f"{summary.get('backend')}, observer {summary.get('observer')}"
            + (f", {summary['activation_dtype']} activations" if quantized != "int8" else ""))
    lines = [head, "-" * len(head),
             f"{'model':<18}{'accuracy':>10}{'size':>12}{'latency (batch 1)':>24}   runs in"]
    for name, runtime, acc, size, latency, iqr in rows:
        lines.append(f"{name:<18}{_percent(acc):>10}{_kib(size):>12}{_ms(latency, iqr):>24}   {runtime}")
    samples = summary.get("val_samples")
    lines.append(f"accuracy on {samples} validation images (one image = {100 / samples:.2f} points)" if samples else "")
    reference = "float" if ptq else "fake-quant"
    agreement = f"top-1 agreement of {quantized} with {reference}: {_percent(summary.get('top1_agreement'), 100)}"
    if "onnx_sqnr_db" in summary:
        agreement += (f"; ONNX vs torch fake-quant: SQNR {_db(summary['onnx_sqnr_db'])}, top-1 "
                      f"{_percent(summary.get('onnx_top1_agreement'), 100)}")
    lines.append(agreement)
    if summary.get("latency_method"):
        lines.append(f"latency: {summary['latency_method']}; ± is half the interquartile range")
    for fmt, path in (summary.get("exported") or {}).items():
        lines.append(f"exported {fmt}: {path} (report: {path}.report.json)")
    return "\n".join(line for line in lines if line)
