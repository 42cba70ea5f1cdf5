"""``skip=[...]``: layers that stay float in every mode, the converted model and every export.

An entry is a module name as in the network's ``named_modules()`` (``"fc2"``), a regular expression
prefixed ``re:`` that must match a whole name (``r"re:features\\.0\\..*"``), or a module class
(``nn.LayerNorm``; in a config file ``"class:torch.nn.LayerNorm"``). Entries are checked for form when
a callback is constructed and matched against the network when it is prepared: an entry that matches
nothing is an error naming the closest names, before any data is seen.

A skipped module drags its fusion group along (conv-bn-relu, linear-relu, ...): a conv kept float
with its BatchNorm and ReLU quantized would need a quantize/dequantize pair inside what the backend
runs as one kernel, and eager and FX refuse to fuse members with different qconfigs.
"""

from __future__ import annotations

import difflib
import importlib
import re
from typing import Sequence, Union

from torch import nn

from qlightning.errors import QuantizationConfigError

SkipEntry = Union[str, type]
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.LeakyReLU,
                nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish)

REGEX_PREFIX = "re:"
CLASS_PREFIX = "class:"
_FORMS = (
    "module names as in named_modules() ('fc2'), 're:'-prefixed regular expressions matching whole names "
    "(r're:features\\.0\\..*'), or nn.Module classes (nn.LayerNorm, or 'class:torch.nn.LayerNorm')"
)


def _import_class(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise QuantizationConfigError(
            f"skip entry {CLASS_PREFIX + path!r} does not name an importable nn.Module class; write the full "
            "import path, e.g. 'class:torch.nn.LayerNorm'"
        )
    return cls


def check_skip(skip: Sequence[SkipEntry] | None) -> tuple[SkipEntry, ...]:
    """Validate the form of ``skip`` (no network needed); returns the entries with ``class:`` paths
    imported and ``re:`` patterns compiled once to prove they are valid."""
    if skip is None:
        return ()
    if isinstance(skip, (str, type)) or not isinstance(skip, Sequence):
        raise QuantizationConfigError(f"skip must be a list of entries ({_FORMS}), got {skip!r}")
    entries = []
    for entry in skip:
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            entries.append(entry)
        elif isinstance(entry, str) and entry.startswith(CLASS_PREFIX):
            entries.append(_import_class(entry[len(CLASS_PREFIX):]))
        elif isinstance(entry, str) and entry.startswith(REGEX_PREFIX):
            try:
                re.compile(entry[len(REGEX_PREFIX):])
            except re.error as exc:
                raise QuantizationConfigError(f"skip entry {entry!r} is not a valid regular expression: {exc}") from exc
            entries.append(entry)
        elif isinstance(entry, str) and entry:
            entries.append(entry)
        else:
            raise QuantizationConfigError(f"skip entry {entry!r} is none of: {_FORMS}")
    return tuple(entries)


def _matches(entry: SkipEntry, name: str, module: nn.Module) -> bool:
    if isinstance(entry, type):
        return isinstance(module, entry)
    if entry.startswith(REGEX_PREFIX):
        return re.fullmatch(entry[len(REGEX_PREFIX):], name) is not None
    return name == entry


def _no_match_error(entry: SkipEntry, network: nn.Module, names: list[str]) -> QuantizationConfigError:
    if isinstance(entry, type):
        classes = sorted({type(m).__name__ for m in network.modules()})
        close = difflib.get_close_matches(entry.__name__, classes, n=3, cutoff=0.3)
        hint = f"closest classes in it: {close}" if close else f"its classes: {classes}"
        return QuantizationConfigError(
            f"skip entry {entry.__name__} matches no module of {type(network).__name__} ({hint}); entries are {_FORMS}"
        )
    text = entry[len(REGEX_PREFIX):] if entry.startswith(REGEX_PREFIX) else entry
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.3)
    hint = f"closest names: {close}" if close else f"its top-level modules: {[n for n in names if '.' not in n]}"
    return QuantizationConfigError(
        f"skip entry {entry!r} matches no module of {type(network).__name__} ({hint}); entries are {_FORMS}"
    )


def resolve_skip(network: nn.Module, skip: Sequence[SkipEntry]) -> tuple[str, ...]:
    """Names (in ``named_modules()`` order) of the modules of ``network`` that stay float: those the
    entries match, then every member of a fusion group one of them belongs to. A name's submodules
    stay float with it and are not listed separately."""
    if not skip:
        return ()
    from qlightning.modes.fusion import find_modules_to_fuse, module_chains

    modules = dict(network.named_modules())
    names = [n for n in modules if n]
    matched: set[str] = set()
    for entry in check_skip(skip):
        hits = {n for n in names if _matches(entry, n, modules[n])}
        if not hits:
            raise _no_match_error(entry, network, names)
        matched |= hits
    chains = module_chains(network)  # one symbolic trace for both expansions below
    for group in find_modules_to_fuse(network, chains):
        if matched.intersection(group):
            matched.update(group)
    # An activation module right after a kept-float conv/linear(-bn) goes with it too (ReLU6, hardswish,
    # SiLU...: eager's fusion patterns know only ReLU; mobilenet_v2's ConvBNReLU6 kept its ReLU6 quantized).
    for chain in chains:
        for before, after in zip(chain, chain[1:]):
            if before in matched and isinstance(modules.get(after), _ACTIVATIONS) and isinstance(
                    modules.get(before), (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                matched.add(after)
    # Keep only the outermost names: a skipped container covers its children.
    outermost = [n for n in names if n in matched and not any(n.startswith(p + ".") for p in matched)]
    leaves = [n for n in names if not any(True for _ in modules[n].children())]
    if all(is_skipped(n, outermost) for n in leaves):
        raise QuantizationConfigError(
            f"skip={list(skip)!r} keeps every layer of {type(network).__name__} float: nothing would be "
            "quantized. Skip fewer layers, or do not quantize this network"
        )
    return tuple(outermost)


def is_skipped(name: str, skipped: Sequence[str]) -> bool:
    """Whether module ``name`` is one of ``skipped`` or inside one."""
    return any(name == s or name.startswith(s + ".") for s in skipped)


def skip_labels(entries: Sequence[SkipEntry]) -> list[str]:
    """The entries as text, classes as ``class:<import path>`` (checkpoint states, reports)."""
    return [f"{CLASS_PREFIX}{e.__module__}.{e.__qualname__}" if isinstance(e, type) else e for e in entries]
