"""Mode registry. Each mode lives in its own module, imported only when chosen, so a torch release
that deletes ``torch.ao.quantization`` eager/FX breaks only those two modes."""

from __future__ import annotations

import importlib

from qlightning.errors import unknown_choice

# name -> "module:Class"
_MODES: dict[str, str] = {
    "eager": "qlightning.modes.eager:EagerMode",
    "fx": "qlightning.modes.fx:FxMode",
    "pt2e": "qlightning.modes.pt2e:Pt2eMode",
}


def available_modes() -> list[str]:
    return sorted(_MODES)


def validate_mode(name: str) -> str:
    if not isinstance(name, str) or name not in _MODES:
        raise unknown_choice("mode", name, _MODES)
    return name


def get_mode(name: str):
    """An instance of the mode implementation (imports its quantization stack now)."""
    module_name, class_name = _MODES[validate_mode(name)].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
