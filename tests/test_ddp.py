"""DDP on CPU (gloo, 2 processes; strategies ddp and ddp_spawn): QAT and PTQ end with identical
qparams and identical int8 models on every rank, with statistics gathered from all ranks, and only
rank zero exports. Each run is a separate script (tests/ddp_worker.py), so these are ``slow``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")

# Rank 0 sees inputs in [0, 1], rank 1 the same data x2. Synchronised statistics of the input
# quantizer reach rank 1's range: the maximum for min/max and histogram observers, the mean of the
# two ranks' running averages (about 1.5) for moving-average ones. Unsynchronised, DDP's buffer
# broadcast would leave every rank with rank 0's range (max 1.0).
EXPECTED_INPUT_MAX = {"minmax": 1.99, "histogram": 1.99, "moving_average_minmax": 1.3}


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,mode,kind,observer",
    [
        ("ddp", "pt2e", "qat", "minmax"),
        ("ddp", "pt2e", "qat_compiled", "moving_average_minmax"),  # each rank trains through torch.compile
        ("ddp", "eager", "qat", "moving_average_minmax"),
        ("ddp_spawn", "fx", "qat", "minmax"),
        ("ddp", "pt2e", "ptq", "histogram"),
        ("ddp_spawn", "fx", "ptq", "minmax"),
    ],
)
def test_ranks_end_with_identical_qparams_and_int8_models(strategy, mode, kind, observer, tmp_path):
    run = subprocess.run(
        [sys.executable, str(WORKER), strategy, mode, kind, observer, str(tmp_path)],
        cwd=WORKER.parents[1], env={**os.environ, "PYTHONPATH": str(WORKER.parents[1])},
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][key], value), f"{key} differs between ranks"
    assert torch.equal(ranks[0]["int8_out"], ranks[1]["int8_out"])
    for rank in ranks:
        assert max(rank["observer_maxima"]) >= EXPECTED_INPUT_MAX[observer], rank["observer_maxima"]

    assert all(bool(rank["compiled"]) == (kind == "qat_compiled") for rank in ranks)
    assert ranks[0]["exported"] == ["onnx"] and ranks[1]["exported"] == []
    assert sorted(p.name for p in tmp_path.glob("net.onnx*")) == ["net.onnx", "net.onnx.report.json"]
    if kind.startswith("qat"):  # QParamMonitor ran on both ranks; one metrics file, written by rank zero
        metrics = list(tmp_path.glob("logs/**/metrics.csv"))
        assert len(metrics) == 1
        header = metrics[0].read_text().splitlines()[0]
        assert any(column.startswith("qparams/") for column in header.split(","))
