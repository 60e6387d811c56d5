"""Checkpoints: one ``.npz`` that is the whole saved state, and the single commit point.

A run must survive ``kill -9`` at any instant, so a save has exactly one
moment at which it takes effect: the ``os.replace`` of the ``.npz``
(``atomic.write_atomically``). The ``.npz`` therefore carries everything
needed to evaluate or resume: parameters, buffers, optimizer state, label
mapping, and, as JSON strings, the metadata (``config``: format, epoch,
model Config, optimizer numbers, training settings, data source) and the
per-epoch log records (``history``). Before the rename the previous save is
whole; after it the new one is.

``config.json`` beside it is a readable copy of the metadata, written after
the ``.npz``; it is never read back, so a kill between the two renames costs
nothing. ``metrics.jsonl`` is likewise a copy of ``history``, rewritten from
the checkpoint on resume. The same ``save``/``load`` serve any second file of
a run (e.g. a ``best.npz``): its readable copy is ``best.json``.

Loading validates every field (``allow_pickle=False``; one line naming the
file and the field on any problem): the model and training settings by the
domains of ``Config`` and ``TrainSettings`` themselves (``paeff_np/domains.py``).
Only this format (2) is read: 0.1.0 reads no earlier one.
"""
import json
import math
import os
import struct
import zipfile
import zlib

import numpy as np

from .atomic import write_atomically, write_json
from ..backend import to_host
from ..domains import FieldError, check_fields, check_known, is_integer, is_number, named
from ..model import BRANCHES, Config
from ..optim import AdamW

CHECKPOINT_NAME = "checkpoint.npz"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 2
DATA_SOURCES = ("dir", "synthetic")
FIRST_WEIGHT = BRANCHES[0] + "0.weight"    # (embed_dim, face_dim): checked before building a model


ZIP_MAGIC = b"PK\x03\x04"     # how an .npz (a zip archive) begins
JSON_ENTRIES = ("config", "history")
JSON_ENTRY_MAX_BYTES = 64 << 20   # the metadata and the per-epoch records: far below this
JSON_MAX_DEPTH = 8                # the metadata nests 3 levels; deeper is not ours
DEFLATE_MAX_RATIO = 1032          # the most deflate can expand (zlib's own bound)
# what reading a damaged zip or .npy can raise, caught in read_npz and nowhere else
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, struct.error, ValueError,
                OSError, EOFError, NotImplementedError, RuntimeError, OverflowError, KeyError,
                TypeError, SyntaxError, MemoryError)


class CheckpointError(Exception):
    """A missing, corrupt or mismatched checkpoint: one line naming the file."""


def readable_copy_name(npz_name):
    """``config.json`` for ``checkpoint.npz``; ``<stem>.json`` for any other checkpoint."""
    return CONFIG_NAME if npz_name == CHECKPOINT_NAME else os.path.splitext(npz_name)[0] + ".json"


def save(out_dir, params, buffers, cfg, *, epoch, optimizer=None, label_values=None, meta=None,
         history=(), name=CHECKPOINT_NAME):
    """Write ``name`` (the commit point), then its readable JSON copy, into ``out_dir``.

    ``meta``: JSON-ready extras (training settings, data source, ...);
    ``history``: the per-epoch log records so far (one per epoch).
    """
    arrays = {f"params/{k}": to_host(v) for k, v in params.items()}
    arrays.update({f"buffers/{k}": to_host(v) for k, v in buffers.items()})
    opt_meta = None
    if optimizer is not None:
        opt_meta, opt_arrays = optimizer.state_dict()
        arrays.update({f"optimizer/{k}": v for k, v in opt_arrays.items()})
    if label_values is not None:
        arrays["label_values"] = np.asarray(label_values).astype(str)
    config = dict(format_version=FORMAT_VERSION, epoch=int(epoch), model=cfg.to_dict(),
                  optimizer=opt_meta, **(meta or {}))
    arrays["config"] = np.array(json.dumps(config))
    arrays["history"] = np.array(json.dumps(list(history)))
    write_atomically(os.path.join(out_dir, name), lambda f: np.savez(f, **arrays))
    write_json(os.path.join(out_dir, readable_copy_name(name)), config)


