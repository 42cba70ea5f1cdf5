"""Where quantization error comes from, layer by layer: :func:`compare_layers`.

For every quantized layer of an int8 network, in execution order, two signal-to-quantization-noise
ratios (``10 * log10(sum(float^2) / sum((float - int8)^2))``, ``inf`` when equal) against the float
network the int8 one was made from:

* ``sqnr_db``: the layer's output in the int8 network run end to end, against the float network's
  output of the same layer. It contains the error every layer before it passed on.
* ``own_sqnr_db``: the int8 layer alone, fed the float network's input of that layer (quantized with
  the layer's input qparams, as the int8 network quantizes it), against the same float output: the
  error the layer adds by itself (input rounding, int8 weights, output rounding).

And ``skip_gain_db``: how many dB the SQNR of the network's output rises when only that layer computes in
float, as ``skip=[name]`` would leave it (the layer's float modules on the dequantized input that reaches
it; their output rounded onto the layer's output grid for the next int8 layer, left float when it is the
network's output; a first layer that alone reads the network input reads it unquantized). It is what
:meth:`LayerReport.worst` ranks by: the own SQNR also counts input and output rounding that skipping the
layer leaves in place, and on Fashion-MNIST it did not predict which skip helps (docs/calibration.md).

A *layer* is a fusion group of the float network that the int8 network computes as one quantized
op: ``conv -> bn -> relu`` is one layer, named after its first module (``conv1``, as eager and FX name
the fused module and as ``skip=[...]`` takes it), compared at the group's last output (the relu's).
Names are module names of the float network's ``named_modules()``. A layer is listed when it has int8
weights, or its own output qparams, or rounds its result onto its input's grid (average pooling,
hardswish with shared qparams); ops that only move int8 values on their input's grid (max-pool,
flatten, reshape) add no error and belong to no layer.

How each int8 network is read:

* eager (``EagerQuantWrapper`` around the network, fused and converted by torch.ao) and FX
  (``convert_fx``'s GraphModule): modules of ``torch.ao.nn.quantized`` / ``torch.ao.nn.intrinsic
  .quantized`` are layers, and float modules that run on int8 tensors and round (average pooling). The
  float module of the same name starts the group; the float modules after it that read its output and
  are gone from the int8 network (fused into it: ``nn.Identity`` in eager, absent in FX) complete it.
  Whether a module reads the previous one's output is decided by tensor identity and version counter,
  so ``out += identity`` between two modules ends a group. A ReLU that FX fused from a functional
  ``F.relu`` is applied to the float output. The end-to-end output is the module's output
  (dequantized); the layer alone is the module called on the float input quantized with the qparams of
  the tensor that reached it end to end.
* PT2E (``ExportedNetwork`` / a converted GraphModule of aten ops between ``quantized_decomposed``
  quantize / dequantize nodes; also FX for backends without PyTorch int8 kernels, which converts
  through PT2E): a layer is a chain of ops from one reading dequantized activations or int8 weights up
  to the next quantize (or a fork, a second activation input, or the output). Ops are mapped to float
  modules by ``node.meta["nn_module_stack"]`` (innermost entry, e.g. ``'L__self__conv1': ('conv1',
  'torch.nn.modules.conv.Conv2d')``); BatchNorm folded into the conv and a merged ReLU are completed from
  the float network as above; ops of the chain outside any leaf module (a functional ``relu`` or
  ``flatten`` in ``forward``, or a clamp FX fused into a conv) are replayed on the float output. The
  end-to-end output is the value downstream ops read (the dequantize after the chain's quantize, or the
  float value where there is none). The layer alone re-evaluates only the nodes between the value
  feeding the chain's input quantize and the chain's output (run-time qparams included), with that
  value replaced by the float input.

Not listed: layers that stay float in the int8 network (a ``skip``-ped module, an op the backend does
not quantize), and functional ops that no leaf module owns (``x + y`` of a residual block,
``torch.cat``): a layer must be a module to be moved to float by name; their error shows up in the
end-to-end SQNR of the next listed layer. A chain with two activation inputs is not a layer either.

Not read: fake-quantized networks (``prepare``'s, ``callback.finalized_network``), which compute in
float or fake-quantize; pass ``callback.quantized_model``. The float network must be the one the int8
network was converted from: after ``QuantizationAwareTraining`` the LightningModule holds the
fake-quantized network, and a copy of the float network from before ``fit`` has the weights before QAT
training, so its SQNRs include what training changed (tens of dB on a few epochs).

Cost: one float forward with hooks and one int8 forward with hooks (or an FX interpreter keeping every
value) over ``inputs``, holding each layer's float input and output and int8 output (a few copies of
the activations), plus one call of each int8 layer alone, plus one more int8 forward per layer for
``skip_gain_db`` (the whole report of mobilenet_v2, 53 layers, on 64 images of 32 x 32: 4.6 s on 2 cores, docs/calibration.md).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.nn import functional as F

from qlightning.passes.graph import clamp_range

__all__ = ["LayerError", "LayerReport", "compare_layers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerError:
    """One quantized layer of a :class:`LayerReport`.

    Attributes:
        name: the float network's module name of the layer's first module (``named_modules()``).
        kind: class name of that float module (``"Conv2d"``).
        sqnr_db: SQNR in dB of the layer's output in the int8 network run end to end, against the float
            network's output of the layer (``inf`` when equal).
        own_sqnr_db: SQNR of the int8 layer alone, fed the float input of the layer quantized with the
            layer's input qparams: the error the layer adds by itself.
        input_sqnr_db: SQNR of the float input rounded onto the layer's input grid, against the float input
            (``inf`` when the layer reads float values, ``nan`` when the rounding happens inside the layer,
            as in dynamic quantization). That grid is usually the previous layer's output grid, so its
            rounding counts in the own error of both: an ``own_sqnr_db`` close to ``input_sqnr_db`` says
            the layer's error comes from its input's qparams, chosen upstream.
        output_scale: the scale of the layer's int8 output, ``None`` when the int8 network keeps the
            layer's output in float (x86's last linear in PT2E) or quantizes it at run time (dynamic).
        members: the float modules the layer computes (``("conv1", "bn1", "relu1")``), in order.
        numel: how many output values were compared (over all calls of the layer).
        skip_gain_db: how many dB the SQNR of the network's output (logits) against the float network's
            rises when this layer alone runs in float, as ``skip=[name]`` keeps it: the int8 network run
            again with the layer's float modules computing on the dequantized input that reaches it, their
            output rounded onto the layer's output grid unless that output goes straight to the network's
            output. What ``skip`` removes: the layer's weight rounding and integer arithmetic (and, for a
            last layer, its output rounding), not the rounding of its input or of its output for the next
            layer, which ``own_sqnr_db`` includes. ``nan`` when it could not be measured.
    """

    name: str
    kind: str
    sqnr_db: float
    own_sqnr_db: float
    _: KW_ONLY
    input_sqnr_db: float = math.nan
    output_scale: float | None = None
    members: tuple[str, ...] = ()
    numel: int = 0
    skip_gain_db: float = math.nan

    @property
    def inherited_db(self) -> float:
        """How many dB the errors of the layers before this one cost it: ``own_sqnr_db - sqnr_db``
        (about 0 for the first layer; can be negative when errors happen to cancel)."""
        if math.isinf(self.own_sqnr_db) and math.isinf(self.sqnr_db):
            return 0.0
        return self.own_sqnr_db - self.sqnr_db

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite SQNRs as the strings ``"inf"`` / ``"-inf"`` / ``"nan"``."""
        data = asdict(self)
        data.pop("_", None)
        data["members"] = list(self.members)
        return {k: _jsonable(v) for k, v in data.items()}


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class LayerReport(Sequence):
    """The :class:`LayerError` of every quantized layer, in execution order (a read-only sequence;
    ``report["conv1"]`` looks a layer up by name)."""

    def __init__(self, layers: Sequence[LayerError], source: str):
        self._layers = tuple(layers)
        # How the int8 network was read: "eager/fx modules" or "pt2e graph".
        self.source = source

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, key):
        if isinstance(key, str):
            for layer in self._layers:
                if layer.name == key:
                    return layer
            raise KeyError(f"no quantized layer named {key!r}; layers: {self.names}")
        if isinstance(key, slice):
            return LayerReport(self._layers[key], self.source)
        return self._layers[key]

    def __eq__(self, other) -> bool:
        if not isinstance(other, LayerReport):
            return NotImplemented
        return self._layers == other._layers and self.source == other.source

    __hash__ = None

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    def worst(self, n: int = 1) -> list[LayerError]:
        """The ``n`` layers whose move to float helps the network's output most: highest ``skip_gain_db``
        first (ties, and layers whose gain could not be measured, NaN, after them: lowest ``own_sqnr_db``,
        then execution order).

        Ranked by what ``skip`` removes, measured on the network's output, not by the error a layer adds
        by itself: a layer's own error includes the rounding of its input (chosen by the layer before it)
        and of its output for the next layer, and keeping the layer float removes neither. On Fashion-MNIST
        the own-error ranking did not predict which skip helps (docs/calibration.md); the measured gain
        does, to a tenth of a dB on digits. Whether the gain matters for the metric is what the caller's
        accuracy check decides."""
        order = sorted(range(len(self._layers)), key=lambda i: (*_rank(-self._layers[i].skip_gain_db),
                                                              *_rank(self._layers[i].own_sqnr_db), i))
        return [self._layers[i] for i in order[: max(n, 0)]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": "sqnr_db = 10*log10(sum(float^2) / sum((float - int8)^2)); own_sqnr_db: the int8 layer "
                      "alone, fed the float network's input of the layer; skip_gain_db: the rise of the network "
                      "output's SQNR when only this layer runs in float",
            "source": self.source,
            "layers": [layer.to_dict() for layer in self._layers],
        }

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """The report as JSON (non-finite SQNRs as strings); written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def format(self) -> str:
        """A plain-text table, one row per layer."""
        width = max([len("layer")] + [len(layer.name) for layer in self._layers])
        kinds = max([len("kind")] + [len(layer.kind) for layer in self._layers])
        rows = [f"{'layer':<{width}}  {'kind':<{kinds}}  {'sqnr_db':>8}  {'own_db':>8}  {'input_db':>8}  "
                "skip_gain  output_scale  members"]
        for layer in self._layers:
            scale = "float" if layer.output_scale is None else f"{layer.output_scale:.4g}"
            rows.append(f"{layer.name:<{width}}  {layer.kind:<{kinds}}  {layer.sqnr_db:8.2f}  {layer.own_sqnr_db:8.2f}  "
                        f"{layer.input_sqnr_db:8.2f}  {layer.skip_gain_db:+9.2f}  {scale:>12}  {', '.join(layer.members)}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"LayerReport({len(self)} layers, {self.source})"


def _rank(value: float) -> tuple[bool, float]:
    """Sort key: lowest first, NaN (not measured) after everything."""
    return (True, 0.0) if math.isnan(value) else (False, value)


@contextlib.contextmanager
def _evaluating(module: nn.Module):
    """Eval behaviour inside (dropout off, BatchNorm on running statistics, which it then leaves alone);
    each submodule's own mode restored after."""
    training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in training.items():
            m.training = mode


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


