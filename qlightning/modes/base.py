"""What every quantization mode provides to the callbacks."""

from __future__ import annotations

import copy
import logging
import math
import re
import traceback
from abc import ABC, abstractmethod

import torch
from torch import nn

from qlightning.backends import Backend
from qlightning.errors import QuantizationConfigError, UntraceableModelError
from qlightning.spec import QuantRecipe

log = logging.getLogger(__name__)

_OTHER_MODES_HINT = {
    "eager": "mode='fx' or mode='pt2e', which place quant/dequant around every op themselves. Eager mode needs a "
    "network written for it: residual adds, cat and mul through torch.ao.nn.quantized.FloatFunctional, its own "
    "QuantStub/DeQuantStub where needed; torchvision ships such variants in torchvision.models.quantization (resnet, "
    "mobilenet_v2/v3, shufflenet_v2, googlenet, inception_v3; build them with quantize=False), which eager mode "
    "accepts as they are",
    "fx": "mode='pt2e' (torch.export accepts shape-dependent Python and functional code that FX symbolic "
    "tracing rejects) or mode='eager' (no tracing at all)",
    "pt2e": "mode='fx' (symbolic tracing can leave untraceable submodules as leaves) or mode='eager'",
}


class QuantMode(ABC):
    name: str
    # Whether QAT can train the prepared network through torch.compile (``compile_training``).
    compiles_training: bool = False

    @abstractmethod
    def prepare_qat(
        self, network: nn.Module, example_inputs: tuple, recipe: QuantRecipe, backend: Backend, **options
    ) -> nn.Module:
        """Return the network with fake quantization inserted, ready to train."""

    @abstractmethod
    def prepare_ptq(
        self, network: nn.Module, example_inputs: tuple, recipe: QuantRecipe, backend: Backend, **options
    ) -> nn.Module:
        """Return a copy of the network in eval mode with observers inserted, ready to calibrate."""

    @abstractmethod
    def quantize_dynamic(
        self, network: nn.Module, example_inputs: tuple, recipe: QuantRecipe, backend: Backend, **options
    ) -> nn.Module:
        """Return a copy of the network with int8 Linear/LSTM/GRU weights whose activations are
        quantized at run time (no calibration)."""

    @abstractmethod
    def convert(self, prepared: nn.Module, backend: Backend) -> nn.Module:
        """Return an int8 model built from a *copy* of ``prepared``; ``prepared`` is left trainable."""

    def check_compilable(self, observer: str) -> None:
        """Raise ``QuantizationConfigError`` unless ``compile_training`` can train with ``observer``."""

    def compile_training(self, prepared: nn.Module, options: dict) -> None:
        """Make ``prepared``'s training forwards run through ``torch.compile(**options)``."""
        raise NotImplementedError(f"mode {self.name!r} does not compile training")

    @abstractmethod
    def observers(self, prepared: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, observer module) for every observer of a network made by :meth:`prepare_ptq`."""

    @abstractmethod
    def quantizers(self, prepared: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, fake-quantize module) for every quantizer in the prepared network."""

    @abstractmethod
    def set_observers_enabled(self, prepared: nn.Module, enabled: bool) -> None:
        """Start or stop qparam updates (min/max statistics, or LSQ gradient learning)."""

    @abstractmethod
    def freeze_bn(self, prepared: nn.Module) -> None:
        """Stop BatchNorm statistics updates: from now on BN normalises with its running stats."""

    def enforce_frozen_bn(self, prepared: nn.Module) -> None:
        """Called before every training batch once BN is frozen, since ``model.train()`` may undo it."""

    @abstractmethod
    def bn_modules_or_nodes(self, prepared: nn.Module) -> list:
        """The BatchNorms of the prepared network (for tests and monitoring)."""

    # -- fit-end post-processing -------------------------------------------------------------------
    def unobserved_on_the_forward_path(self, prepared: nn.Module) -> list[str]:
        """Quantizers that saw no data although forward runs through them. In a captured graph (FX,
        PT2E) every quantizer is on the path, so any unobserved one counts."""
        return unobserved_quantizers(prepared)

    def finalize(self, prepared: nn.Module, example_inputs: tuple, *, fold_bn: bool = True,
                 merge_relu: bool = True, share_split: bool = False, check_inputs: tuple | None = None,
                 keep_shared_quantizers: bool = False) -> nn.Module:
        """A copy of a trained/calibrated network, observers frozen, with the deployment passes
        applied: BatchNorm folded and ReLU/clamp merged into qparams. Exporters and ``convert``
        start from it; ``prepared`` itself stays trainable. ``check_inputs`` (real data; default: the
        example inputs) are what the ReLU/clamp merge is verified on: ``example_input_array`` is often
        random, and on random images a correct merge measured 1.7 dB worse against float while real
        validation images measured it better (googlenet, issue 17). ``keep_shared_quantizers``: the
        merge leaves a clamp whose input quantizer is shared by several ops (a backend whose concat
        needs one scale on its inputs and output: :attr:`Backend.same_scale_concat`)."""
        unobserved = self.unobserved_on_the_forward_path(prepared)
        if unobserved:
            raise QuantizationConfigError(
                f"{len(unobserved)} quantizers saw no data before conversion ({_shown(unobserved)}): the network "
                "never ran during training or calibration. Check that `module=` names the network the LightningModule "
                "calls in its steps, and that some batches were run"
            )
        overflowed = overflowed_quantizers(prepared)
        if overflowed:
            raise QuantizationConfigError(
                f"{len(overflowed)} quantizers observed NaN/inf values or a range too wide for float32 "
                f"({_shown(overflowed)}): "
                "their scale would be NaN or inf. The activations diverged or overflowed; check the loss for "
                "NaN/inf, lower the learning rate, or normalise the inputs"
            )
        model = copy.deepcopy(prepared).cpu().eval()
        self.set_observers_enabled(model, False)
        example_inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in batch_of_two(example_inputs))
        if fold_bn:
            self.fold_bn(model, example_inputs)
        if merge_relu:
            graph = self.graph_of(model)
            if graph is None:
                log.debug("merge_relu: mode=%s has no graph to rewrite (eager fuses conv/linear-relu itself)", self.name)
            else:
                from qlightning.passes.merge_clamp import merge_relu_clamp

                checks = example_inputs if check_inputs is None else tuple(
                    x.cpu() if isinstance(x, torch.Tensor) else x for x in check_inputs)
                merge_relu_clamp(graph, checks, keep_shared=keep_shared_quantizers)
        if share_split and self.graph_of(model) is not None:
            from qlightning.passes.share_split import share_split_qparams

            share_split_qparams(self.graph_of(model))
        self.freeze_qparams(model)
        return model

    def freeze_qparams(self, model: nn.Module) -> None:
        """Make the finalized model's quantizers report exactly the qparams they fake-quantize with
        (used by :meth:`finalize`; by default nothing to do)."""

    def fold_bn(self, model: nn.Module, example_inputs: tuple) -> None:
        """Fold the QAT BatchNorms of ``model`` in place (used by :meth:`finalize`)."""

    def graph_of(self, model: nn.Module):
        """The ``torch.fx.GraphModule`` holding the quantizers, or ``None`` (eager)."""
        return None

    def untraceable(self, network: nn.Module, exc: BaseException) -> UntraceableModelError:
        """Wrap a capture failure in an error naming the mode, the failing op and another mode."""
        return UntraceableModelError(
            f"mode={self.name!r} could not capture {type(network).__name__}: the failing op is "
            f"{describe_failure(exc)}. Refactor that code, or try {_OTHER_MODES_HINT[self.name]}."
        )


