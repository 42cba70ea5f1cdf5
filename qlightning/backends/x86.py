"""x86 CPUs through oneDNN/FBGEMM (PyTorch's default server backend)."""

from qlightning.backends.registry import Backend, fx_backend_config, register_backend, x86_inductor_quantizer
from qlightning.spec import TensorQuantSpec


register_backend(
    Backend(
        name="x86",
        engine="x86",
        # The x86 engine picks VNNI kernels when present, which take the full uint8 range.
        activation=TensorQuantSpec("uint8", 0, 255, symmetric=False, per_channel=False),
        weight=TensorQuantSpec("int8", -128, 127, symmetric=True, per_channel=True),
        fx_backend_config=fx_backend_config("torch.ao.quantization.backend_config.x86", "get_x86_backend_config"),
        pt2e_quantizer=x86_inductor_quantizer,
        description="x86 CPU int8 kernels (oneDNN / FBGEMM); PT2E via torchao's X86InductorQuantizer",
    )
)
