"""Read the FOP CSV layout (no header rows) into the classes of `paeff_np.data.dataset`.

Training files hold feature columns followed by an identity label; test lists hold
feature columns (extra trailing columns are ignored). Parsing happens in C through
`np.loadtxt`; Python only re-scans a file after a failure, to name the first bad row.
Row numbers in messages are 1-based lines of the file.

Each parsed CSV is cached as `.npy` in `<csv dir>/.paeff_cache/`, so later runs
memory-map it instead of parsing again. A JSON stamp with the source's size and
modification time decides whether the cache is still valid. Arrays read from the
cache are read-only memory maps.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..atomic import write_atomically
from .dataset import KINDS, SPLITS, Dataset, TestList, TrainSet, test_file_names, train_file_names

CACHE_DIR_NAME = ".paeff_cache"
CACHE_VERSION = 1

# Cached arrays of each kind of parsed file, with the suffix of their cache file.
_CACHED_ARRAYS = {
    "matrix": {"features": ".npy"},
    "train": {"features": ".npy", "labels": ".labels.npy"},
}
_READ_CHUNK_BYTES = 1 << 26  # bytes per read when counting delimiters
_FINITE_BLOCK_ROWS = 4096  # rows per block when looking for NaN/Inf


class DataError(Exception):
    """A problem with the user's data files. str() is one line naming the file and the problem."""


def read_matrix(path, *, cache: bool = True) -> np.ndarray:
    """Read a CSV of numbers as a float32 matrix (rows, columns), all columns kept."""
    return _read_cached(Path(path), "matrix", cache)["features"]


def read_train(face_path, voice_path, *, cache: bool = True) -> TrainSet:
    """Read the training pairs: features of each file, identity label in the last column.

    Labels are compared as text, except that labels which are all integral numbers are
    written as integers first, so "7.0" (a file saved from floats) and "7" agree.
    Class indices follow the sorted order of those label strings.
    """
    face, face_labels = _read_train_file(Path(face_path), cache)
    voice, voice_labels = _read_train_file(Path(voice_path), cache)
    if len(face) != len(voice):
        raise DataError(
            f"{face_path} has {len(face)} rows but {voice_path} has {len(voice)}; "
            "row i of both files must be one face-voice pair"
        )
    face_labels = _normalise_labels(face_labels)
    voice_labels = _normalise_labels(voice_labels)
    mismatches = np.flatnonzero(face_labels != voice_labels)
    if mismatches.size:
        row = mismatches[0]
        raise DataError(
            f"{face_path}: row {row + 1} has label {str(face_labels[row])!r} "
            f"but {voice_path} row {row + 1} has label {str(voice_labels[row])!r}"
        )
    label_values, labels = np.unique(face_labels, return_inverse=True)
    return TrainSet(face=face, voice=voice, labels=labels.reshape(-1).astype(np.int64), label_values=label_values)


def read_test_list(face_path, voice_path, face_dim=None, voice_dim=None, *, cache: bool = True) -> TestList:
    """Read one verification list: the first face_dim / voice_dim columns (all when None).

    Row i of the face file pairs with row i of the voice file; even rows are positive pairs.
    """
    face = _first_columns(Path(face_path), read_matrix(face_path, cache=cache), face_dim, "face")
    voice = _first_columns(Path(voice_path), read_matrix(voice_path, cache=cache), voice_dim, "voice")
    if len(face) != len(voice):
        raise DataError(
            f"{face_path} has {len(face)} rows but {voice_path} has {len(voice)}; "
            "row i of both files must be one test pair"
        )
    if len(face) % 2:
        raise DataError(
            f"{face_path}: has {len(face)} rows, expected an even number "
            "(pairs alternate positive and negative)"
        )
    return TestList(face=face, voice=voice)


def load_dir(data_dir, face_dim=None, voice_dim=None, need_train: bool = True, *, cache: bool = True) -> Dataset:
    """Read a FOP data directory: the training files and every test list present.

    The training files are read only when need_train is True (a missing one is an
    error): evaluation never parses a large training file it does not use. Test lists are keyed "<split>/<kind>"; a list with neither
    half present is skipped. When face_dim / voice_dim are None and the training set
    was read, test lists are cut to the training widths.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory")

    face_train, voice_train = (data_dir / name for name in train_file_names())
    train = None
    if need_train:
        train = read_train(face_train, voice_train, cache=cache)
        face_dim = train.face_dim if face_dim is None else face_dim
        voice_dim = train.voice_dim if voice_dim is None else voice_dim

    tests = {}
    for split in SPLITS:
        for kind in KINDS:
            face_path, voice_path = (data_dir / name for name in test_file_names(split, kind))
            if not face_path.exists() and not voice_path.exists():
                continue
            for missing, present in ((face_path, voice_path), (voice_path, face_path)):
                if not missing.exists():
                    raise DataError(f"{missing}: file not found (its other half {present.name} is present)")
            tests[f"{split}/{kind}"] = read_test_list(face_path, voice_path, face_dim, voice_dim, cache=cache)
    return Dataset(train=train, tests=tests)


# ---------------------------------------------------------------------------
# Parsing


def _read_train_file(path: Path, cache: bool) -> tuple[np.ndarray, np.ndarray]:
    arrays = _read_cached(path, "train", cache)
    return arrays["features"], arrays["labels"]


def _parse(path: Path, kind: str) -> dict[str, np.ndarray]:
    """Parse a CSV into the arrays cached for its kind ("matrix" or "train")."""
    if kind == "matrix":
        return {"features": _load_features(path)}

    n_columns = _first_row_width(path)
    if n_columns < 2:
        raise DataError(f"{path}: rows have 1 column, expected feature columns then a label column")
    n_features = n_columns - 1
    features = _load_features(path, n_features)
    labels = _loadtxt(path, n_features, usecols=[n_features], dtype=str)[:, 0]
    # Reading selected columns lets longer rows pass unnoticed; count the delimiters.
    _check_row_widths(path, len(features), n_columns)
    return {"features": features, "labels": np.char.strip(labels)}


def _load_features(path: Path, n_features: int | None = None) -> np.ndarray:
    """Load the first n_features columns (all when None) as float32 and check they are finite."""
    usecols = None if n_features is None else range(n_features)
    features = _loadtxt(path, n_features, usecols=usecols, dtype=np.float32)
    _check_finite(path, features)
    return features


def _loadtxt(path: Path, n_numeric: int | None, **kwargs) -> np.ndarray:
    """np.loadtxt with DataError messages; n_numeric: how many leading columns are numbers."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            table = np.loadtxt(path, delimiter=",", comments=None, ndmin=2, **kwargs)
    except ValueError as error:
        raise DataError(_find_bad_row(path, n_numeric) or f"{path}: {error}") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    if len(table) == 0:
        raise DataError(f"{path}: file is empty")
    return table


