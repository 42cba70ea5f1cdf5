"""Output checks shared by the passes: a pass that would change outputs beyond its tolerance raises
instead of returning a silently different model."""

from __future__ import annotations

import math

import torch


class PassToleranceError(RuntimeError):
    """A graph pass changed the model's outputs more than it is allowed to."""


def _flat_outputs(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().float().flatten()
    if isinstance(out, (tuple, list)):
        return torch.cat([_flat_outputs(o) for o in out])
    if isinstance(out, dict):
        return torch.cat([_flat_outputs(v) for v in out.values()])
    raise TypeError(f"cannot compare outputs of type {type(out).__name__}")


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``candidate`` against ``reference`` in dB (inf if equal)."""
    noise = (reference - candidate).pow(2).mean().item()
    signal = reference.pow(2).mean().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


@torch.no_grad()
def run(model, example_inputs) -> torch.Tensor:
    return _flat_outputs(model(*example_inputs))


def check_close(
    pass_name: str, before: torch.Tensor, after: torch.Tensor, *, rtol: float | None = None,
    atol: float = 0.0, min_sqnr_db: float | None = None,
) -> None:
    """Raise :class:`PassToleranceError` when ``after`` differs from ``before`` beyond the tolerance:
    elementwise (``|a - b| <= atol + rtol * |b|``) and/or by SQNR."""
    diff = (after - before).abs()
    if rtol is not None and bool((diff > atol + rtol * before.abs()).any()):
        raise PassToleranceError(
            f"{pass_name} changed the outputs by up to {diff.max().item():.3g} (allowed: {atol:g} + {rtol:g} x |output|); "
            "the model was left unchanged"
        )
    if min_sqnr_db is not None:
        ratio = sqnr_db(before, after)
        if ratio < min_sqnr_db:
            raise PassToleranceError(
                f"{pass_name} changed the outputs to an SQNR of {ratio:.1f} dB against the model before it "
                f"(allowed: >= {min_sqnr_db:g} dB); the model was left unchanged"
            )


def check_noise_growth(pass_name: str, float_out: torch.Tensor, before: torch.Tensor, after: torch.Tensor, *,
                       max_noise_growth_db: float) -> None:
    """Raise :class:`PassToleranceError` when the pass made the quantized model's error against the
    float network grow by more than ``max_noise_growth_db`` (SQNR against float, before vs after)."""
    sqnr_before, sqnr_after = sqnr_db(float_out, before), sqnr_db(float_out, after)
    if sqnr_before - sqnr_after > max_noise_growth_db:
        raise PassToleranceError(
            f"{pass_name} made the model's error against the float network {sqnr_before - sqnr_after:.1f} dB larger "
            f"(SQNR against float {sqnr_before:.1f} dB before, {sqnr_after:.1f} dB after; allowed growth "
            f"{max_noise_growth_db:g} dB); the model was left unchanged"
        )
