from qlightning.data.digits import DigitsDataModule
from qlightning.data.fashion_mnist import FashionMNISTDataModule
from qlightning.data.torchvision_folder import DatasetNotFoundError, TorchvisionDataModule

__all__ = ["DatasetNotFoundError", "DigitsDataModule", "FashionMNISTDataModule", "TorchvisionDataModule"]
