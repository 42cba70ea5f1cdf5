"""The sweep report (report.md / .csv / .png, scripts/report.py, the end-of-sweep Hydra callback) and the
Optuna search config's space."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
from optuna.distributions import CategoricalDistribution, IntUniformDistribution

import qlightning.conf_schema  # noqa: F401  (registers the quant schemas conf/quant/ starts from)
from qlightning.report import NoRunsError, best_runs, group_points, last_error_line, plot_figure, write_report

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# scripts/report.py, loaded from its file: scripts/ is not a package, and adding it to sys.path would let
# its modules shadow others for every test in the session.
_spec = importlib.util.spec_from_file_location("report_script", ROOT / "scripts" / "report.py")
report_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report_script)

# A realistic 6-run sweep (eager/fx/pt2e x minmax/histogram): runs 0-3 share their ONNX accuracy and
# size (the digits validation set has 360 images: 0.28 points each), and latencies differ by microseconds.
SIX_RUNS = [("eager", "minmax", 97.22, 21050, 0.118), ("eager", "histogram", 97.22, 21050, 0.121),
            ("fx", "minmax", 97.22, 21050, 0.119), ("fx", "histogram", 97.22, 21050, 0.1195),
            ("pt2e", "minmax", 96.94, 21130, 0.1232), ("pt2e", "histogram", 96.67, 21130, 0.1241)]


def _write_run(root: Path, run: str, overrides: list[str], summary: dict | None = None, log: str | None = None):
    (root / run / ".hydra").mkdir(parents=True)
    (root / run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (root / run / "summary.json").write_text(json.dumps(summary))
    if log is not None:
        (root / run / "train.log").write_text(log)


def _six_run_rows() -> list[dict]:
    return [{"run": str(i), "overrides": f"float_epochs=1 quant.mode={mode} quant.observer={observer}", "mode": mode,
             "observer": observer, "int8_acc": acc, "onnx_int8_acc": acc, "int8_size_bytes": 22784,
             "onnx_size_bytes": size, "int8_latency_ms": 1.8, "onnx_latency_ms": latency}
            for i, (mode, observer, acc, size, latency) in enumerate(SIX_RUNS)]


def _six_run_sweep(root: Path, failed: bool = True) -> Path:
    for row in _six_run_rows():
        _write_run(root, row["run"], row["overrides"].split(), {k: v for k, v in row.items() if k not in ("run", "overrides")})
    if failed:
        log = ("[2026-12-02 00:35:42,020][qlightning.report][ERROR] - qlightning: job 6 failed (quant.mode=eager)\n"
               "Traceback (most recent call last):\n  File \"jobs.py\", line 1, in train\n"
               "qlightning.errors.QuantizationConfigError: freeze_bn_epoch must be None or an epoch number >= 0, got -1\n")
        _write_run(root, "6", ["float_epochs=1", "quant.mode=eager", "quant.freeze_bn_epoch=-1"], log=log)
    return root


def test_report_from_run_summaries(tmp_path):
    for run, (mode, acc) in enumerate([("fx", 97.5), ("pt2e", 98.0)]):
        _write_run(tmp_path, str(run), [f"quant.mode={mode}"],
                   {"mode": mode, "observer": "minmax", "int8_acc": acc, "int8_size_bytes": 1000 + run,
                    "int8_latency_ms": 0.5 + run, "exported": {"onnx": "x"}})
    paths = write_report(tmp_path)
    text = paths["md"].read_text()
    assert "quant.mode=fx" in text and "quant.mode=pt2e" in text
    assert "Best int8 accuracy (`int8_acc`): 98.00 %, run 1 (quant.mode=pt2e)." in text
    assert "2 runs in" in text and "2 finished, 0 failed" in text
    assert paths["csv"].read_text().count("\n") == 3 and paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_runs_that_tie_for_the_best_accuracy_are_all_named(tmp_path):
    text = write_report(_six_run_sweep(tmp_path, failed=False))["md"].read_text()
    assert "Best int8 accuracy (`onnx_int8_acc`): 97.22 %; 4 runs tie (equal at the 2 decimals summary.json stores)" in text
    for run, (mode, observer, *_) in enumerate(SIX_RUNS[:4]):
        assert f"run {run} (float_epochs=1 quant.mode={mode} quant.observer={observer})" in text.split("\n\n")[2]
    rows = _six_run_rows()
    assert [r["run"] for r in best_runs(rows)] == ["0", "1", "2", "3"]
    # One digits validation image (100 / 360 points) as the tolerance: run 4 ties too, run 5 (two images) not.
    assert [r["run"] for r in best_runs(rows, tolerance=100 / 360)] == ["0", "1", "2", "3", "4"]
    with pytest.raises(ValueError, match=r"tie_tolerance is in accuracy points and cannot be negative, got -1"):
        write_report(tmp_path, tie_tolerance=-1)


def test_latency_measurement_details_are_stated_when_the_summaries_carry_them(tmp_path):
    rows = _six_run_rows()[:2]
    for row in rows:
        summary = {k: v for k, v in row.items() if k not in ("run", "overrides")}
        summary.update(latency_threads=2, latency_repeats=30, onnx_latency_ms_iqr=0.004)
        _write_run(tmp_path, row["run"], row["overrides"].split(), summary)
    text = write_report(tmp_path)["md"].read_text()
    assert "Latency measured per batch-1 call: 2 threads, 30 timed calls." in text
    assert "| onnx_latency_ms | onnx_latency_ms_iqr |" in text and "| 0.004 |" in text
    # Without them the report says it does not know, rather than guessing.
    plain = tmp_path / "plain"
    _six_run_sweep(plain, failed=False)
    assert "(no measurement details recorded)" in write_report(plain)["md"].read_text()


def test_failed_runs_are_listed_with_the_last_error_line_of_their_log(tmp_path, capsys):
    sweep = _six_run_sweep(tmp_path)
    assert last_error_line(sweep / "6") == ("qlightning.errors.QuantizationConfigError: freeze_bn_epoch must be None "
                                            "or an epoch number >= 0, got -1")
    assert report_script.main([str(sweep)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "6 runs reported, 1 failed: run 6 (float_epochs=1 quant.mode=eager quant.freeze_bn_epoch=-1)"
    assert out[1:] == [str(sweep / name) for name in ("report.md", "report.csv", "report.png")]
    text = (sweep / "report.md").read_text()
    assert "7 runs in" in text and "6 finished, 1 failed." in text
    assert ("| 6 | float_epochs=1 quant.mode=eager quant.freeze_bn_epoch=-1 | qlightning.errors.QuantizationConfigError: "
            "freeze_bn_epoch must be None or an epoch number >= 0, got -1 |") in text.split("## Failed runs")[1]
    csv_rows = (sweep / "report.csv").read_text().splitlines()
    assert len(csv_rows) == 8 and csv_rows[-1].startswith("6,") and ",failed," in csv_rows[-1]


def test_a_run_that_died_without_a_log_is_still_listed(tmp_path):
    _write_run(tmp_path, "0", ["quant.mode=fx"])  # e.g. killed by the OOM killer: overrides, nothing else
    paths = write_report(tmp_path)
    assert "png" not in paths  # nothing finished: no plot
    assert "| 0 | quant.mode=fx | no error in the log (killed, or failed before logging) |" in paths["md"].read_text()


def test_nothing_to_report_is_a_one_line_error_and_exit_status_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    cases = {tmp_path / "missing": r"report\.py: .*missing does not exist: pass a Hydra sweep directory \(multirun/<date>/<time>\)",
             tmp_path / "a_file": r"report\.py: .*a_file is not a directory: pass a Hydra sweep directory .*",
             tmp_path / "empty": r"report\.py: no Hydra run under .*empty \(no sub-directory with a summary\.json or "
                                 r"\.hydra/overrides\.yaml\): nothing to report"}
    for path, message in cases.items():
        assert report_script.main([str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and re.fullmatch(message + "\n", captured.err), captured.err
    with pytest.raises(FileNotFoundError, match=r"missing does not exist: pass a Hydra sweep directory"):
        write_report(tmp_path / "missing")
    with pytest.raises(NotADirectoryError, match=r"a_file is not a directory"):
        write_report(tmp_path / "a_file")
    with pytest.raises(NoRunsError, match=r"no Hydra run under .*empty .*: nothing to report$"):
        write_report(tmp_path / "empty")
    # A single run's directory (its summary.json at the top) gets a hint about what to pass instead.
    (tmp_path / "single" / ".hydra").mkdir(parents=True)
    (tmp_path / "single" / "summary.json").write_text("{}")
    with pytest.raises(NoRunsError, match=r"that is one run's directory; pass the sweep directory above it"):
        write_report(tmp_path / "single")


def test_coinciding_points_are_grouped_under_one_label():
    points = [("0", 100.0, 50.0), ("1", 100.0, 50.0), ("2", 104.0, 52.0), ("3", 160.0, 50.0), ("4", 109.0, 57.0)]
    # 4 is 9.9 px from 2 (chained), 3 is far from everyone.
    assert sorted(map(sorted, group_points(points, radius=10))) == [["0", "1", "2", "4"], ["3"]]


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("case", ["six runs, four on one spot", "twelve close runs"])
def test_the_plot_labels_every_run_once_and_no_text_collides(case):
    import matplotlib.pyplot as plt

    rows = _six_run_rows()
    if case == "twelve close runs":  # an Optuna-like search: few distinct accuracies, latencies microseconds apart
        rows = [{**rows[i % 6], "run": str(i), "onnx_int8_acc": [97.22, 97.5, 96.94][i % 3],
                 "onnx_latency_ms": 0.12 + 0.00037 * ((i * 5) % 12)} for i in range(12)]
    figure = plot_figure(rows, failed=[{"run": str(len(rows)), "overrides": "quant.freeze_bn_epoch=-1", "error": None}])
    renderer = figure.canvas.get_renderer()
    size_axis, latency_axis = figure.axes
    assert size_axis.get_xlabel().endswith("(KiB)") and latency_axis.get_xlabel().endswith("(ms)")
    assert all(a.get_ylabel().endswith("(%)") for a in figure.axes)
    for axis in figure.axes:
        labels = [t.get_text() for t in axis.texts]
        named = [n for label in labels for n in re.sub(r"^runs? ", "", label).split(", ")]
        expanded = [str(k) for n in named for k in (range(int(n.split("-")[0]), int(n.split("-")[1]) + 1) if "-" in n else [n])]
        assert sorted(expanded, key=int) == [r["run"] for r in rows], labels
        boxes = [t.get_window_extent(renderer) for t in axis.texts]
        for i, a in enumerate(boxes):
            for j, b in enumerate(boxes[i + 1:], i + 1):
                assert not _boxes_overlap(a, b), f"{labels[i]!r} overlaps {labels[j]!r}"
        ticks = [t.get_window_extent(renderer) for t in axis.get_xticklabels() + axis.get_yticklabels() if t.get_text()]
        assert not any(_boxes_overlap(a, b) for i, a in enumerate(ticks) for b in ticks[i + 1:])
        assert all(len(t.get_text()) <= 7 for t in axis.get_xticklabels())  # no "0.12000000001" or "+2.1e4" offsets
    if case == "six runs, four on one spot":
        assert sorted(t.get_text() for t in size_axis.texts) == ["run 4", "run 5", "runs 0-3"]
    plt.close(figure)


def _search_space_values(expression: str) -> list:
    """Every value the Optuna sweeper can sample for one ``hydra.sweeper.params`` entry."""
    override = OverridesParser.create().parse_override(f"key={expression}")
    distribution = create_optuna_distribution_from_override(override)
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntUniformDistribution):  # its high is sampled too
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    raise AssertionError(f"{expression} maps to {distribution!r}, which this test cannot enumerate")


def test_the_optuna_search_only_samples_freeze_epochs_inside_the_run():
    # What the installed plugin makes of range(a, b): b is sampled (the old config's range(1, 3) gave 3).
    assert _search_space_values("range(1, 3)") == [1, 2, 3]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    for key in ("quant.freeze_observers_epoch", "quant.freeze_bn_epoch"):
        values = _search_space_values(params[key])
        assert values and all(0 <= v < cfg.quant.epochs for v in values), (key, values, cfg.quant.epochs)


@pytest.mark.slow  # several training runs (about a minute on 2 cores)
def test_a_sweep_with_a_failing_job_still_writes_the_report(tmp_path):
    """Hydra skips on_multirun_end when a job raised; the callback's per-job report still covers every run."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "float_epochs=1", "quant.epochs=1",
         "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1", "quant.mode=fx,pt2e",
         "quant.freeze_bn_epoch=2,-1", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]  # the sweep did fail, and says so
    report = (sweep / "report.md").read_text()
    assert "4 runs in" in report and "2 finished, 2 failed." in report
    finished, failed = report.split("## Failed runs")
    for run, mode in ((0, "fx"), (2, "pt2e")):
        assert f"| {run} | float_epochs=1 quant.epochs=1 +trainer.limit_train_batches=3 +trainer.limit_val_batches=1 " \
               f"quant.mode={mode} quant.freeze_bn_epoch=2 |" in finished
    for run, mode in ((1, "fx"), (3, "pt2e")):
        assert (f"| {run} | float_epochs=1 quant.epochs=1 +trainer.limit_train_batches=3 +trainer.limit_val_batches=1 "
                f"quant.mode={mode} quant.freeze_bn_epoch=-1 | qlightning.errors.QuantizationConfigError: "
                f"freeze_bn_epoch must be None or an epoch number >= 0, got -1 |") in failed
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"
    rows = (sweep / "report.csv").read_text().splitlines()
    assert len(rows) == 5 and "onnx_int8_acc" in rows[0]
    # Each finished run also left its TensorBoard curves and its ONNX model.
    assert list((sweep / "0" / "tensorboard").glob("events.out.tfevents.*"))
    assert (sweep / "0" / "quantized" / "net.onnx").is_file()
