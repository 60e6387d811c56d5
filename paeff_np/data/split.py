"""A validation split carved from the training data, for honest model selection.

Two parts, each a verification list built like the test lists (rows
alternate a positive pair, even rows, and a negative pair with a random other
identity, odd rows; ``TestList.same`` reads them):

* **unseen**: a fraction ``identities`` of the training identities is held out
  whole. Its list pairs identities the model never trained on, like the
  unseen-unheard test lists; model selection reads its EER.
* **seen**: of every remaining identity, a fraction ``rows`` of its rows is held
  out (rounded per identity, and at least one row always stays for training).
  Its list pairs identities the model trained on, through rows it did not see,
  like the seen-heard test lists.

Row k of a list takes the face of held-out row ``r_k`` (each held-out row once,
in random order) and the voice of another held-out row: of the same identity
for even k, of a different identity drawn uniformly among the part's other rows
for odd k. The training set keeps the other rows, its classes renumbered
0..K'-1 in the original order (``label_values`` says which is which).

A validation set of its own (``train.py --val-dir``, ``validation_from_rows``)
gives the same two parts without carving anything: its rows of identities not
in training form the unseen part, its rows of training identities the seen part.

Everything is drawn from ``default_rng([seed, SPLIT_STREAM, 0])``, a stream no
epoch uses (``training`` draws epoch e from ``[seed, e, 0]`` and ``[seed, e, 1]``):
the same data, fractions and seed give the same split, which the checkpoint
records (``ValidationSplit.record``) and ``--resume`` checks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .dataset import TestList, TrainSet

SPLIT_STREAM = 2**31 - 1       # a seed word no epoch number reaches
MIN_VALIDATION_PAIRS = 20      # per part: 10 positive and 10 negative pairs, at least
PARTS = ("unseen", "seen")


class SplitError(ValueError):
    """Fractions or data that give no usable split; str() is one line naming the flag."""


@dataclass
class ValidationSplit:
    """``train``: the rows left for training; ``lists``: ``{"unseen"|"seen": TestList}``
    (a part turned off is absent); ``record``: the JSON-ready description the
    checkpoint keeps."""

    train: TrainSet
    lists: dict
    record: dict


def split_validation(train: TrainSet, identities: float = 0.1, rows: float = 0.05,
                     seed: int = 0) -> ValidationSplit:
    """Hold out ``identities`` of the identities (unseen part) and ``rows`` of the
    remaining identities' rows (seen part); 0 turns a part off. See the module doc."""
    for flag, frac in (("--val-identities", identities), ("--val-rows", rows)):
        if not 0 <= frac < 1:          # NaN fails too
            raise SplitError(f"{flag} {frac:g}: the fraction must be in [0, 1)")
    rng = np.random.default_rng([seed, SPLIT_STREAM, 0])
    labels = np.asarray(train.labels)
    n_classes = train.n_classes

    n_unseen = int(round(identities * n_classes))
    held_classes = np.sort(rng.permutation(n_classes)[:n_unseen])
    kept_classes = np.setdiff1d(np.arange(n_classes), held_classes)
    if len(kept_classes) < 2:
        raise SplitError(f"--val-identities {identities:g} holds out {n_unseen} of the {n_classes} "
                         f"training identities and leaves {len(kept_classes)}: training needs two")
    is_unseen = np.isin(labels, held_classes)

    # the seen part: per kept identity, round(rows * count) of its rows, at most count - 1
    order = rng.permutation(len(labels))
    order = order[~is_unseen[order]]
    order = order[np.argsort(labels[order], kind="stable")]        # by identity, random within
    counts = np.bincount(labels[order], minlength=n_classes)
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(order)) - starts[labels[order]]
    take = np.minimum(np.round(rows * counts), np.maximum(counts - 1, 0))
    is_seen = np.zeros(len(labels), bool)
    is_seen[order[rank < take[labels[order]]]] = True

    lists = {}
    for part, frac, flag, mask in (("unseen", identities, "--val-identities", is_unseen),
                                   ("seen", rows, "--val-rows", is_seen)):
        if frac == 0:
            continue
        n_ids = len(np.unique(labels[mask]))
        if mask.sum() < MIN_VALIDATION_PAIRS or n_ids < 2:
            raise SplitError(f"{flag} {frac:g} gives the {part} validation part {int(mask.sum())} pairs "
                             f"of {n_ids} identities; it needs {MIN_VALIDATION_PAIRS} pairs of two "
                             f"identities or more: raise it, or 0 turns the part off")
        lists[part] = _verification_list(rng, train, np.flatnonzero(mask))

    keep = ~(is_unseen | is_seen)
    renumber = np.full(n_classes, -1, np.int64)
    renumber[kept_classes] = np.arange(len(kept_classes))
    kept = TrainSet(face=train.face[keep], voice=train.voice[keep], labels=renumber[labels[keep]],
                    label_values=np.asarray(train.label_values)[kept_classes])
    record = dict(identities=float(identities), rows=float(rows), seed=int(seed),
                  held_out_identities=[str(v) for v in np.asarray(train.label_values)[held_classes]],
                  pairs={part: len(lst) for part, lst in lists.items()},
                  training_rows=int(keep.sum()),
                  rows_digest=hashlib.sha256(np.packbits(keep).tobytes()).hexdigest()[:16])
    return ValidationSplit(train=kept, lists=lists, record=record)


