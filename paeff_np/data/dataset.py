"""In-memory form of the face-voice data: a training set and verification test lists.

Both the CSV reader (`paeff_np.data.csv`) and the synthetic generator return these
classes, so the rest of the project never needs to know where the data came from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

KINDS = ("random", "G", "N", "A", "GNA")
"""Test-list kinds of the FOP challenge: random pairs, and pairs matched on
gender (G), nationality (N), age (A), or all three (GNA)."""

SPLITS = ("unseenunheard", "seenheard")
"""Test splits: identities absent from training, or identities seen in training."""


def train_file_names():
    """Return the (face, voice) training file names."""
    return "faceTrain.csv", "voiceTrain.csv"


def test_file_names(split, kind):
    """Return the (face, voice) file names of one verification test list."""
    return (
        f"face_veriflist_test_{kind}_{split}.csv",
        f"voice_veriflist_test_{kind}_{split}.csv",
    )


test_file_names.__test__ = False  # not a pytest test, despite the name


@dataclass
class TrainSet:
    """Face-voice training pairs: row i of `face` and row i of `voice` show identity `labels[i]`."""

    face: np.ndarray  # (N, face_dim) float32
    voice: np.ndarray  # (N, voice_dim) float32
    labels: np.ndarray  # (N,) int64 class index in 0..K-1
    label_values: np.ndarray  # (K,) str: the original label of each class index

    @property
    def n_classes(self):
        return len(self.label_values)

    @property
    def face_dim(self):
        return self.face.shape[1]

    @property
    def voice_dim(self):
        return self.voice.shape[1]

    def __len__(self):
        return len(self.labels)

    def fingerprint(self):
        """SHA-256 (hex) of the pairs: both feature matrices, the labels and the label
        values, with their shapes and dtypes. A resumed run compares it with the one
        its checkpoint recorded. About 0.1 s per 200 MB of features."""
        digest = hashlib.sha256()
        for array in (self.face, self.voice, self.labels, self.label_values.astype(str)):
            digest.update(f"{array.dtype.str}{array.shape};".encode())
            rows = max(1, (1 << 24) // max(1, array[:1].nbytes))     # 16 MB at a time, no full copy
            for start in range(0, len(array), rows):
                digest.update(np.ascontiguousarray(array[start:start + rows]).data)
        return digest.hexdigest()


@dataclass
class TestList:
    """Verification pairs: row i of `face` with row i of `voice`; even rows are positive pairs."""

    __test__ = False  # not a pytest test class, despite the name

    face: np.ndarray  # (N, face_dim) float32
    voice: np.ndarray  # (N, voice_dim) float32
    ids: np.ndarray | None = None  # (N, 2) identity of (face, voice), synthetic data only

    @property
    def same(self):
        """Ground truth per row: True where face and voice belong to the same identity."""
        return np.arange(len(self.face)) % 2 == 0

    def __len__(self):
        return len(self.face)


@dataclass
class Dataset:
    """A training set (or None) and the test lists keyed "<split>/<kind>"."""

    train: TrainSet | None
    tests: dict[str, TestList]