# -- the float network ------------------------------------------------------------------------------


@dataclass
class _Call:
    """One call of a leaf module of the float network."""

    name: str
    index: int  # the how-many-th call of this module
    input: torch.Tensor | None
    output: torch.Tensor | None
    input_id: int | None
    output_id: int | None
    # Version counters: a tensor changed in place between two modules (``out += identity``) is the same
    # object but no longer the value the first module returned.
    input_version: int = -1
    output_version: int = -1


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        return _first_tensor(list(value.values()))
    return None


def _leaves(network: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in network.named_modules() if next(m.children(), None) is None}


class _FloatRun:
    """The float network run once on the inputs, every leaf module's calls recorded (input and output
    copied to the CPU, and which tensor object each was, to follow the data from module to module)."""

    def __init__(self, network: nn.Module, inputs: tuple):
        self.modules = _leaves(network)
        self.calls: list[_Call] = []
        self.by_module: dict[str, list[_Call]] = defaultdict(list)
        keep_alive: list = []  # tensor ids are compared after the run; the tensors must outlive it

        def pre_hook(name):
            def hook(module, args):
                tensor = _first_tensor(args)
                keep_alive.append(tensor)
                call = _Call(name, len(self.by_module[name]), _copy(tensor), None, _id(tensor), None,
                             _version(tensor))
                self.calls.append(call)
                self.by_module[name].append(call)
            return hook

        def post_hook(name):
            def hook(module, args, output):
                tensor = _first_tensor(output)
                keep_alive.append(tensor)
                call = self.by_module[name][-1]
                call.output, call.output_id, call.output_version = _copy(tensor), _id(tensor), _version(tensor)
            return hook

        handles = []
        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(pre_hook(name)))
                handles.append(module.register_forward_hook(post_hook(name)))
            device = _device_of(network)
            moved = tuple(_to(x, device) for x in inputs)
            keep_alive.extend(moved)
            self.input_ids = {id(x) for x in moved if isinstance(x, torch.Tensor)}
            with _evaluating(network):
                self.output = _copy(_first_tensor(network(*moved)))
        finally:
            for handle in handles:
                handle.remove()
        self.position = {id(call): i for i, call in enumerate(self.calls)}

    def followers(self, last: _Call, absent) -> list[_Call]:
        """The calls after ``last`` that read its output and that the int8 network folded away
        (``absent(name)``), each reading the previous one's output: BatchNorm and ReLU after a conv."""
        chain = []
        i = self.position[id(last)] + 1
        while i < len(self.calls):
            call = self.calls[i]
            if (call.input_id is None or (call.input_id, call.input_version) != (last.output_id, last.output_version)
                    or not absent(call.name)):
                break
            chain.append(call)
            last = call
            i += 1
        return chain

    def only_reader_of_input(self, name: str) -> bool:
        """Whether module ``name`` reads the network's input and nothing else does: ``skip`` then
        leaves the input float (eager drops its input quantize, PT2E and FX insert none)."""
        calls = self.by_module.get(name, [])
        readers = {call.name for call in self.calls if call.input_id in self.input_ids}
        return bool(calls) and readers == {name} and all(call.input_id in self.input_ids for call in calls)

    def next_call(self, after: _Call, name: str) -> _Call | None:
        for call in self.calls[self.position[id(after)]:]:
            if call.name == name:
                return call
        return None


