"""Calibration methods for static PTQ: which range of a histogram the activation quantizer covers.

Pure torch, no ``torch.ao`` / ``torchao`` import: the functions here take a histogram (``counts`` over
``bins`` equal bins from ``min_val`` to ``max_val``, as ``HistogramObserver`` records it), the integer
range ``[quant_min, quant_max]`` and the scheme, and return the chosen ``(lo, hi)``. Every returned
range includes 0, as every torch observer's does. Values are taken as spread uniformly inside each
bin (the only assumption a histogram allows): quantiles interpolate inside a bin, and a bin's mass
moves to another binning in proportion to overlap.

The observer classes are thin: :class:`PercentileSearch`, :class:`EntropySearch` and :class:`MSESearch`
replace ``HistogramObserver``'s L2 search (``_non_linear_param_search``, which ``calculate_qparams``
calls before computing scale / zero point from the range) and are mixed into torch.ao's class in
:mod:`qlightning.calibration_ao` (eager / FX) and torchao's in :mod:`qlightning.calibration_pt2e` (PT2E).

All arithmetic is float64 on the CPU, so the torch.ao and torchao classes pick bit-identical ranges.
"""

from __future__ import annotations

from typing import Callable

import torch

from qlightning.errors import QuantizationConfigError

DEFAULT_PERCENTILE = 99.99
# The MSE search grid: the observed ends scaled by k / MSE_GRID (one end free: symmetric or one-signed
# ranges), or each end by k / MSE_GRID_2D (both free: signed affine ranges, MSE_GRID_2D**2 candidates).
MSE_GRID = 128
MSE_GRID_2D = 32
_F64 = torch.float64

QParams = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def check_percentile(percentile) -> float:
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50 < percentile <= 100:
        raise QuantizationConfigError(
            f"percentile must be a number in (50, 100] (the share of observed values, in %, the range keeps), "
            f"got {percentile!r}"
        )
    return float(percentile)


# -- the histogram as a distribution ----------------------------------------------------------------


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through (xp, fp) (xp strictly increasing), constant outside."""
    idx = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return f0 + w * (f1 - f0)


def _inverse(target: torch.Tensor, xs: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
    """The smallest x with cdf(x) >= target, cdf piecewise linear through (xs, cdf), non-decreasing."""
    k = torch.searchsorted(cdf, target, right=False).clamp(1, len(xs) - 1)
    c0, c1 = cdf[k - 1], cdf[k]
    w = torch.where(c1 > c0, (target - c0) / (c1 - c0), torch.ones_like(c0)).clamp(0.0, 1.0)
    return xs[k - 1] + w * (xs[k] - xs[k - 1])


def _distribution(counts, min_val: float, max_val: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin edges and the cumulative count at each edge (the CDF, unnormalised)."""
    counts = torch.as_tensor(counts).detach().to("cpu", _F64).clamp_min(0.0)
    edges = torch.linspace(min_val, max_val, len(counts) + 1, dtype=_F64)
    return edges, torch.cat([torch.zeros(1, dtype=_F64), counts.cumsum(0)])


