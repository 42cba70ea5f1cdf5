"""``skip=`` in PT2E: the backend's Quantizer annotates the exported graph, then the annotations of
nodes that come from a skipped module are removed, so prepare / convert leave those nodes float.

A node's origin is its ``nn_module_stack`` metadata (the module path torch.export recorded for it).
Annotations elsewhere may share qparams with an edge or node that lost its annotation
(``SharedQuantizationSpec``: a max-pool sharing its input's qparams); those get the spec the shared
location had, so they are still observed, on their own.
"""

from __future__ import annotations

from typing import Sequence

import torch

from qlightning.skip import is_skipped

_ANNOTATION = "quantization_annotation"


def module_paths(node: torch.fx.Node) -> list[str]:
    """The module paths of ``node``'s ``nn_module_stack``, outermost first ("" is the network itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


def from_skipped_module(node: torch.fx.Node, skipped: Sequence[str]) -> bool:
    return any(path and is_skipped(path, skipped) for path in module_paths(node))


def _shared_target(spec):
    return getattr(spec, "edge_or_node", None)


def strip_skipped_annotations(model: torch.fx.GraphModule, skipped: Sequence[str]) -> list[torch.fx.Node]:
    """Remove the quantization annotations of the nodes from ``skipped`` modules; returns those nodes."""
    if not skipped:
        return []
    # Every annotated location (a node's output, or an (input, node) edge) and its spec, before removal.
    located = {}
    for node in model.graph.nodes:
        annotation = node.meta.get(_ANNOTATION)
        if annotation is None:
            continue
        for arg, spec in annotation.input_qspec_map.items():
            located[(arg, node)] = spec
        if annotation.output_qspec is not None:
            located[node] = annotation.output_qspec
    # Parameters carry no module stack; a quantizer that annotates a weight's own output (LiteRT's) is
    # undone when every reader of the weight is a skipped op.
    stripped = [n for n in model.graph.nodes if _ANNOTATION in n.meta and (
        from_skipped_module(n, skipped)
        or n.op == "get_attr" and n.users and all(from_skipped_module(u, skipped) for u in n.users))]
    # Quantizers that annotate an op's output on its consumers' inputs (torchao's X86InductorQuantizer:
    # linear-relu's output is quantized by the next linear's input spec) would leave a quantized layer
    # in front of a skipped one with a float output: ONNX Runtime then cannot fuse it into an integer
    # kernel and runs it in float too. Such an edge's spec moves to the producer's output.
    stripped_set = set(stripped)  # membership tests below, over every annotated location of the graph
    boundary = [(arg, spec) for node in stripped for arg, spec in node.meta[_ANNOTATION].input_qspec_map.items()
                if spec is not None and arg not in stripped_set]
    for node in stripped:
        del node.meta[_ANNOTATION]
    removed = {loc for loc in located if (loc[1] if isinstance(loc, tuple) else loc) in stripped_set}

    def own_spec(spec):
        """Follow shared specs into removed locations until a spec that stands on its own."""
        seen = set()
        while _shared_target(spec) is not None and _shared_target(spec) in removed and _shared_target(spec) not in seen:
            seen.add(_shared_target(spec))
            spec = located[_shared_target(spec)]
        return None if _shared_target(spec) in removed else spec

    for node in model.graph.nodes:
        annotation = node.meta.get(_ANNOTATION)
        if annotation is None:
            continue
        annotation.input_qspec_map = {arg: own_spec(spec) for arg, spec in annotation.input_qspec_map.items()}
        if annotation.output_qspec is not None:
            annotation.output_qspec = own_spec(annotation.output_qspec)
    for producer, spec in boundary:
        annotation = producer.meta.get(_ANNOTATION)
        if annotation is not None and annotation.output_qspec is None:
            annotation.output_qspec = own_spec(spec)
    return stripped


def skipping_quantizer(quantizer, skipped: Sequence[str]):
    """``quantizer`` with its annotations removed from the nodes of ``skipped`` modules."""
    if not skipped:
        return quantizer
    from torchao.quantization.pt2e.quantizer import Quantizer

    class SkippingQuantizer(Quantizer):
        def transform_for_annotation(self, model):
            return quantizer.transform_for_annotation(model)

        def annotate(self, model):
            model = quantizer.annotate(model)
            strip_skipped_annotations(model, skipped)
            return model

        def validate(self, model):
            quantizer.validate(model)

        def prepare_obs_or_fq_callback(self, model, edge_or_node_to_obs_or_fq):
            callback = getattr(quantizer, "prepare_obs_or_fq_callback", None)
            if callback is not None:
                callback(model, edge_or_node_to_obs_or_fq)

    return SkippingQuantizer()
