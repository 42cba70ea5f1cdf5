"""Observer registry: how quantization ranges are estimated during QAT and calibration.

An entry names observer classes, not objects: eager/FX resolve them in ``torch.ao.quantization`` and
PT2E in ``torchao.quantization.pt2e``, which define classes of the same names. A new observer is one
``register_observer`` call.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlightning.registry import Registry


@dataclass(frozen=True)
class ObserverChoice:
    name: str
    activation_observer: str
    weight_observer: str
    weight_per_channel_observer: str
    # Learnable scale / zero point (LSQ): the observer only seeds the qparams, gradients move them.
    learnable: bool = False
    description: str = ""


_OBSERVERS: Registry[ObserverChoice] = Registry("observer")


def register_observer(choice: ObserverChoice) -> ObserverChoice:
    return _OBSERVERS.register(choice)


def get_observer(name: str) -> ObserverChoice:
    return _OBSERVERS.get(name)


def available_observers() -> list[str]:
    return _OBSERVERS.names()


register_observer(
    ObserverChoice(
        "minmax",
        "MinMaxObserver",
        "MinMaxObserver",
        "PerChannelMinMaxObserver",
        description="running min/max over everything seen",
    )
)
register_observer(
    ObserverChoice(
        "moving_average_minmax",
        "MovingAverageMinMaxObserver",
        "MovingAverageMinMaxObserver",
        "MovingAveragePerChannelMinMaxObserver",
        description="exponential moving average of per-batch min/max",
    )
)
# Weights are fully known, so a histogram search buys nothing for them: weights use min/max.
register_observer(
    ObserverChoice(
        "histogram",
        "HistogramObserver",
        "MinMaxObserver",
        "PerChannelMinMaxObserver",
        description="activation range chosen by minimising quantization error over a histogram",
    )
)
register_observer(
    ObserverChoice(
        "lsq",
        "MovingAverageMinMaxObserver",
        "MovingAverageMinMaxObserver",
        "MovingAveragePerChannelMinMaxObserver",
        learnable=True,
        description="learned step size (Esser et al. 2020): qparams seeded by min/max, then trained",
    )
)
