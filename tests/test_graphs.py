"""CUDA graphs (paeff_np/graphs.py, ``train.py --cuda-graphs``), tested on the CPU
through the CuPy test double, which simulates capture and replay (tests/strict_xp.py:
a captured kernel does not run until its graph is launched, its new arrays read as
garbage until then, cuBLAS and cuRAND calls are refused while capturing).

A replayed step must give the eager step's bits; what it costs is counted in
tests/test_launches.py. No GPU has run this: these tests prove the logic, not CuPy's
graphs or their speed.
"""
import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest

import strict_xp
import paeff_np as pn
from paeff_np.backend import default_rng
from paeff_np.data.synth import make_synthetic
from paeff_np.domains import FieldError
from paeff_np.flat import flatten
from paeff_np.graphs import StepGraphs
from paeff_np.run import checkpoint as ckpt
from paeff_np.run.training import NO_SELECTION, GraphedStep, Trainer, TrainSettings

from test_launches import VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cupy(monkeypatch):
    return strict_xp.install(monkeypatch)


# --- the double's capture, as CuPy's --------------------------------------------------

def test_a_captured_kernel_runs_only_when_its_graph_is_launched(cupy):
    a = cupy.asarray(np.ones(4))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        a += 1.0                      # a node: not run yet
        b = a * 2.0                   # a new array: garbage until the launch
        graph = stream.end_capture()
    assert np.array_equal(a.get(), np.ones(4))
    assert np.isnan(b.get()).all()
    graph.launch(stream)
    stream.synchronize()              # the default stream does not wait for a non-blocking one
    assert np.array_equal(a.get(), np.full(4, 2.0)) and np.array_equal(b.get(), np.full(4, 4.0))
    graph.launch(stream)              # every launch runs it all again, on the same memory
    stream.synchronize()
    assert np.array_equal(a.get(), np.full(4, 3.0)) and np.array_equal(b.get(), np.full(4, 6.0))


@pytest.mark.parametrize("call", ["matmul", "random", "sync", "upload"])
def test_the_double_refuses_during_capture_what_cupy_refuses(cupy, call):
    a = cupy.asarray(np.ones((3, 3)))
    rng = cupy.random.default_rng(0)     # a Generator (the library's dropout draws none)
    stream = cupy.cuda.Stream(non_blocking=True)
    do = {"matmul": lambda: a @ a, "random": lambda: rng.random((3,)), "sync": lambda: float(a[0, 0]),
          "upload": lambda: cupy.asarray(np.ones(3))}[call]
    with stream:
        stream.begin_capture()
        with pytest.raises(NotImplementedError if call in ("matmul", "random") else RuntimeError,
                           match="capturing"):
            do()
        if call == "sync":            # CUDA invalidates the capture (CuPy's test_graph.py)
            with pytest.raises(RuntimeError, match="Invalidated"):
                stream.end_capture()
        else:                         # CuPy refuses before CUDA sees it: the capture goes on
            stream.end_capture()
    assert not stream.is_capturing()


def test_capture_needs_a_non_blocking_stream(cupy):
    with pytest.raises(RuntimeError, match="non-blocking"):
        cupy.cuda.Stream().begin_capture()


def test_step_graphs_cut_at_each_matrix_product(cupy):
    """The tape: graphs between the matrix products (which capture cannot hold), the
    products eager; the first call eager, the second recorded, the rest replayed; each
    gives x's next value as an eager loop does."""
    w = cupy.asarray(np.random.default_rng(0).standard_normal((4, 4)) / 4)
    b = cupy.asarray(np.random.default_rng(1).standard_normal((4, 4)) / 4)
    x = cupy.asarray(np.ones((2, 4)))
    seen = []

    def step():
        y = pn.backend.matmul(x, w) + 1.0
        x[...] = pn.backend.matmul(y, b) * 0.5

    graphs = StepGraphs(cupy)
    cupy.cuda.Device().synchronize()    # the graphs' stream does not wait for the default one
    for _ in range(4):
        graphs(step)
        graphs.synchronize()
        seen.append(x.get())
    x2 = cupy.asarray(np.ones((2, 4)))
    for got in seen:
        x2[...] = ((x2 @ w + 1.0) @ b) * 0.5
        assert np.array_equal(got, x2.get())
    assert len(graphs.tape) == 5        # graph, matmul, graph, matmul, graph


