from qlightning.models.classifier import ImageClassifier, accuracy
from qlightning.models.cnn import SmallCNN
from qlightning.models.guide import GuideNet
from qlightning.models.rnn import RowLSTM

__all__ = ["GuideNet", "ImageClassifier", "RowLSTM", "SmallCNN", "accuracy"]