def _shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _statistics(model: nn.Module):
    """(name, quantizer, min_val, max_val) of every min/max-based quantizer of ``model``."""
    from qlightning.passes.graph import is_quantizer, statistics_observers

    quantizers = [(name, m) for name, m in model.named_modules() if is_quantizer(m)]
    for name, module, observer in statistics_observers(quantizers):
        yield name, module, observer.min_val, observer.max_val


def never_observed(min_val: torch.Tensor, max_val: torch.Tensor) -> bool:
    """Whether min/max statistics are still the initial (+inf, -inf) (or empty, per channel)."""
    return min_val.numel() == 0 or bool((min_val == math.inf).all() and (max_val == -math.inf).all())


def statistics_quantizers(model: nn.Module) -> list[str]:
    """Names of the min/max-based quantizers of ``model`` (observed or not)."""
    return [name for name, _, _, _ in _statistics(model)]


def unobserved_quantizers(model: nn.Module) -> list[str]:
    """Names of the min/max-based quantizers whose observer has never seen a tensor."""
    return [name for name, _, min_val, max_val in _statistics(model) if never_observed(min_val, max_val)]


def overflowed_quantizers(model: nn.Module) -> list[str]:
    """Names of the quantizers whose statistics or qparams are not finite: they observed NaN/inf
    activations, or a range whose width (max - min) overflows float32 and so gives an inf scale."""
    from qlightning.passes.graph import is_fake_quantize

    names = []
    for name, module, min_val, max_val in _statistics(model):
        if min_val.numel() == 0:
            continue
        unobserved = (min_val == math.inf) & (max_val == -math.inf)
        observed_min, observed_max = min_val[~unobserved].float(), max_val[~unobserved].float()
        bad = not (torch.isfinite(observed_min).all() and torch.isfinite(observed_max).all())
        bad = bad or not torch.isfinite(observed_max - observed_min).all()
        scale = getattr(module, "scale", None)
        if is_fake_quantize(module) and isinstance(scale, torch.Tensor) and not unobserved.any():
            bad = bad or not torch.isfinite(scale).all()
        if bad:
            names.append(name)
    return names


def describe_failure(exc: BaseException) -> str:
    """The user-code line that failed plus the first line of the error, as compactly as possible."""
    user_frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not re.search(r"[/\\](torch|torchao|lightning|qlightning|contextlib)[/\\]", f.filename)
        and "<eval_with_key>" not in f.filename
    ]
    message = str(exc).strip()
    # torch.export / dynamo put the user frame in the message itself.
    match = re.search(r"from user code:\s*(.*)", message, re.S)
    location = ""
    if match:
        lines = [line.strip() for line in match.group(1).splitlines() if line.strip()]
        location = " ".join(lines[-2:])
    elif user_frames:
        f = user_frames[-1]
        location = f"File {f.filename}, line {f.lineno}, in {f.name}: {f.line}"
    first_line = message.splitlines()[0] if message else type(exc).__name__
    summary = f"`{location}`" if location else "unknown"
    return f"{summary} ({type(exc).__name__}: {first_line[:300]})"


def dynamic_batch(example_inputs: tuple, dim) -> tuple:
    """``torch.export`` dynamic_shapes making dimension 0 of every tensor input ``dim``."""
    return tuple({0: dim} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)


def batch_of_two(example_inputs: tuple) -> tuple:
    """Make every tensor input's batch dimension 2.

    torch.export treats sizes 0 and 1 as static, so a batch-1 example would freeze the batch size;
    BatchNorm in training mode also rejects single-sample batches.
    """
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
            x = torch.cat([x, x], dim=0)
        out.append(x)
    return tuple(out)
