"""README.md as users paste it: every fenced Python block runs as written, in order, in a fresh
process; the default job's command runs as written too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def _environment() -> dict:
    # The package is installed (editable) in this interpreter; the blocks run from a scratch folder.
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_readme_python_blocks_run_as_written(tmp_path):
    blocks = _blocks("python")
    assert len(blocks) >= 3  # journey 1, post-training quantization, journey 3
    script = "\n\n".join(blocks)
    # What the blocks leave behind, checked after they ran.
    script += """

import json, pathlib
print("README-RESULT", json.dumps({
    "int8_logits": list(logits.shape),
    "qat_exported": sorted(qat.exported),
    "ptq_quantized": ptq.quantized_model is not None,
    "ptq_calibrated_batches": ptq.calibrated_batches,
    "dynamic": dynamic.dynamic,
    "tensorboard_runs": len(list(pathlib.Path("runs").rglob("events.out.tfevents.*"))),
}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout.split("README-RESULT", 1)[1])
    assert outcome["int8_logits"][1] == 10 and outcome["qat_exported"] == ["onnx"]
    assert outcome["ptq_quantized"] and outcome["ptq_calibrated_batches"] > 0 and outcome["dynamic"]
    assert outcome["tensorboard_runs"] >= 1
    assert list(tmp_path.rglob("net.onnx")) and list(tmp_path.rglob("net.onnx.report.json"))


def test_readme_default_job_command_runs(tmp_path):
    command = next(line for block in _blocks("bash") for line in block.splitlines() if "scripts/train.py" in line)
    # The install half of the command is what .ci/run does; run the job half as written (from the repo root).
    job = command.split("&&")[-1].split()
    assert job == [".venv/bin/python", "scripts/train.py"]
    result = subprocess.run([sys.executable, "scripts/train.py", f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "pt2e" and summary["int8_acc"] > 80
    assert "qlightning summary: QAT" in result.stdout and "int8 ONNX" in result.stdout
