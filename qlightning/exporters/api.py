"""``qlightning.export``: write a verified int8 file and its ``<name>.report.json``, or nothing."""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qlightning.errors import ExportVerificationError, QuantizationConfigError
from qlightning.exporters.atomic import publish, staged_path, write_json
from qlightning.exporters.program import exportable_program
from qlightning.exporters.registry import get_format
from qlightning.passes.graph import activation_dtypes

log = logging.getLogger(__name__)


def report_path(path: str | Path) -> Path:
    """``net.onnx`` -> ``net.onnx.report.json`` (the full name, so two formats never share a report)."""
    path = Path(path)
    return path.with_name(path.name + ".report.json")


def _flat(out) -> np.ndarray:
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    return np.concatenate([o.detach().cpu().reshape(o.shape[0], -1).float().numpy() for o in outputs], axis=1)


def _reference_outputs(program, inputs: tuple) -> np.ndarray:
    return _reference_outputs_of(program.reference, inputs)


def _reference_outputs_of(model, inputs: tuple) -> np.ndarray:
    with torch.no_grad():
        return _flat(model(*inputs))


def _output_scale(converted: nn.Module) -> float | None:
    """Scale of the last dequantize before the graph output (one step of the output's grid), or
    ``None`` when the output is computed in float after the last dequantize (e.g. a final Linear)."""
    graph = converted.graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    node = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    if "dequantize_per_tensor" in str(getattr(node, "target", "")):
        return float(node.args[1])
    return None


def _sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    from qlightning.passes.verify import sqnr_db

    return sqnr_db(torch.from_numpy(reference), torch.from_numpy(candidate))


def _agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    if reference.ndim == 2 and reference.shape[1] > 1:  # class scores
        return float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    return None


def _finite(value: float):
    return value if math.isfinite(value) else "inf"


def _metrics(reference: np.ndarray, exported: np.ndarray, output_scale: float | None) -> dict:
    diff = np.abs(exported - reference)
    return {
        "max_abs_diff": float(diff.max()),
        "max_abs_diff_in_steps": None if output_scale is None else float(diff.max() / output_scale),
        "output_scale": output_scale,
        "within_2_steps_fraction": None if output_scale is None else float(np.mean(diff <= 2 * output_scale + 1e-7)),
        "sqnr_db": _finite(_sqnr(reference, exported)),
        "top1_agreement": _agreement(reference, exported),
    }


def _float_metrics(float_out: np.ndarray, reference: np.ndarray, exported: np.ndarray) -> dict:
    """Quantization's own error (the torch fake-quant model against the float network with the same
    weights) and the runtime's error against that float network."""
    fake_quant_sqnr, runtime_sqnr = _sqnr(float_out, reference), _sqnr(float_out, exported)
    growth = 0.0 if fake_quant_sqnr == runtime_sqnr else fake_quant_sqnr - runtime_sqnr
    return {
        "fake_quant_float_sqnr_db": _finite(fake_quant_sqnr),
        "runtime_float_sqnr_db": _finite(runtime_sqnr),
        "noise_growth_db": growth if math.isfinite(growth) else ("inf" if growth > 0 else "-inf"),
        "fake_quant_float_top1_agreement": _agreement(float_out, reference),
        "runtime_float_top1_agreement": _agreement(float_out, exported),
    }


def _verdict(metrics: dict, max_noise_growth_db: float, min_sqnr_db: float,
             min_top1_agreement: float) -> str | None:
    """Why the runtime's file is not the trained model, or None when it is.

    With a float reference (any prepared / calibrated model): the runtime's error against float may
    exceed the fake-quant model's own error against float by at most ``max_noise_growth_db`` (3 dB:
    the runtime adds at most as much noise as quantization itself). Depth does not move this
    criterion: a deeper network accumulates more quantization noise in both. Top-1 agreements are
    reported, not gated: near-tie logits flip under one-step rounding differences between torch and
    a runtime (2 of 36 decisions of a briefly trained SmallCNN at 46 dB SQNR against the fake-quant
    model, measured), while a real mismatch shows as noise growth first.
    Without one (a model that arrives converted): SQNR against the torch model and top-1 agreement
    with it, against fixed floors.
    """
    if "runtime_float_sqnr_db" in metrics:
        growth = metrics["noise_growth_db"]
        growth = math.inf if growth == "inf" else -math.inf if growth == "-inf" else growth
        if growth > max_noise_growth_db:
            return (f"its error against the float network is {growth:.1f} dB above the fake-quant model's own "
                    f"(SQNR against float: runtime {metrics['runtime_float_sqnr_db']} dB, fake-quant "
                    f"{metrics['fake_quant_float_sqnr_db']} dB; allowed growth {max_noise_growth_db:g} dB)")
        return None
    sqnr = math.inf if metrics["sqnr_db"] == "inf" else metrics["sqnr_db"]
    agreement = metrics["top1_agreement"]
    if sqnr < min_sqnr_db or (agreement is not None and agreement < min_top1_agreement):
        return (f"SQNR {sqnr:.1f} dB against the torch model (min {min_sqnr_db:g}), top-1 agreement {agreement} "
                f"(min {min_top1_agreement:g})")
    return None


