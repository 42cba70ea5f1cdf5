"""PT2E mode: ``torch.export`` with a dynamic batch dimension, torchao ``prepare_qat_pt2e`` with the
backend's Quantizer, ``convert_pt2e``."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchao.quantization import pt2e as ao_pt2e
from torchao.quantization.pt2e import observer as ao_observer
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

from qlightning.backends import Backend
from qlightning.calibration_pt2e import observer_class
from qlightning.modes.base import QuantMode, batch_of_two, dynamic_batch
from qlightning.modes.pt2e_kernels import QuantizeDequantizeFakeQuantize
from qlightning.modes.pt2e_skip import skipping_quantizer
from qlightning.modes.pt2e_dynamic import (
    DynamicLinearRnnQuantizer,
    dynamic_activation_spec,
    observer_spec,
    static_spec,
)
from qlightning.observers import get_observer
from qlightning.passes.graph import clone_parameter_views_into_quantizers
from qlightning.passes.pt2e_fold_bn import fold_qat_conv_bn, unscale_by_reciprocal
from qlightning.passes.split_reused_modules import split_reused_module_partitions
from qlightning.spec import QuantRecipe, TensorQuantSpec, fused_kernel_keeps

aten = torch.ops.aten
# Ops whose train/eval behaviour is a boolean argument of the node, and that argument's position.
_BATCHNORM_TRAINING_ARG = {aten.batch_norm.default: 5, aten._native_batch_norm_legit.default: 5}
_DROPOUT_TRAINING_ARG = {aten.dropout.default: 2, aten.dropout_.default: 2, aten.feature_dropout.default: 2}
# Random ops traced from Python that branches on ``self.training`` (torchvision's stochastic depth:
# ``empty().bernoulli_(p).div_(p)`` times the residual branch) have no training flag to switch. In eval
# behaviour each becomes its expectation (a tensor filled with p), so mask / p is exactly 1 and the
# branch passes unchanged, as in eager eval; training behaviour restores the random op.
_RANDOM_EXPECTATION = {aten.bernoulli_.float: aten.fill_.Scalar, aten.bernoulli.p: aten.full_like.default}
_RANDOM_ORIGINAL = "qlightning_random_op"


def set_exported_training(gm: torch.fx.GraphModule, batchnorm: bool, dropout: bool) -> None:
    """Switch BatchNorm and dropout nodes of an exported graph between train and eval behaviour.

    ``model.train()`` does not reach into an exported graph. torchao's helper rewrites whole
    subgraphs by pattern matching on every call (slow, and it loses custom momentum/eps); the
    training flag is a plain argument of these aten ops, so we set it directly. Random ops traced
    from training-only Python branches (stochastic depth) follow ``dropout``: see _RANDOM_EXPECTATION.
    """
    changed = False
    for node in gm.graph.nodes:
        for table, value in ((_BATCHNORM_TRAINING_ARG, batchnorm), (_DROPOUT_TRAINING_ARG, dropout)):
            position = table.get(node.target)
            if position is not None and node.args[position] != value:
                args = list(node.args)
                args[position] = value
                node.args = tuple(args)
                changed = True
        if not dropout and node.target in _RANDOM_EXPECTATION:
            node.meta[_RANDOM_ORIGINAL] = node.target
            node.target = _RANDOM_EXPECTATION[node.target]
            changed = True
        elif dropout and _RANDOM_ORIGINAL in node.meta:
            node.target = node.meta.pop(_RANDOM_ORIGINAL)
            changed = True
        # The training graph counts batches in a separate `num_batches_tracked.add_(1)`; eager BatchNorm
        # counts only in training, so in eval behaviour the node adds 0 (validation must not change state).
        if _is_batch_counter(node) and node.args[1] != int(batchnorm):
            node.args = (node.args[0], int(batchnorm))
            changed = True
    if changed:
        gm.recompile()


_DIVIDES = {aten.div.Tensor, aten.div_.Tensor, aten.div.Scalar, aten.div_.Scalar}


def drop_unit_masks(gm: torch.fx.GraphModule) -> int:
    """Remove ``x * mask`` where ``mask`` is a random op's expectation divided by itself (stochastic depth
    in eval behaviour: ``fill(p) / p``, exactly 1), through any quantize / dequantize pairs the quantizer
    put on the mask. An inference-only graph then holds what eager eval computes, the residual branch
    itself: efficientnet_b0's PT2E QAT ONNX file had kept 9 Expand -> Div -> Mul chains multiplying by
    one (issue 17). Returns how many products were removed."""
    removed = 0
    for fill in list(gm.graph.nodes):
        if fill.target not in (aten.fill_.Scalar, aten.full_like.default):
            continue
        for div in list(fill.users):
            if div.target not in _DIVIDES or div.args[0] is not fill or div.args[1] != fill.args[1]:
                continue
            for user in list(div.users):
                chain = [user]
                while (chain[-1].target is not aten.mul.Tensor and len(chain[-1].users) == 1
                       and "quantize" in str(chain[-1].target)):
                    chain.append(next(iter(chain[-1].users)))
                mul = chain[-1]
                if mul.target is not aten.mul.Tensor or len(mul.args) != 2:
                    continue
                mask = chain[-2] if len(chain) > 1 else div
                other = mul.args[1] if mul.args[0] is mask else mul.args[0]
                kept, product = _value_of(other), _value_of(mul)
                if kept is None or product is None or kept.shape != product.shape:
                    continue  # the mask would broadcast the other operand
                mul.replace_all_uses_with(other)
                _erase_unused([*reversed(chain), div, fill], gm.graph)
                removed += 1
    if removed:
        gm.recompile()
    return removed


def _erase_unused(nodes: list, graph: torch.fx.Graph) -> None:
    """Erase ``nodes`` (users first) and then their inputs, each only once nothing uses it. Not FX's
    dead-code pass: that keeps the in-place fill, or (told otherwise) drops every unused in-place op."""
    pending, erased = list(nodes), set()
    while pending:
        node = pending.pop(0)
        if node not in erased and not node.users and node.op == "call_function":
            pending.extend(node.all_input_nodes)
            graph.erase_node(node)
            erased.add(node)


def _value_of(node):
    """The example value of ``node``, looked up through the quantize / dequantize nodes conversion
    inserted without one."""
    while "val" not in node.meta and "quantize" in str(node.target) and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node.meta.get("val")


def _is_batch_counter(node: torch.fx.Node) -> bool:
    counter = node.args[0] if node.target == aten.add_.Tensor and node.args else None
    return isinstance(counter, torch.fx.Node) and counter.op == "get_attr" and str(counter.target).endswith(
        "num_batches_tracked"
    )


def batchnorm_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target in _BATCHNORM_TRAINING_ARG]


class ExportedNetwork(nn.Module):
    """Holds an exported graph and makes ``train()``/``eval()`` mean what they mean in eager.

    Frozen BatchNorm stays in eval behaviour through ``train()``; dropout follows the mode. An
    ``inference_only`` network (a converted int8 graph) keeps eval behaviour whatever the mode.

    The graph's behaviour is synchronised with ``self.training`` at every forward, not only in
    ``train()``: Lightning restores the mode after validation by assigning ``module.training``
    directly, and a graph switched only in ``train()`` stayed in eval behaviour for the rest of fit
    (BatchNorm never updated its statistics during PT2E QAT).
    """

    def __init__(self, graph_module: torch.fx.GraphModule, inference_only: bool = False):
        super().__init__()
        self.graph_module = graph_module
        self.inference_only = inference_only
        self.bn_frozen = False
        self._graph_behaviour: tuple[bool, bool] | None = None  # (batchnorm, dropout) training flags in the graph
        # torch.compile options when training forwards run compiled (compile_training), else None.
        self.compile_options: dict | None = None
        # The compiled training graphs, by behaviour; never copied or pickled (see __getstate__).
        self._compiled: dict[tuple[bool, bool], nn.Module] = {}
        self.train(not inference_only)

    def forward(self, *args):
        self._sync_graph_behaviour()
        compiled = self._compiled_graph() if self.compile_options is not None else None
        return (self.graph_module if compiled is None else compiled)(*args)

    def compile_training(self, **options) -> None:
        """Run training-behaviour forwards through ``torch.compile(**options)`` from now on.

        Each training behaviour (BatchNorm updating or frozen) gets its own compiled copy of the graph,
        sharing this network's parameters, buffers and quantizers: switching to validation rewrites the
        graph's training flags (``set_exported_training``), and a rewritten graph is new code to dynamo,
        which would compile it again at every switch. Evaluation runs uncompiled. The quantizers must be
        branch-free first (:func:`qlightning.modes.pt2e_compile.compilable_quantizers`)."""
        self.compile_options = dict(options)
        self._compiled = {}

    def _compiled_graph(self) -> nn.Module | None:
        behaviour = self._graph_behaviour
        if not behaviour[1] or not torch.is_grad_enabled():
            return None  # evaluation, or a no-grad forward in train mode
        compiled = self._compiled.get(behaviour)
        if compiled is None:
            from qlightning.modes.pt2e_compile import quantizers_sized

            if not quantizers_sized(self.graph_module):
                return None  # per-channel observers size their buffers on the first batch, uncompiled
            variant = torch.fx.GraphModule(self.graph_module, copy.deepcopy(self.graph_module.graph))
            compiled = self._compiled[behaviour] = torch.compile(variant, **self.compile_options)
        return compiled

    def __getstate__(self):
        # Compiled graphs hold dynamo's caches and code: copies and pickles recompile on first use.
        return {**self.__dict__, "_compiled": {}}

    def _apply(self, fn, recurse=True):
        # A move to another device or dtype replaces buffer tensors (BN running stats) in their owning
        # modules, and a compiled copy of the graph holds its own references to the graph's buffers: compile
        # again then. Lightning's teardown .cpu() of a CPU network returns the same tensors: keep them.
        buffers = [id(b) for b in self.buffers()]
        result = super()._apply(fn, recurse)
        if [id(b) for b in self.buffers()] != buffers:
            self._compiled = {}
        return result

    def train(self, mode: bool = True):
        # torchao makes ``train()`` on the exported graph raise; the flag itself is harmless to set.
        for module in self.modules():
            module.training = mode
        self._sync_graph_behaviour()
        return self

    def _sync_graph_behaviour(self) -> None:
        training = self.training and not self.inference_only
        wanted = (training and not self.bn_frozen, training)
        if wanted != self._graph_behaviour:
            set_exported_training(self.graph_module, batchnorm=wanted[0], dropout=wanted[1])
            self._graph_behaviour = wanted


def quantization_spec(
    spec: TensorQuantSpec, observer_name: str, learnable: bool, qat: bool = True, **options
) -> QuantizationSpec:
    """``options``: keyword options of the observer (``QuantRecipe.observer_options``, activations only)."""
    if not qat:
        # Static PTQ: plain observers, calibrated then converted; nothing is fake-quantized.
        return observer_spec(spec, observer_name, **options)
    observer = observer_class(observer_name).with_args(**options) if options else observer_class(observer_name)
    if learnable:
        ctor = ao_pt2e.LearnableFakeQuantize.with_args(observer=observer, use_grad_scaling=True, eps=spec.eps)
    elif fused_kernel_keeps(spec, observer_name):  # symmetric specs: see fused_kernel_keeps
        # torchao's fused module, fake-quantizing through vectorized kernels: see pt2e_kernels.
        ctor = QuantizeDequantizeFakeQuantize.with_args(observer=observer, eps=spec.eps)
    else:
        ctor = ao_pt2e.FakeQuantize.with_args(observer=observer, eps=spec.eps)
    return static_spec(spec, ctor)


def quantization_config(recipe: QuantRecipe, qat: bool) -> QuantizationConfig:
    choice = get_observer(recipe.observer)
    weight_observer = choice.weight_per_channel_observer if recipe.weight.per_channel else choice.weight_observer
    activation = quantization_spec(recipe.activation, choice.activation_observer, choice.learnable, qat,
                                   **dict(recipe.observer_options))
    weight = quantization_spec(recipe.weight, weight_observer, choice.learnable, qat)
    return QuantizationConfig(activation, activation, weight, None, is_qat=qat)


def export_network(network: nn.Module, example_inputs: tuple) -> torch.fx.GraphModule:
    example_inputs = batch_of_two(example_inputs)
    dynamic_shapes = dynamic_batch(example_inputs, torch.export.Dim.AUTO)
    graph_module = torch.export.export(network, example_inputs, dynamic_shapes=dynamic_shapes).module()
    split_reused_module_partitions(graph_module)
    return graph_module


def _drop_unreferenced_tensors(gm: torch.fx.GraphModule) -> None:
    """Delete parameters and buffers no graph node reads any more.

    After conversion the float weights (and the conv-bn fold's float copies) are replaced by int8
    constants, but stay attached to the module, doubling its size in any ``state_dict``.
    """
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if name not in used:
            owner_name, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_name)
            owner._parameters.pop(attr, None)
            owner._buffers.pop(attr, None)


def _fake_quantizers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, ao_pt2e.FakeQuantizeBase)]


class Pt2eMode(QuantMode):
    name = "pt2e"
    compiles_training = True

    def check_compilable(self, observer: str) -> None:
        from qlightning.modes.pt2e_compile import check_compilable_observer

        check_compilable_observer(get_observer(observer))

    def compile_training(self, prepared: ExportedNetwork, options: dict) -> None:
        from qlightning.modes.pt2e_compile import compilable_quantizers

        compilable_quantizers(prepared)
        prepared.compile_training(**options)

    def _export(self, network, example_inputs) -> torch.fx.GraphModule:
        try:
            return export_network(network, example_inputs)
        except Exception as exc:  # noqa: BLE001 - torch.export raises many exception types
            raise self.untraceable(network, exc) from exc

    def prepare_qat(self, network, example_inputs, recipe: QuantRecipe, backend: Backend, skip=(), **_):
        quantizer = skipping_quantizer(backend.pt2e_quantizer(quantization_config(recipe, qat=True)), skip)
        graph_module = prepare_qat_pt2e(self._export(network.train(), example_inputs), quantizer)
        unscale_by_reciprocal(graph_module)
        clone_parameter_views_into_quantizers(graph_module)
        prepared = ExportedNetwork(graph_module)
        if get_observer(recipe.observer).learnable:
            # LearnableFakeQuantize creates its scale parameters on first use: do it now, in eval
            # (BN statistics untouched), so the optimizer made after setup sees and trains them.
            with torch.no_grad():
                prepared.eval()(*batch_of_two(example_inputs))
            prepared.train()
            for _, fq in _fake_quantizers(prepared):
                if isinstance(fq, ao_pt2e.LearnableFakeQuantize):
                    fq.enable_range_learning()
        return prepared

    def prepare_ptq(self, network, example_inputs, recipe: QuantRecipe, backend: Backend, skip=(), **_):
        quantizer = skipping_quantizer(backend.pt2e_quantizer(quantization_config(recipe, qat=False)), skip)
        was_training = network.training
        exported = self._export(network.eval(), example_inputs)
        network.train(was_training)
        # prepare_pt2e folds BatchNorm into the preceding conv/linear before observing.
        observed = prepare_pt2e(exported, quantizer)
        clone_parameter_views_into_quantizers(observed)
        return ExportedNetwork(observed, inference_only=True)

    def quantize_dynamic(self, network, example_inputs, recipe: QuantRecipe, backend: Backend, skip=(), **_):
        choice = get_observer(recipe.observer)
        weight_observer = choice.weight_per_channel_observer if recipe.weight.per_channel else choice.weight_observer
        quantizer = skipping_quantizer(DynamicLinearRnnQuantizer(
            dynamic_activation_spec(recipe.activation), observer_spec(recipe.weight, weight_observer)
        ), skip)
        was_training = network.training
        exported = self._export(network.eval(), example_inputs)
        network.train(was_training)
        observed = prepare_pt2e(exported, quantizer)
        # Weight observers only need the (constant) weights; one pass over the example records them.
        with torch.no_grad():
            observed(*batch_of_two(example_inputs))
        # Converted without the usual defensive copy: a deep copy leaves the annotations pointing
        # at the old graph's nodes, and convert_pt2e then cannot find a dynamic input's
        # choose_qparams node. ``observed`` is ours alone, so nothing else sees it change.
        return self._convert_in_place(observed.cpu())

    def convert(self, prepared: ExportedNetwork, backend, fold_quantize: bool = True):
        """``fold_quantize=False`` keeps float weights behind quantize/dequantize pairs instead of int8
        constants: the layout litert-torch's converter needs (litert-torch issue 400)."""
        return self._convert_in_place(copy.deepcopy(prepared.graph_module).cpu(), fold_quantize)

    @staticmethod
    def _convert_in_place(graph: torch.fx.GraphModule, fold_quantize: bool = True) -> ExportedNetwork:
        set_exported_training(graph, batchnorm=False, dropout=False)
        fold_qat_conv_bn(graph)
        converted = convert_pt2e(graph, fold_quantize=fold_quantize)
        drop_unit_masks(converted)
        _drop_unreferenced_tensors(converted)
        return ExportedNetwork(converted, inference_only=True)

    def fold_bn(self, model: ExportedNetwork, example_inputs):
        fold_qat_conv_bn(model.graph_module)

    def freeze_qparams(self, model: ExportedNetwork) -> None:
        # A fused moving-average fake-quantizer computes the scale it applies inside its kernel, and
        # convert_pt2e asks its observer instead: the two differ slightly (SQNR 34 dB between the
        # fake-quantized and converted SmallCNN, measured). Swap every fake-quantizer for a fixed one
        # holding the qparams training used, so the converted model is the model that was trained.
        from qlightning.passes.exact_qparams import freeze_exact_qparams

        freeze_exact_qparams(model.graph_module, fake_quantizers_only=True)

    def graph_of(self, model: ExportedNetwork):
        return model.graph_module

    def quantizers(self, prepared):
        return _fake_quantizers(prepared)

    def observers(self, prepared):
        return [(n, m) for n, m in prepared.named_modules() if isinstance(m, ao_observer.ObserverBase)]

    def set_observers_enabled(self, prepared, enabled):
        for _, fq in _fake_quantizers(prepared):
            if isinstance(fq, ao_pt2e.LearnableFakeQuantize):
                if enabled:
                    fq.enable_range_learning()
                else:
                    fq.disable_range_learning()
            else:
                fq.enable_observer(enabled)

    def freeze_bn(self, prepared: ExportedNetwork):
        prepared.bn_frozen = True
        prepared.train(prepared.training)  # applies the frozen BN to the graph now, not at the next forward

    def bn_modules_or_nodes(self, prepared: ExportedNetwork):
        return batchnorm_nodes(prepared.graph_module)
