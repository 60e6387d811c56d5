"""Read the FOP CSV layout (no header rows) into the classes of `paeff_np.data.dataset`.

Training files hold feature columns followed by an identity label; test lists hold
feature columns (extra trailing columns are ignored). `np.loadtxt` parses in C; after
a failure Python reads the file once more to name the first bad row. Row numbers in
messages are 1-based lines of the file. The first bytes are checked first for what is
not a plain FOP CSV (gzip or zip data, UTF-16, a byte-order mark, a `;`, tab or space
separator, a header or comment line, a trailing comma), each with its own message.

Each parsed CSV is cached as `.npy` in `<csv dir>/.paeff_cache/` and memory-mapped
(read-only) by later reads. A JSON stamp of the source (size, mtime_ns, ctime_ns,
inode, and a SHA-256 of its first and last megabyte, so that `cp -p` or `touch -r`
still count as a change) decides whether the cache stands for the file; it also
records each array's shape and dtype. Cached arrays that cannot be loaded, differ from
the stamp, or fail the checks a parse applies are a damaged cache: a one-line note on
stderr, and the CSV is parsed again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import stat
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ..run.atomic import write_atomically
from .dataset import KINDS, SPLITS, Dataset, TestList, TrainSet, test_file_names, train_file_names

CACHE_DIR_NAME = ".paeff_cache"
CACHE_VERSION = 3  # 2: fingerprinted stamp; 3: the stamp records each array's shape and dtype
_SUFFIXES = {"features": ".npy", "labels": ".labels.npy"}  # cache file of each parsed array
_KEYS = {"matrix": ("features",), "train": ("features", "labels")}  # the arrays of each kind of file
_FINGERPRINT_BYTES = 1 << 20  # bytes hashed at each end of a file for the cache stamp
_SNIFF_BYTES = 1 << 16  # bytes read to recognise the file's format
_FINITE_BLOCK_BYTES = 4 << 20  # bytes per block when looking for NaN/Inf (two passes stay in cache)
_COUNT_BYTES = 1 << 26  # bytes per read when counting commas

FEATURE_LIMIT = 1e12
"""Largest |feature| accepted. The model squares its inputs' scale (BatchNorm's variance
sums x^2 over a batch), and float32 overflows at 3.4e38: 1e12 leaves room for batches
of 10^13 rows, and no real embedding comes near it."""
EXCERPT_CHARS = 120  # characters of a row or cell quoted in a message, at most
LABEL_MAX_CHARS = 1000  # an identity label longer than this is refused (real ids: id10001, n000002)
PROGRESS_MIN_BYTES = 64 << 20  # files larger than this print progress while parsed
_PROGRESS_BLOCK_BYTES = 16 << 20  # bytes handed to np.loadtxt at a time
_PROGRESS_EVERY_S = 2.0  # seconds between two progress lines


class DataError(Exception):
    """A problem with the user's data files. str() is one line naming the file and the problem."""


def read_matrix(path, *, cache=True):
    """Read a CSV of numbers as a float32 matrix (rows, columns), all columns kept."""
    return _read_cached(Path(path), "matrix", cache)["features"]


def check_regular_file(path):
    """The ``os.stat`` of ``path``, a regular file (or a link to one); else one DataError.
    A named pipe, a device or a socket would block a reader or never end: refused
    before anything opens it."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    if not stat.S_ISREG(status.st_mode):
        what = ("a folder" if stat.S_ISDIR(status.st_mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(status.st_mode)
                else "a socket" if stat.S_ISSOCK(status.st_mode) else "a device")
        raise DataError(f"{path}: is {what}, not a regular file; give the file itself")
    return status


def read_features(path, *, cache=True):
    """Read the feature columns of a CSV whose last column may be text (an id or a label, which
    is dropped): all columns when the first row's last cell is a number, else all but the last."""
    path = Path(path)
    check_regular_file(path)
    if _last_cell_is_text(path):
        return _read_cached(path, "train", cache)["features"]
    return read_matrix(path, cache=cache)


def _last_cell_is_text(path):
    try:
        first = _first_line(path)[1]
    except OSError:
        return False                   # reported by the reader
    cell = first.rsplit(",", 1)[-1].strip()
    try:
        float(cell)
    except ValueError:
        return "," in first and cell != ""
    return False