def _id(tensor) -> int | None:
    return id(tensor) if isinstance(tensor, torch.Tensor) else None


def _version(tensor) -> int:
    try:
        return tensor._version if isinstance(tensor, torch.Tensor) else -1
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _copy(tensor) -> torch.Tensor | None:
    if not isinstance(tensor, torch.Tensor):
        return None
    tensor = tensor.detach()
    if tensor.is_quantized:
        tensor = tensor.dequantize()
    return tensor.to("cpu", copy=True)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        # A copy: networks may modify their input in place (a first ReLU(inplace=True)).
        return value.detach().to(device, copy=True)
    return value


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if not tensor.is_quantized:
            return tensor.device
    return torch.device("cpu")


# -- accumulation -----------------------------------------------------------------------------------


class _Accumulator:
    """Signal and noise sums of one layer over all its calls."""

    def __init__(self, name: str, kind: str, members: tuple[str, ...], output_scale: float | None):
        self.name, self.kind, self.members, self.output_scale = name, kind, members, output_scale
        self.signal = self.noise = self.own_noise = 0.0
        self.input_signal = self.input_noise = 0.0
        self.numel = 0
        self.broken = False  # a call whose values could not be matched

    def add(self, reference, end_to_end, alone, float_input=None, rounded_input=None) -> None:
        if reference is None or end_to_end is None or end_to_end.shape != reference.shape:
            self.broken = True
            return
        if float_input is None or rounded_input is None or rounded_input.shape != float_input.shape:
            self.input_noise = math.nan
        else:
            float_input = float_input.double()
            self.input_signal += float(float_input.pow(2).sum())
            self.input_noise += float((float_input - rounded_input.double()).pow(2).sum())
        reference = reference.double()
        self.signal += float(reference.pow(2).sum())
        self.noise += float((reference - end_to_end.double()).pow(2).sum())
        if alone is None or alone.shape != reference.shape:
            self.own_noise = math.nan
        else:
            self.own_noise += float((reference - alone.double()).pow(2).sum())
        self.numel += reference.numel()

    def result(self) -> LayerError | None:
        if self.broken or self.numel == 0:
            log.warning("compare_layers: the int8 output of %s does not match the float network's output of %s "
                        "(shape or missing value); the layer is left out of the report", self.name,
                        self.members[-1] if self.members else self.name)
            return None
        own = math.nan if math.isnan(self.own_noise) else _sqnr(self.signal, self.own_noise)
        rounding = math.nan if math.isnan(self.input_noise) else _sqnr(self.input_signal, self.input_noise)
        return LayerError(self.name, self.kind, _sqnr(self.signal, self.noise), own, input_sqnr_db=rounding,
                          output_scale=self.output_scale, members=self.members, numel=self.numel)


# -- eager / FX modules -----------------------------------------------------------------------------

_QUANTIZED_NAMESPACES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                         "torch.nn.quantized", "torch.nn.intrinsic.quantized")


def _is_quantized_layer(module: nn.Module) -> bool:
    """An int8 module with its own output qparams or int8 weights (not a stub, not an op that keeps its
    input's qparams such as max-pool or ReLU6)."""
    if not type(module).__module__.startswith(_QUANTIZED_NAMESPACES):
        return False
    if type(module).__name__ in ("Quantize", "DeQuantize"):
        return False
    return hasattr(module, "scale") or hasattr(module, "_packed_params") or ".dynamic" in type(module).__module__


