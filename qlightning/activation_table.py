"""A16W8 against A8W8 against float on the real Fashion-MNIST: the guide's network and a zoo CNN, static
PTQ and QAT, in ONNX Runtime and LiteRT (the runtimes that execute 16-bit activations).

Each network is trained once in float (the zoo's cached float training); every cell quantizes a copy
with qlightning's callback, exports, verifies and measures accuracy on the test images in the runtime.
Latency: batch 1, 2 threads, the float file and the two quantized files of one (model, method,
runtime) taking turns round by round (medians).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from qlightning.models import GuideNet
from qlightning.zoo import MODELS, Target, ZooConfig, ZooModel, _network, run_cell

# The guide's 1x1-conv network, on the zoo's 3-channel Fashion-MNIST at its own 28 x 28. is_cnn=False
# only skips run_cell's own ORT latency (fp32 / quantize_static / export), measured here instead.
GUIDE_NET = ZooModel("guide_net", "qlightning", 28, lambda: GuideNet(in_channels=3, image_size=28), is_cnn=False)
TARGETS = (Target("pt2e", "onnxruntime", "onnx"), Target("pt2e", "tflite", "tflite"))
ACTIVATION_DTYPES = ("8-bit", "int16")
METHODS = ("ptq", "qat")


def model(name: str) -> ZooModel:
    return GUIDE_NET if name == GUIDE_NET.name else dataclasses.replace(MODELS.get(name), is_cnn=False)


def run_cells(names, config: ZooConfig, workdir: Path, targets=TARGETS, methods=METHODS) -> list[dict]:
    cells = []
    for name in names:
        for target in targets:
            for method in methods:
                files = {}
                for dtype in ACTIVATION_DTYPES:
                    cell_dir = workdir / "cells" / f"{name}-{method}-{target.backend}-{dtype}"
                    result = run_cell(model(name), method, target, config, cell_dir, workdir / "float",
                                      activation_dtype=None if dtype == "8-bit" else dtype)
                    result["activations"] = dtype if dtype != "8-bit" else (result.get("verification") or {}).get(
                        "activation_dtype", "8-bit")
                    cells.append(result)
                    if result["status"] == "ok":
                        files[result["activations"]] = cell_dir / result["path"]
                if len(files) == len(ACTIVATION_DTYPES):
                    latency = runtime_latency(model(name), target.format, files, config, workdir / "float")
                    for cell in cells[-len(ACTIVATION_DTYPES):]:
                        cell["latency_ms"] = latency[cell["activations"]]
                        cell["float_latency_ms"] = latency["float"]
    return cells


def _float_file(zoo_model: ZooModel, fmt: str, x: torch.Tensor, config: ZooConfig, cache: Path) -> Path:
    from qlightning.zoo import float_weights

    weights, _ = float_weights(zoo_model, config, cache)
    net = _network(zoo_model, "pt2e", weights).eval()
    path = cache / f"{zoo_model.name}-float.{fmt}"
    if fmt == "onnx":
        from qlightning.latency import export_float_onnx

        return export_float_onnx(net, x, path)
    import litert_torch

    litert_torch.convert(net, (x,)).export(str(path))
    return path


def runtime_latency(zoo_model: ZooModel, fmt: str, files: dict[str, Path], config: ZooConfig, cache: Path,
                    rounds: int = 100) -> dict[str, dict[str, float]]:
    """Median and IQR (ms) of batch-1 inference of the float file and each quantized one, interleaved."""
    from qlightning.latency import interleaved_calls_ms

    x = torch.rand(1, 3, zoo_model.image_size, zoo_model.image_size)
    files = {"float": _float_file(zoo_model, fmt, x, config, cache), **files}
    if fmt == "onnx":
        from qlightning.latency import ort_session

        calls = {}
        for label, path in files.items():
            session = ort_session(path, threads=2)
            feed = {session.get_inputs()[0].name: x.numpy()}
            calls[label] = lambda s=session, f=feed: s.run(None, f)
    else:
        from ai_edge_litert.interpreter import Interpreter

        from qlightning.exporters.tflite_format import _to_input

        calls = {}
        for label, path in files.items():
            interpreter = Interpreter(model_path=str(path), num_threads=2)
            interpreter.allocate_tensors()
            detail = interpreter.get_input_details()[0]
            interpreter.set_tensor(detail["index"], _to_input(detail, x.numpy()))  # litert-torch keeps NCHW
            calls[label] = interpreter.invoke
    return interleaved_calls_ms(calls, warmup=10, rounds=rounds)


def markdown(cells: list[dict], meta: dict) -> str:
    lines = [
        "# 16-bit activations (A16W8) against 8-bit (A8W8) and float",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}. Date: {meta['date']}. Took {meta['minutes']:.0f} min.",
        "",
        f"Data: the real Fashion-MNIST (Debian's dataset-fashion-mnist), {meta['config']['train_images']} training "
        f"images, accuracy on {meta['config']['test_images']} test images, measured in the runtime on the exported file. "
        f"Float: {meta['config']['float_epochs']} epochs; QAT: {meta['config']['qat_steps']} steps at lr "
        f"{meta['config']['qat_lr']:g} from the float weights; static PTQ: {meta['config']['calibration_batches']} "
        "calibration batches, histogram observer.",
        "",
        "Latency: batch 1, 2 threads, median of 100 rounds in which the float file and both quantized files "
        "take turns (IQR in brackets). ONNX Runtime's CPU provider has no 16-bit integer kernels: it runs an A16W8 "
        "file's convolutions in float between 16-bit QuantizeLinear / DequantizeLinear, so its A16W8 latency is "
        "float's plus the Q/DQ; the format is for NPU providers that run int16 (e.g. QNN's HTP).",
        "",
        "| model | method | runtime | activations | accuracy % | vs float | size KiB | latency ms | vs float file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        if c["status"] != "ok":
            lines.append(f"| {c['model']} | {c['method']} | {c['format']} | {c.get('activation_dtype', '8-bit')} | "
                         f"{c['status']}: {c.get('reason', '')[:120]} | | | | |")
            continue
        latency = c.get("latency_ms")
        lat = f"{latency['median']:.3f} ({latency['iqr']:.3f})" if latency else "-"
        ratio = f"{latency['median'] / c['float_latency_ms']['median']:.2f}" if latency else "-"
        lines.append(
            f"| {c['model']} | {c['method']} | {c['format']} | {c['activations']} | {c['int8_acc']:.2f} | "
            f"{c['int8_acc'] - c['float_acc']:+.2f} (float {c['float_acc']:.2f}) | {c['size_bytes'] / 1024:.1f} | "
            f"{lat} | {ratio} |"
        )
    return "\n".join(lines) + "\n"
