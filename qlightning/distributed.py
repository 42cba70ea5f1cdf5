"""Keeping quantizer statistics identical across data-parallel ranks.

Under DDP every rank observes its own shard of the data, so min/max, moving averages and histograms
drift apart, and so would the qparams and the converted models. The callbacks call
:func:`sync_quantizer_statistics` after every training step (QAT) and before conversion (PTQ):
statistics are reduced over all ranks (min of minima, max of maxima, mean of moving averages, sum of
histograms on a common range) and the fake-quantizers' scale / zero point recomputed from them, so
every rank holds the same numbers. Collectives are batched into a handful of flat tensors per call.

BatchNorm: eager and FX QAT modules call an ``nn.BatchNorm`` that :func:`sync_batchnorm` turns into
``SyncBatchNorm`` (batch statistics over all ranks); a PT2E graph's ``batch_norm`` is an aten op, so
its running statistics are averaged over ranks after each step instead.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from qlightning.passes.graph import is_fake_quantize, statistics_observers


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _is_histogram(observer: nn.Module) -> bool:
    return isinstance(getattr(observer, "histogram", None), torch.Tensor)


def _is_moving_average(observer: nn.Module) -> bool:
    return hasattr(observer, "averaging_constant")


def _min_max_observers(quantizers: list[tuple[str, nn.Module]]) -> list[tuple[nn.Module, nn.Module]]:
    """(quantizer, observer) pairs with statistics to reduce (learnable qparams are parameters, which
    DDP already keeps identical)."""
    return [(module, obs) for _, module, obs in statistics_observers(quantizers) if obs.min_val.numel() > 0]


def _all_reduce_flat(tensors: list[torch.Tensor], op) -> list[torch.Tensor]:
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])
    dist.all_reduce(flat, op=op)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()
    return out


def _set(buffer: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        if buffer.shape != value.shape:
            buffer.resize_(value.shape)
        buffer.copy_(value.to(buffer.dtype))


def _sync_min_max(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    moving = [obs for _, obs in pairs if _is_moving_average(obs) and not _is_histogram(obs)]
    extremes = [obs for _, obs in pairs if not _is_moving_average(obs) and not _is_histogram(obs)]
    # Plain min/max observers: the extremes over every rank's data.
    minima = _all_reduce_flat([o.min_val for o in extremes], dist.ReduceOp.MIN)
    maxima = _all_reduce_flat([o.max_val for o in extremes], dist.ReduceOp.MAX)
    for obs, lo, hi in zip(extremes, minima, maxima):
        _set(obs.min_val, lo)
        _set(obs.max_val, hi)
    # Moving averages: the mean over the ranks that have observed something (a rank that has not
    # still holds the +inf / -inf start values, which must not enter the mean).
    values, counts = [], []
    for obs in moving:
        seen = torch.isfinite(obs.min_val) & torch.isfinite(obs.max_val)
        values += [torch.where(seen, obs.min_val, 0.0), torch.where(seen, obs.max_val, 0.0)]
        counts.append(seen.float())
    values = _all_reduce_flat(values, dist.ReduceOp.SUM)
    counts = _all_reduce_flat(counts, dist.ReduceOp.SUM)
    for i, obs in enumerate(moving):
        count = counts[i]
        seen = count > 0
        _set(obs.min_val, torch.where(seen, values[2 * i] / count.clamp(min=1), torch.full_like(count, math.inf)))
        _set(obs.max_val, torch.where(seen, values[2 * i + 1] / count.clamp(min=1), torch.full_like(count, -math.inf)))


def _sync_histograms(observers: list[nn.Module]) -> None:
    """Histogram observers: every rank re-bins its histogram (bin centres weighted by counts) onto
    the common [global min, global max] range, and the re-binned histograms are summed."""
    if not observers:
        return
    minima = _all_reduce_flat([o.min_val.reshape(1) for o in observers], dist.ReduceOp.MIN)
    maxima = _all_reduce_flat([o.max_val.reshape(1) for o in observers], dist.ReduceOp.MAX)
    rebinned = []
    for obs, lo, hi in zip(observers, minima, maxima):
        lo, hi = float(lo), float(hi)
        bins = obs.histogram.numel()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            rebinned.append(torch.zeros(bins))
            continue
        counts = obs.histogram.detach().float().cpu()
        own_lo, own_hi = float(obs.min_val), float(obs.max_val)
        if counts.sum() == 0 or not (math.isfinite(own_lo) and math.isfinite(own_hi)):
            rebinned.append(torch.zeros(bins))
            continue
        width = (own_hi - own_lo) / bins
        centres = own_lo + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
        upper = hi if hi > lo else lo + 1.0
        hist, _ = torch.histogram(centres.float(), bins=bins, range=(lo, upper), weight=counts)
        rebinned.append(hist)
    summed = _all_reduce_flat(rebinned, dist.ReduceOp.SUM)
    for obs, lo, hi, hist in zip(observers, minima, maxima, summed):
        _set(obs.min_val, lo.reshape(obs.min_val.shape))
        _set(obs.max_val, hi.reshape(obs.max_val.shape))
        _set(obs.histogram, hist)


def _recompute_fake_quant_qparams(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    for module, observer in pairs:
        if module is observer or not is_fake_quantize(module):
            continue
        if not bool(getattr(module, "observer_enabled", torch.tensor([1]))[0]):
            continue  # frozen qparams stay what training used (identical already: synced until the freeze)
        if not (torch.isfinite(observer.min_val).all() and torch.isfinite(observer.max_val).all()):
            continue
        scale, zero_point = observer.calculate_qparams()
        _set(module.scale, scale)
        _set(module.zero_point, zero_point)


def sync_quantizer_statistics(quantizers: list[tuple[str, nn.Module]]) -> bool:
    """Reduce every quantizer's statistics over all ranks; a no-op (``False``) outside DDP."""
    if world_size() == 1:
        return False
    pairs = _min_max_observers(quantizers)
    _sync_min_max(pairs)
    _sync_histograms([obs for _, obs in pairs if _is_histogram(obs)])
    _recompute_fake_quant_qparams(pairs)
    return True


def sync_running_stats(batchnorm_buffers: list[torch.Tensor]) -> None:
    """Average BatchNorm running means / variances over ranks (PT2E graphs, which have no SyncBN)."""
    if world_size() == 1 or not batchnorm_buffers:
        return
    means = _all_reduce_flat(batchnorm_buffers, dist.ReduceOp.SUM)
    for buffer, total in zip(batchnorm_buffers, means):
        _set(buffer, total / world_size())


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """``SyncBatchNorm`` in place of every BatchNorm (eager / FX QAT modules call theirs as a child)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
