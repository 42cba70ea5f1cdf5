"""Facts about this machine's CPU that change how int8 files must be laid out or how timings read."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """Model name and the int8-relevant x86 flags (``/proc/cpuinfo``; empty flags elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines) if value}
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name", platform.processor()),
        "machine": platform.machine(),
        "avx2": "avx2" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx": any(f.startswith("amx") for f in flags),
    }


def machine_description(threads: int) -> str:
    """The machine line of a measured table: CPU model, threads, and the int8-relevant flags."""
    info = cpu_info()
    flags = ", ".join(f"{k} {'yes' if info[k] else 'no'}" for k in ("avx2", "avx512_vnni", "avx_vnni", "amx"))
    return f"{info['model']}, {threads} threads; {flags}"


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's u8 x s8 integer kernels can saturate on this CPU.

    Without VNNI, x86 integer GEMMs multiply uint8 activations by int8 weights with ``vpmaddubsw``,
    which adds two products into an int16 and clamps: 255 * 127 * 2 = 64770 does not fit. ONNX
    Runtime documents it ("U8S8 ... may have saturation issues on AVX2/AVX512 machines without VNNI;
    use reduce_range or U8U8"). Measured here (AMD EPYC, AVX2, no VNNI, onnxruntime 1.32): the
    default job's QDQ file ran at 15 dB SQNR against its own unfused graph; with uint8 weights, 64 dB.
    """
    info = cpu_info()
    x86 = info["machine"].lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and not (info["avx512_vnni"] or info["avx_vnni"] or info["amx"])
