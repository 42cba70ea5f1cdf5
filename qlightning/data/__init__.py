from qlightning.data.digits import DigitsDataModule
from qlightning.data.torchvision_folder import DatasetNotFoundError, TorchvisionDataModule

__all__ = ["DatasetNotFoundError", "DigitsDataModule", "TorchvisionDataModule"]
