"""Observed qparams equal the guide's formulas (asymmetric, symmetric, signed and unsigned ranges)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlightning.spec import SIXTEEN_BIT_DTYPES, SIXTEEN_BIT_EPS, TensorQuantSpec, qparams_from_range

SPECS = {
    "uint8 affine [0,255]": TensorQuantSpec("uint8", 0, 255, symmetric=False, per_channel=False),
    "uint8 affine reduced [0,127]": TensorQuantSpec("uint8", 0, 127, symmetric=False, per_channel=False),
    "int8 affine [-128,127]": TensorQuantSpec("int8", -128, 127, symmetric=False, per_channel=False),
    "int8 symmetric [-128,127]": TensorQuantSpec("int8", -128, 127, symmetric=True, per_channel=False),
    "int8 symmetric narrow [-127,127]": TensorQuantSpec("int8", -127, 127, symmetric=True, per_channel=False),
    "uint8 symmetric [0,255]": TensorQuantSpec("uint8", 0, 255, symmetric=True, per_channel=False),
    # A16W8 activations: ONNX Runtime's int16 / uint16 QDQ and LiteRT's 16x8 (symmetric, zero point 0).
    "int16 affine [-32768,32767]": TensorQuantSpec("int16", -32768, 32767, symmetric=False, per_channel=False,
                                                   eps=SIXTEEN_BIT_EPS),
    "int16 symmetric narrow [-32767,32767]": TensorQuantSpec("int16", -32767, 32767, symmetric=True,
                                                             per_channel=False, eps=SIXTEEN_BIT_EPS),
    "uint16 affine [0,65535]": TensorQuantSpec("uint16", 0, 65535, symmetric=False, per_channel=False,
                                               eps=SIXTEEN_BIT_EPS),
    "uint16 symmetric [0,65535]": TensorQuantSpec("uint16", 0, 65535, symmetric=True, per_channel=False,
                                                  eps=SIXTEEN_BIT_EPS),
}

finite = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False, width=32)


def _torch_ao_observer(spec, per_channel=False):
    import torch.ao.quantization as tq

    qscheme = {
        (False, False): torch.per_tensor_affine,
        (True, False): torch.per_tensor_symmetric,
        (True, True): torch.per_channel_symmetric,
        (False, True): torch.per_channel_affine,
    }[(spec.symmetric, per_channel)]
    cls = tq.PerChannelMinMaxObserver if per_channel else tq.MinMaxObserver
    return cls(
        dtype=torch.quint8 if spec.dtype == "uint8" else torch.qint8,
        qscheme=qscheme,
        quant_min=spec.quant_min,
        quant_max=spec.quant_max,
        eps=spec.eps,
    )


def _torchao_observer(spec):
    from torchao.quantization.pt2e.observer import MinMaxObserver

    return MinMaxObserver(
        dtype=spec.torch_dtype,
        qscheme=torch.per_tensor_symmetric if spec.symmetric else torch.per_tensor_affine,
        quant_min=spec.quant_min,
        quant_max=spec.quant_max,
        eps=spec.eps,
    )


@pytest.mark.parametrize("name", list(SPECS))
@settings(max_examples=60, deadline=None)
@given(a=finite, b=finite)
def test_minmax_qparams_match_guide_formulas(name, a, b):
    spec = SPECS[name]
    lo, hi = min(a, b), max(a, b)
    x = torch.tensor([lo, hi], dtype=torch.float32)
    expected_scale, expected_zp = qparams_from_range(lo, hi, spec)
    # torch.ao's observers (eager / FX) take quint8 / qint8 only; 16-bit activations are PT2E's (torchao).
    observers = [_torchao_observer(spec)] + ([] if spec.dtype in SIXTEEN_BIT_DTYPES else [_torch_ao_observer(spec)])
    for observer in observers:
        observer(x)
        scale, zp = observer.calculate_qparams()
        assert scale.item() == pytest.approx(expected_scale, rel=1e-6)
        assert int(zp.item()) == expected_zp


def test_formulas_worked_examples():
    # Asymmetric uint8 over [-1, 3]: scale 4/255, zero point round(1 / (4/255)) = 64.
    assert qparams_from_range(-1.0, 3.0, SPECS["uint8 affine [0,255]"]) == pytest.approx((4 / 255, 64))
    # Symmetric signed narrow range: scale 2*3/254, zero point 0.
    assert qparams_from_range(-1.0, 3.0, SPECS["int8 symmetric narrow [-127,127]"]) == pytest.approx((6 / 254, 0))
    # Signed asymmetric range: zero point moves to -128 + 64.
    assert qparams_from_range(-1.0, 3.0, SPECS["int8 affine [-128,127]"])[1] == -64
    # A range not containing zero is widened to include it: [2, 4] -> [0, 4], zero point 0.
    assert qparams_from_range(2.0, 4.0, SPECS["uint8 affine [0,255]"]) == pytest.approx((4 / 255, 0))
    # 16 bits: the same formulas over 65535 (65534 narrow) steps, 257x finer than 8 bits over [-1, 3].
    assert qparams_from_range(-1.0, 3.0, SPECS["int16 affine [-32768,32767]"]) == pytest.approx(
        (4 / 65535, -32768 + 16384))
    assert qparams_from_range(-1.0, 3.0, SPECS["int16 symmetric narrow [-32767,32767]"]) == pytest.approx((6 / 65534, 0))
    assert qparams_from_range(-1.0, 3.0, SPECS["uint16 affine [0,65535]"]) == pytest.approx((4 / 65535, 16384))
    assert qparams_from_range(-1.0, 3.0, SPECS["uint16 symmetric [0,65535]"]) == pytest.approx((6 / 65535, 32768))


def test_a_16_bit_range_keeps_its_resolution_below_the_8_bit_scale_floor():
    """The 8-bit scale floor (2**-12, qnnpack's) would cap a 16-bit quantizer of a [-1, 1] activation at
    2**-12 instead of 2/65535 (8x coarser): 16-bit specs floor at float32's epsilon."""
    scale, _ = qparams_from_range(-1.0, 1.0, SPECS["int16 affine [-32768,32767]"])
    assert scale == pytest.approx(2 / 65535, rel=1e-6) and scale < 2.0**-12
    observer = _torchao_observer(SPECS["int16 affine [-32768,32767]"])
    observer(torch.tensor([-1.0, 1.0]))
    assert observer.calculate_qparams()[0].item() == pytest.approx(2 / 65535, rel=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=6))
