"""Compare the runs of a Hydra sweep: ``report.md``, ``report.csv`` and ``report.png`` in its directory.

Each run directory holds Hydra's ``.hydra/overrides.yaml`` and, when the job finished, the
``summary.json`` it wrote. A run directory without ``summary.json`` is a run that failed; the report
lists it with the last error line of its log. ``scripts/report.py <multirun dir>`` writes the report;
:class:`SweepReportCallback` (configured in ``conf/hydra/default.yaml``) does it during and at the end of
every sweep.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

from qlightning.exporters.atomic import publish, staged_path

log = logging.getLogger(__name__)

# Columns of the markdown table, in order (report.csv has every summary key). Latency spreads
# (``<name>_latency_ms_iqr``) are inserted after their latency when the summaries carry them.
TABLE = ("run", "overrides", "method", "mode", "backend", "observer", "float_acc", "fake_quant_acc", "int8_acc",
         "onnx_int8_acc", "top1_agreement", "float_size_bytes", "int8_size_bytes", "onnx_size_bytes",
         "float_latency_ms", "int8_latency_ms", "onnx_latency_ms")

# summary.json rounds accuracies to 2 decimals: runs equal at that precision are indistinguishable here.
ACCURACY_DECIMALS = 2

# A line of a Python traceback naming the exception: "qlightning.errors.ExportVerificationError: ...".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure)\b(:.*)?$")
# A log record at ERROR or CRITICAL level in Hydra's job log format ("[time][logger][ERROR] - ...").
_ERROR_RECORD = re.compile(r"\]\[(ERROR|CRITICAL)\] - (.*)$")


class NoRunsError(FileNotFoundError):
    """The directory holds no Hydra run (no sub-directory with a summary.json or .hydra/overrides.yaml)."""


# ---------------------------------------------------------------------------------------------------
# Reading the sweep directory


def _run_order(name: str):
    return (not name.isdigit(), int(name) if name.isdigit() else name)


def _run_dirs(multirun_dir: Path) -> list[Path]:
    multirun_dir = Path(multirun_dir)
    if not multirun_dir.exists():
        raise FileNotFoundError(f"{multirun_dir} does not exist: pass a Hydra sweep directory (multirun/<date>/<time>)")
    if not multirun_dir.is_dir():
        raise NotADirectoryError(f"{multirun_dir} is not a directory: pass a Hydra sweep directory (multirun/<date>/<time>)")
    dirs = [d for d in multirun_dir.iterdir()
            if d.is_dir() and ((d / "summary.json").is_file() or (d / ".hydra" / "overrides.yaml").is_file())]
    return sorted(dirs, key=lambda d: _run_order(d.name))


def _overrides(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    import yaml

    return " ".join(str(o) for o in (yaml.safe_load(path.read_text()) or []))


def last_error_line(run_dir: str | Path) -> str | None:
    """The last exception line ("SomeError: message") in the run's ``*.log`` files, else their last
    ERROR record, else None (a job killed from outside, or one that failed before logging started)."""
    exception_line = error_record = None
    for log_path in sorted(Path(run_dir).glob("*.log")):
        for line in log_path.read_text(errors="replace").splitlines():
            line = line.rstrip()
            if _EXCEPTION_LINE.match(line):
                exception_line = line
            elif match := _ERROR_RECORD.search(line):
                error_record = match.group(2)
    return exception_line or error_record


def collect_runs(multirun_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run that finished (has a summary.json), in run order."""
    rows = []
    for run_dir in _run_dirs(Path(multirun_dir)):
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            rows.append({"run": run_dir.name, "overrides": _overrides(run_dir), **json.loads(summary_path.read_text())})
    return rows


