"""Face-voice data: the in-memory classes, the FOP CSV reader and the synthetic world."""

from .csv import DataError, load_dir, read_test_list, read_train
from .dataset import KINDS, SPLITS, Dataset, TestList, TrainSet, test_file_names, train_file_names
from .synth import make_synthetic, make_world

__all__ = [
    "KINDS",
    "SPLITS",
    "DataError",
    "Dataset",
    "TestList",
    "TrainSet",
    "load_dir",
    "make_synthetic",
    "make_world",
    "read_test_list",
    "read_train",
    "test_file_names",
    "train_file_names",
]
