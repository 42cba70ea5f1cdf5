from qlightning.models.classifier import ImageClassifier, accuracy
from qlightning.models.cnn import SmallCNN

__all__ = ["ImageClassifier", "SmallCNN", "accuracy"]
