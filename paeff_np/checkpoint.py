"""Checkpoints: ``checkpoint.npz`` (every array) + ``config.json`` (everything else).

Both files are written atomically (a temporary file in the same folder, then
``os.replace``), so an interrupted save leaves the previous checkpoint whole.
The npz is read with ``allow_pickle=False``; the two files carry the same
``epoch`` so a pair from different saves is refused.
"""
import json
import os
import zipfile

import numpy as np

from .atomic import write_atomically, write_json  # noqa: F401  (re-exported)
from .backend import to_host
from .model import Config

CHECKPOINT_NAME = "checkpoint.npz"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A missing, corrupt or mismatched checkpoint: one line naming the file."""


def save(out_dir, params, buffers, cfg, *, epoch, optimizer=None, label_values=None, meta=None):
    """Write ``checkpoint.npz`` and ``config.json`` into ``out_dir``.

    ``meta``: JSON-ready extras (training settings, data source, ...).
    """
    arrays = {f"params/{k}": to_host(v) for k, v in params.items()}
    arrays.update({f"buffers/{k}": to_host(v) for k, v in buffers.items()})
    opt_meta = None
    if optimizer is not None:
        opt_meta, opt_arrays = optimizer.state_dict()
        arrays.update({f"optimizer/{k}": v for k, v in opt_arrays.items()})
    if label_values is not None:
        arrays["label_values"] = np.asarray(label_values).astype(str)
    arrays["epoch"] = np.array(epoch, dtype=np.int64)
    config = dict(format_version=FORMAT_VERSION, epoch=int(epoch), model=cfg.to_dict(),
                  optimizer=opt_meta, **(meta or {}))
    write_atomically(os.path.join(out_dir, CHECKPOINT_NAME), lambda f: np.savez(f, **arrays))
    write_json(os.path.join(out_dir, CONFIG_NAME), config)


class Checkpoint:
    """What ``load`` returns: ``cfg``, ``params``, ``buffers`` (NumPy),
    ``optimizer`` (``(meta, arrays)`` or None), ``label_values``, ``epoch``, ``config``."""

    def __init__(self, cfg, params, buffers, optimizer, label_values, epoch, config):
        self.cfg, self.params, self.buffers = cfg, params, buffers
        self.optimizer, self.label_values = optimizer, label_values
        self.epoch, self.config = epoch, config


def resolve(path):
    """``(npz path, json path)`` from a run folder or a ``checkpoint.npz`` path."""
    if os.path.isdir(path):
        npz = os.path.join(path, CHECKPOINT_NAME)
    else:
        npz = path
    return npz, os.path.join(os.path.dirname(os.path.abspath(npz)), CONFIG_NAME)


def load(path):
    """Read a checkpoint written by ``save``; raise CheckpointError on any problem."""
    npz_path, json_path = resolve(path)
    for p in (npz_path, json_path):
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: no such file")
    try:
        with open(json_path) as f:
            config = json.load(f)
        cfg = Config.from_dict(config["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{json_path}: not a paeff_np config ({exc})") from None
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"{npz_path}: corrupt or not a checkpoint ({exc})") from None
    group = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    params, buffers = group("params/"), group("buffers/")
    epoch = int(arrays.get("epoch", -1))
    if epoch != config.get("epoch"):
        raise CheckpointError(f"{npz_path}: epoch {epoch} does not match {json_path} "
                              f"(epoch {config.get('epoch')}); the two files are from different saves")
    from .model import init_params
    expected_params, expected_buffers = init_params(cfg, seed=0, dtype=np.float32)
    for name, got, want in (("parameter", params, expected_params), ("buffer", buffers, expected_buffers)):
        missing = sorted(set(want) - set(got))
        if missing:
            raise CheckpointError(f"{npz_path}: {name} {missing[0]} is missing")
        for k, v in want.items():
            if got[k].shape != v.shape:
                raise CheckpointError(f"{npz_path}: {k} has shape {got[k].shape}, the config "
                                      f"in {CONFIG_NAME} needs {v.shape}")
            if got[k].dtype.kind == "f" and not np.isfinite(got[k]).all():
                raise CheckpointError(f"{npz_path}: {k} holds NaN or Inf")
    optimizer = None
    if config.get("optimizer") is not None:
        optimizer = (config["optimizer"], group("optimizer/"))
    return Checkpoint(cfg, params, buffers, optimizer, arrays.get("label_values"), epoch, config)
