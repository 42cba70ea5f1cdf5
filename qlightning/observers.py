"""Observer registry: how quantization ranges are estimated during QAT and calibration.

An entry names observer classes, not objects: eager/FX resolve them in ``torch.ao.quantization`` and
PT2E in ``torchao.quantization.pt2e``, which define classes of the same names. qlightning's own
calibration observers (percentile, entropy, MSE) are defined once per family too, in
:mod:`qlightning.calibration_ao` and :mod:`qlightning.calibration_pt2e`, and a name is looked up there
first (:func:`resolve_observer_class`). A new observer is one ``register_observer`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Mapping

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
    # A calibration method of static PTQ (a search over a histogram at conversion): QAT refuses it.
    calibration_only: bool = False
    # Keyword options of the activation observer that the callback sets (``PostTrainingQuantization``'s
    # argument of the same name, carried in ``QuantRecipe.observer_options``).
    options: tuple[str, ...] = ()


_OBSERVERS: Registry[ObserverChoice] = Registry("observer")


def register_observer(choice: ObserverChoice) -> ObserverChoice:
    return _OBSERVERS.register(choice)


def get_observer(name: str) -> ObserverChoice:
    return _OBSERVERS.get(name)


def available_observers() -> list[str]:
    return _OBSERVERS.names()


def resolve_observer_class(name: str, own: Mapping[str, type], library: ModuleType) -> type:
    """The class an entry names, for one family of observers: qlightning's own class of that name
    (``own``: the family's ``OWN_OBSERVERS``) if there is one, else the library's (``library``:
    ``torch.ao.quantization.observer`` or ``torchao.quantization.pt2e.observer``)."""
    cls = own.get(name) or getattr(library, name, None)
    if not isinstance(cls, type):
        raise AttributeError(f"no observer class {name!r} in qlightning's {sorted(own)} or {library.__name__}")
    return cls


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
# Calibration methods of static PTQ: each picks the activation range from a histogram of everything
# seen (qlightning.calibration); weights, fully known, keep min/max.
register_observer(
    ObserverChoice(
        "percentile",
        "PercentileObserver",
        "MinMaxObserver",
        "PerChannelMinMaxObserver",
        description="activation range keeping `percentile` % of the values (default 99.99)",
        calibration_only=True,
        options=("percentile",),
    )
)
register_observer(
    ObserverChoice(
        "entropy",
        "EntropyObserver",
        "MinMaxObserver",
        "PerChannelMinMaxObserver",
        description="clipping threshold of least KL divergence, clipped vs quantized (TensorRT's calibration)",
        calibration_only=True,
    )
)
register_observer(
    ObserverChoice(
        "mse",
        "MSEObserver",
        "MinMaxObserver",
        "PerChannelMinMaxObserver",
        description="activation range of least expected quantize-dequantize squared error",
        calibration_only=True,
    )
)
