"""Exceptions raised by qlightning. Each message says what was wrong and what is allowed."""


class QuantizationConfigError(ValueError):
    """An unknown or unsupported choice of mode, backend, observer or schedule."""


class UntraceableModelError(RuntimeError):
    """The network cannot be captured or quantized in the chosen mode."""


def unknown_choice(kind: str, value: object, valid) -> QuantizationConfigError:
    """Build the error for ``kind=value`` when only ``valid`` are allowed."""
    valid_list = ", ".join(repr(v) for v in sorted(valid))
    if not isinstance(value, str):
        return QuantizationConfigError(
            f"{kind} must be one name (a string), got {value!r} ({type(value).__name__}); valid {kind}s are: {valid_list}"
        )
    return QuantizationConfigError(f"unknown {kind} {value!r}; valid {kind}s are: {valid_list}")


class ExportVerificationError(RuntimeError):
    """An export whose runtime disagrees with the torch model, or that quantized nothing; nothing is written."""
