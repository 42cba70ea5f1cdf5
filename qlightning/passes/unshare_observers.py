"""A BackendConfig transform: ReLU / ReLU6 / hardtanh / clamp get their own output observer.

PyTorch's x86 and native BackendConfigs share one observer between these ops' input and output,
so the clamped output is quantized with the unclamped range (half the levels wasted for ReLU).
Given a config, this returns a copy where those patterns use a separate output observer, which
then only ever sees the clamped values. Apply it before ``prepare``; after training,
:func:`~qlightning.passes.merge_clamp.merge_relu_clamp` can remove the now-redundant input observer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

CLAMP_PATTERNS = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, F.relu, F.relu6, F.hardtanh, F.hardtanh_, torch.relu, torch.clamp,
    "relu", "relu_", "clamp", "clamp_",
)


def unshare_clamp_observers(backend_config):
    """A copy of ``backend_config`` whose clamp-like patterns observe their output separately."""
    import importlib

    importlib.import_module("torch.ao.quantization.backend_config.utils")  # needed by set_backend_pattern_config
    from torch.ao.quantization.backend_config import BackendPatternConfig, ObservationType

    result = copy.deepcopy(backend_config)
    clamp_patterns = set(CLAMP_PATTERNS)
    if hasattr(torch._C._nn, "hardtanh_"):
        clamp_patterns.add(torch._C._nn.hardtanh_)
    updated = []
    for config in result.configs:
        if config.pattern in clamp_patterns and config.observation_type == ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT:
            updated.append(
                BackendPatternConfig(config.pattern)
                .set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
                .set_dtype_configs(config.dtype_configs)
            )
    return result.set_backend_pattern_configs(updated)
