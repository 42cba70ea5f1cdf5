"""Calibration methods of static PTQ (percentile, entropy, MSE): each picks the range its definition
says (checked against torch.quantile and brute force), gives the spec's qparams, is the same in torch.ao
(eager / FX) and torchao (PT2E), and quantizes a trained network in every mode."""

import copy
import importlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import qlightning.jobs  # noqa: F401  (registers the structured quant schemas)
from qlightning import PostTrainingQuantization, QuantizationAwareTraining, QuantizationConfigError, quantized_engine
from qlightning import calibration as cal
from qlightning import calibration_ao, calibration_pt2e
from qlightning.models import ImageClassifier, SmallCNN
from qlightning.observers import get_observer
from qlightning.spec import SIXTEEN_BIT_EPS, TensorQuantSpec, qparams_from_range
from tests.conftest import trainer_kwargs

METHODS = ["percentile", "entropy", "mse"]
CLASS = {"percentile": "PercentileObserver", "entropy": "EntropyObserver", "mse": "MSEObserver"}
SPECS = {
    "uint8 affine": TensorQuantSpec("uint8", 0, 255, symmetric=False, per_channel=False),
    "int8 affine": TensorQuantSpec("int8", -128, 127, symmetric=False, per_channel=False),
    "int8 symmetric": TensorQuantSpec("int8", -128, 127, symmetric=True, per_channel=False),
    "uint8 symmetric": TensorQuantSpec("uint8", 0, 255, symmetric=True, per_channel=False),
}
CONF = Path(__file__).resolve().parents[1] / "conf"