def _fused_relu(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.ao.nn.intrinsic", "torch.nn.intrinsic")) and type(
        module).__name__.rstrip("123d").endswith("ReLU")


def _float_name_of(quantized_name: str, prefix: str) -> str | None:
    if not prefix:
        return quantized_name
    if quantized_name == prefix.rstrip("."):
        return ""
    return quantized_name[len(prefix):] if quantized_name.startswith(prefix) else None


def _bound_engine(network: nn.Module) -> str | None:
    """The engine :func:`qlightning.quantized_engine.bind_quantized_engine` bound the network to."""
    for hook in network._forward_pre_hooks.values():
        engine = getattr(getattr(hook, "__self__", None), "engine", None)
        if isinstance(engine, str):
            return engine
    return None


_GRID_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.ZeroPad1d, nn.ZeroPad2d,
                 nn.ZeroPad3d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)


def _keeps_grid_module(module: nn.Module) -> bool:
    """A module mapping int8 values onto the same grid (moves, selects or clamps them)."""
    if isinstance(module, nn.Upsample):
        return module.mode == "nearest"
    return isinstance(module, _GRID_MODULES) or type(module).__name__ in ("ReLU6", "Dropout")


def _compare_modules(float_network: nn.Module, quantized: nn.Module, inputs: tuple) -> LayerReport:
    from qlightning.quantized_engine import quantized_engine

    # Eager mode wraps the network: EagerQuantWrapper(quant, net, dequant).
    prefix = "net." if type(quantized).__name__ == "EagerQuantWrapper" and hasattr(quantized, "net") else ""
    reference = _FloatRun(float_network, inputs)

    watched: dict[str, nn.Module] = {}  # float name -> int8 module, for the int8 network's ops
    for name, module in quantized.named_modules():
        float_name = _float_name_of(name, prefix)
        # A quantized Linear holds its packed weights in a child module: not a leaf, still one op.
        # Eager's FloatRegion (skip=) stands where its float layer is: present, so not fused away.
        if float_name is not None and name and (_is_quantized_layer(module) or next(module.children(), None) is None
                                                or type(module).__name__ == "FloatRegion"):
            watched[float_name] = module
    arrived: dict[str, list] = defaultdict(list)  # per call: the tensor that reached the module
    produced: dict[str, list] = defaultdict(list)  # per call: its output (as returned)
    order: list[str] = []

    def pre_hook(name):
        def hook(module, args):
            tensor = _first_tensor(args)
            arrived[name].append(tensor.detach().clone() if isinstance(tensor, torch.Tensor) else None)
        return hook

    def post_hook(name):
        def hook(module, args, output):
            tensor = _first_tensor(output)
            produced[name].append(tensor.detach().clone() if isinstance(tensor, torch.Tensor) else None)
            if name not in order:
                order.append(name)
        return hook

    engine = _bound_engine(quantized)

    def scope():
        return quantized_engine(engine) if engine else contextlib.nullcontext()

    handles = []
    try:
        for name, module in watched.items():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name)))
        with scope(), _evaluating(quantized):
            baseline = _copy(_first_tensor(quantized(*(_to(x, torch.device("cpu")) for x in inputs))))
    finally:
        for handle in handles:
            handle.remove()

    def absent(name: str) -> bool:
        """Fused away: gone from the int8 network, or an ``nn.Identity`` there (eager)."""
        return name not in order or (isinstance(watched[name], nn.Identity)
                                     and not isinstance(reference.modules.get(name), nn.Identity))

    def is_layer(name: str) -> bool:
        module = watched[name]
        if type(module).__name__ == "FloatRegion":
            return False  # kept float (skip=); its output's re-quantization shows in the next layer's input
        if _is_quantized_layer(module):
            return True
        # A float module run on int8 tensors that rounds its result onto the grid (average pooling).
        quantized_out = any(isinstance(t, torch.Tensor) and t.is_quantized for t in produced[name])
        quantized_in = any(isinstance(t, torch.Tensor) and t.is_quantized for t in arrived[name])
        return quantized_in and quantized_out and not _keeps_grid_module(module)

    results = []
    float_layers: dict[str, Callable] = {}
    for name in order:
        calls = reference.by_module.get(name, [])
        if not calls or name not in reference.modules or not is_layer(name):
            continue
        module = watched[name]
        calls = calls[: len(produced[name])]
        members = (name,) + tuple(c.name for c in reference.followers(calls[0], absent))
        extra_relu = _fused_relu(module) and not any(isinstance(reference.modules[m], nn.ReLU) for m in members)
        float_layers[name] = _float_layer(reference.modules, members, extra_relu)
        scale = None if ".dynamic" in type(module).__module__ else getattr(module, "scale", None)
        if not isinstance(scale, (float, int, torch.Tensor)) or callable(scale):
            first = produced[name][0]
            scale = first.q_scale() if isinstance(first, torch.Tensor) and first.is_quantized and first.qscheme() in (
                torch.per_tensor_affine, torch.per_tensor_symmetric) else None
        acc = _Accumulator(name, type(reference.modules[name]).__name__, members,
                           None if scale is None else float(scale))
        for call, quantized_input, output in zip(calls, arrived[name], produced[name]):
            followers = reference.followers(call, absent)
            expected = followers[-1].output if followers else call.output
            if expected is not None and _fused_relu(module) and not any(
                    isinstance(reference.modules[c.name], nn.ReLU) for c in followers):
                expected = F.relu(expected)  # a functional relu FX fused into the module
            fed = _requantized(call.input, quantized_input)
            # Dynamic layers quantize their input inside: its rounding is not seen here.
            rounded = None if ".dynamic" in type(module).__module__ else _copy(fed)
            with scope():
                alone = _copy(_first_tensor(module(fed)))
            acc.add(expected, _copy(output), alone, call.input, rounded)
        layer = acc.result()
        if layer is not None:
            results.append(layer)
    with scope(), _evaluating(quantized):  # the int8 network run once more per layer, as in the run above
        gains = {}
        for layer in results:
            name = layer.name
            gains[name] = _skip_gain(name, reference.output, baseline, lambda: _run_with_float_module(
                quantized, watched[name], float_layers[name], _feeds_output_only(quantized, prefix + name), inputs,
                reference.only_reader_of_input(name)))
    return LayerReport([dataclasses.replace(layer, skip_gain_db=gains[layer.name]) for layer in results],
                       "eager/fx modules")