def read_train(face_path, voice_path, *, cache=True):
    """Read the training pairs: features of each file, identity label in the last column.

    A label may be any non-empty text (surrounding spaces are dropped); an empty one is
    an error. Each cell that is an integral number stands for that integer, so "7",
    "7.0" and "7.000000" (np.savetxt's way) are one label in either file; any other
    cell is compared as text ("id7" and "7" differ, "3.5" and "3.50" too). The labels
    of row i of both files must agree under that rule. label_values holds the labels
    so written ("7", never "7.0"), sorted as strings; class indices follow that order.
    """
    face_path, voice_path = Path(face_path), Path(voice_path)
    face, face_labels = _read_train_file(face_path, cache)
    voice, voice_labels = _read_train_file(voice_path, cache)
    if len(face) != len(voice):
        raise DataError(
            f"{face_path} has {len(face)} rows but {voice_path} has {len(voice)}; "
            "row i of both files must be one face-voice pair"
        )
    face_keys = _normalise_labels(face_labels)
    mismatches = np.flatnonzero(face_keys != _normalise_labels(voice_labels))
    if mismatches.size:
        row = mismatches[0]
        raise DataError(
            f"{face_path}: row {_line_number(face_path, row)} has label {_excerpt(str(face_labels[row]))!r} "
            f"but {voice_path} row {_line_number(voice_path, row)} has label {_excerpt(str(voice_labels[row]))!r}"
        )
    label_values, labels = np.unique(face_keys, return_inverse=True)
    if len(label_values) < 2:
        raise DataError(
            f"{face_path}: every row has the label {_excerpt(str(label_values[0]))!r}; training needs "
            "at least 2 identities (cross-entropy and OPL compare identities)"
        )
    return TrainSet(face=face, voice=voice, labels=labels.reshape(-1).astype(np.int64), label_values=label_values)


def read_test_list(face_path, voice_path, face_dim=None, voice_dim=None, *, cache=True):
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


def load_dir(data_dir, face_dim=None, voice_dim=None, need_train=True, *, cache=True):
    """Read a FOP data directory: the training files and every test list present.

    The training files are read only when need_train is True (a missing one is an
    error): evaluation never parses a large training file it does not use. Test lists are keyed "<split>/<kind>"; a list with neither
    half present is skipped. When face_dim / voice_dim are None and the training set
    was read, test lists are cut to the training widths.
    """
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"{data_dir}: no such folder (missing)")
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


def _read_train_file(path, cache):
    arrays = _read_cached(path, "train", cache)
    return arrays["features"], arrays["labels"]


def _parse(path, kind):
    """Parse a CSV into the arrays of its kind: "matrix" (numbers) or "train" (numbers, then a label)."""
    n_columns = _check_format(path, kind)
    if kind == "matrix":
        arrays = {"features": _loadtxt(path, None, dtype=np.float32)}
    else:
        if n_columns < 2:
            raise DataError(f"{path}: rows have 1 column, expected feature columns then a label column")
        n = n_columns - 1
        features = _loadtxt(path, n, usecols=range(n), dtype=np.float32)
        # Python strings first: a fixed-width str array takes its longest cell's width in every row
        labels = _loadtxt(path, n, "labels", usecols=[n], dtype=object)[:, 0]
        _check_row_widths(path, len(features), n_columns)
        longest = int(np.argmax([len(label) for label in labels]))
        if len(labels[longest]) > LABEL_MAX_CHARS:
            raise DataError(f"{path}: row {_line_number(path, longest)}: a label of {len(labels[longest]):,} "
                            f"characters ({_excerpt(labels[longest], 40)!r}); labels name identities, at "
                            f"most {LABEL_MAX_CHARS} characters")
        arrays = {"features": features, "labels": np.char.strip(labels.astype(str))}
    problem = _first_problem(arrays)
    if problem is not None:
        _, row, what, hint = problem
        raise DataError(f"{path}: row {_line_number(path, row)}{what}{hint}")
    return arrays


