"""Merge ReLU / ReLU6 / hardtanh / clamp into the qparams of the quantizer that follows them.

Backend configs that share one observer between a clamp's input and output (PyTorch's x86 and
native configs do for standalone ReLU, ReLU6, hardtanh and clamp) quantize the clamped output with
the *unclamped* range: for a ReLU half of the integer levels are spent on negative values that can
no longer occur. After training or calibration this pass rewrites

    op -> quantizer_a -> clamp -> quantizer_b        into        op -> quantizer_b' [-> clamp]

where ``quantizer_b'`` has qparams for the clamped range (the guide's formulas: asymmetric
``[max(lo, min), min(hi, max)]``; symmetric ``+-max(|new_min|, |new_max|)``). The clamp itself is
dropped when the quantizer is a fake-quantizer whose saturation already implements it (its lowest
and highest representable values lie within half a step of the clamp bounds: an asymmetric ReLU,
for one); otherwise it stays, in front of the quantizer (always, for calibration observers, which
are identity until conversion). ``op -> clamp -> quantizer`` loses the clamp under the same condition.

Works on FX prepared graphs and PT2E prepared graphs (both call quantizer modules). Learnable (LSQ)
quantizers are left alone: their range is a trained parameter, not an observed statistic.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn

from qlightning.passes.graph import (
    clamp_range, erase, float_twin, is_fake_quantize, is_learnable, quantizer_node, single_user, unique_name,
)
from qlightning.passes.verify import check_noise_growth, run

log = logging.getLogger(__name__)

_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def _observer_of(quantizer: nn.Module) -> nn.Module:
    return getattr(quantizer, "activation_post_process", quantizer)


def _mergeable(quantizer: nn.Module) -> bool:
    obs = _observer_of(quantizer)
    learnable = is_learnable(quantizer)
    per_tensor = getattr(obs, "qscheme", None) in (torch.per_tensor_affine, torch.per_tensor_symmetric)
    return not learnable and per_tensor and hasattr(obs, "min_val") and obs.min_val.numel() == 1


def observed_range(quantizer: nn.Module) -> tuple[float, float]:
    obs = _observer_of(quantizer)
    return float(obs.min_val), float(obs.max_val)


def clamped_range(observed: tuple[float, float], bounds: tuple[float, float]) -> tuple[float, float]:
    """The image of the observed range under the clamp: each end clipped into ``bounds``. Clipping
    (not intersecting) keeps ``lo <= hi`` when the two ranges do not overlap, e.g. a ReLU after an
    always-negative tensor outputs exactly [0, 0]."""
    lo, hi = bounds
    return min(max(observed[0], lo), hi), min(max(observed[1], lo), hi)


def _min_max_observer_like(obs: nn.Module) -> nn.Module:
    """A MinMaxObserver of the same family and integer range as ``obs`` (a histogram observer's
    qparams come from a search over its histogram, not from min/max, so it cannot be narrowed)."""
    import importlib

    family = importlib.import_module(type(obs).__module__)
    return family.MinMaxObserver(
        dtype=obs.dtype, qscheme=obs.qscheme, quant_min=obs.quant_min, quant_max=obs.quant_max, eps=float(obs.eps)
    )


def narrowed_copy(quantizer: nn.Module, lo: float, hi: float) -> nn.Module:
    """A copy of ``quantizer`` whose qparams cover exactly ``[lo, hi]`` (and that stops observing)."""
    new = copy.deepcopy(quantizer)
    obs = _observer_of(new)
    if hasattr(obs, "histogram") or not hasattr(obs, "min_val"):
        obs = _min_max_observer_like(obs)
        if new is _observer_of(new):
            new = obs
        else:
            new.activation_post_process = obs
    obs.min_val = torch.tensor(lo, dtype=torch.float32)
    obs.max_val = torch.tensor(hi, dtype=torch.float32)
    if new is not obs:  # a fake-quantize module: its forward uses the scale/zero_point buffers
        scale, zero_point = obs.calculate_qparams()
        new.scale.resize_(scale.shape).copy_(scale)
        new.zero_point.resize_(zero_point.shape).copy_(zero_point)
        new.disable_observer()
    return new


def _qparams(quantizer: nn.Module) -> tuple[float, int]:
    if hasattr(quantizer, "scale") and quantizer is not _observer_of(quantizer):
        return float(quantizer.scale), int(quantizer.zero_point)
    scale, zero_point = quantizer.calculate_qparams()
    return float(scale), int(zero_point)


def saturation_implements(quantizer: nn.Module, lo: float, hi: float) -> bool:
    """Whether ``quantizer`` already clamps to ``[lo, hi]`` in forward: it fake-quantizes (a plain
    observer is identity until conversion, and the graph must keep computing the same function)
    and its representable range ends within half a step of the clamp bounds, so
    clamp-then-quantize == quantize."""
    if not is_fake_quantize(quantizer):
        return False
    scale, zero_point = _qparams(quantizer)
    obs = _observer_of(quantizer)
    lowest = (obs.quant_min - zero_point) * scale
    highest = (obs.quant_max - zero_point) * scale
    return lowest >= lo - 0.5 * scale * (1 - 1e-6) and highest <= hi + 0.5 * scale * (1 - 1e-6)


def _run_as_quantized(gm: fx.GraphModule, example_inputs: tuple):
    # Compared as the graph will compute once converted: plain observers fake-quantize too.
    from qlightning.passes.exact_qparams import simulating_quantization

    with simulating_quantization(gm):
        return run(gm, example_inputs)


def restore(gm: fx.GraphModule, backup: fx.GraphModule) -> None:
    """Put ``backup``'s modules and graph back into ``gm`` (the same object callers hold)."""
    gm._modules = backup._modules
    gm.graph = backup.graph
    gm.recompile()


