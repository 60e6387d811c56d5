"""Face-voice data: the in-memory classes and the FOP CSV reader."""

from .csv import DataError, load_dir, read_test_list, read_train
from .dataset import KINDS, SPLITS, Dataset, TestList, TrainSet, test_file_names, train_file_names

__all__ = [
    "KINDS",
    "SPLITS",
    "DataError",
    "Dataset",
    "TestList",
    "TrainSet",
    "load_dir",
    "read_test_list",
    "read_train",
    "test_file_names",
    "train_file_names",
]
