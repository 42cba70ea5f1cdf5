from qlightning.models.classifier import ImageClassifier, accuracy
from qlightning.models.cnn import SmallCNN
from qlightning.models.rnn import RowLSTM

__all__ = ["ImageClassifier", "RowLSTM", "SmallCNN", "accuracy"]
