"""Shared fixtures: every operation test runs on NumPy, and on CuPy when a GPU is present.

The CuPy half asks the library's one device probe (``backend.probe_gpu``).
Without a usable GPU it is skipped, with the probe's reason (the real
exception) in the skip message; with ``PAEFF_REQUIRE_GPU=1`` it fails instead,
so a GPU CI job cannot pass while running no GPU test.
"""
import contextlib
import os
import signal

import numpy as np
import pytest

from paeff_np import backend
from paeff_np.model import batchnorm_prefixes

REQUIRE_GPU = os.environ.get("PAEFF_REQUIRE_GPU") == "1"


def require_gpu():
    """The probed ``cupy`` module; else skip with the probe's reason, or fail
    under ``PAEFF_REQUIRE_GPU=1``."""
    cupy, reason = backend.probe_gpu()
    if cupy is None:
        if REQUIRE_GPU:
            pytest.fail(f"PAEFF_REQUIRE_GPU=1 but no usable GPU: {reason}", pytrace=False)
        pytest.skip(reason)
    return cupy


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module a test runs on; the CuPy half needs a GPU (``require_gpu``)."""
    if request.param == "numpy":
        return np
    return require_gpu()


@pytest.fixture
def cuda():
    """The ``cupy`` module for a test that needs a real GPU (``require_gpu``)."""
    return require_gpu()


# A tiny synthetic world for end-to-end runs on any device (tests/test_gpu.py,
# tests/test_strict_xp.py): 1,608 training pairs, 27 identities, lists of 200 rows.
TINY_WORLD = dict(n_identities=40, seed=0, face_dim=256, voice_dim=64, test_rows=200)


@pytest.fixture
def tiny_world():
    return dict(TINY_WORLD)


@pytest.fixture
def tiny_run(tmp_path):
    """``tiny_run(device, dropout=0.0, name="run")``: on TINY_WORLD, epoch 1,
    save, load the checkpoint into a new Trainer, epoch 2, evaluate. Returns
    ``(records, host params, results, run folder)``."""
    from paeff_np.run import checkpoint as ckpt
    from paeff_np.data.synth import make_synthetic
    from paeff_np.run.evaluation import evaluate
    from paeff_np.model import Config
    from paeff_np.run.training import NO_SELECTION, Trainer, TrainSettings

    def run(device, dropout=0.0, name="run"):
        dataset = make_synthetic(**TINY_WORLD)
        train = dataset.train
        cfg = Config(face_dim=train.face_dim, voice_dim=train.voice_dim, embed_dim=32,
                     n_classes=train.n_classes, dropout=dropout)
        settings = TrainSettings(epochs=2, lr=1e-3, batch_size=64, device=device, **NO_SELECTION)
        meta = {"source": "synthetic", "synthetic": TINY_WORLD}
        out = str(tmp_path / name)
        os.makedirs(out)
        first = Trainer(dataset, cfg, settings, out, meta, log=lambda line: None)
        records = first.train(stop_after=1)
        checkpoint = ckpt.load(out)
        resumed = Trainer(dataset, checkpoint.cfg, settings, out, meta, log=lambda line: None)
        resumed.restore(checkpoint)
        records += resumed.train()
        results = evaluate(resumed.params, resumed.buffers, resumed.cfg, dataset.tests, seed=0)
        params = {k: backend.to_host(v) for k, v in resumed.params.items()}
        return records, params, results, out
    return run


@pytest.fixture
def rand(xp):
    """``rand(*shape, seed=0, scale=1.0)``: float64 standard normals on ``xp``."""
    def make(*shape, seed=0, scale=1.0):
        return xp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale)
    return make


# --- helpers shared by the test files ---

# worst relative error accepted by every float64 gradient check, and a model small
# enough for finite differences over every parameter: the gradient checker's own
from paeff_np.gradcheck import TOLERANCE as TOL            # noqa: E402
from paeff_np.gradcheck.cases import SMALL                 # noqa: E402


def pre_batchnorm_biases(cfg):
    """Biases feeding a train-mode BatchNorm: their gradient is exactly zero."""
    return {p[:-2] + "0.bias" for p in batchnorm_prefixes(cfg)}


def small_batch(xp, B=8, seed=0):
    rng = np.random.default_rng(seed)
    face = xp.asarray(np.abs(rng.standard_normal((B, SMALL["face_dim"]))))
    voice = xp.asarray(rng.standard_normal((B, SMALL["voice_dim"])))
    labels = xp.asarray(np.array([0, 1, 2, 0, 1, 2, 0, 1])[:B])
    return face, voice, labels


def to_xp(d, xp):
    return {k: xp.asarray(v) for k, v in d.items()}


# --- end-to-end helpers for the command-line tests ---

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """FOP CSV files of a 24-identity synthetic world (32/16-d features, lists of
    40 rows), written once per test module (a module may define its own)."""
    from paeff_np.data.synth import make_synthetic, save_dir
    d = tmp_path_factory.mktemp("tiny")
    save_dir(make_synthetic(n_identities=24, seed=5, face_dim=32, voice_dim=16, test_rows=40), d)
    return str(d)


def one_line_error(capsys, *words):
    """What a user error leaves on stderr: one line holding ``words`` (notes aside)."""
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("note:")]
    assert len(lines) == 1, lines
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def no_hang(seconds=20):
    """Fail (instead of blocking forever) when the code inside opens a named pipe that
    nobody writes: SIGALRM interrupts the blocked open."""
    def hung(*_):
        raise AssertionError(f"still blocked after {seconds} s (a named pipe opened?)")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def recorded_renames(folder, call):
    """Run ``call()`` with ``os.replace`` recorded; return the targets of its renames, in
    order, relative to ``folder`` (every file is renamed into place: see atomic.py)."""
    targets, real_replace = [], os.replace

    def replace(src, dst):
        targets.append(os.path.relpath(dst, folder))
        real_replace(src, dst)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        call()
    return targets
