"""Faults: a QAT run killed with SIGKILL resumes from its last checkpoint and ends where an
uninterrupted run ends; an interrupted export leaves no file behind at its path."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qlightning import export
from tests.test_passes import SmallCNN, _inputs, _trained

ROOT = Path(__file__).resolve().parents[1]

# One QAT run (PT2E, the default job's schedule) as a child process, so that it can be SIGKILLed.
# argv: output dir, resume ("none" or a checkpoint), kill_at ("none" or "epoch:batch").
_QAT_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from qlightning import QuantizationAwareTraining
    from qlightning.data import DigitsDataModule
    from qlightning.models import ImageClassifier, SmallCNN

    out, resume, kill_at = sys.argv[1], sys.argv[2], sys.argv[3]

    class KillAt(L.Callback):
        def __init__(self, epoch, batch):
            self.epoch, self.batch = epoch, batch

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
                os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: a real crash

    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), lr=1e-3)
    qat = QuantizationAwareTraining("pt2e", "x86", freeze_bn_epoch=2, freeze_observers_epoch=2)
    callbacks = [qat, ModelCheckpoint(dirpath=out, save_last=True, every_n_epochs=1)]
    if kill_at != "none":
        callbacks.append(KillAt(*map(int, kill_at.split(":"))))
    L.seed_everything(1, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, limit_train_batches=6, limit_val_batches=1,
                        deterministic=True, logger=False, callbacks=callbacks, default_root_dir=out)
    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=None if resume == "none" else resume)
    torch.save({"prepared": qat.prepared_network.state_dict(), "epoch": trainer.current_epoch,
                "bn_frozen": qat.bn_frozen, "observers_frozen": qat.observers_frozen,
                "quantized": qat.quantized_model is not None}, os.path.join(out, "final.pt"))
    """
)


def _qat_run(out: Path, resume="none", kill_at="none") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", _QAT_RUN, str(out), str(resume), kill_at], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_sigkill_mid_qat_resumes_from_the_last_checkpoint_and_finishes(tmp_path):
    killed = _qat_run(tmp_path / "run", kill_at="2:3")  # mid-epoch 2, after BN and observers froze
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = tmp_path / "run" / "last.ckpt"
    assert last.is_file() and not (tmp_path / "run" / "final.pt").exists()
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 1  # the end of epoch 1

    resumed = _qat_run(tmp_path / "run", resume=last)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    uninterrupted = _qat_run(tmp_path / "full")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    got = torch.load(tmp_path / "run" / "final.pt", weights_only=False)
    want = torch.load(tmp_path / "full" / "final.pt", weights_only=False)
    assert got["epoch"] == want["epoch"] == 3
    assert got["bn_frozen"] and got["observers_frozen"] and got["quantized"]
    assert got["prepared"].keys() == want["prepared"].keys()
    for key, value in want["prepared"].items():
        torch.testing.assert_close(got["prepared"][key], value, rtol=0, atol=1e-6, msg=key)


def _calibrated():
    impl, backend, prepared = _trained("pt2e", SmallCNN(), ptq=True)
    return prepared, _inputs(4)


def test_an_export_interrupted_after_writing_leaves_no_file(tmp_path, monkeypatch):
    from qlightning.exporters import onnx_format

    real_write = onnx_format.write

    def write_then_interrupt(converted, example_inputs, path):
        real_write(converted, example_inputs, path)  # the whole file exists, staged
        raise KeyboardInterrupt  # Ctrl-C during verification

    monkeypatch.setattr(onnx_format, "write", write_then_interrupt)
    model, example = _calibrated()
    target = tmp_path / "net.onnx"
    with pytest.raises(KeyboardInterrupt):
        export(model, example, "onnx", target)
    assert list(tmp_path.iterdir()) == []  # neither the file, nor its report, nor the staged copy


_KILLED_EXPORT = textwrap.dedent(
    """
    import os, signal, sys
    from qlightning import export
    from qlightning.exporters import onnx_format
    from tests.test_passes import SmallCNN, _inputs, _trained

    def write_half_then_die(converted, example_inputs, path):
        path.write_bytes(b"half an onnx file")
        os.kill(os.getpid(), signal.SIGKILL)

    onnx_format.write = write_half_then_die
    _, _, prepared = _trained("pt2e", SmallCNN(), ptq=True)
    export(prepared, _inputs(4), "onnx", sys.argv[1])
    """
)


def test_an_export_killed_mid_write_never_leaves_a_partial_file_at_its_path(tmp_path):
    target = tmp_path / "net.onnx"
    run = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(target)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert not target.exists() and not (tmp_path / "net.onnx.report.json").exists()
    # What a SIGKILL leaves is a hidden staged file beside it, never the target itself.
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".net.onnx.") and name.endswith(".tmp") for name in leftovers), leftovers
