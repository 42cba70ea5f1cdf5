"""QNNPACK / XNNPACK, PyTorch's ARM and mobile backend."""

from qlightning.backends.registry import Backend, fx_backend_config, register_backend, x86_inductor_quantizer
from qlightning.spec import TensorQuantSpec


register_backend(
    Backend(
        name="qnnpack",
        engine="qnnpack",
        activation=TensorQuantSpec("uint8", 0, 255, symmetric=False, per_channel=False),
        # XNNPACK's symmetric int8 weights exclude -128 and need scales >= 2**-12.
        weight=TensorQuantSpec("int8", -127, 127, symmetric=True, per_channel=True),
        fx_backend_config=fx_backend_config("torch.ao.quantization.backend_config", "get_qnnpack_backend_config"),
        # torchao ships no production XNNPACK quantizer (it moved to ExecuTorch); the x86 annotator
        # covers the same conv/linear/relu/pool/add patterns, here with XNNPACK's ranges.
        pt2e_quantizer=x86_inductor_quantizer,
        description="QNNPACK/XNNPACK mobile kernels: symmetric [-127, 127] weights",
    )
)
