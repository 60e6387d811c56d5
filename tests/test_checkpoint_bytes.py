"""Whatever bytes a checkpoint holds, loading it ends in a clean load or one line naming it.

``PAEFF_FUZZ_VALUES=all`` flips every byte to four values (0x00, 0xff, and the byte
with its lowest or highest bit flipped) instead of CI's one (all bits flipped).
"""
import io
import json
import os
import zipfile

import numpy as np
import pytest

from paeff_np.data.synth import make_synthetic
from paeff_np.model import Config
from paeff_np.run import checkpoint as ckpt
from paeff_np.run.training import Trainer, TrainSettings

ALL_VALUES = os.environ.get("PAEFF_FUZZ_VALUES") == "all"
WORLD = dict(n_identities=6, seed=0, face_dim=3, voice_dim=2, test_rows=8)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """The bytes of the smallest checkpoint a run writes: D = 2, 3/2-d features, one
    epoch, kept without its optimizer state (as best.npz is), about 8 KB."""
    out = str(tmp_path_factory.mktemp("small"))
    dataset = make_synthetic(**WORLD)
    cfg = Config(face_dim=3, voice_dim=2, embed_dim=2, n_classes=dataset.train.n_classes, dropout=0.0)
    settings = TrainSettings(epochs=1, lr=1e-3, batch_size=8, val_identities=0, val_rows=0, select="last")
    trainer = Trainer(dataset, cfg, settings, out, {"source": "synthetic", "synthetic": WORLD},
                      log=lambda line: None)
    trainer.train()
    run = ckpt.load(out)
    ckpt.save(out, run.params, run.buffers, run.cfg, epoch=run.epoch, label_values=run.label_values,
              meta={k: run.config[k] for k in ("train", "data")}, history=run.history, name="small.npz")
    with open(os.path.join(out, "small.npz"), "rb") as f:
        return f.read()


def load_bytes(tmp_path, data, name="c.npz"):
    """ckpt.load of ``data`` written to a file: the Checkpoint, or the one-line message."""
    path = tmp_path / name
    path.write_bytes(data)
    try:
        return ckpt.load(str(path))
    except ckpt.CheckpointError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message, message
        return message


def fuzzed_offsets(data):
    """CI's share of the offsets: every byte of the central directory and end record,
    every third byte of the entries' zip records and .npy headers (alike from entry to
    entry), every 16th of the arrays' data (each such flip takes one path: the entry's
    CRC). ``PAEFF_FUZZ_VALUES=all``: every offset."""
    if ALL_VALUES:
        return range(len(data))
    array_data = set()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
    for info in infos:
        local = info.header_offset            # a local record: 30 bytes, then name and extra
        start = (local + 30 + int.from_bytes(data[local + 26:local + 28], "little")
                 + int.from_bytes(data[local + 28:local + 30], "little"))
        npy_header = 10 + int.from_bytes(data[start + 8:start + 10], "little")
        array_data.update(range(start + npy_header, start + info.compress_size))
    directory = data.index(b"PK\x01\x02", infos[-1].header_offset)
    return [i for i in range(len(data))
            if i >= directory or (i % 16 == 0 if i in array_data else i % 3 == 0)]


def test_every_byte_flipped_loads_cleanly_or_is_one_line(small_checkpoint, tmp_path):
    assert isinstance(load_bytes(tmp_path, small_checkpoint), ckpt.Checkpoint)
    escaped = []
    for offset in fuzzed_offsets(small_checkpoint):
        byte = small_checkpoint[offset]
        values = {0x00, 0xFF, byte ^ 0x01, byte ^ 0x80} if ALL_VALUES else {byte ^ 0xFF}
        for value in values - {byte}:
            damaged = bytearray(small_checkpoint)
            damaged[offset] = value
            try:
                load_bytes(tmp_path, bytes(damaged))
            except Exception as exc:        # anything but a clean load or a CheckpointError
                escaped.append((offset, value, f"{type(exc).__name__}: {exc}"[:120]))
    assert not escaped, escaped[:5]


def npz_of(entries, compression=zipfile.ZIP_STORED):
    """An .npz archive of ``{name: npy bytes}``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name + ".npy", data)
    return buffer.getvalue()


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def entries_of(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename[:-4]: archive.read(info) for info in archive.infolist()}


def test_a_declared_shape_that_cannot_fit_is_refused_before_allocating(tmp_path):
    header = npy(np.zeros(3, np.float32)).replace(b"(3,)", b"(10000000000000,)")
    message = load_bytes(tmp_path, npz_of({"params/x": header}))
    assert "declares float32 (10000000000000,)" in message


def test_encrypted_and_unsupported_entries_are_one_line(small_checkpoint, tmp_path):
    data = bytearray(small_checkpoint)
    data[6] |= 0x01                          # the first local header's "encrypted" flag
    central = small_checkpoint.index(b"PK\x01\x02")
    data[central + 8] |= 0x01                # and its central directory record's
    assert "encrypted" in load_bytes(tmp_path, bytes(data))
    bzip = npz_of(entries_of(small_checkpoint), zipfile.ZIP_BZIP2)
    assert "compression 12" in load_bytes(tmp_path, bzip)


def test_a_damaged_npy_header_is_one_line(small_checkpoint, tmp_path):
    entries = entries_of(small_checkpoint)
    entries["config"] = entries["config"][:20] + b"{{{{" + entries["config"][24:]
    assert "corrupt or not a checkpoint" in load_bytes(tmp_path, npz_of(entries))


def _with_config(small_checkpoint, change):
    entries = entries_of(small_checkpoint)
    config = json.loads(str(np.load(io.BytesIO(entries["config"]))))
    change(config)
    entries["config"] = npy(np.array(json.dumps(config)))
    return npz_of(entries)


def test_metadata_nested_absurdly_deep_is_one_line(small_checkpoint, tmp_path):
    deep = "[" * 100000 + "]" * 100000
    entries = entries_of(small_checkpoint)
    config = str(np.load(io.BytesIO(entries["config"])))
    entries["config"] = npy(np.array(config.replace('"epoch": 1', '"epoch": ' + deep, 1)))
    assert "entry 'config'" in load_bytes(tmp_path, npz_of(entries))
    entries["config"] = npy(np.array(config.replace('"epoch": 1', '"epoch": ' + "[" * 500 + "]" * 500, 1)))
    assert "nested more than" in load_bytes(tmp_path, npz_of(entries))


@pytest.mark.parametrize("field", ["n_classes", "voice_dim", "egff_kernel"])
def test_config_sizes_that_would_allocate_terabytes_are_refused_first(small_checkpoint, tmp_path, field):
    def huge(config):
        config["model"][field] = 10**11 + 1
    message = load_bytes(tmp_path, _with_config(small_checkpoint, huge))
    # a kernel that wide is refused by Config's own rule (wider than 2·D − 1) before any shape
    refusal = "never meet a feature" if field == "egff_kernel" else "the config needs"
    assert refusal in message and str(10**11 + 1) in message