def test_per_channel_symmetric_weights_match_formula_per_channel(ranges):
    spec = TensorQuantSpec("int8", -128, 127, symmetric=True, per_channel=True)
    weight = torch.tensor([[min(a, b), max(a, b)] for a, b in ranges], dtype=torch.float32)
    observer = _torch_ao_observer(spec, per_channel=True)
    observer(weight)
    scales, zps = observer.calculate_qparams()
    for (lo, hi), scale, zp in zip(weight.tolist(), scales, zps):
        expected_scale, expected_zp = qparams_from_range(lo, hi, spec)
        assert scale.item() == pytest.approx(expected_scale, rel=1e-6)
        assert zp.item() == expected_zp


def test_spec_rejects_range_outside_dtype():
    with pytest.raises(ValueError, match=r"quant range \[-129, 127\] does not fit int8 \[-128, 127\]"):
        TensorQuantSpec("int8", -129, 127, symmetric=True, per_channel=False)
    with pytest.raises(ValueError, match=r"quant range \[-32769, 32767\] does not fit int16 \[-32768, 32767\]"):
        TensorQuantSpec("int16", -32769, 32767, symmetric=True, per_channel=False)
    with pytest.raises(ValueError, match=r"dtype must be one of \['int16', 'int8', 'uint16', 'uint8'\], got 'int4'"):
        TensorQuantSpec("int4", -8, 7, symmetric=True, per_channel=False)