def _find_bad_row(path: Path, n_numeric: int | None) -> str | None:
    """Describe the first row whose width differs from the first row's or holding a non-number."""
    expected = None
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\n")
            if not line:
                continue  # np.loadtxt skips empty lines too
            cells = line.split(",")
            if expected is None:
                expected = len(cells)
            if len(cells) != expected:
                return f"{path}: row {number} has {len(cells)} columns, expected {expected}"
            for column, cell in enumerate(cells[:n_numeric], start=1):
                try:
                    float(cell)
                except ValueError:
                    return f"{path}: row {number}, column {column}: {cell!r} is not a number"
    return None


def _first_row_width(path: Path) -> int:
    """Number of columns of the first non-empty line."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            line = line.rstrip("\n")
            if line:
                return len(line.split(","))
    raise DataError(f"{path}: file is empty")


def _check_row_widths(path: Path, n_rows: int, n_columns: int) -> None:
    """Check every row has n_columns, given that none has fewer: the comma count must match."""
    commas = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(_READ_CHUNK_BYTES):
            commas += chunk.count(b",")
    if commas != n_rows * (n_columns - 1):
        raise DataError(_find_bad_row(path, n_columns - 1) or f"{path}: rows have unequal numbers of columns")


def _check_finite(path: Path, features: np.ndarray) -> None:
    """Raise on the first NaN or Inf, looking at blocks of rows to keep memory small."""
    for start in range(0, len(features), _FINITE_BLOCK_ROWS):
        block = features[start : start + _FINITE_BLOCK_ROWS]
        bad = ~np.isfinite(block)
        if bad.any():
            row, column = np.argwhere(bad)[0]
            raise DataError(
                f"{path}: row {start + row + 1}, column {column + 1} is {block[row, column]}; "
                "features must be finite float32 numbers"
            )


def _first_columns(path: Path, matrix: np.ndarray, width: int | None, modality: str) -> np.ndarray:
    if width is None:
        return matrix
    if matrix.shape[1] < width:
        raise DataError(f"{path}: has {matrix.shape[1]} columns, expected at least {width} {modality} features")
    return matrix[:, :width]


def _normalise_labels(labels: np.ndarray) -> np.ndarray:
    """Write labels as integers ("7.0" -> "7") when all are integral numbers; else keep the text."""
    try:
        values = labels.astype(np.float64)
    except ValueError:
        return labels
    integral = np.isfinite(values) & (values == np.round(values)) & (np.abs(values) < 2**53)
    if not integral.all():
        return labels
    return values.astype(np.int64).astype(str)


# ---------------------------------------------------------------------------
# Cache


def _read_cached(path: Path, kind: str, cache: bool) -> dict[str, np.ndarray]:
    """Return the parsed arrays of a CSV, from the cache when its stamp matches the source."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    stamp = {"version": CACHE_VERSION, "kind": kind, "size": status.st_size, "mtime_ns": status.st_mtime_ns}
    cache_dir = path.parent / CACHE_DIR_NAME
    if cache:
        arrays = _load_cache(cache_dir, path.name, kind, stamp)
        if arrays is not None:
            return arrays
    arrays = _parse(path, kind)
    if cache:
        _save_cache(cache_dir, path.name, kind, stamp, arrays)
    return arrays


def _load_cache(cache_dir: Path, name: str, kind: str, stamp: dict) -> dict[str, np.ndarray] | None:
    try:
        if json.loads((cache_dir / f"{name}.json").read_text()) != stamp:
            return None
        return {
            key: np.load(cache_dir / f"{name}{suffix}", mmap_mode="r", allow_pickle=False)
            for key, suffix in _CACHED_ARRAYS[kind].items()
        }
    except (OSError, ValueError):  # no cache yet, or a damaged one: parse again
        return None


def _save_cache(cache_dir: Path, name: str, kind: str, stamp: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays, then the stamp that validates them; skip silently if we cannot write."""
    try:
        cache_dir.mkdir(exist_ok=True)
        stamp_path = cache_dir / f"{name}.json"
        stamp_path.unlink(missing_ok=True)  # the old stamp must not vouch for half-written arrays
        for key, suffix in _CACHED_ARRAYS[kind].items():
            write_atomically(
                cache_dir / f"{name}{suffix}", lambda stream, array=arrays[key]: np.save(stream, array)
            )
        write_atomically(stamp_path, lambda stream: stream.write(json.dumps(stamp).encode()))
    except OSError:
        pass


