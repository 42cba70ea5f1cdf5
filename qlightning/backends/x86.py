"""x86 CPUs through oneDNN/FBGEMM (PyTorch's default server backend)."""

from qlightning.backends.registry import Backend, fx_backend_config, register_backend, x86_inductor_quantizer
from qlightning.cpu import u8s8_saturates
from qlightning.spec import TensorQuantSpec


register_backend(
    Backend(
        name="x86",
        engine="x86",
        # The x86 engine picks VNNI kernels when present, which take the full ranges. Without VNNI its
        # u8 x s8 multiply adds pairs of products into an int16 and saturates (torch 2.14.1 on AVX2: a
        # full-range QuantizedLinear 30-112 output steps off its reference). 7-bit weights keep every pair
        # in range (255 * 64 * 2 < 2**15) and stay exact in the int8 model; PyTorch's own default narrows
        # the activations instead (reduce_range), which the int8 kernels do not clamp to: activations past
        # the observed range then differed from the fake-quant model by 23 output steps (measured).
        activation=TensorQuantSpec("uint8", 0, 255, symmetric=False, per_channel=False),
        weight=TensorQuantSpec("int8", *((-64, 63) if u8s8_saturates() else (-128, 127)), symmetric=True,
                               per_channel=True),
        fx_backend_config=fx_backend_config("torch.ao.quantization.backend_config.x86", "get_x86_backend_config"),
        pt2e_quantizer=x86_inductor_quantizer,
        description="x86 CPU int8 kernels (oneDNN / FBGEMM); PT2E via torchao's X86InductorQuantizer"
                    + ("; 7-bit weights on this CPU (no VNNI)" if u8s8_saturates() else ""),
    )
)
