"""Graph passes that make a trained or calibrated quantized model deployable.

Each pass runs on its own (and the callbacks run ``fold_bn`` / ``merge_relu_clamp`` at fit end):

- :func:`fold_bn`: BatchNorm folded into QAT conv/linear modules (eager, FX); PT2E graphs are folded by
  :func:`fold_qat_conv_bn` during conversion.
- :func:`merge_relu_clamp`: ReLU/clamp merged into the following quantizer's qparams (FX, PT2E).
- :func:`unshare_clamp_observers`: a BackendConfig transform giving clamps their own output observer.
- :func:`share_split_qparams`: split/chunk children share their input's qparams (FX, PT2E).
- :func:`ao_to_pt2e`: an eager or FX prepared model as a PT2E program with exactly its qparams.

Import from the submodules to keep torch.ao (eager/FX) and torchao (PT2E) imports apart; this
package namespace loads them lazily.
"""

import importlib

_EXPORTS = {
    "fold_bn": "qlightning.passes.fold_qat_bn",
    "fold_qat_conv_bn": "qlightning.passes.pt2e_fold_bn",
    "unscale_by_reciprocal": "qlightning.passes.pt2e_fold_bn",
    "merge_relu_clamp": "qlightning.passes.merge_clamp",
    "unshare_clamp_observers": "qlightning.passes.unshare_observers",
    "share_split_qparams": "qlightning.passes.share_split",
    "ao_to_pt2e": "qlightning.passes.to_pt2e",
    "PassToleranceError": "qlightning.passes.verify",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qlightning.passes' has no attribute {name!r}")