def _loadtxt(path, n_numeric, what="rows", **kwargs):
    """np.loadtxt with DataError messages; n_numeric: how many leading columns are numbers (None: all).

    The file goes to np.loadtxt in blocks of whole lines; one larger than PROGRESS_MIN_BYTES
    prints rows read, MB/s and time left on stderr.
    """
    blocks, done, rows = [], 0, 0
    started = last_report = time.monotonic()
    try:
        size = path.stat().st_size
        with open(path, "rb") as stream, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": a block of blank lines
            while lines := stream.readlines(_PROGRESS_BLOCK_BYTES):
                done += sum(map(len, lines))
                block = np.loadtxt(lines, encoding="utf-8", delimiter=",", comments=None, ndmin=2, **kwargs)
                if len(block):
                    blocks.append(block)
                    rows += len(block)
                now = time.monotonic()
                if size > PROGRESS_MIN_BYTES and now - last_report >= _PROGRESS_EVERY_S:
                    last_report, rate = now, done / max(now - started, 1e-9)
                    print(f"{path.name} ({what}): {rows:,} rows read, {done / 1e6:,.0f} of {size / 1e6:,.0f} MB, "
                          f"{rate / 1e6:,.1f} MB/s, ~{(size - done) / rate:,.0f} s left", file=sys.stderr, flush=True)
    except ValueError as error:                       # UnicodeDecodeError is one too
        raise DataError(_find_bad_row(path, n_numeric) or f"{path}: {_excerpt(str(error))}") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    if not blocks:
        raise DataError(f"{path}: file is empty")
    if size > PROGRESS_MIN_BYTES:
        print(f"{path.name} ({what}): {rows:,} rows read in {time.monotonic() - started:,.1f} s",
              file=sys.stderr, flush=True)
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def _excerpt(text, limit=EXCERPT_CHARS):
    """text, cut to `limit` characters with the number of characters left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _first_line(path):
    """(1-based number, stripped text) of the first line that is not blank; (0, "") if none is."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                return number, line.strip()
    return 0, ""


