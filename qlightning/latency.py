"""ONNX Runtime latency measured the way the benchmarks and the zoo report it: fixed threads, no
spinning pools, sessions interleaved round by round, median and spread; and ORT's own
``quantize_static`` (U8S8 QDQ after ``quant_pre_process``, its recommended CPU setting) as the
baseline an int8 export has to beat."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def ort_session(path: Path, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Each session owns a thread pool whose workers spin after every run; with three sessions
    # interleaved on two cores the spinning pools of the idle sessions steal the running one's CPU,
    # so whichever session ran second looked slower (ratios swung 0.85-1.19 between runs).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_latency_ms(sessions: dict, x, warmup: int, rounds: int) -> dict[str, dict[str, float]]:
    """Per ONNX Runtime session: the median and the interquartile spread of ``rounds`` runs on ``x``
    (numpy), the sessions taking turns within every round so that load changes hit all of them alike."""
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    calls = {k: (lambda s=s, feed=feeds[k]: s.run(None, feed)) for k, s in sessions.items()}
    return interleaved_calls_ms(calls, warmup, rounds)


def interleaved_calls_ms(calls: dict[str, Callable[[], object]], warmup: int, rounds: int) -> dict[str, dict[str, float]]:
    """Per zero-argument call: median and interquartile range (ms) of ``rounds`` timed calls after
    ``warmup`` untimed ones, the calls taking turns within every round."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            start = time.perf_counter()
            call()
            times[k].append(1000 * (time.perf_counter() - start))
    result = {}
    for k, v in times.items():
        q1, _, q3 = statistics.quantiles(v, n=4)
        result[k] = {"median": statistics.median(v), "iqr": q3 - q1}
    return result


def export_float_onnx(net: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    """The float network as one self-contained ONNX file with a dynamic batch."""
    torch.onnx.export(net.eval(), (x,), path, dynamo=True, optimize=True, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    return path


def ort_quantize_static(fp32: Path, calibration: list[torch.Tensor], out: Path) -> Path:
    """ORT's static quantization of ``fp32``: QDQ, uint8 activations, per-channel int8 weights, after
    ``quant_pre_process``, calibrated (min/max) on the given batches one image at a time."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = ort_session(fp32).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: c[i : i + 1].numpy()} for c in calibration for i in range(len(c))])

        def get_next(self):
            return next(self.batches, None)

    preprocessed = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(str(fp32), str(preprocessed))
    quantize_static(str(preprocessed), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    preprocessed.unlink(missing_ok=True)
    return out
