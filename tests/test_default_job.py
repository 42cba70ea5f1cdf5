import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qlightning import QuantizationConfigError
from qlightning.jobs import quantize, train
from tests.conftest import trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def _cfg(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("quant", ["qat_eager", "qat_fx", "qat_pt2e"])
def test_default_job_runs_and_writes_summary(tmp_path, quant, capsys):
    cfg = _cfg(f"quant={quant}", "float_epochs=1", "quant.epochs=1", "+trainer.limit_train_batches=3",
               "+trainer.limit_val_batches=1")
    summary = train(cfg, tmp_path)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == summary and written["mode"] == quant.removeprefix("qat_")
    assert 0 <= written["int8_acc"] <= 100 and written["int8_size_bytes"] < written["float_size_bytes"]
    assert 0 <= written["onnx_int8_acc"] <= 100 and (tmp_path / "quantized" / "net.onnx").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # qparam curves of the QAT phase
    assert "int8 ONNX" in capsys.readouterr().out


def test_bad_quant_choice_fails_before_training(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"Error merging override quant.observer=minmaxx"):
        _cfg("quant.observer=minmaxx")
    # Values the schema cannot know (an epoch number that is negative) fail when the callback is built.
    with pytest.raises(QuantizationConfigError, match=r"freeze_bn_epoch must be None or an epoch number >= 0"):
        train(_cfg("quant.freeze_bn_epoch=-1"), tmp_path)
    assert not (tmp_path / "summary.json").exists()


def _quantize_cfg(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("quantize", overrides=list(overrides))


def test_train_job_with_static_ptq_quantizes_at_fit_end(tmp_path):
    cfg = _cfg("quant=ptq_static", "quant.calibration_batches=4", "float_epochs=3")
    summary = train(cfg, tmp_path)
    assert summary["method"] == "ptq_static (4 batches)" and summary["fake_quant_acc"] is None
    assert summary["int8_acc"] >= summary["float_acc"] - 1.5
    assert summary["int8_size_bytes"] < summary["float_size_bytes"] / 2


def _checkpoint(tmp_path, model_name: str) -> Path:
    """A trained float checkpoint, made the way a user's training run would make it."""
    cfg = _cfg(f"model={model_name}")
    L.seed_everything(0, verbose=False)
    model = instantiate(cfg.model)
    dm = instantiate({k: v for k, v in cfg.data.items() if k not in ("num_classes", "input_shape")})
    trainer = L.Trainer(**trainer_kwargs(max_epochs=4, limit_train_batches=None))
    trainer.fit(model, dm)
    path = tmp_path / f"{model_name}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize(
    "model_name,quant,tolerance", [("small_cnn", "ptq_static", 1.5), ("row_lstm", "ptq_dynamic", 2.0)]
)
def test_quantize_job_quantizes_a_checkpoint_without_training(tmp_path, model_name, quant, tolerance):
    ckpt = _checkpoint(tmp_path, model_name)
    cfg = _quantize_cfg(f"ckpt_path={ckpt}", f"quant={quant}", f"model={model_name}")
    summary = quantize(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert summary["ckpt_path"] == str(ckpt) and summary["method"].startswith(quant)
    # The checkpoint's weights were loaded: a fresh, untrained network would score ~10 %.
    assert summary["float_acc"] > 80
    assert summary["int8_acc"] >= summary["float_acc"] - tolerance


def test_quantize_job_refuses_a_missing_checkpoint_or_a_qat_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ckpt_path='nope.ckpt' is not a file"):
        quantize(_quantize_cfg("ckpt_path=nope.ckpt"), tmp_path)
    ckpt = tmp_path / "empty.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(QuantizationConfigError, match=r"quantizing a checkpoint needs a post-training config "
                                                      r"\(quant=ptq_static or quant=ptq_dynamic\), got "
                                                      r"QuantizationAwareTraining"):
        quantize(_quantize_cfg(f"ckpt_path={ckpt}", "quant=qat_fx"), tmp_path)


def test_quantize_script_is_a_working_hydra_shim(tmp_path):
    ckpt = _checkpoint(tmp_path, "small_cnn")
    run_dir = tmp_path / "script_run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quantize.py"), f"ckpt_path={ckpt}", "quant.calibration_batches=2",
         f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "ptq_static (2 batches)" and "int8" in result.stdout and "KiB" in result.stdout


