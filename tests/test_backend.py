"""The backend: generators, host/device moves, and the one device probe with
its one-line errors (tested here without a GPU, through fake CuPy modules)."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import strict_xp
from paeff_np import backend
from paeff_np.backend import (GPUUnavailable, array_module, cupy_module, default_rng,
                              elementwise_kernel, get_array_module, probe_gpu, to_device, to_host)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generator_from_a_list_seed_is_reproducible(xp):
    """The dropout's numbers depend on the seed only (NumPy: its Generator; CuPy: the
    counter-based hash, whose key, step and draw all change the mask)."""
    from paeff_np.layers import dropout_forward
    mask = lambda rng: to_host(dropout_forward(xp.ones(200), 0.5, rng)[1])
    a, b, c = (mask(default_rng(s, xp)) for s in ([7, 3, 1], [7, 3, 1], [7, 4, 1]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    rng = default_rng([7, 3, 1], xp)
    first, second = mask(rng), mask(rng)
    np.testing.assert_array_equal(first, a)
    assert not np.array_equal(first, second)              # the next draw of the step
    if xp is not np:
        rng.advance()                                      # the next step
        assert not np.array_equal(mask(rng), a)


def test_array_module_and_moves(xp):
    x = xp.arange(3.0)
    assert get_array_module(np.ones(1), x) is xp
    assert isinstance(to_host(x), np.ndarray)
    assert isinstance(to_device(x, "cpu"), np.ndarray)
    with pytest.raises(ValueError, match="unknown device"):
        to_device(x, "tpu")
    assert array_module("cpu") is np


# --- the probe, without a GPU ---------------------------------------------------------

@pytest.fixture
def fresh_probe(monkeypatch):
    """The backend with its probe and kernels forgotten (restored after the test)."""
    monkeypatch.setattr(backend, "_probe_memo", [])
    monkeypatch.setattr(backend, "_kernel_memo", {})
    return monkeypatch


def _fake_cupy(monkeypatch, **overrides):
    """The strict test double as ``cupy``, with some of its parts replaced."""
    cupy = types.SimpleNamespace(**{k: getattr(strict_xp, k) for k in (
        "__version__", "ndarray", "arange", "asarray", "float32", "ElementwiseKernel", "cuda")})
    for name, value in overrides.items():
        setattr(cupy, name, value)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    return cupy


def _raises(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


def test_cuda_without_cupy_is_one_clear_error(fresh_probe):
    fresh_probe.setattr(backend, "_import_cupy", _raises(ImportError("No module named 'cupy'")))
    with pytest.raises(GPUUnavailable, match=r'the GPU needs CuPy.*No module named .cupy.*"cupy-cuda12x\[ctk\]"'):
        to_device(np.ones(2), "cuda")


def test_cupy_without_a_device_is_one_clear_error(fresh_probe):
    """CuPy installed, no usable device: the reason carries CUDA's own words."""
    runtime = types.SimpleNamespace(getDeviceCount=_raises(RuntimeError(
        "cudaErrorNoDevice: no CUDA-capable device is detected")))
    _fake_cupy(fresh_probe, cuda=types.SimpleNamespace(runtime=runtime, Device=strict_xp.cuda.Device))
    with pytest.raises(GPUUnavailable) as err:
        array_module("cuda")
    message = str(err.value)
    assert "\n" not in message
    assert "cudaErrorNoDevice: no CUDA-capable device is detected" in message
    assert '"cupy-cuda12x[ctk]"' in message and "installed but the GPU is not usable" in message


def test_cupy_that_cannot_compile_is_one_clear_error(fresh_probe):
    """A driver-only machine: CuPy counts the device, then the first kernel
    compile fails. Counting devices is not the probe; running a kernel is."""
    _fake_cupy(fresh_probe, ElementwiseKernel=_raises(RuntimeError(
        "CompileException: cannot open libnvrtc.so.12\nsecond line")))
    cupy, reason = probe_gpu()
    assert cupy is None and "cannot open libnvrtc.so.12" in reason and "second line" not in reason
    with pytest.raises(GPUUnavailable, match=r"\[ctk\]"):
        cupy_module()


def test_cupy_with_wrong_results_is_refused(fresh_probe):
    wrong_kernel = lambda *spec: strict_xp.ElementwiseKernel("T x", "T y", "y = x + 1", "wrong")
    _fake_cupy(fresh_probe, ElementwiseKernel=wrong_kernel)
    cupy, reason = probe_gpu()
    assert cupy is None and "wrong results" in reason


