"""Property tests (hypothesis) of the qparam math, the observers the modes use and the passes: random
shapes, all-zero, constant and huge-magnitude tensors never give a NaN/inf scale or a crash."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlightning import QuantizationConfigError
from qlightning.passes.merge_clamp import clamped_range, narrowed_copy
from qlightning.spec import TensorQuantSpec, qparams_from_range

SPECS = [
    TensorQuantSpec("uint8", 0, 255, symmetric=False, per_channel=False),
    TensorQuantSpec("int8", -128, 127, symmetric=False, per_channel=False),
    TensorQuantSpec("int8", -128, 127, symmetric=True, per_channel=False),
    TensorQuantSpec("int8", -127, 127, symmetric=True, per_channel=False),
    TensorQuantSpec("uint8", 0, 255, symmetric=True, per_channel=False),
]
# Up to float32's largest finite value: a range that wide overflows (max - min) in float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)
finite = st.floats(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX, allow_nan=False, width=32)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _grid_covers(lo, hi, scale, zero_point, spec) -> bool:
    """The quantization grid reaches the range's ends (widened to include 0) within one step."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    lowest, highest = (spec.quant_min - zero_point) * scale, (spec.quant_max - zero_point) * scale
    slack = scale * (1 + 1e-5)
    return lowest <= lo + slack and highest >= hi - slack


@FUZZ
@given(a=finite, b=finite, spec=st.sampled_from(SPECS))
def test_qparams_from_any_finite_range_are_finite_and_cover_it(a, b, spec):
    lo, hi = min(a, b), max(a, b)
    scale, zero_point = qparams_from_range(lo, hi, spec)
    assert math.isfinite(scale) and scale >= spec.eps * (1 - 1e-6)
    assert spec.quant_min <= zero_point <= spec.quant_max
    assert _grid_covers(lo, hi, scale, zero_point, spec)


@st.composite
def tensors(draw, min_dims=1):
    """Random shapes; all-zero, constant, or random values of any magnitude (1e-30 .. 1e30)."""
    shape = draw(st.lists(st.integers(1, 6), min_size=min_dims, max_size=4))
    kind = draw(st.sampled_from(["zeros", "constant", "random"]))
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, draw(st.floats(-1e30, 1e30, allow_nan=False)))
    magnitude = 10.0 ** draw(st.integers(-30, 30))
    seed = draw(st.integers(0, 2**16))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * magnitude


def _observer_classes():
    import torch.ao.quantization.observer as ao_obs
    from torchao.quantization.pt2e import observer as pt2e_obs

    names = ["MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver"]
    return [getattr(family, name) for family in (pt2e_obs, ao_obs) for name in names]


def _examples_for(observer_class) -> int:
    # A histogram observer's qparams come from a search over 2048 bins (~0.2 s a draw): fewer draws.
    return 25 if "Histogram" in observer_class.__name__ else 150


def _per_channel_observer_classes():
    import torch.ao.quantization.observer as ao_obs
    from torchao.quantization.pt2e import observer as pt2e_obs

    names = ["PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"]
    return [getattr(family, name) for family in (pt2e_obs, ao_obs) for name in names]


def _check_qparams(scale, zero_point, quant_min, quant_max):
    assert torch.isfinite(scale).all() and (scale > 0).all(), scale
    assert ((zero_point >= quant_min) & (zero_point <= quant_max)).all(), zero_point