# -- what a person sees and keeps (issue 18) ----------------------------------------------------------

# Lines that are progress bars (Lightning's rich bar: its frame and the metrics under it) or the model
# summary table Lightning prints once.
_PROGRESS = re.compile(r"━|^\s*(train|val)/\w+: |^Epoch \d+/\d+")
_MODEL_SUMMARY = re.compile(r"^[┏┃┡│└]|^(Trainable|Non-trainable|Total|Modules in) ")
_NOISE = re.compile(r"[Ww]arning|deprecated|Tip:|LeafSpec|KernelPreference|\]\[INFO\]|available: |Unable to load|"
                    r"folded 0|Traceback|stepping batches")


def test_the_default_job_prints_progress_bars_lines_that_matter_and_a_readable_summary(tmp_path):
    """The default job as a user runs it, on a shortened schedule: 12 of its 45 lines were framework
    noise, the export line came twice, and the summary printed raw floats, bytes and a dict."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", "float_epochs=1",
         "quant.epochs=2", "quant.freeze_bn_epoch=1", "quant.freeze_observers_epoch=1", "+trainer.limit_train_batches=6",
         "+trainer.limit_val_batches=2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.rstrip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert not [line for line in lines if _NOISE.search(line)], "\n".join(lines)
    assert sum(1 for line in lines if line.startswith("Epoch")) >= 2  # a progress bar per training phase
    plain = [line for line in lines if not _PROGRESS.search(line) and not _MODEL_SUMMARY.search(line)]
    # 2 phase lines, 4 callback lines (prepared, 2 freezes, exported), the summary (11 lines).
    assert len(plain) <= 20, "\n".join(plain)
    assert sum("qlightning: exported" in line for line in plain) == 1
    assert [line for line in plain if line.startswith("== qlightning: ")] == [
        "== qlightning: float baseline, 1 epochs",
        "== qlightning: QAT, mode pt2e, backend x86, observer moving_average_minmax, 2 epochs"]
    stdout = result.stdout.splitlines()
    summary = "\n".join(stdout[stdout.index(next(l for l in stdout if l.startswith("qlightning summary"))):])
    for expected in ("float (fp32)", "fake-quant (QAT)", "int8 ONNX", " %", "KiB", " ms ± ", "not int8 kernels",
                     "onnxruntime", "validation images", "2 threads", "report.json"):
        assert expected in summary, (expected, summary)
    assert "None" not in summary and "{'" not in summary and not re.search(r"\d\.\d{5,}", summary)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["latency_threads"] == 2 and written["latency_repeats"] == 50
    assert {"float_latency_ms_iqr", "int8_latency_ms_iqr", "onnx_latency_ms_iqr"} <= set(written)
    # Checkpoints in the run directory, one folder per phase; nothing in the current directory.
    assert (tmp_path / "run" / "checkpoints" / "float" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "qat" / "last.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_results_reach_the_loggers_and_the_quant_config_the_hparams_tab(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    summary = train(_cfg("float_epochs=1", "quant.epochs=1", "+trainer.limit_train_batches=3",
                         "+trainer.limit_val_batches=1", "quant.observer=histogram"), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key in ("float_acc", "fake_quant_acc", "int8_acc", "onnx_int8_acc", "onnx_size_bytes"):
        assert [e.value for e in events.Scalars(f"summary/{key}")] == [pytest.approx(summary[key])]
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["quant.mode"].string_value == "pt2e"
    assert start.hparams["quant.observer"].string_value == "histogram"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"summary/int8_acc", "summary/onnx_int8_acc"} <= {m.name.tag for m in experiment.metric_infos}
    assert "hp_metric" not in events.Tags()["scalars"]


@pytest.mark.slow  # several training runs (about a minute on 2 cores)
def test_a_sweep_trains_its_float_baseline_once(tmp_path, capsys):
    overrides = ("float_epochs=1", "quant.epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
                 f"paths.cache_dir={tmp_path / 'cache'}")
    first = train(_cfg(*overrides, "quant.observer=minmax"), tmp_path / "a")
    assert "reused" not in capsys.readouterr().out
    second = train(_cfg(*overrides, "quant.observer=histogram"), tmp_path / "b")
    assert "float baseline: 1 epochs, reused from" in capsys.readouterr().out
    assert second["float_acc"] == first["float_acc"]
    assert Path(second["float_ckpt_path"]).parent == tmp_path / "cache" and Path(first["float_ckpt_path"]).is_file()
    assert not (tmp_path / "b" / "checkpoints" / "float").exists()
    # Another float schedule is another baseline.
    third = train(_cfg(*overrides[1:], "float_epochs=2"), tmp_path / "c")
    assert third["float_ckpt_path"] != first["float_ckpt_path"]


def test_trainer_run_lengths_are_refused_with_the_keys_to_use(tmp_path):
    for override in ("trainer.max_epochs=1", "+trainer.max_steps=5"):
        with pytest.raises(QuantizationConfigError, match=r"trainer\.max_(epochs|steps)=(1|5) is set by the job for "
                                                          r"each phase: use float_epochs=N \(the float baseline\) and "
                                                          r"quant\.epochs=N \(QAT\) instead"):
            train(_cfg(override), tmp_path)


@pytest.mark.slow  # several training runs (about a minute on 2 cores)
def test_export_takes_the_quant_config_from_the_checkpoint_and_train_resumes_from_one(tmp_path):
    from qlightning.jobs import export_checkpoint

    base = ("float_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1")
    # No float-baseline cache: this run trains its own, so its float checkpoint is in its run directory.
    train(_cfg(*base, "quant=qat_fx", "quant.epochs=1", "quant.observer=minmax", "paths.cache_dir=null"), tmp_path / "fx")
    ckpt = tmp_path / "fx" / "checkpoints" / "qat" / "last.ckpt"
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        export_cfg = compose("export", overrides=[f"ckpt_path={ckpt}", "+trainer.limit_val_batches=1"])
    summary = export_checkpoint(export_cfg, tmp_path / "export")  # the config's default is pt2e/moving average
    assert (summary["mode"], summary["observer"]) == ("fx", "minmax")
    assert json.loads((tmp_path / "export" / "quantized" / "net.onnx.report.json").read_text())["mode"] == "fx"
    # A quant key named on the command line wins, and the callback says what differs.
    with pytest.raises(QuantizationConfigError, match=r"trained with observer='minmax' but this "
                                                      r"QuantizationAwareTraining has observer='histogram'"):
        export_checkpoint(OmegaConf.merge(export_cfg, {"quant": {"observer": "histogram"}}), tmp_path / "export2",
                          overrides=("quant.observer=histogram",))
    # Resume: one more QAT epoch from the checkpoint of the first.
    resumed = train(_cfg(*base, "quant=qat_fx", "quant.epochs=2", "quant.observer=minmax", f"ckpt_path={ckpt}"),
                    tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "qat" / "last.ckpt", weights_only=False)["epoch"] == 1
    assert resumed["mode"] == "fx"
    with pytest.raises(QuantizationConfigError, match=r"holds no QuantizationAwareTraining state: it is not a QAT "
                                                      r"checkpoint"):
        train(_cfg(*base, f"ckpt_path={tmp_path / 'fx' / 'checkpoints' / 'float' / 'last.ckpt'}"), tmp_path / "x")


def test_the_shipped_static_ptq_config_calibrates_without_warning(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(_cfg("quant=ptq_static", "float_epochs=1"), tmp_path)
    assert summary["method"] == "ptq_static (16 batches)"
    assert not [w for w in caught if "calibration_batches" in str(w.message)]


def test_a_freeze_epoch_past_the_run_warns_before_training(digits):
    from qlightning import QuantizationAwareTraining
    from qlightning.models import ImageClassifier, SmallCNN

    qat = QuantizationAwareTraining("fx", freeze_observers_epoch=3)
    with pytest.warns(UserWarning, match=r"freeze_observers_epoch=3 but this fit ends after epoch 1 \(max_epochs=2\): "
                                         r"it never applies; use an epoch from 0 to 1, or None"):
        L.Trainer(**trainer_kwargs(callbacks=[qat], max_epochs=2, limit_train_batches=2)).fit(
            ImageClassifier(SmallCNN()), digits)