def _at_batch(inputs: tuple, batch_size: int) -> tuple:
    """The example inputs cut or repeated to ``batch_size`` along the batch dimension."""
    def resize(x):
        if not isinstance(x, torch.Tensor):
            return x
        repeats = -(-batch_size // x.shape[0])
        return x.repeat(repeats, *([1] * (x.dim() - 1)))[:batch_size]

    return tuple(resize(x) for x in inputs)


@contextlib.contextmanager
def _staged_companions(staged: Path, fmt):
    companions = [Path(f"{staged}{suffix}") for suffix in fmt.companion_suffixes]
    try:
        yield companions
    finally:
        for companion in companions:
            companion.unlink(missing_ok=True)


def export(
    model: nn.Module,
    example_inputs,
    format: str = "onnx",  # noqa: A002 - the SPEC's name
    path: str | Path | None = None,
    *,
    check_inputs: Iterable | None = None,
    backend: str | None = None,
    batch_size: int = 1,
    max_noise_growth_db: float = 3.0,
    min_sqnr_db: float = 35.0,
    min_top1_agreement: float = 0.99,
) -> dict:
    """Export a prepared (QAT / calibrated) or converted model from any mode and verify it.

    The model is brought to a converted PT2E program (eager/FX through ``ao_to_pt2e``, with their
    exact qparams), written in ``format`` to ``path``, run in the format's runtime on ``check_inputs``
    (default: the example inputs) and compared with the torch fake-quantized model and with the float
    network of the same weights. It must add at most ``max_noise_growth_db`` of noise against float
    beyond what fake quantization itself adds (see ``_verdict``); a model that arrives already converted has no float twin and is
    held to ``min_sqnr_db`` / ``min_top1_agreement`` against the torch model. When nothing was
    quantized or the check fails, it raises :class:`~qlightning.errors.ExportVerificationError` and
    writes nothing. Otherwise the file and ``<name>.report.json`` are written atomically; the report is
    returned.
    """
    fmt = get_format(format)
    if backend is not None:
        fmt.check_backend(backend)
    implementation = fmt.load()
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    example_inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    path = Path(path) if path is not None else Path(f"model{fmt.suffix}")
    checks = [example_inputs] + [
        tuple(c.cpu() for c in ((x,) if isinstance(x, torch.Tensor) else tuple(x))) for x in (check_inputs or [])
    ]

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise QuantizationConfigError(f"batch_size must be a positive int (the batch the file runs), got {batch_size!r}")
    program = exportable_program(model, example_inputs, fold_quantize=fmt.folded_weights)
    write_inputs = _at_batch(example_inputs, batch_size) if fmt.fixed_batch else example_inputs
    with staged_path(path, fmt.suffix) as staged, _staged_companions(staged, fmt) as companions:
        implementation.write(program.converted, write_inputs, staged)
        quantized_ops, float_ops = implementation.op_counts(staged)
        if quantized_ops == 0:
            raise ExportVerificationError(
                f"the {format} export of {type(model).__name__} has no quantized op ({float_ops} float ops): "
                "nothing was quantized; no file written"
            )
        reference = np.concatenate([_reference_outputs(program, c) for c in checks])
        exported = np.concatenate([implementation.run(staged, c) for c in checks])
        metrics = _metrics(reference, exported, _output_scale(program.converted))
        if program.float_reference is not None:
            float_out = np.concatenate([_reference_outputs_of(program.float_reference, c) for c in checks])
            metrics.update(_float_metrics(float_out, reference, exported))
        failure = _verdict(metrics, max_noise_growth_db, min_sqnr_db, min_top1_agreement)
        if failure:
            raise ExportVerificationError(
                f"{fmt.runtime} does not run the trained model: {failure}; against the torch fake-quant model: "
                f"SQNR {metrics['sqnr_db']} dB, max abs diff {metrics['max_abs_diff']:.4g}"
                + (f" ({metrics['max_abs_diff_in_steps']:.1f} output steps)" if metrics["max_abs_diff_in_steps"] else "")
                + "; no file written"
            )
        report = {
            "format": format,
            "path": path.name,
            "mode": program.mode,
            "backend": backend,
            "files": [path.name] + [path.with_suffix(suffix).name for suffix in fmt.companion_suffixes],
            "size_bytes": staged.stat().st_size + sum(c.stat().st_size for c in companions),
            "float_size_bytes": implementation.float_size_bytes(staged),
            "float_size_basis": "the same file with its 8-bit weights stored as fp32",
            "batch_size": batch_size if fmt.fixed_batch else "dynamic",
            "num_quantized_ops": quantized_ops,
            # What the program quantizes activations to ("int16": A16W8), as the file carries it.
            "activation_dtype": "/".join(activation_dtypes(program.converted.graph_module)) or None,
            # How the file stores its 8-bit weights, where the format says (ONNX: uint8 on x86 CPUs
            # without VNNI, whose u8 x s8 kernels saturate: onnx_format.unsigned_weights).
            **({"weight_dtype": implementation.weight_dtype(staged)} if hasattr(implementation, "weight_dtype") else {}),
            "num_float_ops": float_ops,
            **metrics,
            "check_batches": len(checks),
            "check_samples": int(reference.shape[0]),
            "tolerances": (
                {"max_noise_growth_db": max_noise_growth_db}
                if program.float_reference is not None
                else {"min_sqnr_db": min_sqnr_db, "min_top1_agreement": min_top1_agreement}
            ),
            "runtime": fmt.runtime,
            "runtime_version": implementation.runtime_version(),
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        for suffix, companion in zip(fmt.companion_suffixes, companions):
            publish(companion, path.with_suffix(suffix))  # first: whoever sees the main file finds its parts
        publish(staged, path)
    write_json(report_path(path), report)
    log.debug("qlightning: exported %s (%d bytes, SQNR %s dB)", path, report["size_bytes"], report["sqnr_db"])
    return report
