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


# --- helpers shared by the test files ---

TOL = 1e-7   # worst relative error accepted by every float64 gradient check


def assert_gradcheck(report):
    """Every entry of a ``gradcheck``/``check_op`` report is below ``TOL``."""
    assert report, "nothing was checked"
    worst = max(report, key=report.get)
    assert report[worst] < TOL, (worst, report)
