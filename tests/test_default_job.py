import json

import pytest
from hydra import compose, initialize_config_dir

from qlightning import QuantizationConfigError
from qlightning.jobs import train
from pathlib import Path

CONF = str(Path(__file__).resolve().parents[1] / "conf")


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
    assert "int8_acc" in capsys.readouterr().out


def test_bad_quant_choice_fails_before_training(tmp_path):
    cfg = _cfg("quant.observer=minmaxx")
    with pytest.raises(QuantizationConfigError, match=r"unknown observer 'minmaxx'; valid observers are"):
        train(cfg, tmp_path)
    assert not (tmp_path / "summary.json").exists()