def collect_failed_runs(multirun_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run that started (Hydra wrote its overrides) but wrote no summary.json, in run order:
    ``run``, ``overrides`` and ``error`` (the last error line of its log, or None)."""
    return [{"run": d.name, "overrides": _overrides(d), "error": last_error_line(d)}
            for d in _run_dirs(Path(multirun_dir)) if not (d / "summary.json").is_file()]


# ---------------------------------------------------------------------------------------------------
# What the report says


def accuracy_key(rows: list[dict]) -> str:
    """The target runtime's accuracy when every run exported to ONNX, else the torch int8 model's."""
    return "onnx_int8_acc" if rows and all(r.get("onnx_int8_acc") is not None for r in rows) else "int8_acc"


def best_runs(rows: list[dict], tolerance: float = 0.0) -> list[dict]:
    """Every run whose accuracy (:func:`accuracy_key`) is within ``tolerance`` points of the best, at the
    2 decimals summary.json stores. Several runs tie often on a small validation set (one image of
    digits' 360 is 0.28 points), and picking one of them would be arbitrary."""
    key = accuracy_key(rows)
    scored = [(round(r[key], ACCURACY_DECIMALS), r) for r in rows if r.get(key) is not None]
    if not scored:
        return []
    best = max(score for score, _ in scored)
    # Two values rounded to 2 decimals can differ by up to 0.01 more than the accuracies did (349/360 and
    # 350/360 read 96.94 and 97.22: 0.28 > one image's 0.2778), so a nonzero tolerance allows for that.
    # The 1e-9 absorbs float noise in "best - score".
    slack = 10.0 ** -ACCURACY_DECIMALS if tolerance > 0 else 0.0
    return [r for score, r in scored if best - score <= tolerance + slack + 1e-9]


def _described(row: dict) -> str:
    return f"run {row['run']} ({row.get('overrides') or 'defaults'})"


def _best_sentence(rows: list[dict], tolerance: float) -> str:
    key = accuracy_key(rows)
    best = best_runs(rows, tolerance)
    if not best:
        return f"No run recorded `{key}`."
    value = max(r[key] for r in best)
    if len(best) == 1:
        return f"Best int8 accuracy (`{key}`): {value:.2f} %, {_described(best[0])}."
    rule = (f"equal at the {ACCURACY_DECIMALS} decimals summary.json stores" if tolerance == 0
            else f"within {tolerance:g} points of the best")
    return (f"Best int8 accuracy (`{key}`): {value:.2f} %; {len(best)} runs tie ({rule}): "
            + "; ".join(_described(r) for r in best) + ".")


# How to say a latency-measurement key in prose; other ``latency_*`` keys are shown as key=value.
_LATENCY_WORDS = {"latency_method": "{}", "latency_threads": "{} threads", "latency_repeats": "{} timed calls"}


def _latency_sentence(rows: list[dict]) -> str:
    present = {k for r in rows for k in r if k.startswith("latency_")}
    keys = [k for k in _LATENCY_WORDS if k in present] + sorted(present - set(_LATENCY_WORDS))
    if not keys:
        return "Latency: per batch-1 call, as each run's summary.json records it (no measurement details recorded)."
    parts = []
    for key in keys:
        values = {json.dumps(r.get(key)) for r in rows}
        if len(values) > 1:  # runs measured differently: say so rather than pick one
            parts.append(f"{key} differs between runs (see report.csv)")
        else:
            value = rows[0].get(key)
            parts.append(_LATENCY_WORDS[key].format(value) if key in _LATENCY_WORDS else f"{key}={value}")
    spread = any(k.endswith("_latency_ms_iqr") for r in rows for k in r)
    return ("Latency measured per batch-1 call: " + ", ".join(parts) + "."
            + (" The `*_latency_ms_iqr` columns give each latency's interquartile range." if spread else ""))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _columns(rows: list[dict]) -> list[str]:
    columns = []
    for column in TABLE:
        if any(column in r for r in rows):
            columns.append(column)
        if column.endswith("_latency_ms") and any(f"{column}_iqr" in r for r in rows):
            columns.append(f"{column}_iqr")
    return columns


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def failed_summary(failed: list[dict]) -> str:
    """``run 3 (quant.mode=eager ...)``, comma-separated: the failed runs in one line."""
    return ", ".join(_described(f) for f in failed)


def report_markdown(multirun_dir: Path, rows: list[dict], failed: list[dict], tolerance: float = 0.0) -> str:
    lines = ["# qlightning sweep report", "",
             f"{len(rows) + len(failed)} runs in `{multirun_dir}`: {len(rows)} finished, {len(failed)} failed.", ""]
    if rows:
        lines += [_best_sentence(rows, tolerance), "", _latency_sentence(rows), "", markdown_table(rows), ""]
    if failed:
        lines += ["## Failed runs", "",
                  "These runs wrote no summary.json; the error is the last one in the run's log file.", "",
                  markdown_table([{**f, "error": f["error"] or "no error in the log (killed, or failed before logging)"}
                                  for f in failed], ["run", "overrides", "error"]), ""]
    if rows:
        lines += ["![plot](report.png)", ""]
    return "\n".join(lines)


def _csv(rows: list[dict], failed: list[dict]) -> str:
    # Failed runs are rows too (status "failed"), so a spreadsheet of the sweep misses nothing.
    records = [{"run": r["run"], "overrides": r["overrides"], "status": "finished",
                **{k: v for k, v in r.items() if k not in ("run", "overrides")}} for r in rows]
    records += [{"run": f["run"], "overrides": f["overrides"], "status": "failed", "error": f["error"]} for f in failed]
    records.sort(key=lambda r: _run_order(r["run"]))
    keys: list[str] = []
    for record in records:
        keys += [k for k in record if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    for record in records:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in record.items()})
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# The plot


def _run_list(runs: list[str]) -> str:
    """"0-3, 5" for runs 0, 1, 2, 3, 5: a label stays short when many runs share a point."""
    numbers = sorted(int(r) for r in runs if r.isdigit())
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(n) if n == start else f"{start}-{n}" if n > start + 1 else f"{start}, {n}")
            start = None
    return ", ".join(parts + sorted(r for r in runs if not r.isdigit()))


