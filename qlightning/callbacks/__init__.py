from qlightning.callbacks.ptq import PostTrainingQuantization
from qlightning.callbacks.qat import QuantizationAwareTraining

__all__ = ["PostTrainingQuantization", "QuantizationAwareTraining"]