def _check_format(path, kind):
    """The first row's number of columns; a file that is not a plain comma-separated table is refused,
    with a message naming what it is instead."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(_SNIFF_BYTES)
        number, line = _first_line(path)
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    for magic, problem in ((b"\x1f\x8b", f"compressed (gzip); decompress first, e.g. zcat {path.name} > plain.csv"),
                           (b"PK\x03\x04", f"compressed (zip); decompress first, e.g. unzip {path.name}"),
                           (b"\xff\xfe", "UTF-16 text; save it as plain UTF-8"),
                           (b"\xfe\xff", "UTF-16 text; save it as plain UTF-8"),
                           (b"\xef\xbb\xbf", "starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without BOM")):
        if head.startswith(magic):
            raise DataError(f"{path}: {problem}")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:         # (a character cut by the end of `head` is fine)
        if error.start < len(head) - 3:
            raise DataError(f"{path}: not a text file (byte {error.start + 1} is not UTF-8 text); "
                            "FOP CSV files are plain comma-separated numbers") from None
        text = head[:error.start].decode("utf-8")
    if "\x00" in text:
        raise DataError(f"{path}: not a text file (byte {text.index(chr(0)) + 1} is a NUL byte); "
                        "FOP CSV files are plain comma-separated numbers")
    if not line:
        raise DataError(f"{path}: file is empty")
    quoted = _excerpt(line)
    if line.startswith("#"):
        raise DataError(f"{path}: row {number} is a comment line ({quoted!r}); "
                        "FOP CSV files hold numbers only: remove it")
    cells = line.split(",")
    numeric_cells = cells[:-1] if kind == "train" and len(cells) > 1 else cells  # a label may hold any text
    separator = ("';'" if any(";" in cell for cell in numeric_cells)  # also "1,5;2,5" (decimal commas)
                 else "tabs" if line.count("\t") > line.count(",")
                 else "spaces" if len(cells) == 1 and len(line.split()) > 1 else None)
    if separator:
        raise DataError(f"{path}: values are separated by {separator}, expected commas ({quoted!r})")
    if cells[-1].strip() == "":
        what = ("an empty label, or a trailing comma on every row (the label would be read as a feature)"
                if kind == "train" else "an empty last column")
        raise DataError(f"{path}: row {number} ends with a comma: {what}; remove the trailing commas, "
                        f"e.g. sed -i 's/,$//' {path.name}")
    try:
        float(cells[0])
    except ValueError:
        raise DataError(f"{path}: row {number} is a header line ({quoted!r}); "
                        "FOP CSV files have no header: remove it") from None
    return len(cells)


def _find_bad_row(path, n_numeric):
    """Describe the first row that is not UTF-8 text, is a comment, is not as wide as the first
    row, or holds a non-number in its first n_numeric cells (all when None); None if none does."""
    expected = None
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                line = line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                return (f"{path}: row {number} is not UTF-8 text (its byte {error.start + 1}); "
                        "FOP CSV files are plain comma-separated numbers")
            if not line:
                continue  # np.loadtxt skips empty lines too
            if line.lstrip().startswith("#"):
                return f"{path}: row {number} is a comment line ({_excerpt(line)!r}); FOP CSV files hold numbers only"
            cells = line.split(",")
            expected = expected or len(cells)
            if len(cells) != expected:
                return f"{path}: row {number} has {len(cells)} columns, expected {expected}"
            for column, cell in enumerate(cells[:n_numeric], start=1):
                try:
                    float(cell)
                except ValueError:
                    return f"{path}: row {number}, column {column}: {_excerpt(cell)!r} is not a number"
    return None


def _check_row_widths(path, n_rows, n_columns):
    """Reading selected columns lets longer rows pass: every row has n_columns if the commas add up."""
    commas = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(_COUNT_BYTES):
            commas += chunk.count(b",")
    if commas != n_rows * (n_columns - 1):
        raise DataError(_find_bad_row(path, n_columns - 1) or f"{path}: rows have unequal numbers of columns")


def _first_problem(arrays):
    """The first value the model cannot take, as (array key, 0-based row, what, hint); None if none.

    A NaN, Inf or |feature| > FEATURE_LIMIT, then an empty label (labels already stripped).
    Both a parse and a cache read apply it.
    """
    bad = _first_bad_value(arrays["features"])
    if bad is not None:
        row, column, value = bad
        hint = ("features must be finite float32 numbers" if not np.isfinite(value) else
                f"features beyond ±{FEATURE_LIMIT:g} overflow the model's float32 arithmetic "
                "(BatchNorm squares them): rescale the features")
        return "features", row, f", column {column + 1} is {value:g}", f"; {hint}"
    empty = np.flatnonzero(arrays["labels"] == "") if "labels" in arrays else []
    return ("labels", int(empty[0]), ": empty label", "") if len(empty) else None


def _first_bad_value(features):
    """(row, column, value) of the first NaN, Inf or |value| > FEATURE_LIMIT, 0-based; None if none.

    Blocks of rows keep memory small; a block's min and max (NaN propagates through
    both) clear it in two passes that stay in the CPU cache, and only a block that
    fails is searched cell by cell.
    """
    block_rows = max(1, _FINITE_BLOCK_BYTES // max(1, features[:1].nbytes))
    for start in range(0, len(features), block_rows):
        block = features[start : start + block_rows]
        if block.size == 0 or (block.min() >= -FEATURE_LIMIT and block.max() <= FEATURE_LIMIT):
            continue
        row, column = np.argwhere(~(np.abs(block) <= FEATURE_LIMIT))[0]  # NaN compares False
        return start + int(row), int(column), block[row, column]
    return None


def _line_number(path, row):
    """1-based line of the file holding table row `row` (0-based): np.loadtxt skips empty lines.

    Only called on the way to an error message, so it may read the file.
    """
    try:
        with open(path, "rb") as lines:
            filled = (number for number, line in enumerate(lines, start=1) if line.rstrip(b"\r\n"))
            return next(itertools.islice(filled, row, None), row + 1)
    except OSError:
        return row + 1


def _first_columns(path, matrix, width, modality):
    if width is None:
        return matrix
    if matrix.shape[1] < width:
        raise DataError(f"{path}: has {matrix.shape[1]} columns, expected at least {width} {modality} features")
    return matrix[:, :width]


_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _normalise_labels(labels):
    """The label each cell stands for: an integral number as an integer ("7.0" -> "7"), else the text.

    Cell by cell, so a cell's label does not depend on the other rows ("3.000000" is "3"
    in a file that also holds "abc"). Each distinct text is converted once.
    """
    texts, inverse = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    keys = np.array([_label_key(text) for text in texts.tolist()] or [""], dtype=str)
    return keys[inverse.reshape(-1)]


def _label_key(text):
    if _INTEGER.fullmatch(text):
        return str(int(text))  # exact, however long
    if _DECIMAL.fullmatch(text):
        value = float(text)
        if math.isfinite(value) and value == math.floor(value) and abs(value) < 2**53:
            return str(int(value))
    return text


# ---------------------------------------------------------------------------
# Cache


def _read_cached(path, kind, cache):
    """Return the parsed arrays of a CSV, from the cache when it is valid for the source."""
    status = check_regular_file(path)
    if not cache:
        return _parse(path, kind)
    cache_dir = path.parent / CACHE_DIR_NAME
    stamp = _stamp(path, status, kind)
    arrays = _load_cache(path, cache_dir, kind, stamp)
    if arrays is None:
        arrays = _parse(path, kind)
        _save_cache(cache_dir, path.name, stamp, arrays)
    return arrays


def _stamp(path, status, kind):
    """What must be equal for a cache to stand for the file: its identity, times and end blocks.

    An edit changes ctime_ns (which a user cannot set back), and rewriting by rename changes
    the inode; the hash of the first and last _FINGERPRINT_BYTES catches the rest cheaply.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            digest.update(stream.read(_FINGERPRINT_BYTES))
            if status.st_size > _FINGERPRINT_BYTES:
                stream.seek(max(_FINGERPRINT_BYTES, status.st_size - _FINGERPRINT_BYTES))
                digest.update(stream.read(_FINGERPRINT_BYTES))
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    return {"version": CACHE_VERSION, "kind": kind, "size": status.st_size, "mtime_ns": status.st_mtime_ns,
            "ctime_ns": status.st_ctime_ns, "inode": status.st_ino, "device": status.st_dev,
            "ends_sha256": digest.hexdigest()}