def group_points(points: list[tuple[str, float, float]], radius: float) -> list[list[str]]:
    """Runs whose points lie within ``radius`` of one another (chained: single linkage), as lists of run
    names. ``points`` are (run, x, y) in display pixels; a group gets one label, so coinciding points
    are not labelled on top of one another."""
    parent = list(range(len(points)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, (_, xi, yi) in enumerate(points):
        for j in range(i):
            _, xj, yj = points[j]
            if (xi - xj) ** 2 + (yi - yj) ** 2 <= radius ** 2:
                parent[root(i)] = root(j)
    groups: dict[int, list[str]] = {}
    for i, (run, _, _) in enumerate(points):
        groups.setdefault(root(i), []).append(run)
    return list(groups.values())


def _varying_overrides(rows: list[dict]) -> dict[str, str]:
    """Each run's overrides less those every run shares (a sweep's fixed settings say nothing per point)."""
    split = {r["run"]: (r.get("overrides") or "").split() for r in rows}
    common = set.intersection(*(set(o) for o in split.values())) if split else set()
    return {run: " ".join(o for o in overrides if o not in common) for run, overrides in split.items()}


# Offsets (points) tried for a label, around its point; the first that overlaps nothing wins.
_LABEL_OFFSETS = ((6, 6), (6, -13), (-6, 6), (-6, -13), (6, 18), (-6, 18), (6, -25), (-6, -25), (18, -4), (-18, -4),
                  (6, 30), (-6, 30), (6, -37), (-6, -37))
_GROUP_RADIUS_PX = 10  # markers are ~8 px wide at the saved dpi: points closer than this look like one
_DPI = 110


def _overlap(a, b, pad: float = 0.0) -> float:
    """Area (pixels) that boxes ``a`` and ``b`` share once each is grown by ``pad`` on every side."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0) + 2 * pad
    h = min(a.y1, b.y1) - max(a.y0, b.y0) + 2 * pad
    return w * h if w > 0 and h > 0 else 0.0


def _place_labels(figure, axis, points: list[tuple[str, float, float]]) -> None:
    from matplotlib.transforms import Bbox

    renderer = figure.canvas.get_renderer()
    display = [(run, *axis.transData.transform((x, y))) for run, x, y in points]
    groups = group_points(display, _GROUP_RADIUS_PX)
    where = {run: (x, y) for run, x, y in points}
    where_px = {run: (x, y) for run, x, y in display}
    # Markers are obstacles too, so a label does not hide another group's point.
    markers = {run: Bbox.from_extents(x - 5, y - 5, x + 5, y + 5) for run, x, y in display}
    labels: list = []
    inside = axis.get_window_extent(renderer)
    for group in sorted(groups, key=lambda g: where_px[g[0]]):
        label = ("run " if len(group) == 1 else "runs ") + _run_list(group)
        anchor = where[group[0]]
        other_markers = [box for run, box in markers.items() if run not in group]
        best = None
        for dx, dy in _LABEL_OFFSETS:
            text = axis.annotate(label, anchor, xytext=(dx, dy), textcoords="offset points", fontsize=7,
                                 ha="left" if dx >= 0 else "right", annotation_clip=False)
            box = text.get_window_extent(renderer)
            # Covering another label is worse than covering a marker (the marker's own label names it).
            # Labels keep a few pixels apart, else "run 2" and "run 3" side by side read as "run 2run 3".
            cost = (100 * sum(_overlap(box, other, pad=2) for other in labels)
                    + sum(_overlap(box, m) for m in other_markers))
            # Outside the axes a label would cross the tick labels or the other panel.
            cost += 1e6 * (box.x0 < inside.x0 or box.x1 > inside.x1 or box.y0 < inside.y0 or box.y1 > inside.y1)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost == 0:
                break
        labels.append(best[2])


def _fix_colliding_ticks(figure, axis) -> None:
    renderer = figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in axis.get_xticklabels() if t.get_text()]
    if any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
        axis.tick_params(axis="x", labelrotation=30)
        for t in axis.get_xticklabels():
            t.set_ha("right")


def plot_figure(rows: list[dict], failed: list[dict] = ()):
    """The report's figure: accuracy against size (KiB) and latency (ms), one point per run, each group
    of coinciding points labelled once, and a key from run number to its overrides below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    key = accuracy_key(rows)
    onnx = key == "onnx_int8_acc"
    size_key, latency_key = ("onnx_size_bytes", "onnx_latency_ms") if onnx else ("int8_size_bytes", "int8_latency_ms")
    target = "ONNX Runtime" if onnx else "torch int8"
    varying = _varying_overrides(rows + list(failed))
    key_lines = [f"run {r['run']:>3}: {r.get('mode', '?')}/{r.get('observer', '?')}  {varying[r['run']]}".rstrip()
                 for r in rows]
    key_lines += [f"run {f['run']:>3}: failed, not plotted  {varying[f['run']]}".rstrip() for f in failed]
    line_in = 0.125  # a line of 7-point monospace text, in inches
    key_in = line_in * len(key_lines) + 0.1
    height = 4.0 + key_in
    figure, axes = plt.subplots(1, 2, figsize=(11, height), dpi=_DPI)
    figure.subplots_adjust(left=0.07, right=0.98, top=1 - 0.55 / height, bottom=(key_in + 0.6) / height, wspace=0.22)
    panels = ((axes[0], size_key, 1 / 1024, f"{target} model size (KiB)"),
              (axes[1], latency_key, 1.0, f"{target} latency per batch-1 call (ms)"))
    placements = []
    for axis, x_key, scale, xlabel in panels:
        points = [(r["run"], r[x_key] * scale, r[key]) for r in rows
                  if r.get(x_key) is not None and r.get(key) is not None]
        axis.scatter([p[1] for p in points], [p[2] for p in points], s=30, alpha=0.8, zorder=3)
        axis.margins(x=0.15, y=0.2)  # room for labels beside the outermost points
        for which in (axis.xaxis, axis.yaxis):
            # Round steps (0.05, 0.1, 0.25 ...) and at most 6 ticks: short labels that cannot collide.
            which.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10], min_n_ticks=3))
            # Plain numbers with one number of decimals per axis: no offset ("+2.2e4") or multiplier
            # ("1e-3") a reader has to apply by hand.
            formatter = ScalarFormatter(useOffset=False)
            formatter.set_scientific(False)
            which.set_major_formatter(formatter)
        axis.tick_params(labelsize=8)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(f"int8 accuracy, {target} (%)")
        axis.grid(alpha=0.3)
        placements.append((axis, points))
    figure.suptitle(f"qlightning sweep: {len(rows)} runs, accuracy against size and latency"
                    + (f" ({len(failed)} failed)" if failed else ""), fontsize=11)
    figure.text(0.01, 0.1 / height, "\n".join(key_lines), family="monospace", fontsize=7, va="bottom")
    figure.canvas.draw()  # fixes the axes' limits and transforms, which label placement works in
    for axis, points in placements:
        _fix_colliding_ticks(figure, axis)
        _place_labels(figure, axis, points)
    return figure


