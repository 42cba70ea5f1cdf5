"""LiteRT (TFLite): the `tflite` backend (litert-torch's PT2E quantizer; an FX BackendConfig mirroring
its patterns) and `format="tflite"` (litert-torch's converter, verified in ai-edge-litert's
Interpreter with int8 tensors)."""

import copy
import json

import numpy as np
import pytest
import torch

from qlightning import QuantizationAwareTraining, export
from qlightning.errors import QuantizationConfigError
from qlightning.exporters import tflite_format
from qlightning.exporters.program import unfold_quantized_weights
from tests.conftest import labels, predictions, qat_from_float_baseline
from tests.test_passes import SmallCNN, _inputs, _trained


@pytest.mark.parametrize("mode", ["fx", "pt2e"])
def test_qat_digits_cnn_runs_in_litert_within_2_points_of_float(mode, float_baseline, digits, tmp_path):
    model, qat = qat_from_float_baseline(float_baseline, digits, mode, "tflite", export=["tflite"],
                                         export_dir=tmp_path)
    path = tmp_path / "net.tflite"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.json", "net.tflite", "net.tflite.report.json"]
    report = json.loads((tmp_path / "net.tflite.report.json").read_text())
    assert report["runtime"] == "ai-edge-litert"
    assert report["num_quantized_ops"] == 4 and report["num_float_ops"] == 0  # 2 convs + 2 fully connected, int8
    assert report["top1_agreement"] >= 0.99 and report["size_bytes"] < report["float_size_bytes"] / 2

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    dtypes = {t["dtype"] for t in interpreter.get_tensor_details()}
    assert np.int8 in dtypes and interpreter.get_input_details()[0]["dtype"] == np.int8

    val = digits.val_dataloader()
    litert_top1 = predictions(lambda x: tflite_format.run(path, (x,)), val)
    litert_acc = 100.0 * float((litert_top1 == labels(val)).mean())
    print(f"{mode}: float {float_baseline[1]:.2f}  LiteRT int8 {litert_acc:.2f}")
    assert litert_acc >= float_baseline[1] - 2.0
    model.eval()
    assert (predictions(model, val) == litert_top1).mean() >= 0.99
    # The int8 model in torch (FX: through PT2E, as no PyTorch kernel takes int8 activations) agrees too.
    assert (predictions(qat.quantized_model, val) == litert_top1).mean() >= 0.99


def test_a_converted_model_with_int8_weight_constants_is_unfolded_for_litert(tmp_path):
    """litert-torch rejects dequantize(int8 constant) (issue 400): a model converted with
    fold_quantize=True is unfolded to float weights + quantize/dequantize, computing the same."""
    impl, backend, prepared = _trained("pt2e", SmallCNN(), ptq=True, backend="tflite")
    converted = impl.convert(prepared, backend)  # int8 weight constants
    gm = copy.deepcopy(converted.graph_module)
    assert unfold_quantized_weights(gm) == 4
    x = _inputs(8)[0]
    torch.testing.assert_close(gm(x), converted(x), rtol=0, atol=0)
    report = export(converted, _inputs(4), "tflite", tmp_path / "net.tflite")
    assert report["num_quantized_ops"] == 4 and report["top1_agreement"] == 1.0


def test_tflite_export_without_its_extra_names_the_extra(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "litert_torch" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"format='tflite' needs litert_torch, which is not installed: "
                                          r"pip install 'qlightning\[tflite\]'"):
        # FX: the backend's BackendConfig needs no extra, so the format's check speaks (PT2E's quantizer is
        # litert-torch's, named by the backend check in tests/test_first_contact.py).
        QuantizationAwareTraining("fx", "tflite", export=["tflite"])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_tflite_file_runs_the_deployed_batch_and_the_report_says_it(batch_size, tmp_path):
    """The example inputs hold 4 images; the file runs the batch asked for (default 1, a phone's)."""
    from ai_edge_litert.interpreter import Interpreter

    impl, _, prepared = _trained("pt2e", SmallCNN(), ptq=True, backend="tflite")
    kwargs = {} if batch_size == 1 else {"batch_size": batch_size}
    report = export(prepared, _inputs(4), "tflite", tmp_path / "net.tflite", **kwargs)
    assert report["batch_size"] == batch_size
    assert Interpreter(model_path=str(tmp_path / "net.tflite")).get_input_details()[0]["shape"][0] == batch_size


def test_export_batch_size_must_be_a_positive_int(tmp_path):
    _, _, prepared = _trained("pt2e", SmallCNN(), ptq=True, backend="tflite")
    with pytest.raises(QuantizationConfigError, match=r"batch_size must be a positive int \(the batch the file runs\), got 0"):
        export(prepared, _inputs(4), "tflite", tmp_path / "net.tflite", batch_size=0)
    assert not any(tmp_path.iterdir())


