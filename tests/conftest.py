"""Shared fixtures: every operation test runs on NumPy, and on CuPy when a GPU is present."""
import numpy as np
import pytest


def _cupy_if_gpu():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        cupy.zeros(1).sum()
        return cupy
    except Exception:
        return None


CUPY = _cupy_if_gpu()


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module a test runs on; the CuPy half is skipped without a GPU."""
    if request.param == "numpy":
        return np
    if CUPY is None:
        pytest.skip("CuPy with a CUDA device is not available")
    return CUPY


@pytest.fixture
def rand(xp):
    """``rand(*shape, seed=0, scale=1.0)``: float64 standard normals on ``xp``."""
    def make(*shape, seed=0, scale=1.0):
        return xp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale)
    return make