def _plot(rows: list[dict], path: Path, failed: list[dict] = ()) -> None:
    import matplotlib.pyplot as plt

    figure = plot_figure(rows, failed)
    with staged_path(path, ".png") as staged:
        figure.savefig(staged, format="png", dpi=_DPI)
        publish(staged, path)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------
# Writing it


def write_report(multirun_dir: str | Path, tie_tolerance: float = 0.0) -> dict[str, Path]:
    """Write report.md, report.csv and report.png into ``multirun_dir``; returns their paths. Failed runs
    (no summary.json) are listed in report.md and report.csv. ``tie_tolerance`` (accuracy points): runs
    this close to the best are all named best, e.g. 100 / the validation set's size for one image.

    Raises FileNotFoundError / NotADirectoryError for a missing directory, :class:`NoRunsError` for one
    without any run."""
    multirun_dir = Path(multirun_dir)
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance is in accuracy points and cannot be negative, got {tie_tolerance}")
    rows, failed = collect_runs(multirun_dir), collect_failed_runs(multirun_dir)
    if not rows and not failed:
        hint = (" (it holds a summary.json itself: that is one run's directory; pass the sweep directory above it)"
                if (multirun_dir / "summary.json").is_file() else "")
        raise NoRunsError(f"no Hydra run under {multirun_dir} (no sub-directory with a summary.json or "
                          f".hydra/overrides.yaml): nothing to report{hint}")
    paths = {"md": multirun_dir / "report.md", "csv": multirun_dir / "report.csv"}
    for key, content in (("md", report_markdown(multirun_dir, rows, failed, tie_tolerance)), ("csv", _csv(rows, failed))):
        with staged_path(paths[key]) as staged:
            staged.write_text(content)
            publish(staged, paths[key])
    if rows:  # a plot of failures only would be empty
        paths["png"] = multirun_dir / "report.png"
        _plot(rows, paths["png"], failed)
    log.info("qlightning: sweep report written to %s (%d runs finished, %d failed)", paths["md"], len(rows), len(failed))
    return paths


