"""qlightning's calibration observers for torchao (PT2E mode; only it imports this module).

Each is torchao's ``HistogramObserver`` with its range search replaced (:mod:`qlightning.calibration`);
:mod:`qlightning.calibration_ao` defines the same classes on torch.ao's observer for eager / FX.
"""

from __future__ import annotations

from torchao.quantization.pt2e import observer as library
# Not used here: qlightning.passes.merge_clamp builds a MinMaxObserver "of the same family" as an
# observer from the module its class is defined in.
from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver  # noqa: F401

from qlightning.calibration import EntropySearch, MSESearch, PercentileSearch
from qlightning.observers import resolve_observer_class


class PercentileObserver(PercentileSearch, HistogramObserver):
    __doc__ = PercentileSearch.__doc__


class EntropyObserver(EntropySearch, HistogramObserver):
    __doc__ = EntropySearch.__doc__


class MSEObserver(MSESearch, HistogramObserver):
    __doc__ = MSESearch.__doc__


OWN_OBSERVERS = {cls.__name__: cls for cls in (PercentileObserver, EntropyObserver, MSEObserver)}


def observer_class(name: str) -> type:
    """The torchao (PT2E) observer class an :class:`~qlightning.observers.ObserverChoice` names."""
    return resolve_observer_class(name, OWN_OBSERVERS, library)