def _verification_list(rng, train, rows):
    """A list over the held-out ``rows``: row k the face of ``rows[k]`` (shuffled), the
    voice of a row of the same identity (even k) or of another identity (odd k)."""
    rows = rows[np.argsort(np.asarray(train.labels)[rows], kind="stable")]   # grouped by identity
    labels = np.asarray(train.labels)[rows]
    _, start, count = np.unique(labels, return_index=True, return_counts=True)
    group = np.searchsorted(labels[start], labels)                     # each row's identity group
    face_at = rng.permutation(len(rows))
    g = group[face_at]
    n = len(rows)
    positive = start[g] + rng.integers(count[g])
    other = rng.integers(n - count[g])                                 # skip the probe's own block
    negative = other + (other >= start[g]) * count[g]
    voice_at = np.where(np.arange(n) % 2 == 0, positive, negative)
    return TestList(face=train.face[rows[face_at]], voice=train.voice[rows[voice_at]],
                    ids=np.stack([labels[face_at], labels[voice_at]], axis=1))


VAL_FILE_NAMES = ("faceVal.csv", "voiceVal.csv")   # --val-dir: the training files' layout


def validation_from_rows(train: TrainSet, val: TrainSet, seed: int = 0, source: dict | None = None
                         ) -> ValidationSplit:
    """Validation lists from a separate validation set ``val`` (faceVal.csv/voiceVal.csv,
    read like the training files): nothing is carved from ``train``, which is
    returned whole. A ``val`` row whose label is a training label goes to the *seen*
    part, any other to the *unseen* part (VoxCeleb1's validation identities are all
    unseen); each part is built as ``split_validation`` builds its lists, from the same
    random stream, and must hold ``MIN_VALIDATION_PAIRS`` pairs of two identities,
    else it is left out. ``source`` (JSON-ready: the folder and the files' digest)
    goes into the record."""
    if (val.face_dim, val.voice_dim) != (train.face_dim, train.voice_dim):
        raise SplitError(f"{(source or {}).get('dir', 'the validation set')}: features are "
                         f"{val.face_dim}/{val.voice_dim} wide (face/voice), the training files' "
                         f"are {train.face_dim}/{train.voice_dim}")
    rng = np.random.default_rng([seed, SPLIT_STREAM, 0])
    seen = np.isin(np.asarray(val.label_values)[val.labels], np.asarray(train.label_values))
    lists, sizes = {}, {}
    for part, mask in (("unseen", ~seen), ("seen", seen)):
        n_ids = len(np.unique(val.labels[mask]))
        sizes[part] = (int(mask.sum()), n_ids)
        if mask.sum() >= MIN_VALIDATION_PAIRS and n_ids >= 2:
            lists[part] = _verification_list(rng, val, np.flatnonzero(mask))
    if not lists:
        (n_u, ids_u), (n_s, ids_s) = sizes["unseen"], sizes["seen"]
        raise SplitError(f"{(source or {}).get('dir', 'the validation set')}: {n_u} rows of {ids_u} "
                         f"identities not in training and {n_s} rows of {ids_s} training identities; "
                         f"a validation part needs {MIN_VALIDATION_PAIRS} rows of two identities or more")
    record = dict(source=dict(source or {}), seed=int(seed),
                  pairs={part: len(lst) for part, lst in lists.items()},
                  training_rows=len(train))
    return ValidationSplit(train=train, lists=lists, record=record)