def _float_layer(modules: dict[str, nn.Module], members: Sequence[str], extra_relu: bool = False,
                 trailing: Sequence[fx.Node] = (), env: dict | None = None) -> Callable:
    """The float computation of a layer: its float modules in order (conv, bn, relu), then what the int8
    network fused into it that no float module computes (a functional relu, ops replayed from the graph)."""
    device = _device_of(modules[members[0]])

    def run(value: torch.Tensor) -> torch.Tensor:
        back = value.device
        value = value.dequantize().to(device)
        for name in members:
            with _evaluating(modules[name]):
                value = modules[name](value)
        if extra_relu:
            value = F.relu(value)
        if trailing:
            value = _replay(list(trailing), value.to(back), env)
        return value.to(back)
    return run


def _skip_gain(name: str, reference, baseline, run_with_float_layer: Callable) -> float:
    """dB the network output's SQNR gains when ``name`` runs in float (NaN, with a warning, when that run
    fails or its output does not match the float network's)."""
    try:
        with torch.no_grad():
            floated = _copy(_first_tensor(run_with_float_layer()))
    except Exception as error:  # a diagnostic: one layer that cannot be swapped must not lose the report
        log.warning("compare_layers: could not run %s in float to measure its skip gain (%s: %s)", name,
                    type(error).__name__, error)
        return math.nan
    if reference is None or baseline is None or floated is None or not (
            reference.shape == baseline.shape == floated.shape):
        return math.nan
    reference = reference.double()
    signal = float(reference.pow(2).sum())
    before = _sqnr(signal, float((reference - baseline.double()).pow(2).sum()))
    after = _sqnr(signal, float((reference - floated.double()).pow(2).sum()))
    if math.isinf(before) and math.isinf(after):
        return 0.0
    return after - before


def _run_with_float_module(quantized: nn.Module, module: nn.Module, float_layer: Callable, unrounded: bool,
                           inputs: tuple, reads_network_input: bool = False):
    """``quantized`` run with ``module``'s output computed by ``float_layer`` on the input that reaches it
    (dequantized; the float network input itself when ``reads_network_input``), re-quantized with the
    qparams of the int8 output it replaces, as eager's ``FloatRegion`` and FX's float modules hand their
    output to the next int8 layer; left float when ``unrounded``."""

    def hook(module, args, output):
        value = float_layer(inputs[0] if reads_network_input else _first_tensor(args))
        if isinstance(output, torch.Tensor) and output.is_quantized and not unrounded:
            return torch.quantize_per_tensor(value, output.q_scale(), output.q_zero_point(), output.dtype)
        return value

    handle = module.register_forward_hook(hook)
    try:
        return quantized(*(_to(x, torch.device("cpu")) for x in inputs))
    finally:
        handle.remove()


def _feeds_output_only(quantized: nn.Module, name: str) -> bool:
    """In an FX int8 GraphModule, whether module ``name``'s output is only dequantized for the network's
    output: ``skip`` leaves such a layer's output float (no output quantize). Eager's ``FloatRegion`` always
    re-quantizes, so False there."""
    if not isinstance(quantized, fx.GraphModule):
        return False
    for node in quantized.graph.nodes:
        if node.op == "call_module" and node.target == name:
            users = list(node.users)
            return bool(users) and all(
                (u.target == "dequantize" or u.target is torch.dequantize) and all(o.op == "output" for o in u.users)
                for u in users)
    return False


def _requantized(float_input, arrived):
    """The float input quantized the way the int8 network quantized the tensor that reached the layer."""
    if float_input is None:
        return arrived
    if not isinstance(arrived, torch.Tensor) or not arrived.is_quantized:
        return float_input.to(arrived.device) if isinstance(arrived, torch.Tensor) else float_input
    if arrived.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return torch.quantize_per_tensor(float_input, arrived.q_scale(), arrived.q_zero_point(), arrived.dtype)
    return torch.quantize_per_channel(float_input, arrived.q_per_channel_scales(),
                                      arrived.q_per_channel_zero_points(), arrived.q_per_channel_axis(), arrived.dtype)


# -- PT2E graphs ------------------------------------------------------------------------------------


def _op_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_function" else ""


def _is_quantize(node) -> bool:
    name = _op_name(node) if isinstance(node, fx.Node) else ""
    return ("quantized_decomposed.quantize_per" in name or "quantize_affine" in name) and "dequantize" not in name


def _is_dequantize(node) -> bool:
    name = _op_name(node) if isinstance(node, fx.Node) else ""
    return "quantized_decomposed.dequantize_per" in name or "dequantize_affine" in name