class Checkpoint:
    """What ``load`` returns: ``cfg``, ``params``, ``buffers`` (NumPy),
    ``optimizer`` (``(meta, arrays)`` or None), ``label_values``, ``epoch``,
    ``config`` (the metadata), ``history`` (the per-epoch records), ``path``."""

    def __init__(self, cfg, params, buffers, optimizer, label_values, epoch, config, history, path):
        self.cfg, self.params, self.buffers = cfg, params, buffers
        self.optimizer, self.label_values = optimizer, label_values
        self.epoch, self.config, self.history, self.path = epoch, config, history, path


def resolve(path):
    """``(npz path, readable copy path)`` from a run folder or a checkpoint's path."""
    npz = os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path
    return npz, os.path.join(os.path.dirname(os.path.abspath(npz)),
                             readable_copy_name(os.path.basename(npz)))


def load(path):
    """Read a checkpoint written by ``save``; raise CheckpointError on any problem."""
    if not path:
        raise CheckpointError("the checkpoint path is empty: give a run folder or a .npz file")
    npz_path, json_path = resolve(path)
    if not os.path.isfile(npz_path):
        what = "not a regular file" if os.path.exists(npz_path) else "no such file"
        raise CheckpointError(f"{npz_path}: {what}")
    arrays = read_npz(npz_path)
    if "config" not in arrays and not any(k.startswith("params/") for k in arrays):
        raise CheckpointError(f"{npz_path}: an .npz archive, but not a paeff_np checkpoint "
                              f"(no config and no params/ entries)")
    if "config" not in arrays:
        raise CheckpointError(f"{npz_path}: no metadata entry 'config' (a checkpoint of an earlier "
                              f"format, which 0.1.0 does not read, or a damaged one)")
    config = _json_entry(arrays, "config", npz_path)
    history = _json_entry(arrays, "history", npz_path)
    cfg = _check_config(config, npz_path)
    group = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    params, buffers = group("params/"), group("buffers/")
    _check_arrays(params, buffers, cfg, npz_path)
    optimizer = None
    if config["optimizer"] is not None:
        optimizer = (config["optimizer"], group("optimizer/"))
        _check_optimizer_arrays(optimizer[1], params, config["optimizer"]["t"], npz_path)
    label_values = arrays.get("label_values")
    if label_values is not None and (label_values.ndim != 1 or label_values.dtype.kind != "U"
                                     or len(label_values) != cfg.n_classes):
        raise CheckpointError(f"{npz_path}: label_values must be {cfg.n_classes} strings "
                              f"(model.n_classes), got {label_values.dtype} {label_values.shape}")
    _check_history(history, config["epoch"], npz_path)
    return Checkpoint(cfg, params, buffers, optimizer, label_values, config["epoch"], config,
                      history, npz_path)


