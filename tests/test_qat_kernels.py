"""The PT2E activation quantizer that fake-quantizes through quantize / dequantize kernels is torchao's
fused module, bit for bit: outputs, gradients, statistics and qparams (qlightning.modes.pt2e_kernels)."""

import copy

import numpy as np
import pytest
import torch
from torchao.quantization.pt2e import fake_quantize as ao_fake_quantize
from torchao.quantization.pt2e import observer as ao_observer

from qlightning.modes.pt2e_kernels import QuantizeDequantizeFakeQuantize, in_range_bounds

RANGES = {"uint8 affine": (0, 255, torch.per_tensor_affine, torch.quint8),
          "int8 affine": (-128, 127, torch.per_tensor_affine, torch.qint8),
          "int8 symmetric": (-128, 127, torch.per_tensor_symmetric, torch.qint8)}


def _pair(quant_min, quant_max, qscheme, dtype):
    reference = ao_fake_quantize.FusedMovingAvgObsFakeQuantize(
        observer=ao_observer.MovingAverageMinMaxObserver, quant_min=quant_min, quant_max=quant_max,
        qscheme=qscheme, dtype=dtype)
    ours = copy.deepcopy(reference)
    ours.__class__ = QuantizeDequantizeFakeQuantize
    return reference, ours


def _edges(module) -> torch.Tensor:
    """Inputs on the mask's edges and on rounding ties for the module's current qparams."""
    observer = module.activation_post_process
    scale, zero_point = float(module.scale), int(module.zero_point)
    low, high = in_range_bounds(scale, zero_point, observer.quant_min, observer.quant_max)
    edges = [np.nextafter(np.float32(low), np.float32(-np.inf)), low, high, np.nextafter(np.float32(high), np.float32(np.inf))]
    ties = [(k + 0.5) * scale for k in range(observer.quant_min - zero_point - 3, observer.quant_max - zero_point + 3)]
    return torch.tensor([*edges, *ties, 0.0, -0.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")], dtype=torch.float32)


@pytest.mark.parametrize("quant_range", RANGES.values(), ids=RANGES.keys())
def test_outputs_gradients_and_state_equal_torchaos_fused_module_bit_for_bit(quant_range):
    reference, ours = _pair(*quant_range)
    generator = torch.Generator().manual_seed(1)
    for step in range(8):
        if step == 4:  # frozen qparams: the edges and ties of this step's grid are known
            for module in (reference, ours):
                module.disable_observer()
        if step == 6:
            for module in (reference, ours):
                module.disable_fake_quant()
        x = torch.randn(4, 8, 5, 5, generator=generator) * (1 + step)
        if step >= 4:
            x = torch.cat([x.flatten(), _edges(ours)])
        outputs, grads = [], []
        for module in (reference, ours):
            leaf = x.clone().requires_grad_()
            out = module(leaf)
            out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
            outputs.append(out.detach())
            grads.append(leaf.grad)
        # Exact equality; NaN (an input of the last steps, passed through with fake-quant off) equals NaN.
        torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0, equal_nan=True, msg=f"step {step}")
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0, equal_nan=True, msg=f"step {step}")
        for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
            assert torch.equal(a, b), f"step {step}: {name}"


def test_in_range_bounds_are_the_exact_edges_of_atens_mask():
    for scale, zero_point, quant_min, quant_max in ((0.0173, 3, 0, 255), (1.19e-7, 0, -128, 127), (3.7, 255, 0, 255)):
        low, high = in_range_bounds(scale, zero_point, quant_min, quant_max)
        below, above = np.nextafter(np.float32(low), np.float32(-np.inf)), np.nextafter(np.float32(high), np.float32(np.inf))
        x = torch.tensor([below, low, high, above], dtype=torch.float32)
        _, mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x, scale, zero_point, quant_min, quant_max)
        assert mask.tolist() == [False, True, True, False], (scale, zero_point)


def test_other_ranges_and_inputs_use_torchaos_forward():
    # int16 activations have no quantized dtype; the fast path must not saturate them to 8 bits.
    reference, ours = _pair(-(2**15), 2**15 - 1, torch.per_tensor_affine, torch.int16)
    x = torch.randn(2, 3, 4, 4) * 50
    assert ours._quantized_dtype(x) is None
    assert torch.equal(reference(x), ours(x))
    _, ours8 = _pair(0, 255, torch.per_tensor_affine, torch.quint8)
    assert ours8._quantized_dtype(x.double()) is None
    assert ours8._quantized_dtype(x) is torch.quint8


@pytest.mark.parametrize("backend", ["x86", "tflite"])
def test_prepared_network_trains_as_with_torchaos_module(backend):
    """The product's PT2E preparation uses the quantize / dequantize module for fused activation quantizers;
    training a network with it ends in the same state, bit for bit, as with torchao's class."""
    from qlightning.callbacks.config import build_recipe
    from qlightning.models import SmallCNN
    from qlightning.modes.registry import get_mode

    backend_, recipe = build_recipe("pt2e", backend, "moving_average_minmax", "per_channel_symmetric", None)
    networks = []
    for _ in range(2):
        torch.manual_seed(0)
        networks.append(get_mode("pt2e").prepare_qat(SmallCNN(), (torch.rand(4, 1, 8, 8),), recipe, backend_).train())
    ours, reference = networks
    swapped = [m for m in reference.modules() if type(m) is QuantizeDequantizeFakeQuantize]
    assert len(swapped) >= 3, "the activation quantizers should be the quantize / dequantize module"
    for module in swapped:
        module.__class__ = ao_fake_quantize.FusedMovingAvgObsFakeQuantize
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.rand(16, 1, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator))
               for _ in range(4)]
    for network in networks:
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        for x, y in batches:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(network(x), y).backward()
            optimizer.step()
    reference_state = reference.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, reference_state[name]), name