def _is_qparams(node) -> bool:
    """Run-time qparams (dynamic quantization): ``choose_qparams`` and the items taken from it."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _is_qparams(node.args[0])
    return "quantized_decomposed.choose_qparams" in _op_name(node)


def _is_compute(node: fx.Node) -> bool:
    return node.op == "call_function" and not (_is_quantize(node) or _is_dequantize(node) or _is_qparams(node))


def _source(node: fx.Node) -> fx.Node:
    """What a dequantize reads, through its quantize: the float value quantized there."""
    while isinstance(node, fx.Node) and (_is_dequantize(node) or _is_quantize(node)):
        node = node.args[0]
    return node


def _is_weight(dq: fx.Node) -> bool:
    source = _source(dq)
    return isinstance(source, fx.Node) and source.op == "get_attr"


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None


def _qparams(node: fx.Node) -> tuple:
    return tuple(str(a) for a in node.args[1:3])


def _scale(node: fx.Node, env: dict) -> float | None:
    """A quantize node's constant scale; ``None`` for run-time qparams (dynamic quantization)."""
    scale = node.args[1] if len(node.args) > 1 else node.kwargs.get("scale")
    if isinstance(scale, fx.Node):
        if scale.op != "get_attr":
            return None
        scale = env.get(scale)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return float(scale)
    return float(scale) if isinstance(scale, (float, int)) else None


_CLAMP_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)


def _owned(node: fx.Node, leaves: dict[str, nn.Module]) -> bool:
    """Whether ``node`` computes part of what its float module computes. FX fuses a functional
    ``F.relu`` into the conv before it, and a graph converted from FX labels that relu with the conv's
    name: a clamp labelled with a module that is not a clamp is the float network's functional code."""
    module = leaves.get(_module_path(node))
    if module is None:
        return False
    return isinstance(module, _CLAMP_MODULES) or clamp_range(None, node) is None


_GRID_OPS = {
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "flatten", "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "squeeze", "unsqueeze", "clone",
    "contiguous", "slice", "select", "expand", "alias", "cat", "concat", "split", "split_with_sizes", "chunk",
    "unbind", "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "clamp", "clamp_", "constant_pad_nd", "pad",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "pixel_shuffle", "pixel_unshuffle",
    "channel_shuffle", "getitem", "repeat", "index_select", "gather",
}


def _keeps_grid(node: fx.Node) -> bool:
    """Whether the op maps values of an int8 grid onto the same grid (moves, selects, clamps them): with
    its input's qparams on its output, it adds no rounding error."""
    target = node.target
    name = getattr(target, "__name__", str(target))
    overload = getattr(target, "_overloadpacket", None)
    name = getattr(overload, "__name__", name)
    return name.split(".")[-1] in _GRID_OPS


@dataclass
class _Region:
    """A chain of graph ops the int8 network computes as one quantized layer."""

    nodes: list[fx.Node]
    anchor: str  # float module of the first op
    input: fx.Node  # the float value the chain's input quantize reads (or the first op's input)
    materialised: fx.Node  # the value downstream ops read: the dequantize after the output quantize
    output_quantize: fx.Node | None
    last_module: str  # the last float leaf module whose own computation is in the chain
    trailing: list[fx.Node] = field(default_factory=list)  # ops after that module's, replayed on float