def test_an_error_while_recording_leaves_the_stream_usable(cupy):
    graphs = StepGraphs(cupy)
    cupy.cuda.Device().synchronize()

    def bad():
        raise ValueError("boom")
    graphs(lambda: None)
    with pytest.raises(ValueError, match="boom"):
        graphs(bad)
    assert graphs.tape is None and not graphs.stream.is_capturing()
    graphs(lambda: None)                # records again
    assert graphs.tape is not None


def test_the_double_orders_streams_as_cuda_does(cupy):
    """The default stream and a non-blocking one are not ordered: reading on the
    default stream what the other still writes, or starting work there before the
    default stream's is done, raises until a synchronize."""
    a = cupy.asarray(np.ones(4))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream, pytest.raises(RuntimeError, match="default stream has work in flight"):
        a += 1.0                          # the upload of a may not have run yet
    cupy.cuda.Device().synchronize()
    with stream:
        a += 1.0
    with pytest.raises(RuntimeError, match="synchronize that stream"):
        a.get()
    with pytest.raises(RuntimeError, match="synchronize that stream"):
        a * 2.0                           # work on the default stream, too
    stream.synchronize()
    assert np.array_equal(a.get(), np.full(4, 2.0))
    with stream:
        a += 1.0
        assert float(a[0]) == 3.0         # a read on the stream itself waits for it


@pytest.mark.parametrize("pool", ["default", "private", "private, then freed"])
def test_a_graph_must_own_the_memory_it_writes(cupy, pool):
    """On a GPU a graph holds addresses, not arrays: an array made during the capture
    and dropped gives its memory back to its pool. The default pool hands it to the
    next array anyone makes; a private pool keeps it until free_all_blocks."""
    a = cupy.asarray(np.ones(4))
    private = cupy.cuda.MemoryPool()
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()
    allocator = private.malloc if pool != "default" else None
    with stream:
        with cupy.cuda.using_allocator(allocator) if allocator else contextlib.nullcontext():
            stream.begin_capture()
            a += a * 2.0                  # a * 2.0: a temporary, dropped at once
            graph = stream.end_capture()
        if pool == "private, then freed":
            private.free_all_blocks()
        if pool == "private":
            graph.launch(stream)
            stream.synchronize()
            assert np.array_equal(a.get(), np.full(4, 3.0))
        else:
            with pytest.raises(RuntimeError, match="memory it no longer owns"):
                graph.launch(stream)


def test_a_captured_kernel_reads_its_inputs_at_the_launch(cupy):
    """A kernel input cast to its parameter's type, or a raw input read flat (in NumPy
    both copy a strided or other-typed array), is read when the graph runs, not as it
    was at the capture."""
    cast = cupy.ElementwiseKernel("T x, float64 w", "T y", "y = x + w;", "add_cast")
    flat = cupy.ElementwiseKernel("raw T x", "T y", "y = x[i];", "read_flat")
    x, w32 = cupy.asarray(np.zeros(3)), cupy.asarray(np.ones(3, dtype=np.float32))
    grid = cupy.asarray(np.ones((3, 3)))
    y, z = cupy.empty(3), cupy.empty((3, 3))
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()
    with stream:
        stream.begin_capture()
        cast(x, w32, y)
        flat(grid.T, z)
        graph = stream.end_capture()
        w32 += 1.0
        grid[0] = 5.0
        graph.launch(stream)
        assert np.array_equal(y.get(), np.full(3, 2.0))
        assert np.array_equal(z.get(), grid.T.get())


