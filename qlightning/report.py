"""Compare the runs of a Hydra sweep: ``report.md``, ``report.csv`` and ``report.png`` in its directory.

Each run directory holds the ``summary.json`` the job wrote and Hydra's ``.hydra/overrides.yaml``.
``scripts/report.py <multirun dir>`` writes the report; :class:`SweepReportCallback` (configured in
``conf/hydra/default.yaml``) does it at the end of every sweep.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

from qlightning.exporters.atomic import publish, staged_path

log = logging.getLogger(__name__)

# Columns of the markdown table, in order (report.csv has every summary key).
TABLE = ("run", "overrides", "method", "mode", "backend", "observer", "float_acc", "fake_quant_acc", "int8_acc",
         "onnx_int8_acc", "top1_agreement", "float_size_bytes", "int8_size_bytes", "onnx_size_bytes",
         "float_latency_ms", "int8_latency_ms", "onnx_latency_ms")


def collect_runs(multirun_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run that finished (has a summary.json), in run order."""
    rows = []
    for summary_path in Path(multirun_dir).glob("*/summary.json"):
        run_dir = summary_path.parent
        overrides_path = run_dir / ".hydra" / "overrides.yaml"
        overrides = []
        if overrides_path.is_file():
            import yaml

            overrides = yaml.safe_load(overrides_path.read_text()) or []
        row = {"run": run_dir.name, "overrides": " ".join(overrides)}
        row.update(json.loads(summary_path.read_text()))
        rows.append(row)
    return sorted(rows, key=lambda r: (not r["run"].isdigit(), int(r["run"]) if r["run"].isdigit() else r["run"]))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict]) -> str:
    columns = [c for c in TABLE if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _csv(rows: list[dict]) -> str:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    return buffer.getvalue()


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The target runtime's figures when every run exported to ONNX, else the torch int8 model's.
    onnx = all("onnx_int8_acc" in r for r in rows)
    accuracy_key = "onnx_int8_acc" if onnx else "int8_acc"
    size_key, latency_key = ("onnx_size_bytes", "onnx_latency_ms") if onnx else ("int8_size_bytes", "int8_latency_ms")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, x_key, label in ((axes[0], size_key, f"{size_key} (bytes)"),
                               (axes[1], latency_key, f"{latency_key} (batch 1)")):
        for row in rows:
            if row.get(x_key) is None or row.get(accuracy_key) is None:
                continue
            axis.scatter(row[x_key], row[accuracy_key])
            axis.annotate(f"{row['run']}: {row.get('mode', '')}/{row.get('observer', '')}", (row[x_key], row[accuracy_key]),
                          fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel(label)
        axis.set_ylabel(f"{accuracy_key} (%)")
        axis.grid(alpha=0.3)
    figure.suptitle("qlightning sweep: accuracy against size and latency (one point per config)")
    figure.tight_layout()
    with staged_path(path, ".png") as staged:
        figure.savefig(staged, format="png", dpi=110)
        publish(staged, path)
    plt.close(figure)


def write_report(multirun_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.csv and report.png into ``multirun_dir``; returns their paths."""
    multirun_dir = Path(multirun_dir)
    rows = collect_runs(multirun_dir)
    if not rows:
        raise FileNotFoundError(f"no run with a summary.json under {multirun_dir}: nothing to report")
    paths = {"md": multirun_dir / "report.md", "csv": multirun_dir / "report.csv", "png": multirun_dir / "report.png"}
    best = max(rows, key=lambda r: r.get("onnx_int8_acc", r.get("int8_acc", 0)) or 0)
    text = (f"# qlightning sweep report\n\n{len(rows)} runs in `{multirun_dir}`. Best int8 accuracy: run "
            f"{best['run']} ({best.get('overrides') or 'defaults'}).\n\n{markdown_table(rows)}\n\n![plot](report.png)\n")
    for key, content in (("md", text), ("csv", _csv(rows))):
        with staged_path(paths[key]) as staged:
            staged.write_text(content)
            publish(staged, paths[key])
    _plot(rows, paths["png"])
    log.info("qlightning: sweep report written to %s", paths["md"])
    return paths


class SweepReportCallback(HydraCallback):
    """Hydra callback: writes the report when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            write_report(config.hydra.sweep.dir)
        except FileNotFoundError as exc:  # every run failed: nothing to compare, say so and go on
            log.warning("qlightning: %s", exc)