def _float_weights(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    """Whether ``node`` reads a float weight (a parameter of two or more dimensions, not through a
    dequantize): a layer the int8 network keeps in float (``skip``), even between quantize nodes."""
    for arg in node.all_input_nodes:
        if arg.op != "get_attr":
            continue
        try:
            value = operator.attrgetter(arg.target)(graph_module)
        except AttributeError:
            continue
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
            return True
    return False


def _regions(graph_module: fx.GraphModule, leaves: dict[str, nn.Module]) -> list[_Region]:
    assigned: set[fx.Node] = set()
    regions = []
    for node in graph_module.graph.nodes:
        if node in assigned or not _is_compute(node) or _float_weights(node, graph_module):
            continue
        dequantized = [a for a in node.all_input_nodes if _is_dequantize(a)]
        weights = [a for a in dequantized if _is_weight(a)]
        activations = [a for a in dequantized if not _is_weight(a)]
        if not dequantized:
            continue
        chain = [node]
        while True:
            users = list(chain[-1].users)
            if len(users) != 1 or not _is_compute(users[0]) or users[0] in assigned:
                break
            user = users[0]
            others = [a for a in user.all_input_nodes if a is not chain[-1]]
            if any(not (_is_weight(a) or a.op == "get_attr") for a in others):
                break  # a second activation (add, cat): the chain ends before it
            if _float_weights(user, graph_module):
                break  # a float layer (skipped) reading the chain's float output
            chain.append(user)
        assigned.update(chain)
        last = chain[-1]
        output_quantize = next((u for u in last.users if _is_quantize(u)), None)
        materialised = last
        if output_quantize is not None:
            materialised = next((u for u in output_quantize.users if _is_dequantize(u)), output_quantize)
        own_qparams = output_quantize is not None and all(_qparams(output_quantize) != _qparams(a) for a in activations)
        rounds = output_quantize is not None and not all(_keeps_grid(n) for n in chain)
        if not (weights or own_qparams or rounds):
            continue  # a float op, or one moving int8 values on its input's grid (max-pool, flatten): no error
        anchor = _module_path(node)
        if anchor is None or anchor not in leaves or len(activations) > 1:
            continue  # a functional op no leaf module owns, or several activation inputs (add, cat)
        first_input = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if first_input is None:
            continue
        owned = [i for i, n in enumerate(chain) if _owned(n, leaves)]
        if not owned:
            continue
        regions.append(_Region(chain, anchor, _source(first_input), materialised, output_quantize,
                               _module_path(chain[owned[-1]]), chain[owned[-1] + 1:]))
    return regions


class _Recorder(fx.Interpreter):
    """Runs a graph keeping every value, and copies of the ones asked for as they are made (a later
    in-place op could change them)."""

    def __init__(self, module: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(module, garbage_collect_values=False)
        self.wanted, self.copies = wanted, {}

    def run_node(self, n):
        value = super().run_node(n)
        if n in self.wanted and isinstance(value, torch.Tensor):
            self.copies[n] = _copy(value)
        if n.op == "output":
            self.run_output = value
        return value


def _replay(nodes: list[fx.Node], value: torch.Tensor, env: dict) -> torch.Tensor | None:
    """``nodes`` (a chain of single-input ops) applied to ``value`` in place of their first input."""
    for node in nodes:
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        rest = fx.node.map_arg((node.args[1:], node.kwargs), lambda n: env[n])
        value = node.target(value, *rest[0], **rest[1])
    return value


def _between(source: fx.Node, target: fx.Node) -> list[fx.Node]:
    """The nodes on some path from ``source`` to ``target`` (both included), in graph order."""
    inside = _reachable(target, lambda n: n.all_input_nodes) & _reachable(source, lambda n: n.users)
    return [n for n in target.graph.nodes if n in inside]


def _reachable(start: fx.Node, neighbours) -> set[fx.Node]:
    """``start`` and every node reached from it through ``neighbours(node)``."""
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(neighbours(node))
    return seen


def _alone(region: _Region, float_input: torch.Tensor, env: dict):
    """The region's output with the float input in place of what reached it end to end (the nodes
    from the input's quantize, or its run-time qparams, to the chain's output, evaluated again), and
    the input its first op read then (the float input rounded onto the input grid)."""
    seen = env.get(region.input)
    if not isinstance(seen, torch.Tensor) or seen.shape != float_input.shape:
        return None, None
    local = {region.input: float_input.to(seen.device, seen.dtype, copy=True)}
    read = region.nodes[0].args[0]
    rounded = None
    for node in _between(region.input, region.materialised)[1:]:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: local[n] if n in local else env[n])
        local[node] = node.target(*args, **kwargs)
        if node is read:  # copied as read, before an in-place op of the chain (hardswish_) changes it
            rounded = _copy(local[node])
    if read is region.input:
        rounded = _copy(float_input)  # the chain reads the float value itself
    return _copy(local[region.materialised]), rounded


def _compare_graph(float_network: nn.Module, graph_module: fx.GraphModule, inputs: tuple) -> LayerReport:
    reference = _FloatRun(float_network, inputs)
    regions = _regions(graph_module, reference.modules)
    present = {_module_path(n) for n in graph_module.graph.nodes if _is_compute(n)}
    recorder = _Recorder(graph_module, {r.materialised for r in regions})
    device = _graph_device(graph_module)
    recorder.run(*(_to(x, device) for x in inputs))
    env = recorder.env

    def absent(name: str) -> bool:
        return name not in present

    occurrences: dict[str, int] = defaultdict(int)
    accumulators: dict[str, _Accumulator] = {}
    float_regions: dict[str, list[tuple[_Region, Callable]]] = defaultdict(list)  # per layer: each chain, its float code
    for region in regions:
        index = occurrences[region.anchor]
        occurrences[region.anchor] += 1
        calls = reference.by_module.get(region.anchor, [])
        if index >= len(calls):
            continue
        first = calls[index]
        last = reference.next_call(first, region.last_module) or first
        followers = reference.followers(last, absent)
        members = [first.name]
        for call in reference.calls[reference.position[id(first)] + 1: reference.position[id(last)] + 1]:
            members.append(call.name)
        members += [c.name for c in followers]
        expected = followers[-1].output if followers else last.output
        if expected is not None and region.trailing:
            expected = _replay(region.trailing, expected.clone(), env)
        float_regions[region.anchor].append((region, _float_layer(reference.modules, list(dict.fromkeys(members)),
                                                                  trailing=region.trailing, env=env)))
        alone, rounded = _alone(region, first.input, env) if first.input is not None else (None, None)
        if region.anchor not in accumulators:
            scale = _scale(region.output_quantize, env) if region.output_quantize is not None else None
            accumulators[region.anchor] = _Accumulator(
                region.anchor, type(reference.modules[region.anchor]).__name__, tuple(dict.fromkeys(members)), scale)
        accumulators[region.anchor].add(expected, recorder.copies.get(region.materialised), alone, first.input,
                                        rounded)
    results = [r for r in (acc.result() for acc in accumulators.values()) if r is not None]
    baseline = _copy(_first_tensor(recorder.run_output))
    gains = {layer.name: _skip_gain(layer.name, reference.output, baseline,
                                    lambda name=layer.name: _FloatRegionRun(graph_module, float_regions[name]).run(
                                        *(_to(x, device) for x in inputs)))
             for layer in results}
    return LayerReport([dataclasses.replace(layer, skip_gain_db=gains[layer.name]) for layer in results],
                       "pt2e graph")


class _FloatRegionRun(fx.Interpreter):
    """The int8 graph with the chains of one layer computed by its float modules: each chain's last op
    returns the float layer's output on the value the chain's first op reads (the dequantized input), so
    the chain's output quantize rounds it onto the layer's output grid as ``skip`` leaves it for the next
    layer; where that output is dequantized only for the graph's output, the float value goes there."""

    def __init__(self, graph_module: fx.GraphModule, float_regions: list[tuple[_Region, Callable]]):
        # Values kept: a chain's input is read again at its last op.
        super().__init__(graph_module, garbage_collect_values=False)
        self.replaced: dict[fx.Node, tuple[fx.Node, Callable]] = {}  # node -> (the value read, float code)
        for region, float_layer in float_regions:
            read = region.input if _only_reader_of_input(region) else region.nodes[0].args[0]
            self.replaced[region.nodes[-1]] = (read, float_layer)
            if region.output_quantize is not None:
                dequantized = list(region.output_quantize.users)
                if dequantized and all(_is_dequantize(d) and all(u.op == "output" for u in d.users)
                                       for d in dequantized):
                    self.replaced.update({d: (read, float_layer) for d in dequantized})

    def run_node(self, n):
        if n not in self.replaced:
            return super().run_node(n)
        read, float_layer = self.replaced[n]
        return float_layer(self.env[read])


def _only_reader_of_input(region: _Region) -> bool:
    """Whether the chain is all that reads a network input (through its quantize / dequantize): ``skip``
    then leaves that input float, with no quantize."""
    if region.input.op != "placeholder":
        return False
    for quantize in region.input.users:
        if not quantize.users and not _is_quantize(quantize):
            continue  # torch.export's input checks (``_guards_fn``): nothing reads their result
        if not _is_quantize(quantize):
            return False
        for dequantize in quantize.users:
            if not _is_dequantize(dequantize) or set(dequantize.users) != {region.nodes[0]}:
                return False
    return bool(region.input.users)


def _graph_device(gm: fx.GraphModule) -> torch.device:
    for tensor in list(gm.parameters()) + list(gm.buffers()):
        return tensor.device
    return torch.device("cpu")


def _graph_of(quantized: nn.Module) -> fx.GraphModule | None:
    """The Q/DQ graph of a PT2E int8 network (``ExportedNetwork`` or its graph module), else None."""
    graph_module = getattr(quantized, "graph_module", quantized)
    if not isinstance(graph_module, fx.GraphModule):
        return None
    if any(_is_dequantize(n) for n in graph_module.graph.nodes):
        return graph_module
    return None


@torch.no_grad()
def compare_layers(float_network: nn.Module, quantized_network: nn.Module, inputs) -> LayerReport:
    """Per quantized layer, in execution order: SQNR of its output in ``quantized_network`` against
    ``float_network`` (end to end), and of the layer alone fed the float input (its own error).

    Args:
        float_network: the float network the int8 one was made from (run in eval behaviour; its mode,
            weights and hooks are left as they were).
        quantized_network: an int8 network made from it: ``callback.quantized_model`` of
            :class:`~qlightning.PostTrainingQuantization` or :class:`~qlightning.QuantizationAwareTraining`
            in any mode (eager's ``EagerQuantWrapper``, FX's converted GraphModule, PT2E's
            ``ExportedNetwork`` or a converted graph module).
        inputs: a batch: one tensor, or a tuple of the network's positional inputs (not modified).

    Returns:
        A :class:`LayerReport`: one :class:`LayerError` per quantized layer (see the module docstring
        for what a layer is in each mode), ``report.worst(n)`` the layers with the most error of their
        own, ``report.to_json()`` for files.

    Raises:
        ValueError: ``quantized_network`` has no quantized layer this function can read (a fake-quant
            network from ``prepare``, or the float network itself).
    """
    from qlightning.passes.graph import is_quantizer

    inputs = inputs if isinstance(inputs, tuple) else (tuple(inputs) if isinstance(inputs, list) else (inputs,))
    if _graph_of(float_network) is not None or any(
            is_quantizer(m) or _is_quantized_layer(m) for m in float_network.modules()):
        raise ValueError(
            f"float_network ({type(float_network).__name__}) holds quantizers or int8 layers: pass the float network "
            "the int8 one was made from. QuantizationAwareTraining replaces the LightningModule's network with its "
            "fake-quantized one; keep a copy of the float network from before fit (its weights are the ones before "
            "QAT training, so the SQNRs then include what training changed)"
        )
    with torch.inference_mode(False):
        graph_module = _graph_of(quantized_network)
        if graph_module is not None:
            report = _compare_graph(float_network, graph_module, inputs)
        elif any(_is_quantized_layer(m) for m in quantized_network.modules()):
            report = _compare_modules(float_network, quantized_network, inputs)
        else:
            raise ValueError(
                f"{type(quantized_network).__name__} has no int8 layers to compare: pass the converted network "
                "(callback.quantized_model), not the float network or a fake-quantized one (prepared / finalized "
                "networks compute in float or fake-quantize; they are not read by compare_layers)"
            )
    # A module that computes nothing in eval (dropout, identity) has no error of its own to rank, only the
    # re-quantization of its input (mobilenet_v2's classifier.0 was listed, and skipping it changed nothing).
    modules = dict(float_network.named_modules())
    report = LayerReport([layer for layer in report
                          if not isinstance(modules.get(layer.name), (nn.Identity, nn.modules.dropout._DropoutNd))],
                         report.source)
    if not report:
        raise ValueError(
            f"no int8 layer of {type(quantized_network).__name__} matches a module of {type(float_network).__name__}: "
            "pass the float network the int8 one was converted from"
        )
    return report


def trained_float_network(float_template: nn.Module, prepared: nn.Module) -> nn.Module:
    """The float network with the weights QAT trained into ``prepared`` (any mode), as the float
    reference of :func:`compare_layers` for a QAT int8 model.

    ``float_template`` is a copy of the network before preparation (its architecture; its weights are
    replaced). Each mode keeps the trained tensors under names derived from the float ones: PT2E under
    ``graph_module.``, eager under its wrapper's ``net.``; a fused QAT conv-bn keeps its BatchNorm as
    ``<conv>.bn`` (eager/FX); a float fused group is a Sequential ``<conv>.0``, ``<conv>.1`` ...; an eager
    layer kept float sits in ``<name>.module``. Raises ``ValueError`` when a float tensor has no trained
    counterpart of its shape."""
    from qlightning.modes.fusion import find_modules_to_fuse

    twin = copy.deepcopy(float_template)
    wanted = twin.state_dict()
    prefix = {"ExportedNetwork": "graph_module.", "EagerQuantWrapper": "net."}.get(type(prepared).__name__, "")
    member = {}  # a fused module's child -> the float module it came from
    for group in find_modules_to_fuse(twin):
        for index, name in enumerate(group):
            member[f"{group[0]}.{index}"] = name
        if len(group) >= 2 and isinstance(twin.get_submodule(group[1]), nn.modules.batchnorm._BatchNorm):
            member[f"{group[0]}.bn"] = group[1]
    found = {}
    for key, value in prepared.state_dict().items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):].replace(".module.", ".")
        owner, _, attr = name.rpartition(".")
        if owner:  # a top-level tensor (ViT's class_token) has no owner module to map
            name = f"{member.get(owner, owner)}.{attr}"
        if name in wanted and wanted[name].shape == value.shape:
            found[name] = value.detach().cpu().clone()
    missing = [k for k in wanted if k not in found]
    if missing:
        raise ValueError(f"no trained tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''} in the prepared "
                         f"{type(prepared).__name__}")
    twin.load_state_dict(found)
    return twin.eval()