class WideBranchCat(torch.nn.Module):
    """googlenet's inception in small: two conv-ReLU branches, one with a 4x wider range, concatenated,
    max-pooled, convolved."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Conv2d(1, 8, 1), torch.nn.Conv2d(1, 8, 1),
                                  torch.nn.Conv2d(16, 8, 1))
        self.head = torch.nn.Linear(8, 10)
        with torch.no_grad():
            self.b.weight.mul_(4)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.head(self.c(torch.nn.functional.max_pool2d(y, 3, 1, 1)).mean((2, 3)))


def test_litert_runs_a_concatenation_of_branches_with_different_ranges(tmp_path):
    """litert-torch 0.10's quantizer annotated no cat under non-strict export, so torch kept cat float while
    LiteRT's converter made it int8 at the first branch's scale, clipping the other (googlenet: runtime
    11 dB further from float than fake quant; the ViT's class-token cat: 9-12 dB)."""
    torch.manual_seed(0)
    impl, _, prepared = _trained("pt2e", WideBranchCat().eval(), ptq=True, backend="tflite")
    cat = next(n for n in prepared.graph_module.graph.nodes if n.target == torch.ops.aten.cat.default)
    assert any(u.op == "call_module" for u in cat.users)  # its output is observed: the cat is int8 in torch too
    report = export(impl.finalize(prepared, _inputs(4)), _inputs(4), "tflite", tmp_path / "net.tflite",
                    check_inputs=[_inputs(32, seed=7)])
    assert report["noise_growth_db"] <= 1.0  # LiteRT computes what the fake-quant model computes


class OneTokenAttention(torch.nn.Module):
    """efficientvit's ``v @ attn.transpose(-2, -1)`` where the feature map is 1x1 (one token)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Conv2d(1, 12, 8)  # 8x8 -> 1x1
        self.proj = torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        batch = x.shape[0]
        q, k, v = self.qkv(x).flatten(2).split([2, 2, 8], dim=1)
        attn = (q.transpose(-2, -1) @ k).softmax(-1)
        heads = [(v @ attn.transpose(-2, -1)).view(batch, 8, 1, 1), (v * 0.5 @ attn.transpose(-2, -1)).view(batch, 8, 1, 1)]
        return self.proj(torch.relu(torch.cat(heads, 1))).flatten(1)


def test_a_matmul_over_one_token_is_written_as_the_product_it_is_for_litert():
    """litert-torch 0.10's converter broke efficientvit_m0's one-token matmuls ("'tfl.batch_matmul' op
    found invalid output rank, expected 3 but got 4")."""
    gm = torch.export.export(OneTokenAttention().eval(), _inputs(1)).module()
    rewritten = tflite_format.outer_product_matmuls(gm)
    matmuls = [n for n in rewritten.graph.nodes if n.target == torch.ops.aten.matmul.default]
    assert len(matmuls) == 1  # q^T @ k contracts over 2 channels: kept
    assert torch.equal(rewritten(*_inputs(1)), gm(*_inputs(1)))  # the same products, exactly
    assert len([n for n in gm.graph.nodes if n.target == torch.ops.aten.matmul.default]) == 3  # gm untouched


class CatReLUConv(torch.nn.Module):
    """efficientvit's ``proj(cat(heads))`` with proj = ReLU -> conv: LiteRT's cat shares one quantizer
    between its inputs and output, and the ReLU after it is a merge candidate."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.proj = torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(8, 4, 1)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.head(self.proj(torch.relu(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3)))


@pytest.mark.parametrize("keep_shared", [True, False])
def test_the_relu_merge_keeps_a_concat_on_one_scale_for_litert(keep_shared):
    """Merged into the cat's output quantizer, the ReLU left the cat's inputs on the old scale: "'tfl.concatenation'
    op quantization parameters violate the same scale constraint" (efficientvit_m0 QAT)."""
    impl, backend, prepared = _trained("pt2e", CatReLUConv(), backend="tflite")
    assert backend.same_scale_concat
    final = impl.finalize(prepared, _inputs(4), share_split=True, keep_shared_quantizers=keep_shared)
    graph = final.graph_module
    cat = next(n for n in graph.graph.nodes if n.target == torch.ops.aten.cat.default)
    scales = {float(graph.get_submodule(n.target).scale) for n in [*cat.args[0], *cat.users]
              if n.op == "call_module"}
    assert (len(scales) == 1) == keep_shared, scales


class TwoResiduals(torch.nn.Module):
    """mobilenet_v2's InvertedResidual twice in a row: the first ``x + block(x)`` feeds the second."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU6())
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
                                torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8))
            for _ in range(2))
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def test_residual_adds_are_int8_in_litert(tmp_path):
    """litert-torch 0.10 finds adds by ``source_fn_stack`` (operator.add / torch.add), which non-strict
    torch.export leaves unset: no add was annotated, so torch added in float and LiteRT wrote
    DEQUANTIZE -> float ADD -> QUANTIZE (mobilenet_v2: 9 of its 10 residual adds)."""
    from ai_edge_litert.interpreter import Interpreter

    impl, _, prepared = _trained("pt2e", TwoResiduals().eval(), ptq=True, backend="tflite")
    adds = [n for n in prepared.graph_module.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert len(adds) == 2
    assert all("quantization_annotation" in n.meta for n in adds)
    assert all(u.op == "call_module" for n in adds for u in n.users)  # each sum is observed, add -> add too
    path = tmp_path / "net.tflite"
    report = export(impl.finalize(prepared, _inputs(4), share_split=True, keep_shared_quantizers=True), _inputs(4),
                    "tflite", path, check_inputs=[_inputs(32, seed=7)])
    assert report["num_float_ops"] == 0 and report["noise_growth_db"] <= 1.0
    interpreter = Interpreter(model_path=str(path))
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    add_ops = [op for op in interpreter._get_ops_details() if op["op_name"] == "ADD"]
    assert len(add_ops) == 2
    assert all(dtypes[i] == np.int8 for op in add_ops for i in [*op["inputs"], *op["outputs"]])