def merge_relu_clamp(gm: fx.GraphModule, example_inputs: tuple | None = None, *,
                     max_noise_growth_db: float = 3.0, keep_shared: bool = False) -> int:
    """Merge clamps into the qparams of the following quantizer, in place; returns how many.

    Run it after training/calibration (observers frozen). With ``example_inputs`` the model's error
    against the float network of the same weights (every quantizer the identity) is measured before
    and after; if it grew by more than ``max_noise_growth_db``,
    :class:`~qlightning.passes.verify.PassToleranceError` is raised and the model restored. Narrowed
    qparams have finer steps, so on data like the observed a correct merge lowers that error; inputs
    beyond the observed range are clipped at the narrowed ends, which can raise it (1.3 dB on random
    inputs to a small net, measured), so the allowance is the export's: at most as much added noise as
    quantization itself (3 dB), while a wrong merge (a clamp dropped that saturation does not
    implement) moves outputs by the clamp's whole effect. Comparing the model before and
    after directly instead (a fixed SQNR floor) refused correct merges on deep networks, whose
    outputs differ by the whole network's quantization noise after any requantization (26-28 dB
    on mobilenet_v2 and googlenet, issue 17).

    ``keep_shared``: leave ``op -> quantizer_a -> clamp`` alone where ``quantizer_a`` is one module called
    at several nodes (a shared qspec: ``cat`` shares its output's quantizer with its inputs). Merging
    gives the op's output quantizer_b' while its inputs keep quantizer_a, and a backend whose kernels
    need one scale on both sides refuses the file (LiteRT: "'tfl.concatenation' op quantization
    parameters violate the same scale constraint", efficientvit_m0's cat -> ReLU -> conv).
    """
    backup = copy.deepcopy(gm) if example_inputs is not None else None
    calls: dict[int, int] = {}  # PT2E shares a quantizer module under several names: count by module
    for node in gm.graph.nodes:
        if node.op == "call_module":
            key = id(gm.get_submodule(node.target))
            calls[key] = calls.get(key, 0) + 1
    before = _run_as_quantized(gm, example_inputs) if example_inputs is not None else None
    float_out = run(float_twin(gm), example_inputs) if example_inputs is not None else None
    merged = 0
    for clamp in list(gm.graph.nodes):
        bounds = clamp_range(gm, clamp)
        if bounds is None or len(clamp.all_input_nodes) != 1:
            continue
        after_q = single_user(clamp)
        if after_q is None or not quantizer_node(gm, after_q):
            continue
        source = clamp.all_input_nodes[0]
        quantizer_b = gm.get_submodule(after_q.target)
        if quantizer_node(gm, source) and single_user(source) is clamp:
            quantizer_a = gm.get_submodule(source.target)
            if not (_mergeable(quantizer_a) and _mergeable(quantizer_b)):
                continue
            if keep_shared and calls.get(id(quantizer_a), 0) > 1:
                log.debug("merge_relu_clamp: %s is shared by %d nodes; %s kept", source.target,
                         calls[id(quantizer_a)], clamp.name)
                continue
            # The clamp's output range from quantizer_b's own statistics: the same as quantizer_a's where
            # the backend shares one observer across the clamp (then it is narrowed), already within the
            # bounds where quantizer_b observed the clamped values (then it is kept: a histogram
            # observer's searched range beats a min/max copy; replacing it grew mobilenet_v2's error
            # against float by 1 dB in FX PTQ).
            b_range = observed_range(quantizer_b)
            narrowed = clamped_range(b_range, bounds)
            new_q = quantizer_b
            if narrowed != b_range:
                new_q = narrowed_copy(quantizer_b, *narrowed)
                name = unique_name(gm, f"{after_q.target.replace('.', '_')}_clamp_merged")
                gm.add_module(name, new_q)
                after_q.target = name
            op_output = source.args[0]
            keep_clamp = not saturation_implements(new_q, *bounds)
            if keep_clamp:  # op -> clamp -> quantizer_b'
                clamp.replace_input_with(source, op_output)
            else:  # op -> quantizer_b'
                after_q.replace_input_with(clamp, op_output)
                erase(gm, clamp)
            erase(gm, source)
            merged += 1
        elif not quantizer_node(gm, source) and _mergeable(quantizer_b) and saturation_implements(quantizer_b, *bounds):
            after_q.replace_input_with(clamp, source)
            erase(gm, clamp)
            merged += 1
    if not merged:
        log.debug("merge_relu_clamp: no clamp followed by a quantizer to merge; model unchanged")
        return 0
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    if before is not None:
        try:
            check_noise_growth("merge_relu_clamp", float_out, before, _run_as_quantized(gm, example_inputs),
                               max_noise_growth_db=max_noise_growth_db)
        except Exception:
            restore(gm, backup)
            raise
    log.debug("merge_relu_clamp: merged %d clamps into their quantizers' qparams", merged)
    return merged