def test_set_takes_cupys_checks(cupy):
    a = cupy.asarray(np.zeros(3, dtype=np.float32))
    with pytest.raises(TypeError, match="float64 array cannot be set to float32"):
        a.set(np.zeros(3))
    with pytest.raises(ValueError, match="Shape mismatch"):
        a.set(np.zeros(2, dtype=np.float32))
    a.set(np.arange(3, dtype=np.float32))
    assert np.array_equal(a.get(), np.arange(3))


def test_a_sync_while_recording_is_reported_as_itself(cupy):
    """A sync invalidates the capture (end_capture raises, as CUDA's does); the
    recorder drops it and the step's own error is the one raised."""
    graphs = StepGraphs(cupy)
    x = cupy.asarray(np.ones(3))
    cupy.cuda.Device().synchronize()
    graphs(lambda: None)
    with pytest.raises(RuntimeError, match="float.. while a stream is capturing"):
        graphs(lambda: float(x.sum()))
    assert not graphs.stream.is_capturing() and graphs.tape is None


# --- the training step ------------------------------------------------------------

def small_step_inputs(cupy, cfg, seed=0):
    params, buffers = pn.init_params(cfg, seed=seed, dtype=np.float32)
    _, params = flatten({k: cupy.asarray(v) for k, v in params.items()})
    buffers = {k: cupy.asarray(v) for k, v in buffers.items()}
    host = np.random.default_rng(seed)
    n = 24
    face = cupy.asarray(host.standard_normal((n, cfg.face_dim), dtype=np.float32))
    voice = cupy.asarray(host.standard_normal((n, cfg.voice_dim), dtype=np.float32))
    labels = cupy.asarray(host.integers(0, cfg.n_classes, n))
    return params, buffers, face, voice, labels


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v))
def test_a_replayed_step_gives_the_eager_steps_bits(cupy, variant):
    """Every Config variant: four steps (eager, recorded, two replays) on changing
    batches and learning rates, against four eager steps: the same parameters, AdamW
    moments and BatchNorm buffers, bit for bit."""
    cfg = pn.Config(face_dim=12, voice_dim=10, embed_dim=8, n_classes=5, **variant)
    batches = [cupy.asarray(np.random.default_rng(i).permutation(24)[:16]) for i in range(4)]
    lrs = [1e-3, 9e-4, 8e-4, 7e-4]
    with np.errstate(all="ignore"):
        params, buffers, face, voice, labels = small_step_inputs(cupy, cfg)
        opt, rng = pn.AdamW(lr=1e-3), default_rng(3, cupy)
        for idx, lr in zip(batches, lrs):
            _, _, grads, buffers = pn.loss_and_grads(params, buffers, face[idx], voice[idx], labels[idx],
                                                     cfg, rng=rng)
            opt.step(params, grads, lr=lr)
            rng.advance()                    # CuPy's dropout: the next step's numbers (run_epoch does it)
        g_params, g_buffers, face, voice, labels = small_step_inputs(cupy, cfg)
        g_opt = pn.AdamW(lr=1e-3)
        step = GraphedStep(cupy, g_params, g_buffers, g_opt, cfg, face, voice, labels, 16, rng=default_rng(3, cupy))
        cupy.cuda.Device().synchronize()
        for idx, lr in zip(batches, lrs):
            step(idx, lr)
        step.graphs.synchronize()
    assert step.graphs.tape is not None
    for key in params:
        assert np.array_equal(params[key].get(), g_params[key].get()), key
        assert np.array_equal(opt.m[key].get(), g_opt.m[key].get()), key
    for key in buffers:
        assert np.array_equal(buffers[key].get(), g_buffers[key].get()), key


