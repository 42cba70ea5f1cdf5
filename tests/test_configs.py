"""Hydra configs: every file composes and instantiates, typos fail at compose time (the sweep report: test_report.py)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import qlightning.jobs  # noqa: F401  (registers the structured quant schemas)
from qlightning import PostTrainingQuantization, QuantizationAwareTraining

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _compose(name="train", *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _instantiate(node, drop=()):
    container = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return instantiate({k: v for k, v in container.items() if k not in drop})


@pytest.mark.parametrize("quant", sorted(p.stem for p in (CONF / "quant").glob("*.yaml")))
def test_every_quant_config_composes_and_builds_its_callback(quant):
    cfg = _compose("train", f"quant={quant}")
    callback = _instantiate(cfg.quant, drop=("epochs",))
    expected = PostTrainingQuantization if quant.startswith("ptq") else QuantizationAwareTraining
    assert isinstance(callback, expected) and callback.mode == str(cfg.quant.mode.value)


@pytest.mark.parametrize(
    "group,option",
    [(group.name, p.stem) for group in sorted(CONF.iterdir()) if group.is_dir() and group.name not in ("quant", "hydra")
     for p in sorted(group.glob("*.yaml"))],
)
def test_every_config_file_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", f"paths.output_dir={tmp_path}"]
    cfg = _compose("train", *overrides)
    if group in ("model", "trainer"):
        assert _instantiate(cfg[group]) is not None
    elif group == "data":
        assert _instantiate(cfg.data, drop=("num_classes", "input_shape")) is not None
    elif group in ("logger", "callbacks"):
        for node in (cfg[group] or {}).values():
            assert _instantiate(node) is not None
    elif group == "experiment":
        assert cfg.quant.mode.value == "fx" and cfg.data._target_.endswith("FashionMNISTDataModule")
    elif group == "hparams_search":
        assert cfg.optimized_metric == "int8_acc"
    elif group == "paths":
        assert cfg.paths.output_dir == str(tmp_path)


def test_activation_dtype_reaches_the_callback_and_the_backend_default_scheme_follows_it():
    cfg = _compose("train", "quant.backend=tflite", "quant.activation_dtype=int16")
    callback = _instantiate(cfg.quant, drop=("epochs",))
    assert (callback.activation_dtype, callback.activation_scheme) == ("int16", "per_tensor_symmetric")
    assert _instantiate(_compose("train").quant, drop=("epochs",)).activation_dtype == "uint8"


def test_skip_calibration_and_fallback_options_reach_the_callbacks():
    cfg = _compose("train", "quant=ptq_static", "quant.skip=[fc2,'re:conv.',class:torch.nn.Linear]",
                   "quant.observer=percentile", "quant.percentile=99.9", "quant.max_accuracy_drop=0.003",
                   "quant.monitor=val/acc", "quant.max_float_layers=2")
    ptq = _instantiate(cfg.quant)
    assert list(ptq.skip[:2]) == ["fc2", "re:conv."] and ptq.skip[2] is torch.nn.Linear
    assert (ptq.percentile, ptq.max_accuracy_drop, ptq.monitor, ptq.max_float_layers) == (99.9, 0.003, "val/acc", 2)
    assert _instantiate(_compose("train", "quant.skip=[fc2]").quant, drop=("epochs",)).skip == ("fc2",)
    with pytest.raises(ConfigCompositionException):
        _compose("train", "quant=ptq_static", "quant.max_float_layers=two")


@pytest.mark.parametrize("name", ["quantize", "export"])
def test_the_script_configs_compose(name, tmp_path):
    cfg = _compose(name, f"ckpt_path={tmp_path / 'x.ckpt'}")
    assert cfg.ckpt_path.endswith("x.ckpt") and cfg.model._target_ == "qlightning.models.ImageClassifier"


@pytest.mark.parametrize(
    "override,message",
    [
        ("quant.observer=minmaxx", r"Invalid value 'minmaxx', expected one of \[histogram, lsq, minmax, "
                                   r"moving_average_minmax\]"),
        ("quant.mode=graph", r"Invalid value 'graph', expected one of \[eager, fx, pt2e\]"),
        ("quant.backend=tpu", r"Invalid value 'tpu', expected one of \[fbgemm, onnxruntime, openvino, qnnpack, tflite, x86\]"),
        ("quant=qat_jit", r"Could not find 'quant/qat_jit'"),
        ("quant.activation_dtype=int4", r"Invalid value 'int4', expected one of \[int16, int8, uint16, uint8\]"),
    ],
)
def test_a_typo_fails_at_compose_time_naming_the_valid_values(override, message):
    with pytest.raises(ConfigCompositionException) as raised:
        _compose("train", override)
    text = f"{raised.value} {raised.value.__cause__}"
    assert __import__("re").search(message, text), text