class SweepReportCallback(HydraCallback):
    """Hydra callback: (re)writes the report after every job of a multirun and when the multirun ends.

    After each job, because Hydra skips ``on_multirun_end`` when a job raised: the basic sweeper (and
    Optuna's, past ``max_failure_rate``) re-raises the first failure once the batch has run, so the
    report written after the last job is the one that stays. A failed job's traceback goes to its log
    file, where the report finds its error line. With a parallel launcher (joblib), a report written
    after one job lists the jobs still running as failed (no summary.json yet) until a later job, or
    the end of the sweep, rewrites it; ``scripts/report.py`` rewrites it from the directory at any time."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            # JobReturn.return_value would re-raise it; the exception itself is what we want to log.
            error = job_return._return_value
            log.error("qlightning: job %s failed (%s)", config.hydra.job.num, " ".join(job_return.overrides or []),
                      exc_info=(type(error), error, error.__traceback__) if isinstance(error, BaseException) else None)
        self._write(config.hydra.sweep.dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        self._write(config.hydra.sweep.dir)

    @staticmethod
    def _write(sweep_dir) -> None:
        try:
            write_report(sweep_dir)
        except Exception:  # noqa: BLE001  the report is a by-product: a bug in it must not fail a finished job
            log.warning("qlightning: could not write the sweep report in %s", sweep_dir, exc_info=True)