def read_npz(npz_path):
    """``{name: array}`` of the ``.npz`` at ``npz_path``; whatever its bytes, any problem
    is one CheckpointError naming the file (the one function that reads checkpoint bytes).

    Before an entry is read, its zip record must be plain (not encrypted, stored or
    deflated within deflate's own ratio) and its ``.npy`` header must declare a
    non-object dtype and a shape whose bytes are exactly those the entry holds, so
    nothing is allocated that the file does not hold; the JSON entries are bounded
    by ``JSON_ENTRY_MAX_BYTES``. The zip layer checks each entry's CRC as it is read.
    """
    with open(npz_path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        raise CheckpointError(f"{npz_path}: corrupt or not a checkpoint "
                              f"({'an empty file' if not head else 'not an .npz archive'})")
    try:
        with zipfile.ZipFile(npz_path) as archive:
            arrays = {}
            for info in archive.infolist():
                key = _entry_key(info, arrays)
                with archive.open(info) as entry:
                    arrays[key] = _read_entry(entry, key, info.file_size)
            return arrays
    except CheckpointError:
        raise
    except _READ_ERRORS as exc:
        why = ("an entry holds pickled objects, never loaded" if "pickle" in str(exc)
               else str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        raise CheckpointError(f"{npz_path}: corrupt or not a checkpoint ({why})") from None


def _entry_key(info, seen):
    """The array name of a zip record, once its record is one ``np.savez`` could write."""
    name = info.filename
    if not name.endswith(".npy"):
        raise ValueError(f"entry {name[:60]!r} is not a .npy array")
    key = name[:-len(".npy")]
    if key in seen:
        raise ValueError(f"entry {key[:60]!r} appears twice")
    if info.flag_bits & 0x1:
        raise ValueError(f"entry {key[:60]!r} is encrypted")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise ValueError(f"entry {key[:60]!r} is stored, yet its sizes differ")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > DEFLATE_MAX_RATIO * max(info.compress_size, 1):
            raise ValueError(f"entry {key[:60]!r} declares {info.file_size:,} bytes from "
                             f"{info.compress_size:,}: more than deflate can give")
    else:
        raise ValueError(f"entry {key[:60]!r} uses zip compression {info.compress_type}, "
                         f"which np.savez never writes")
    return key


def _read_entry(entry, key, size):
    """One ``.npy`` record of ``size`` bytes: its header, checked, then exactly the
    bytes it declares, read into the array (to the record's end: the CRC is checked)."""
    version = np.lib.format.read_magic(entry)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"entry {key[:60]!r}: .npy format {version} is not supported")
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    try:                                 # NumPy parses the header with ast: it can raise anything
        shape, fortran, dtype = read_header(entry)
    except (OSError, EOFError, zipfile.BadZipFile):
        raise
    except Exception as exc:
        raise ValueError(f"entry {key[:60]!r}: damaged .npy header ({type(exc).__name__})") from None
    _check_declared(key, shape, dtype, size - entry.tell())
    array = np.empty(shape, dtype, order="F" if fortran else "C")
    buffer, done = memoryview(array.reshape(-1, order="A").view(np.uint8)), 0
    while done < len(buffer):
        got = entry.readinto(buffer[done:])
        if not got:
            raise EOFError(f"entry {key[:60]!r} ends early")
        done += got
    if entry.read(1):
        raise ValueError(f"entry {key[:60]!r} holds more than its header declares")
    return array


def _check_declared(key, shape, dtype, data_bytes):
    """An entry's header must declare exactly the bytes that follow it."""
    if dtype.hasobject:
        raise ValueError("an entry holds pickled objects, never loaded")
    declared = math.prod(shape) * dtype.itemsize
    if declared != data_bytes:
        raise ValueError(f"entry {key[:60]!r} declares {dtype} {tuple(shape)} ({declared:,} bytes) "
                         f"but holds {max(data_bytes, 0):,} bytes")
    if key in JSON_ENTRIES and declared > JSON_ENTRY_MAX_BYTES:
        raise ValueError(f"entry {key!r} holds {declared:,} bytes of metadata, more than "
                         f"{JSON_ENTRY_MAX_BYTES:,}")


def check_same_run(best, run):
    """Refuse a ``best`` (a loaded best.npz) that another run wrote: its model
    configuration, its labels and its records of epochs 1..k must be those of
    ``run`` (the run's loaded checkpoint.npz). The records hold each epoch's
    losses and timings, which no other run repeats."""
    same_labels = (best.label_values is None) == (run.label_values is None) and (
        best.label_values is None or np.array_equal(best.label_values, run.label_values))
    checks = [("model configuration", best.cfg == run.cfg), ("labels", same_labels),
              ("training records", best.history is None or run.history is None
               or best.history == run.history[:best.epoch])]
    differing = [what for what, same in checks if not same]
    if differing:
        raise CheckpointError(f"{best.path}: not from the run in {os.path.dirname(run.path)}: "
                              f"its {' and '.join(differing)} differ from {CHECKPOINT_NAME}'s")


def _json_entry(arrays, key, npz_path):
    entry = arrays.get(key)
    try:
        if entry is None or entry.ndim != 0 or entry.dtype.kind != "U":
            raise ValueError("not a JSON string")
        value = json.loads(str(entry))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{npz_path}: entry {key!r} is damaged ({exc})") from None
    _check_depth(value, f"{npz_path}: entry {key!r}")
    return value


def _check_depth(value, where):
    """Refuse JSON nested deeper than JSON_MAX_DEPTH (walked level by level, without
    recursion), so that no later comparison or message recurses through it."""
    level, depth = [value], 0
    while True:
        containers = [x for x in level if isinstance(x, (dict, list))]
        if not containers:
            return
        depth += 1
        if depth > JSON_MAX_DEPTH:
            raise CheckpointError(f"{where}: JSON nested more than {JSON_MAX_DEPTH} levels deep; "
                                  f"not a paeff_np checkpoint's metadata")
        level = [child for x in containers for child in (x.values() if isinstance(x, dict) else x)]


# --- field-by-field validation of the metadata ----------------------------------------

def _fail(where, field, problem):
    raise CheckpointError(f"{where}: {field}: {problem}")


def _section(config, key, where, allow_none=False):
    if key not in config:
        _fail(where, key, "missing section")
    value = config[key]
    if value is None and allow_none:
        return None
    if not isinstance(value, dict):
        _fail(where, key, f"expected an object, got {json.dumps(value)[:40]}")
    return value


def _check_config(config, where):
    """Check the metadata field by field; return its model Config."""
    if not isinstance(config, dict):
        _fail(where, "metadata", "expected a JSON object")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        _fail(where, "format_version", f"expected {FORMAT_VERSION}, got {json.dumps(version)[:40]}"
              + (" (an earlier format, which 0.1.0 does not read)" if version == 1 else ""))
    if not is_integer(config.get("epoch")) or config["epoch"] < 0:
        _fail(where, "epoch", f"expected an integer >= 0, got {json.dumps(config.get('epoch'))[:40]}")
    cfg = _check_model(_section(config, "model", where), where)
    optimizer = _section(config, "optimizer", where, allow_none=True)
    if optimizer is not None:
        _check_optimizer(optimizer, where)
    _section(config, "train", where)              # its fields: training.TrainSettings.from_dict
    _check_data(_section(config, "data", where), where)
    _check_validation(config.get("validation"), where)
    return cfg


def _check_model(model, where):
    """The ``model`` section as a Config: every field, each in Config's own domain."""
    try:
        return Config.from_dict(model, where="")
    except FieldError as exc:
        raise CheckpointError(f"{where}: {exc.describe(named(lambda field: f'model.{field}'))}") from None


def check_settings(checkpoint_path, train):
    """The ``train`` section as ``TrainSettings`` (checked by its own domains); a
    damaged field raises CheckpointError naming the file and the field."""
    from .training import TrainSettings
    try:
        return TrainSettings.from_dict(train, where="")
    except FieldError as exc:
        raise CheckpointError(f"{checkpoint_path}: {exc.describe(named(lambda field: f'train.{field}'))}") from None


def _check_optimizer(optimizer, where):
    """The ``optimizer`` section: AdamW's state numbers, each in AdamW's own domain."""
    try:
        check_known(optimizer, AdamW.STATE_DOMAINS)
        check_fields(optimizer, AdamW.STATE_DOMAINS)
    except FieldError as exc:
        raise CheckpointError(f"{where}: {exc.describe(named(lambda field: f'optimizer.{field}'))}") from None


def _check_data(data, where):
    source = data.get("source")
    if data and source not in DATA_SOURCES:       # {}: a library run that named no data
        _fail(where, "data.source", f"expected one of {DATA_SOURCES}, got {json.dumps(source)[:40]}")
    if source == "dir" and not (isinstance(data.get("data_dir"), str) and data.get("data_dir")):
        _fail(where, "data.data_dir", f"expected a folder name, got {json.dumps(data.get('data_dir'))[:40]}")
    digest = data.get("train_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(ch in "0123456789abcdef" for ch in digest)):
        _fail(where, "data.train_sha256", f"expected 64 hex digits, got {json.dumps(digest)[:40]}")
    if source == "synthetic":
        knobs = data.get("synthetic")
        if not isinstance(knobs, dict):
            _fail(where, "data.synthetic", "expected an object")
        for key, value in knobs.items():
            if not is_number(value):
                _fail(where, f"data.synthetic.{key}", f"expected a number, got {json.dumps(value)[:40]}")


def _check_history(history, epoch, where):
    if not isinstance(history, list) or len(history) != epoch:
        _fail(where, "history", f"expected {epoch} per-epoch records (one per epoch done)")
    for i, record in enumerate(history):
        if not isinstance(record, dict) or record.get("epoch") != i + 1:
            _fail(where, f"history[{i}]", f"expected the record of epoch {i + 1}")
        for key, value in record.items():      # the figures model selection compares
            if not (value is None or is_number(value)):
                _fail(where, f"history[{i}].{key}", f"expected a finite number, got {json.dumps(value)[:40]}")


def _check_validation(validation, where):
    """The record of the validation split: None (no split) or an object whose
    ``pairs`` counts the pairs of each part."""
    if validation is None:
        return
    if not isinstance(validation, dict):
        _fail(where, "validation", f"expected an object or null, got {json.dumps(validation)[:40]}")
    pairs = validation.get("pairs", {})
    if not (isinstance(pairs, dict) and all(is_integer(n) for n in pairs.values())):
        _fail(where, "validation.pairs", f"expected pair counts per part, got {json.dumps(pairs)[:40]}")


def _check_arrays(params, buffers, cfg, where):
    """Names, shapes, dtypes and finiteness of the parameters and buffers against ``cfg``."""
    for key, shape in _size_carriers(cfg).items():     # before a model of cfg is built
        got = params.get(key)
        if got is None or got.shape != shape:
            _fail(where, key, f"shape {None if got is None else got.shape}, the config needs {shape}")
    from ..model import init_params
    expected_params, expected_buffers = init_params(cfg, seed=0, dtype=np.float32)
    for kind, got, want in (("parameter", params, expected_params), ("buffer", buffers, expected_buffers)):
        missing = sorted(set(want) - set(got))
        if missing:
            _fail(where, missing[0], f"{kind} is missing")
        unknown = sorted(set(got) - set(want))
        if unknown:
            _fail(where, unknown[0], f"unknown {kind} for this config")
        for k, v in want.items():
            if got[k].shape != v.shape:
                _fail(where, k, f"shape {got[k].shape}, the config needs {v.shape}")
            integer = k.endswith("num_batches_tracked")
            if integer and got[k].dtype.kind not in "iu":
                _fail(where, k, f"dtype {got[k].dtype}, expected an integer")
            if not integer and got[k].dtype not in (np.float32, np.float64):
                _fail(where, k, f"dtype {got[k].dtype}, expected float32 or float64")
            if not integer and not np.isfinite(got[k]).all():
                _fail(where, k, "holds NaN or Inf")
            if k.endswith("running_var") and (got[k] < 0).any():
                _fail(where, k, "holds a negative variance")


def _size_carriers(cfg):
    """The parameter that carries each size of the config (face_dim, voice_dim, embed_dim,
    n_classes, egff_kernel), with the shape the config gives it: checked before
    ``init_params`` builds a model of that config, so a config whose sizes would
    allocate gigabytes is refused unless the file holds those gigabytes itself."""
    D = cfg.embed_dim
    shapes = {FIRST_WEIGHT: (D, cfg.face_dim), BRANCHES[1] + "0.weight": (D, cfg.voice_dim),
              "logits_layer.weight": (cfg.n_classes, D)}
    if cfg.fusion == "egff":
        shapes["fusion_layer.conv.weight"] = (1, 2 if cfg.egff_gate == "concat" else 1, cfg.egff_kernel)
    return shapes


def _check_optimizer_arrays(arrays, params, steps, where):
    for key, a in arrays.items():
        moment, _, name = key.partition("/")
        if moment not in ("m", "v") or name not in params:
            _fail(where, f"optimizer/{key}", "unknown optimizer array")
        if a.shape != params[name].shape or a.dtype.kind != "f" or not np.isfinite(a).all():
            _fail(where, f"optimizer/{key}", f"expected finite floats of shape {params[name].shape}")
    if steps > 0 and len(arrays) != 2 * len(params):
        _fail(where, "optimizer", f"the AdamW moments of {2 * len(params) - len(arrays)} "
              f"arrays are missing")
