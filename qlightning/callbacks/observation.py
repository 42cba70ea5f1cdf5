"""Quantizers observe in the train stage only.

torch.ao and torchao quantizers update their statistics on every forward, eval mode included. Left
alone, Lightning's model summary (one forward of ``example_input_array``), the sanity check,
validation, ``trainer.test`` and ``trainer.predict`` would all move qparams with data that is not
training data. The QAT callback pauses observation for each of those and, when the stage ends, puts
back exactly the state it found (flags a user set by hand included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qlightning.modes.base import never_observed
from qlightning.passes.graph import is_fake_quantize, statistics_observers


@dataclass
class ObservationPause:
    """What :func:`pause_observation` changed, to put back with :meth:`restore`."""

    # (buffer, its value before the pause) for every on/off flag of every quantizer
    flags: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # (parameter, requires_grad before the pause): LSQ "observes" by learning its qparams
    learning: list[tuple[nn.Parameter, bool]] = field(default_factory=list)

    def restore(self) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for buffer, value in self.flags:
                buffer.copy_(value)
        for parameter, requires_grad in self.learning:
            parameter.requires_grad_(requires_grad)


def _flag_buffers(quantizer: nn.Module):
    # torch.ao and torchao name every switch `<something>_enabled` (observer_enabled,
    # fake_quant_enabled, LSQ's static_enabled / learning_enabled).
    return [b for name, b in quantizer.named_buffers(recurse=False) if name.endswith("_enabled")]


def pause_observation(mode_impl, network: nn.Module) -> ObservationPause:
    """Stop every quantizer of ``network`` (prepared by ``mode_impl``) from observing.

    A quantizer that has never observed has no qparams yet: scale 1 and zero point 0, with a single
    value where a per-channel quantizer needs one per channel (torch.ao then raises "dimensions of
    scale and zero-point are not consistent with input tensor"). Such quantizers pass their input
    through in float until training has observed data: during the sanity check, a validation before
    the first step is the float network's, not one of meaningless qparams.
    """
    quantizers = mode_impl.quantizers(network)
    pause = ObservationPause()
    with torch.inference_mode(False), torch.no_grad():
        for _, quantizer in quantizers:
            pause.flags += [(b, b.clone()) for b in _flag_buffers(quantizer)]
            pause.learning += [(p, p.requires_grad) for p in quantizer.parameters(recurse=False)]
        mode_impl.set_observers_enabled(network, False)
        for _, quantizer, observer in statistics_observers(quantizers):
            if is_fake_quantize(quantizer) and never_observed(observer.min_val, observer.max_val):
                quantizer.disable_fake_quant()
    return pause