@pytest.mark.parametrize("observer_class", _observer_classes(), ids=lambda c: f"{c.__module__.split('.')[0]}.{c.__name__}")
def test_per_tensor_observers_give_finite_qparams(observer_class):
    @settings(max_examples=_examples_for(observer_class), deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(batches=st.lists(tensors(), min_size=1, max_size=3), symmetric=st.booleans())
    def check(batches, symmetric):
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        dtype, (quant_min, quant_max) = (torch.qint8, (-128, 127)) if symmetric else (torch.quint8, (0, 255))
        observer = observer_class(dtype=dtype, qscheme=qscheme, eps=2.0**-12)
        for batch in batches:
            observer(batch)
        scale, zero_point = observer.calculate_qparams()
        _check_qparams(scale, zero_point, quant_min, quant_max)

    check()


@FUZZ
@pytest.mark.parametrize("observer_class", _per_channel_observer_classes(),
                         ids=lambda c: f"{c.__module__.split('.')[0]}.{c.__name__}")
@given(batch=tensors(min_dims=2))
def test_per_channel_weight_observers_give_finite_qparams(observer_class, batch):
    observer = observer_class(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0, eps=2.0**-12)
    observer(batch)
    scale, zero_point = observer.calculate_qparams()
    assert scale.shape == (batch.shape[0],)
    _check_qparams(scale, zero_point, -128, 127)


huge = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False)
clamp_bounds = st.tuples(st.one_of(huge, st.just(-math.inf)), st.one_of(huge, st.just(math.inf))).map(sorted)


@FUZZ
@given(observed=st.tuples(huge, huge), clamp=clamp_bounds)
def test_narrowing_to_a_clamp_gives_finite_qparams_covering_the_clamped_range(observed, clamp):
    """What merge_relu_clamp does to the quantizer after a clamp: its range becomes the image of what
    the quantizer before the clamp observed (overlapping the bounds or not: dead ReLUs exist)."""
    from torchao.quantization.pt2e import FakeQuantize
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver

    quantizer = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                             qscheme=torch.per_tensor_affine, eps=2.0**-12)
    seen_lo, seen_hi = min(observed), max(observed)
    lo, hi = clamped_range((seen_lo, seen_hi), tuple(clamp))
    assert lo <= hi
    narrowed = narrowed_copy(quantizer, lo, hi)
    scale, zero_point = narrowed.scale, narrowed.zero_point
    _check_qparams(scale, zero_point, 0, 255)
    assert _grid_covers(lo, hi, float(scale), int(zero_point), SPECS[0])
    out = narrowed(torch.tensor([seen_lo, 0.0, seen_hi]))
    assert torch.isfinite(out).all()


bn_values = st.one_of(st.just(0.0), st.floats(-1e6, 1e6, allow_nan=False), st.floats(1e-12, 1e-6))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a QAT preparation each
@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
@given(gamma=bn_values, beta=bn_values, mean=bn_values, var=st.one_of(st.just(0.0), st.floats(0, 1e6)))
def test_folding_bn_with_any_statistics_keeps_outputs_finite_and_close(mode, gamma, beta, mean, var):
    """BatchNorm statistics anywhere from 0 to huge (gamma 0 included: a channel switched off) fold
    into the conv without NaN/inf, and the folded float network computes what the unfolded one did."""
    from qlightning.callbacks.config import build_recipe
    from qlightning.models import SmallCNN
    from qlightning.modes.registry import get_mode

    torch.manual_seed(0)
    backend, recipe = build_recipe(mode, "x86", "minmax", "per_channel_symmetric", "per_tensor_affine")
    impl = get_mode(mode)
    x = (torch.rand(4, 1, 8, 8),)
    network = SmallCNN()
    with torch.no_grad():
        network.bn1.weight.fill_(gamma), network.bn1.bias.fill_(beta)
        network.bn1.running_mean.fill_(mean), network.bn1.running_var.fill_(var)
    if np.float32(gamma) == 0 and mode != "pt2e":  # as stored in the float32 BatchNorm weight
        # torch.ao's conv-bn simulation divides by gamma: refused before training, not trained on NaN.
        with pytest.raises(QuantizationConfigError, match=r"BatchNorm weight \(gamma\) is exactly 0: .*Use mode='pt2e'"):
            impl.prepare_qat(network, x, recipe, backend)
        return
    prepared = impl.prepare_qat(network, x, recipe, backend)
    impl.freeze_bn(prepared)
    with torch.no_grad():
        prepared(*x)  # observers see the activations (BN frozen: the statistics above are used)
        # The simulation with frozen statistics is the folded float network: fake quantization
        # aside, folding must not change it.
        before = prepared(*x)
    assert torch.isfinite(before).all()
    finalized = impl.finalize(prepared, x, fold_bn=True, merge_relu=False)
    with torch.no_grad():
        after = finalized(*x)
    assert torch.isfinite(after).all()
