"""The one place that knows CuPy exists.

Every other module asks ``get_array_module(x)`` for the array module of its
inputs (``numpy`` or ``cupy``) and writes ``xp.exp``, ``xp.tanh`` ... once for
both. What differs between the two lives here: the error function used by the
exact GELU (erfc), scatter-add, random numbers, and moving arrays between host and
device. CuPy is imported lazily, only when a CuPy array or ``device="cuda"`` is
asked for, so the library runs on a machine without it.
"""
import math

import numpy as np


class GPUUnavailable(RuntimeError):
    """``device="cuda"`` was asked for on a machine without a usable CuPy."""


def _cupy_or_none():
    try:
        import cupy
    except Exception:  # ImportError, or a CuPy that cannot find CUDA
        return None
    return cupy


def cupy_module():
    """Return the ``cupy`` module, or raise GPUUnavailable with one clear line."""
    cupy = _cupy_or_none()
    if cupy is None:
        raise GPUUnavailable("--device cuda needs CuPy: pip install cupy-cuda12x "
                             "(or the wheel for your CUDA); see the README")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise GPUUnavailable(f"CuPy is installed but no CUDA device is usable ({exc})")
    return cupy


def get_array_module(*arrays):
    """``numpy`` or ``cupy``: the module of the first CuPy array among ``arrays``."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy
            return cupy
    return np


def is_cupy(x):
    return get_array_module(x) is not np


def to_host(x):
    """A NumPy array (a copy from the device if ``x`` lives there)."""
    return x.get() if is_cupy(x) else np.asarray(x)


def to_device(x, device="cpu"):
    """Move ``x`` to ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy)."""
    if device == "cpu":
        return to_host(x)
    if device == "cuda":
        return cupy_module().asarray(x)
    raise ValueError(f"unknown device {device!r}: use cpu or cuda")


def erfc(x):
    """Elementwise complementary error function, NumPy (scipy) or CuPy (cupyx)."""
    if is_cupy(x):
        import cupyx.scipy.special
        return cupyx.scipy.special.erfc(x)
    import scipy.special
    return scipy.special.erfc(x)


def add_at(target, index, values):
    """``target[index] += values`` accumulating repeated indices (np.add.at)."""
    xp = get_array_module(target)
    if xp is np:
        np.add.at(target, index, values)
    else:
        import cupyx
        cupyx.scatter_add(target, index, values)
    return target


def default_rng(seed, xp=np):
    """A random Generator of the array module ``xp`` (NumPy's or CuPy's).

    ``seed`` may be a list of ints (e.g. ``[seed, epoch]``); CuPy's generator
    takes one int, derived here through NumPy's SeedSequence.
    """
    if xp is np:
        return np.random.default_rng(seed)
    return xp.random.default_rng(int(np.random.SeedSequence(seed).generate_state(1)[0]))


SQRT_HALF = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