def _entry(array):
    return {"shape": list(array.shape), "dtype": array.dtype.str}


def _load_cache(path, cache_dir, kind, stamp):
    """The cached arrays of `path`, or None to parse it again.

    No cache, or a stamp for another version of the source, is a plain miss. A stamp
    that matches the source but arrays that do not match the stamp (unreadable, another
    shape or dtype) or fail the checks a parse applies is a damaged cache: noted on stderr.
    """
    try:
        saved = json.loads((cache_dir / f"{path.name}.json").read_text())
    except (OSError, ValueError):  # no cache yet, or an unreadable stamp
        return None
    if not isinstance(saved, dict) or {key: saved.get(key) for key in stamp} != stamp:
        return None  # the source changed (or the cache format did)
    entries = saved.get("arrays") if isinstance(saved.get("arrays"), dict) else {}
    arrays = {}
    for key in _KEYS[kind]:
        array_path = cache_dir / f"{path.name}{_SUFFIXES[key]}"
        try:
            array = np.load(array_path, mmap_mode="r", allow_pickle=False)
        except Exception as error:       # NumPy parses the header with ast: a damaged one raises anything
            why = ("not a NumPy array file" if "pickle" in str(error)
                   else str(error).splitlines()[0] if isinstance(error, (OSError, ValueError)) and str(error)
                   else f"a damaged .npy header ({type(error).__name__})")
            return _damaged(path, array_path, f"cannot be loaded: {why}")
        if _entry(array) != entries.get(key):
            return _damaged(path, array_path, f"holds {_describe(_entry(array))} "
                            f"where the stamp says {_describe(entries.get(key))}")
        arrays[key] = array
    problem = _first_problem(arrays)
    if problem is not None:
        key, row, what, _ = problem
        return _damaged(path, cache_dir / f"{path.name}{_SUFFIXES[key]}", f"row {row + 1}{what}")
    return arrays


def _describe(entry):
    """An array's entry of the stamp as "<f4 (rows, columns)" (whatever a damaged stamp holds)."""
    if isinstance(entry, dict) and isinstance(entry.get("shape"), list):
        return f"{entry.get('dtype')} {tuple(entry['shape'])}"
    return repr(entry)


def _damaged(path, array_path, problem):
    """Say on stderr that a cache entry is not used, and return None (parse the CSV again)."""
    print(f"{path}: cache {array_path.name} is damaged ({_excerpt(problem)}); "
          "rebuilding it from the CSV", file=sys.stderr, flush=True)
    return None


def _save_cache(cache_dir, name, stamp, arrays):
    """Write the arrays, then the stamp (the source's facts and each array's shape and dtype) that
    validates them; skip silently if we cannot write."""
    stamp = {**stamp, "arrays": {key: _entry(array) for key, array in arrays.items()}}
    try:
        cache_dir.mkdir(exist_ok=True)
        stamp_path = cache_dir / f"{name}.json"
        stamp_path.unlink(missing_ok=True)  # the old stamp must not vouch for half-written arrays
        for key, array in arrays.items():
            write_atomically(cache_dir / f"{name}{_SUFFIXES[key]}", lambda stream, array=array: np.save(stream, array))
        write_atomically(stamp_path, lambda stream: stream.write(json.dumps(stamp).encode()))
    except OSError:
        pass