def _laplace(n=200_000, seed=0) -> torch.Tensor:
    """Laplace(0, 1) samples, by the inverse CDF."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def _histogram(x: torch.Tensor, bins: int):
    """What HistogramObserver records after one batch: counts over [min, max]."""
    lo, hi = float(x.min()), float(x.max())
    return torch.histc(x, bins, lo, hi), lo, hi


def _observer(family, method: str, spec: TensorQuantSpec, **options):
    cls = getattr(family, CLASS[method])
    qscheme = torch.per_tensor_symmetric if spec.symmetric else torch.per_tensor_affine
    if family is calibration_ao:
        dtype = torch.quint8 if spec.dtype == "uint8" else torch.qint8
    else:
        dtype = spec.torch_dtype
    return cls(dtype=dtype, qscheme=qscheme, quant_min=spec.quant_min, quant_max=spec.quant_max, eps=spec.eps,
               **options)


def _select(method: str, counts, lo, hi, spec: TensorQuantSpec, percentile=cal.DEFAULT_PERCENTILE):
    if method == "percentile":
        return cal.percentile_range(counts, lo, hi, spec.symmetric, percentile)
    if method == "entropy":
        return cal.entropy_range(counts, lo, hi, spec.quant_min, spec.quant_max, spec.symmetric)
    return cal.mse_range(counts, lo, hi, spec.quant_min, spec.quant_max, spec.symmetric, eps=spec.eps)


# -- percentile ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_torch_quantile_within_a_bin(p):
    x = _laplace()
    counts, lo, hi = _histogram(x, 2048)
    width = (hi - lo) / 2048
    low, high = cal.percentile_range(counts, lo, hi, symmetric=False, percentile=p)
    # The q-th quantile as the smallest value with a share q at or below it: torch's "lower" interpolation.
    # The histogram's is in the same bin (linear interpolation in between).
    shares = torch.tensor([(100 - p) / 100, p / 100], dtype=torch.float64)
    expected = torch.quantile(x.double(), shares, interpolation="lower").tolist()
    assert abs(low - expected[0]) <= width and abs(high - expected[1]) <= width, (low, high, expected, width)
    # Symmetric: the p-th percentile of |x|.
    low, high = cal.percentile_range(counts, lo, hi, symmetric=True, percentile=p)
    expected_abs = float(torch.quantile(x.double().abs(), p / 100, interpolation="lower"))
    assert low == -high and abs(high - expected_abs) <= width, (high, expected_abs, width)


def test_percentile_100_is_min_max_and_every_range_includes_zero():
    x = torch.rand(10_000) * 4 + 1  # [1, 5]: the range widens to [0, max]
    counts, lo, hi = _histogram(x, 2048)
    assert cal.percentile_range(counts, lo, hi, False, 100.0) == pytest.approx((0.0, hi), abs=1e-12)
    low, high = cal.percentile_range(counts, lo, hi, False, 99.0)
    assert low == 0.0 and hi - 0.05 < high < hi
    signed = _laplace(20_000)
    counts, lo, hi = _histogram(signed, 2048)
    assert cal.percentile_range(counts, lo, hi, False, 100.0) == pytest.approx((lo, hi), abs=1e-9)


# -- entropy ------------------------------------------------------------------------------------------


def _kl_brute_force(magnitudes: np.ndarray, levels: int) -> np.ndarray:
    """KL(P || Q) of each candidate, the definition written out bin by bin."""
    h = magnitudes.astype(np.float64)
    n = len(h)
    divergences = []
    for i in range(levels, n + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        group = np.floor((np.arange(i) + 0.5) * levels / i).astype(int)
        merged = np.bincount(group, weights=h[:i], minlength=levels)
        nonempty = np.bincount(group, weights=(h[:i] > 0).astype(float), minlength=levels)
        q = np.where(h[:i] > 0, merged[group] / np.maximum(nonempty[group], 1), 0.0)
        p, q = p / p.sum(), q / q.sum() if q.sum() > 0 else q
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
        divergences.append(terms.sum())
    return np.array(divergences)


@pytest.mark.parametrize("spec_name,data", [("int8 symmetric", "laplace"), ("uint8 affine", "halfnormal"),
                                            ("int8 affine", "laplace")])
def test_entropy_picks_the_kl_minimal_threshold_by_brute_force(spec_name, data):
    spec = SPECS[spec_name]
    torch.manual_seed(1)
    x = _laplace(50_000, seed=1) if data == "laplace" else torch.randn(50_000).abs()
    bins = 700  # 700 - levels + 1 candidates: groups of unequal size, brute force in a second
    counts, lo, hi = _histogram(x, bins)
    magnitudes, top = cal.magnitude_histogram(counts, lo, hi, bins)
    magnitudes[0] = magnitudes[1]  # as entropy_range does: zeros do not decide the threshold
    levels = cal.entropy_levels(spec.quant_min, spec.quant_max, spec.symmetric, one_signed=lo >= 0)
    assert levels == (256 if data == "halfnormal" else 128)
    expected = _kl_brute_force(magnitudes.numpy(), levels)
    fast = cal.entropy_divergences(magnitudes, levels).numpy()
    assert np.array_equal(np.isinf(fast), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(fast[finite], expected[finite], rtol=1e-9, atol=1e-12)
    best = len(expected) - 1 - int(np.argmin(expected[::-1]))  # ties: the larger threshold
    threshold = (levels + best) * top / bins
    low, high = cal.entropy_range(counts, lo, hi, spec.quant_min, spec.quant_max, spec.symmetric)
    if spec.symmetric:
        assert (low, high) == pytest.approx((-threshold, threshold), rel=1e-12)
    else:
        assert (low, high) == pytest.approx((max(-threshold, min(lo, 0.0)), min(threshold, hi)), rel=1e-12)


def test_entropy_clips_a_laplace_distributions_outliers():
    x = _laplace(200_000)
    x[:20] = torch.linspace(30, 40, 20)  # a few far outliers
    counts, lo, hi = _histogram(x, 2048)
    low, high = cal.entropy_range(counts, lo, hi, -128, 127, symmetric=True)
    bulk = float(torch.quantile(x.abs(), 0.999))
    assert bulk < high < 0.5 * hi, (high, bulk, hi)


def test_entropy_does_not_let_a_relus_zeros_pull_the_threshold_down():
    torch.manual_seed(3)
    z = torch.randn(200_000)
    for data in (z.abs(), torch.relu(z)):  # the same positive values, with and without half of them zeros
        counts, lo, hi = _histogram(data, 2048)
        low, high = cal.entropy_range(counts, lo, hi, 0, 255, symmetric=False)
        assert low == 0.0 and 0.85 * hi < high <= hi, (high, hi)


def test_magnitude_histogram_keeps_the_mass_and_the_distribution_of_abs_x():
    x = _laplace(100_000)
    counts, lo, hi = _histogram(x, 2048)
    magnitudes, top = cal.magnitude_histogram(counts, lo, hi, 512)
    assert top == pytest.approx(max(-lo, hi)) and float(magnitudes.sum()) == pytest.approx(len(x))
    reference = torch.histc(x.abs(), 512, 0.0, top).double()
    assert float((magnitudes.cumsum(0) - reference.cumsum(0)).abs().max()) < 0.005 * len(x)
    relu = torch.relu(x)  # starts at 0: the |x| histogram is the histogram itself
    counts, lo, hi = _histogram(relu, 2048)
    assert torch.allclose(cal.magnitude_histogram(counts, lo, hi, 2048)[0], counts.double(), atol=1e-6)


def test_entropy_with_more_levels_than_bins_or_a_few_values_keeps_the_whole_range():
    x = _laplace(10_000)
    counts, lo, hi = _histogram(x, 2048)
    low, high = cal.entropy_range(counts, lo, hi, -32767, 32767, symmetric=True)  # int16: 32767 levels
    assert high == pytest.approx(max(-lo, hi))
    few = torch.tensor([-1.0, 3.0, 0.5, 2.0] * 50)  # every value would fit a level of its own
    counts, lo, hi = _histogram(few, 2048)
    assert cal.entropy_range(counts, lo, hi, 0, 255, symmetric=False) == pytest.approx((-1.0, 3.0))


# -- MSE ----------------------------------------------------------------------------------------------


def _sampled_mse(counts, lo, hi, ranges, spec, per_bin=64) -> np.ndarray:
    """Expected quantize-dequantize error by brute force: ``per_bin`` evenly spread points per bin, the
    qparams of each range from the spec formulas."""
    edges = np.linspace(lo, hi, len(counts) + 1)
    offsets = (np.arange(per_bin) + 0.5) / per_bin
    points = (edges[:-1, None] + offsets[None, :] * np.diff(edges)[:, None]).reshape(-1)
    weights = np.repeat(counts.double().numpy() / per_bin, per_bin)
    keep = weights > 0
    points, weights = torch.from_numpy(points[keep]), torch.from_numpy(weights[keep] / weights.sum())
    errors = []
    for low, high in ranges:
        scale, zero_point = qparams_from_range(float(low), float(high), spec)
        q = torch.clamp(torch.round(points / scale) + zero_point, spec.quant_min, spec.quant_max)
        errors.append(float((((q - zero_point) * scale - points) ** 2 * weights).sum()))
    return np.array(errors)


@pytest.mark.parametrize("spec_name", ["int8 affine", "int8 symmetric", "uint8 affine"])
def test_mse_no_candidate_has_lower_error_and_it_beats_min_max_on_heavy_tails(spec_name):
    spec = SPECS[spec_name]
    torch.manual_seed(2)
    x = torch.distributions.StudentT(2.0).sample((50_000,))  # heavy tails: min/max wastes the range
    if spec_name == "uint8 affine":
        x = x.abs()
    counts, lo, hi = _histogram(x, 256)
    chosen = cal.mse_range(counts, lo, hi, spec.quant_min, spec.quant_max, spec.symmetric, eps=spec.eps, grid=64,
                           grid_2d=16)
    candidates = cal.mse_candidates(lo, hi, spec.symmetric, grid=64, grid_2d=16).float().tolist()
    assert len(candidates) == (16 * 16 if spec_name == "int8 affine" else 64)
    assert list(chosen) in candidates
    errors = _sampled_mse(counts, lo, hi, candidates, spec)
    best = _sampled_mse(counts, lo, hi, [chosen], spec)[0]
    assert best <= errors.min() * (1 + 1e-4), (best, errors.min())
    # The exact integral agrees with the sampled one.
    scale, zero_point = cal.affine_qparams(torch.tensor([chosen[0]]), torch.tensor([chosen[1]]), spec.quant_min,
                                           spec.quant_max, spec.symmetric, spec.eps)
    exact = float(cal.quantization_mse(counts, lo, hi, scale, zero_point, spec.quant_min, spec.quant_max)[0])
    assert exact == pytest.approx(best, rel=1e-3)
    # At 8 bits clipping costs the tails more than the finer step saves: min/max is beaten by ~10 %
    # (Student's t, 2 degrees of freedom), with the range clipped by 7-20 %.
    min_max = _sampled_mse(counts, lo, hi, [(lo, hi)], spec)[0]
    assert best < 0.95 * min_max, (best, min_max)


# -- the observer classes -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("method", METHODS)
def test_observers_give_the_spec_qparams_of_their_range_bit_identical_in_both_families(method, spec_name):
    spec = SPECS[spec_name]
    x = _laplace(30_000) + (0.5 if "affine" in spec_name else 0.0)
    options = {"percentile": 99.9} if method == "percentile" else {}
    qparams = []
    for family in (calibration_ao, calibration_pt2e):
        observer = _observer(family, method, spec, **options)
        observer(x[:15_000])
        observer(x[15_000:] * 1.5)  # a second batch widens the range: the histogram is re-binned
        low, high = (float(v) for v in observer._non_linear_param_search())
        if method != "mse":
            expected = _select(method, observer.histogram, float(observer.min_val), float(observer.max_val), spec,
                               percentile=99.9)
        else:  # scored with the observer's own qparams (symmetric uint8: its zero point)
            expected = cal.mse_range(observer.histogram, float(observer.min_val), float(observer.max_val),
                                     spec.quant_min, spec.quant_max, spec.symmetric,
                                     qparams=observer._calculate_qparams)
        assert (low, high) == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert low <= 0.0 <= high
        scale, zero_point = observer.calculate_qparams()
        expected_scale, expected_zp = qparams_from_range(low, high, spec)
        assert scale.item() == pytest.approx(expected_scale, rel=1e-6) and int(zero_point) == expected_zp
        qparams.append((scale, zero_point))
    (scale_ao, zp_ao), (scale_pt2e, zp_pt2e) = qparams
    assert torch.equal(scale_ao, scale_pt2e) and torch.equal(zp_ao.long(), zp_pt2e.long())


@pytest.mark.parametrize("method", METHODS)
def test_sixteen_bit_activations_in_pt2e(method):
    spec = TensorQuantSpec("int16", -32768, 32767, symmetric=False, per_channel=False, eps=SIXTEEN_BIT_EPS)
    observer = _observer(calibration_pt2e, method, spec)
    observer(_laplace(20_000))
    low, high = (float(v) for v in observer._non_linear_param_search())
    scale, zero_point = observer.calculate_qparams()
    assert scale.item() == pytest.approx(qparams_from_range(low, high, spec)[0], rel=1e-6)
    assert int(zero_point) == qparams_from_range(low, high, spec)[1]


@pytest.mark.parametrize("method", METHODS)
def test_the_search_is_redone_when_the_histogram_changes(method):
    spec = SPECS["int8 affine"]
    observer, fresh = (_observer(calibration_ao, method, spec) for _ in range(2))
    observer(_laplace(10_000))
    first = observer.calculate_qparams()
    for obs in (observer, fresh):
        obs(_laplace(10_000, seed=1) * 3)
    fresh(_laplace(10_000))  # same histogram, other order: the range is the same either way
    second = observer.calculate_qparams()
    assert not torch.equal(first[0], second[0])
    observer.load_state_dict(fresh.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(observer.calculate_qparams(), fresh.calculate_qparams()))


@pytest.mark.parametrize("family", [calibration_ao, calibration_pt2e], ids=["torch.ao", "torchao"])
@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(method, family):
    spec = SPECS["uint8 affine"]
    observer = _observer(family, method, spec, **({"percentile": 99.5} if method == "percentile" else {}))
    observer(_laplace(20_000))
    restored = _observer(family, method, spec, **({"percentile": 99.5} if method == "percentile" else {}))
    restored.load_state_dict(copy.deepcopy(observer.state_dict()))
    assert set(observer.state_dict()) >= {"histogram", "min_val", "max_val"}
    for a, b in zip(observer.calculate_qparams(), restored.calculate_qparams()):
        assert torch.equal(a, b)
    assert torch.equal(copy.deepcopy(observer).calculate_qparams()[0], observer.calculate_qparams()[0])


def test_the_registry_resolves_qlightnings_classes_per_family_and_library_names_as_before():
    import torch.ao.quantization.observer as ao
    import torchao.quantization.pt2e.observer as tao

    for method in METHODS:
        name = get_observer(method).activation_observer
        assert calibration_ao.observer_class(name) is getattr(calibration_ao, name)
        assert calibration_pt2e.observer_class(name) is getattr(calibration_pt2e, name)
        assert issubclass(calibration_ao.observer_class(name), ao.HistogramObserver)
        assert issubclass(calibration_pt2e.observer_class(name), tao.HistogramObserver)
        assert get_observer(method).weight_observer == "MinMaxObserver" and get_observer(method).calibration_only
        # merge_clamp narrows a histogram observer into the MinMaxObserver of its class's module.
        for family, library in ((calibration_ao, ao), (calibration_pt2e, tao)):
            module = importlib.import_module(family.observer_class(name).__module__)
            assert module.MinMaxObserver is library.MinMaxObserver
    assert calibration_ao.observer_class("MinMaxObserver") is ao.MinMaxObserver
    assert calibration_pt2e.observer_class("HistogramObserver") is tao.HistogramObserver
    with pytest.raises(AttributeError, match="no observer class 'Nope'"):
        calibration_ao.observer_class("Nope")


# -- arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(observer="histogram", percentile=99.9),
         r"percentile=99.9 applies to observer='percentile' only, got observer='histogram'"),
        (dict(observer="percentile", percentile=50), r"percentile must be a number in \(50, 100\] .* got 50"),
        (dict(observer="percentile", percentile=100.5), r"percentile must be a number in \(50, 100\] .* got 100.5"),
        (dict(observer="percentile", percentile="99"), r"percentile must be a number in \(50, 100\] .* got '99'"),
        (dict(observer="percentile", percentile=True), r"percentile must be a number in \(50, 100\] .* got True"),
        (dict(observer="lsq"), r"calibrating observers \['histogram', 'minmax', 'moving_average_minmax'\] or "
                               r"calibration methods \['entropy', 'mse', 'percentile'\] for PTQ"),
    ],
)
def test_bad_percentile_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(QuantizationConfigError, match=message):
        PostTrainingQuantization(**kwargs)


def test_percentile_defaults_to_99_99_and_reaches_the_recipe():
    assert PostTrainingQuantization(observer="percentile").recipe.observer_options == (("percentile", 99.99),)
    callback = PostTrainingQuantization(observer="percentile", percentile=99)
    assert callback.percentile == 99.0 and callback.recipe.observer_options == (("percentile", 99.0),)
    assert PostTrainingQuantization(observer="entropy").recipe.observer_options == ()


@pytest.mark.parametrize("method", METHODS)
def test_qat_refuses_calibration_methods(method):
    with pytest.raises(QuantizationConfigError, match=rf"observer '{method}' is a calibration method of post-training "
                                                      r"quantization .* or one of \['histogram', 'lsq', 'minmax', "
                                                      r"'moving_average_minmax'\] for QAT"):
        QuantizationAwareTraining(observer=method)


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_hydra_percentile_option_and_validation():
    cfg = _compose("quant=ptq_static", "quant.observer=percentile", "quant.percentile=99.9")
    callback = qlightning.jobs._build(cfg.quant, drop=("epochs",))
    assert callback.percentile == 99.9 and callback.recipe.observer_options == (("percentile", 99.9),)
    for method in METHODS:
        assert qlightning.jobs._build(_compose("quant=ptq_static", f"quant.observer={method}").quant).observer == method
    with pytest.raises(QuantizationConfigError, match=r"percentile must be a number in \(50, 100\]"):
        qlightning.jobs._build(_compose("quant=ptq_static", "quant.observer=percentile", "quant.percentile=120").quant)
    with pytest.raises(QuantizationConfigError, match=r"percentile=99.0 applies to observer='percentile' only"):
        qlightning.jobs._build(_compose("quant=ptq_static", "quant.percentile=99").quant)
    with pytest.raises(ConfigCompositionException) as raised:
        _compose("quant=ptq_static", "quant.percentile=high")
    assert "percentile" in f"{raised.value} {raised.value.__cause__}"
    with pytest.raises(ConfigCompositionException) as raised:  # QAT configs do not offer them
        _compose("quant.observer=entropy")
    assert "Invalid value 'entropy'" in f"{raised.value} {raised.value.__cause__}"


# -- through a real Trainer, every mode ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(digits):
    """A SmallCNN trained briefly (2 epochs of 12 batches: 81 % on the digits validation set); PTQ copies it."""
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), lr=3e-3)
    # Trains the float weights the PTQ tests start from; no callback here, so validation would only cost time.
    L.Trainer(**trainer_kwargs(max_epochs=2, limit_train_batches=12, limit_val_batches=0)).fit(model, digits)
    return model


class _RecordingPTQ(PostTrainingQuantization):
    """Records the observer classes the mode inserted."""

    def _prepare(self, network):
        observed = super()._prepare(network)
        self.observer_types = {type(m) for _, m in self._impl.observers(observed)}
        self.percentiles = {getattr(m, "percentile", None) for _, m in self._impl.observers(observed)}
        return observed


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
def test_static_ptq_with_each_method_in_every_mode(mode, method, trained, digits):
    model = copy.deepcopy(trained)
    options = {"percentile": 99.9} if method == "percentile" else {}
    callback = _RecordingPTQ(mode, "x86", method, calibration_batches=3, export=[], **options)
    L.Trainer(**trainer_kwargs(callbacks=[callback], limit_val_batches=3)).validate(
        model, dataloaders=digits.train_dataloader(), verbose=False
    )
    family = calibration_pt2e if mode == "pt2e" else calibration_ao
    expected = getattr(family, CLASS[method])
    assert expected in callback.observer_types, callback.observer_types
    weights = {"MinMaxObserver", "PerChannelMinMaxObserver"}
    assert {t.__name__ for t in callback.observer_types} <= {CLASS[method], *weights}
    if method == "percentile":
        assert 99.9 in callback.percentiles
    x = next(iter(digits.val_dataloader()))[0]
    with torch.no_grad(), quantized_engine("x86"):
        reference, int8 = model.net.eval()(x), callback.quantized_model(x)
    agreement = float((reference.argmax(1) == int8.argmax(1)).float().mean())
    assert agreement >= 0.9, (mode, method, agreement)
    cosine = torch.nn.functional.cosine_similarity(reference.flatten(), int8.flatten(), dim=0)
    assert cosine > 0.98, (mode, method, float(cosine))

