"""Shared fixtures: every operation test runs on NumPy, and on CuPy when a GPU is present.

The CuPy half asks the library's one device probe (``backend.probe_gpu``).
Without a usable GPU it is skipped, with the probe's reason (the real
exception) in the skip message; with ``PAEFF_REQUIRE_GPU=1`` it fails instead,
so a GPU CI job cannot pass while running no GPU test.
"""
import os

import numpy as np
import pytest

from paeff_np import backend

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
def rand(xp):
    """``rand(*shape, seed=0, scale=1.0)``: float64 standard normals on ``xp``."""
    def make(*shape, seed=0, scale=1.0):
        return xp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale)
    return make
