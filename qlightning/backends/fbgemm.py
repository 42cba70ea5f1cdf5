"""FBGEMM, PyTorch's original x86 server backend."""

from qlightning.backends.registry import Backend, fx_backend_config, register_backend, x86_inductor_quantizer
from qlightning.spec import TensorQuantSpec


register_backend(
    Backend(
        name="fbgemm",
        engine="fbgemm",
        # reduce_range: FBGEMM's u8 x s8 multiply accumulates pairs into int16 on CPUs without VNNI;
        # 7-bit activations keep it from saturating (PyTorch's own fbgemm default).
        activation=TensorQuantSpec("uint8", 0, 127, symmetric=False, per_channel=False),
        weight=TensorQuantSpec("int8", -128, 127, symmetric=True, per_channel=True),
        fx_backend_config=fx_backend_config("torch.ao.quantization.backend_config", "get_fbgemm_backend_config"),
        pt2e_quantizer=x86_inductor_quantizer,
        description="FBGEMM x86 kernels with 7-bit activations (reduce_range)",
    )
)