@pytest.mark.parametrize("alignment", ["hyperbolic", "poincare"])
def test_a_run_with_cuda_graphs_is_the_eager_run_bit_for_bit(cupy, tmp_path, alignment):
    """Trainer(cuda_graphs=True): two epochs with dropout (a new recording each epoch),
    the same parameters, buffers and history as without."""
    data = make_synthetic(n_identities=40, seed=0, face_dim=64, voice_dim=32)
    cfg = pn.Config(face_dim=data.train.face_dim, voice_dim=data.train.voice_dim, embed_dim=16,
                    n_classes=data.train.n_classes, dropout=0.1, alignment=alignment)
    runs = {}
    for graphs in (False, True):
        settings = TrainSettings(epochs=2, lr=1e-3, batch_size=32, device="cuda", **NO_SELECTION)
        trainer = Trainer(data, cfg, settings, str(tmp_path / str(graphs)), log=lambda line: None,
                          cuda_graphs=graphs)
        trainer.train()
        runs[graphs] = trainer
    assert len(runs[True].history) == 2 and len(data.train) // 32 >= 4     # replays in each epoch
    eager, graphed = runs[False], runs[True]
    for key in eager.params:
        assert np.array_equal(eager.params[key].get(), graphed.params[key].get()), key
    for key in eager.buffers:
        assert np.array_equal(eager.buffers[key].get(), graphed.buffers[key].get()), key
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in h]
    assert strip(eager.history) == strip(graphed.history)


def test_a_resumed_float64_run_with_cuda_graphs_is_the_eager_run(cupy, tmp_path):
    """float64 (AdamW's device numbers in float64), a training set cut into whole
    batches, and a run resumed from its checkpoint with graphs (Trainer.restore: new
    parameter arrays, the moments made flat again) against one eager run."""
    data = make_synthetic(n_identities=40, seed=0, face_dim=64, voice_dim=32)
    cfg = pn.Config(face_dim=data.train.face_dim, voice_dim=data.train.voice_dim, embed_dim=16,
                    n_classes=data.train.n_classes)
    batch = len(data.train) // 6
    settings = TrainSettings(epochs=3, lr=1e-3, batch_size=batch, device="cuda", dtype="float64", **NO_SELECTION)
    quiet = lambda line: None
    eager = Trainer(data, cfg, settings, str(tmp_path / "eager"), log=quiet)
    eager.train()
    first = Trainer(data, cfg, settings, str(tmp_path / "graphs"), log=quiet, cuda_graphs=True)
    first.train(stop_after=1)
    resumed = Trainer(data, cfg, settings, str(tmp_path / "graphs"), log=quiet, cuda_graphs=True)
    resumed.restore(ckpt.load(str(tmp_path / "graphs")))
    resumed.train()
    assert len(data.train) % batch == 0 and resumed.epoch == 3
    for key in eager.params:
        assert resumed.params[key].dtype == np.float64
        assert np.array_equal(eager.params[key].get(), resumed.params[key].get()), key
        assert np.array_equal(eager.opt.v[key].get(), resumed.opt.v[key].get()), key
    for key in eager.buffers:
        assert np.array_equal(eager.buffers[key].get(), resumed.buffers[key].get()), key
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in h]
    assert strip(eager.history) == strip(resumed.history)


def test_cuda_graphs_on_the_cpu_are_refused(tmp_path):
    data = make_synthetic(n_identities=40, seed=0, face_dim=64, voice_dim=32)
    cfg = pn.Config(face_dim=data.train.face_dim, voice_dim=data.train.voice_dim, embed_dim=16,
                    n_classes=data.train.n_classes)
    with pytest.raises(FieldError, match="CUDA graphs need the GPU"):
        Trainer(data, cfg, TrainSettings(epochs=1, **NO_SELECTION), str(tmp_path), cuda_graphs=True)
    run = subprocess.run([sys.executable, "train.py", "--cuda-graphs", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "train.py: error: --cuda-graphs runs the step as CUDA graphs: it needs --device cuda"]
    assert not (tmp_path / "r").exists()
