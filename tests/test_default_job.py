import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

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
    assert "int8_acc" in capsys.readouterr().out


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
    assert summary["method"] == "ptq_static (2 batches)" and "int8_acc" in result.stdout