def _magnitude_cdf(counts, min_val: float, max_val: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Breakpoints t >= 0 and the cumulative count of |x| <= t there: G(t) = F(t) - F(-t), linear
    between consecutive breakpoints (which are 0 and every |edge|)."""
    edges, cdf = _distribution(counts, min_val, max_val)
    t = torch.unique(torch.cat([torch.zeros(1, dtype=_F64), edges.abs()]))  # sorted
    g = _interp(t, edges, cdf) - _interp(-t, edges, cdf)
    return t, torch.cummax(g, 0).values  # rounding must not make the CDF decrease


def magnitude_histogram(counts, min_val: float, max_val: float, bins: int) -> tuple[torch.Tensor, float]:
    """The histogram of |x| over ``bins`` equal bins from 0 to max(|min_val|, |max_val|), and that
    upper end."""
    t, g = _magnitude_cdf(counts, min_val, max_val)
    top = float(t[-1])
    return torch.diff(_interp(torch.linspace(0.0, top, bins + 1, dtype=_F64), t, g)).clamp_min(0.0), top


def _with_zero(lo: float, hi: float) -> tuple[float, float]:
    return min(lo, 0.0), max(hi, 0.0)


def _degenerate(counts, min_val: float, max_val: float) -> bool:
    return not max_val > min_val or float(torch.as_tensor(counts).sum()) <= 0


# -- percentile -------------------------------------------------------------------------------------


def percentile_range(counts, min_val: float, max_val: float, symmetric: bool,
                     percentile: float = DEFAULT_PERCENTILE) -> tuple[float, float]:
    """The range keeping ``percentile`` % of the observed values.

    Affine: ``[Q(100 - p), Q(p)]``, where ``Q(q)`` is the q-th percentile of the values (the smallest x
    with ``q`` % of the values at or below it, interpolated linearly inside its bin). Symmetric:
    ``[-T, T]`` with ``T`` the p-th percentile of ``|x|``. ``p = 100`` is the observed min / max.
    Then widened to include 0.
    """
    if _degenerate(counts, min_val, max_val):
        return _with_zero(min_val, max_val)
    share = torch.tensor([(100.0 - percentile) / 100.0, percentile / 100.0], dtype=_F64)
    if symmetric:
        t, g = _magnitude_cdf(counts, min_val, max_val)
        top = float(_inverse(share[1:] * g[-1], t, g)[0])
        return -top, top
    edges, cdf = _distribution(counts, min_val, max_val)
    lo, hi = _inverse(share * cdf[-1], edges, cdf).tolist()
    return _with_zero(lo, hi)


# -- entropy (KL divergence, TensorRT) ----------------------------------------------------------------


def entropy_levels(quant_min: int, quant_max: int, symmetric: bool, one_signed: bool) -> int:
    """Quantization levels covering ``[0, T]``: the whole integer range when an affine quantizer
    maps a one-signed tensor to ``[0, T]`` (or ``[-T, 0]``), half of it when the range is ``[-T, T]``."""
    levels = quant_max - quant_min + 1
    return levels if one_signed and not symmetric else levels // 2


def entropy_divergences(magnitudes: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P_i || Q_i) for every candidate ``i = levels .. n`` (the number of |x| bins kept).

    P_i: the first ``i`` bins, with the count of every bin beyond (the clipped outliers) added to bin
    ``i - 1``. Q_i: the first ``i`` bins without the outliers, merged into ``levels`` groups (bin ``j``
    in group ``floor((j + 1/2) * levels / i)``: by its centre) and expanded back, each group's count
    spread evenly over its non-empty bins (empty bins stay empty). Both normalised to sum 1. Where
    P_i > 0 = Q_i (outliers piled onto an empty edge bin) the divergence is infinite. This is
    TensorRT's method (Migacz, "8-bit inference with TensorRT", GTC 2017), with equal-width groups by
    bin centre instead of ``i // levels`` bins per group and the remainder in the last.

    Computed from prefix sums: Q_i is constant over a group's non-empty bins, so
    ``sum_j P_j log Q_j`` is a sum over groups, and each group is a contiguous run of bins.
    """
    h = magnitudes.detach().to("cpu", _F64).clamp_min(0.0)
    n = len(h)
    zero = torch.zeros(1, dtype=_F64)
    total = h.sum()
    cum = torch.cat([zero, h.cumsum(0)])  # cum[i]: count in the first i bins
    nonempty = torch.cat([zero, (h > 0).to(_F64).cumsum(0)])
    xlogx = torch.cat([zero, torch.where(h > 0, h * torch.log(h), 0.0).cumsum(0)])
    kept = torch.arange(levels, n + 1)  # i, (C,)
    inside, outliers = cum[kept], total - cum[kept]
    edge = h[kept - 1] + outliers  # P_i's last bin
    plogp = xlogx[kept - 1] + torch.where(edge > 0, edge * torch.log(edge), 0.0)  # sum_j P_j log P_j
    # Group g of candidate i holds bins start[g] .. start[g + 1] - 1: start[g] = ceil((2 i g - L) / 2L).
    g = torch.arange(levels + 1)
    start = (-torch.div(levels - 2 * kept[:, None] * g[None, :], 2 * levels, rounding_mode="floor")).clamp(0, n)
    sums = cum[start[:, 1:]] - cum[start[:, :-1]]  # (C, L): Q's group counts
    counts = (nonempty[start[:, 1:]] - nonempty[start[:, :-1]]).clamp_min(1.0)
    p_sums = sums.clone()
    p_sums[:, -1] += outliers  # the edge bin is in the last group
    q_log = torch.log(sums / counts / inside.clamp_min(1e-300)[:, None])  # log Q_j (normalised) per group
    cross = torch.where(p_sums > 0, p_sums * q_log, 0.0).sum(1)  # sum_j P_j log Q_j
    divergence = (plogp - cross) / total - torch.log(total)
    infinite = (h[kept - 1] == 0) & (outliers > 0)
    return torch.where(infinite, torch.full_like(divergence, float("inf")), divergence)


def entropy_range(counts, min_val: float, max_val: float, quant_min: int, quant_max: int,
                  symmetric: bool) -> tuple[float, float]:
    """The range whose clipping threshold ``T`` minimises the KL divergence between the clipped and the
    quantized distribution of |x| (:func:`entropy_divergences`), over the thresholds ``T = i * A / n``,
    ``i = levels .. n``: the right edges of the ``n`` (the observer's bin count) equal bins of the |x|
    histogram from 0 to ``A = max |x|``. Ties go to the larger threshold. ``T = A`` without a search when
    ``n <= levels`` (16-bit ranges: nothing to merge) or when at most ``levels`` bins hold data (a few
    distinct values, which the divergence cannot rank: clipping all of them into one bin scores 0).

    Before the search the first |x| bin's count is replaced by the second's (zeros, exactly
    representable, must not decide the threshold).

    Symmetric: ``[-T, T]``. Affine: the search runs on |x| as well (TensorRT's method is defined on
    magnitudes); a one-signed tensor (ReLU outputs) gets all ``quant_max - quant_min + 1`` levels on
    ``[0, T]`` (``[-T, 0]``); a signed one is searched with half of them (one side's share) and gets
    ``[max(-T, min_val), min(T, max_val)]``: each end clipped at T, or kept where the data ends sooner.
    """
    if _degenerate(counts, min_val, max_val):
        return _with_zero(min_val, max_val)
    one_signed = min_val >= 0 or max_val <= 0
    levels = entropy_levels(quant_min, quant_max, symmetric, one_signed)
    n = len(counts)
    magnitudes, top = magnitude_histogram(counts, min_val, max_val, n)
    # Bin 0 holds every exact zero (half of a ReLU's outputs), which any candidate range represents
    # exactly; merged with its neighbours it would dominate the divergence and pull the threshold down
    # (measured: a ReLU of N(0, 1) clipped at 2.0 instead of 4.3, a digits CNN's top-1 agreement with
    # float 64 %). It counts as much as its neighbour, as NVIDIA's pytorch-quantization does.
    if n > 1:
        magnitudes[0] = magnitudes[1]
    threshold = top
    # Data on at most `levels` occupied bins (a few distinct values) is quantized without loss, and the
    # divergence cannot tell thresholds apart (clipping every value into one bin scores 0): keep it all.
    if n > levels and int((magnitudes > 0).sum()) > levels:
        divergences = entropy_divergences(magnitudes, levels)
        last_min = len(divergences) - 1 - int(torch.argmin(divergences.flip(0)))
        threshold = (levels + last_min) * top / n
    if symmetric:
        return -threshold, threshold
    return _with_zero(max(-threshold, min_val), min(threshold, max_val))


# -- MSE ----------------------------------------------------------------------------------------------


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, quant_min: int, quant_max: int, symmetric: bool,
                   eps: float, symmetric_zero_point: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ranges by the observers' formulas (float32), element-wise:
    :func:`qlightning.spec.qparams_from_range`. ``symmetric_zero_point=None``: 0 for a signed range, the
    centre ``(quant_min + quant_max) // 2`` of an unsigned one (torchao puts uint16's at 2**15: pass it).
    The observer classes use their own ``_calculate_qparams`` instead."""
    if symmetric_zero_point is None:
        symmetric_zero_point = 0 if quant_min < 0 else (quant_min + quant_max) // 2
    lo = torch.minimum(lo.float(), torch.zeros(()))
    hi = torch.maximum(hi.float(), torch.zeros(()))
    eps_t = torch.tensor(eps, dtype=torch.float32)
    if symmetric:
        scale = torch.maximum(torch.maximum(-lo, hi) / (float(quant_max - quant_min) / 2), eps_t)
        return scale, torch.full_like(scale, symmetric_zero_point, dtype=torch.int64)
    scale = torch.maximum((hi - lo) / float(quant_max - quant_min), eps_t)
    zero_point = (quant_min - torch.round(lo / scale).to(torch.int)).clamp(quant_min, quant_max)
    return scale, zero_point


def _error_integral(x: torch.Tensor, bottom: torch.Tensor, scale: torch.Tensor, steps: int) -> torch.Tensor:
    """An antiderivative of e(x)**2, e(x) = x - dequantize(quantize(x)), for the grid ``bottom + k * scale``,
    ``k = 0 .. steps`` (rounding to the nearest point, clipping to the ends):
    ``m * scale**3 / 12 + r**3 / 3`` with ``m`` the index of x's grid point and ``r = x - point``."""
    u = x - bottom
    m = torch.floor(u / scale + 0.5).clamp(0, steps)
    r = u - m * scale
    return m * (scale * scale * scale) / 12 + r * r * r / 3  # not ** 3: float64 pow is 10x slower on CPU


def quantization_mse(counts, min_val: float, max_val: float, scale: torch.Tensor, zero_point: torch.Tensor,
                     quant_min: int, quant_max: int) -> torch.Tensor:
    """Expected squared error of quantize-dequantize (rounding and clipping) over the histogram's
    distribution, exactly (values uniform inside each bin), for each (scale, zero point) pair:
    ``sum over bins of density * (Phi(right edge) - Phi(left edge))``, Phi from :func:`_error_integral`."""
    edges, _ = _distribution(counts, min_val, max_val)
    counts = torch.as_tensor(counts).detach().to("cpu", _F64).clamp_min(0.0)
    density = counts / (edges[1:] - edges[:-1]) / counts.sum()
    # Regrouped by edge: Phi(edge k) * (density of bin k - 1 - density of bin k); edges between two
    # empty bins add nothing.
    weight = torch.cat([torch.zeros(1, dtype=_F64), density]) - torch.cat([density, torch.zeros(1, dtype=_F64)])
    used = weight != 0
    edges, weight = edges[used], weight[used]
    scale = scale.detach().to("cpu", _F64).reshape(-1, 1)
    bottom = (quant_min - zero_point.detach().to("cpu", _F64).reshape(-1, 1)) * scale
    steps = quant_max - quant_min
    errors = []
    for rows in torch.split(torch.arange(len(scale)), max(1, (1 << 20) // max(1, len(edges)))):  # bounded memory
        errors.append((_error_integral(edges, bottom[rows], scale[rows], steps) * weight).sum(1))
    return torch.cat(errors)


def mse_candidates(min_val: float, max_val: float, symmetric: bool, grid: int = MSE_GRID,
                   grid_2d: int = MSE_GRID_2D) -> torch.Tensor:
    """The search set of :func:`mse_range`, widest first, as ``(lo, hi)`` rows.

    With ``lo0 = min(min_val, 0)``, ``hi0 = max(max_val, 0)`` and ``k = grid .. 1``: symmetric
    ``(-A k / grid, A k / grid)``, ``A = max(-lo0, hi0)``; affine, one-signed: the non-zero end scaled by
    ``k / grid``; affine, signed: both ends scaled independently by ``k / grid_2d``, ``k = grid_2d .. 1``
    (``grid_2d**2`` pairs).
    """
    lo0, hi0 = _with_zero(min_val, max_val)
    shrink = torch.arange(grid, 0, -1, dtype=_F64) / grid
    if symmetric:
        top = max(-lo0, hi0) * shrink
        return torch.stack([-top, top], 1)
    if lo0 == 0 or hi0 == 0:
        return torch.stack([lo0 * shrink, hi0 * shrink], 1)
    shrink = torch.arange(grid_2d, 0, -1, dtype=_F64) / grid_2d
    lo, hi = torch.meshgrid(lo0 * shrink, hi0 * shrink, indexing="ij")
    return torch.stack([lo.reshape(-1), hi.reshape(-1)], 1)


def mse_range(counts, min_val: float, max_val: float, quant_min: int, quant_max: int, symmetric: bool,
              qparams: QParams | None = None, eps: float = 2.0**-12, symmetric_zero_point: int | None = None,
              grid: int = MSE_GRID, grid_2d: int = MSE_GRID_2D) -> tuple[float, float]:
    """The candidate range (:func:`mse_candidates`) of least expected quantization MSE
    (:func:`quantization_mse`), evaluated with the scale and zero point each range gets: ``qparams``
    (lo, hi tensors -> scale, zero point; the observer's own formula) or :func:`affine_qparams`. The
    observed min / max range is a candidate, so the result is never worse than min / max; ties go to the
    widest candidate."""
    if _degenerate(counts, min_val, max_val):
        return _with_zero(min_val, max_val)
    candidates = mse_candidates(min_val, max_val, symmetric, grid, grid_2d)
    lo, hi = candidates[:, 0].float(), candidates[:, 1].float()
    if qparams is None:
        scale, zero_point = affine_qparams(lo, hi, quant_min, quant_max, symmetric, eps, symmetric_zero_point)
    else:
        scale, zero_point = qparams(lo, hi)
    errors = quantization_mse(counts, min_val, max_val, scale, zero_point, quant_min, quant_max)
    best = int(torch.argmin(errors))
    return float(lo[best]), float(hi[best])


# -- observer mixins ----------------------------------------------------------------------------------


class _RangeSearch:
    """Mixed into a ``HistogramObserver``: ``calculate_qparams`` takes its range from :meth:`_select_range`
    instead of the L2 search, then computes scale and zero point from it as ``MinMaxObserver`` does."""

    @property
    def _symmetric(self) -> bool:
        return self.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)

    def _select_range(self, counts: torch.Tensor, min_val: float, max_val: float) -> tuple[float, float]:
        raise NotImplementedError

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Conversion and the FX / PT2E passes ask for the qparams 4-5 times per observer (measured on a
        # digits CNN); the search runs once per histogram: its result is kept with the state it came from.
        min_val, max_val = float(self.min_val), float(self.max_val)
        key = (min_val, max_val, self.qscheme, self.quant_min, self.quant_max, float(self.eps),
               getattr(self, "percentile", None), self.histogram.detach().cpu().numpy().tobytes())
        searched = getattr(self, "_searched", None)
        if searched is None or searched[0] != key:
            searched = self._searched = (key, self._select_range(self.histogram, min_val, max_val))
        lo, hi = searched[1]
        like = dict(dtype=self.min_val.dtype, device=self.min_val.device)
        return torch.tensor(lo, **like), torch.tensor(hi, **like)


class PercentileSearch(_RangeSearch):
    """The range keeping ``percentile`` % of the observed values (:func:`percentile_range`)."""

    def __init__(self, *args, percentile: float = DEFAULT_PERCENTILE, **kwargs):
        percentile = check_percentile(percentile)
        super().__init__(*args, **kwargs)
        self.percentile = percentile

    def _select_range(self, counts, min_val, max_val):
        return percentile_range(counts, min_val, max_val, self._symmetric, self.percentile)

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}"


class EntropySearch(_RangeSearch):
    """The clipping threshold of least KL divergence, TensorRT's method (:func:`entropy_range`)."""

    def _select_range(self, counts, min_val, max_val):
        return entropy_range(counts, min_val, max_val, self.quant_min, self.quant_max, self._symmetric)


class MSESearch(_RangeSearch):
    """The range of least expected quantize-dequantize squared error on a grid (:func:`mse_range`)."""

    def _select_range(self, counts, min_val, max_val):
        device = self.min_val.device  # the candidates are scored on the CPU; the formula runs where its eps is
        return mse_range(counts, min_val, max_val, self.quant_min, self.quant_max, self._symmetric,
                         qparams=lambda lo, hi: self._calculate_qparams(lo.to(device), hi.to(device)))