def test_probe_succeeds_once_and_kernels_are_built_once(fresh_probe):
    cupy = _fake_cupy(fresh_probe)
    built = []
    cupy.ElementwiseKernel = lambda *spec: built.append(spec) or strict_xp.ElementwiseKernel(*spec)
    assert cupy_module() is cupy and array_module("cuda") is cupy
    assert len(built) == 1                                   # the probe's own kernel, once
    spec = ("T x", "T y", "y = x * 2", "paeff_twice")
    k1, k2 = elementwise_kernel(*spec), elementwise_kernel(*spec)
    assert k1 is k2 and built[1:] == [spec]
    np.testing.assert_array_equal(k1(strict_xp.arange(3.0)).get(), [0.0, 2.0, 4.0])


def test_train_py_without_a_usable_gpu_exits_2_before_reading_data(tmp_path):
    """A CuPy that imports but has no device (a stand-in on PYTHONPATH): one
    line, exit 2, and no run folder made, before the data folder is even read."""
    fake = tmp_path / "fake" / "cupy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "__version__ = '99.0-fake'\n"
        "class _Runtime:\n"
        "    @staticmethod\n"
        "    def getDeviceCount():\n"
        "        raise RuntimeError('cudaErrorInsufficientDriver: CUDA driver version is insufficient')\n"
        "class cuda:\n"
        "    runtime = _Runtime\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), ROOT]))
    out = tmp_path / "run"
    for script, args in (("train.py", ["--data-dir", str(tmp_path / "no-such-folder"), "--out", str(out)]),
                         ("eval.py", ["--checkpoint", str(tmp_path / "no-such-run")])):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--device", "cuda", *args],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert "CuPy 99.0-fake is installed but the GPU is not usable" in proc.stderr
        assert "cudaErrorInsufficientDriver" in proc.stderr and "[ctk]" in proc.stderr
    assert not out.exists()


# --- no silent skips --------------------------------------------------------------------

def test_cupy_half_skips_with_the_reason_or_fails_when_required(tmp_path):
    """Without a usable GPU the CuPy half is skipped with the probe's real
    reason; PAEFF_REQUIRE_GPU=1 turns the skip into a failure. A CuPy that
    cannot import is put first on PYTHONPATH, so this holds on a GPU machine too."""
    fake = tmp_path / "fake" / "cupy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('stand-in CuPy: libcudart.so.12 not found')\n")
    test = "tests/test_backend.py::test_array_module_and_moves"
    runs = {}
    for require in ("0", "1"):
        env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"), PAEFF_REQUIRE_GPU=require)
        runs[require] = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    skipped, required = runs["0"], runs["1"]
    assert skipped.returncode == 0, skipped.stdout
    assert "1 passed, 1 skipped" in skipped.stdout
    assert "libcudart.so.12 not found" in skipped.stdout
    assert required.returncode == 1, required.stdout
    assert "1 passed, 1 error" in required.stdout          # failed in the xp fixture
    assert "PAEFF_REQUIRE_GPU=1 but no usable GPU" in required.stdout
    assert "libcudart.so.12 not found" in required.stdout


def test_keep_freed_memory_where_glibc_has_mallopt():
    import platform
    assert backend.keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_the_command_lines_keep_freed_memory(monkeypatch):
    from paeff_np.run import cli
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1))
    assert cli.run(lambda: 0, "x.py") == 0 and calls == [1]


def test_gpu_check_script_stops_in_one_line_without_a_gpu(tmp_path):
    """``bash .ci/gpu`` (README "GPU"): without a usable GPU, the probe's reason
    in one line, exit 2, and no folder of results."""
    if backend.probe_gpu()[0] is not None:
        pytest.skip("a GPU is present: tests/test_gpu.py covers the real run")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("PAEFF_REQUIRE_GPU", None)
    out = tmp_path / "checks"
    proc = subprocess.run(["bash", os.path.join(root, ".ci", "gpu"), str(out)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(".ci/gpu: error: ") and proc.stderr.count("\n") == 1
    assert not out.exists()


def test_upload_copies_in_row_chunks(monkeypatch):
    """backend.upload: the same array as one asarray, in copies of at most chunk_bytes."""
    import strict_xp
    cupy = strict_xp.install(monkeypatch)
    host = np.random.default_rng(0).standard_normal((50, 7))
    with strict_xp.counting() as count:
        dev = backend.upload(host, cupy, np.float32, chunk_bytes=7 * 4 * 16)
    np.testing.assert_array_equal(dev.get(), host.astype(np.float32))
    assert count.h2d() == 4                          # rows 0..15, 16..31, 32..47, 48..49
    np.testing.assert_array_equal(backend.upload(host, np, np.float32), host.astype(np.float32))
