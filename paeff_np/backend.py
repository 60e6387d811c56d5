"""The one place that knows CuPy exists.

Every other module asks ``get_array_module(x)`` for the array module of its
inputs (``numpy`` or ``cupy``) and writes ``xp.exp``, ``xp.tanh`` ... once for
both. What differs between the two lives here: the normal CDF the exact GELU
calls (``ndtr``), random numbers, moving arrays between host and device,
compiling CuPy elementwise kernels (``elementwise_kernel``, memoised) and the
one device probe (``probe_gpu``) that train.py, eval.py, bench.py and the tests
all run before they touch a GPU. On the host side it holds one setting of the
C allocator (``keep_freed_memory``) that the command lines apply. CuPy is imported lazily, only when a CuPy
array or ``device="cuda"`` is asked for, so the library runs on a machine
without it.
"""
import ctypes
import functools
import os
import sys

import numpy as np

CUPY_INSTALL_HINT = ('pip install "cupy-cuda12x[ctk]" (or "cupy-cuda13x[ctk]"; the [ctk] extra '
                     'brings the CUDA compiler and libraries a driver-only machine lacks)')


class GPUUnavailable(RuntimeError):
    """``device="cuda"`` was asked for on a machine without a usable CuPy."""


# --- the device probe ------------------------------------------------------------

def _import_cupy():
    import cupy
    return cupy


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _run_probe():
    """``(cupy, None)`` when CuPy imports and a device computes correctly, else
    ``(None, reason)``: one line that says what failed and how to fix it.

    Counting devices is not enough: a CuPy wheel without the CUDA toolkit
    imports and counts devices, then fails at the first kernel compile. So the
    probe runs what training needs: an elementwise kernel (NVRTC), a reduction
    and a 2×2 float32 matrix product (cuBLAS), and checks their values.
    """
    try:
        cupy = _import_cupy()
    except Exception as exc:                     # ImportError, or a CuPy that cannot find CUDA
        return None, f"the GPU needs CuPy, which does not import ({_first_line(exc)}): {CUPY_INSTALL_HINT}"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CUDA reports no device")
        square_plus_one = cupy.ElementwiseKernel("T x", "T y", "y = x * x + 1", "paeff_probe")
        x = cupy.arange(4, dtype=cupy.float32)
        total = float(square_plus_one(x).sum())          # 1 + 2 + 5 + 10
        a = cupy.asarray([[1.0, 2.0], [3.0, 4.0]], dtype=cupy.float32)
        product = (a @ a).get()
        cupy.cuda.Device().synchronize()
        if total != 18.0 or not np.array_equal(product, [[7.0, 10.0], [15.0, 22.0]]):
            raise RuntimeError(f"wrong results ({total} instead of 18, {product.tolist()} "
                               f"instead of [[7, 10], [15, 22]])")
    except Exception as exc:
        version = getattr(cupy, "__version__", "?")
        return None, (f"CuPy {version} is installed but the GPU is not usable ({_first_line(exc)}); "
                      f"on a machine without a CUDA toolkit: {CUPY_INSTALL_HINT}")
    return cupy, None


_probe_memo = []          # [(cupy or None, reason)] once probed


def probe_gpu():
    """``(cupy, None)`` or ``(None, reason)``; the probe runs once per process."""
    if not _probe_memo:
        _probe_memo.append(_run_probe())
    return _probe_memo[0]


def cupy_module():
    """The ``cupy`` module after a successful probe, or GPUUnavailable with one line."""
    cupy, reason = probe_gpu()
    if cupy is None:
        raise GPUUnavailable(reason)
    return cupy


def array_module(device):
    """``numpy`` for ``"cpu"``, ``cupy`` (probed) for ``"cuda"``."""
    if device == "cpu":
        return np
    if device == "cuda":
        return cupy_module()
    raise ValueError(f"unknown device {device!r}: use cpu or cuda")


_kernel_memo = {}        # (in_params, out_params, body, name) → ElementwiseKernel


def elementwise_kernel(in_params, out_params, body, name):
    """``cupy.ElementwiseKernel(in_params, out_params, body, name)``, built once
    per distinct source (CuPy compiles it on first call and caches the binary)."""
    key = (in_params, out_params, body, name)
    if key not in _kernel_memo:
        _kernel_memo[key] = cupy_module().ElementwiseKernel(*key)
    return _kernel_memo[key]


def reduction_kernel(in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name):
    """``cupy.ReductionKernel(...)`` with these arguments, built once per distinct
    source, as ``elementwise_kernel``."""
    key = (in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name)
    if key not in _kernel_memo:
        _kernel_memo[key] = cupy_module().ReductionKernel(*key)
    return _kernel_memo[key]


def kernel(spec):
    """The CuPy kernel of a spec dict (``ELEMENTWISE`` or ``REDUCTION`` kind, the
    keyword arguments of ``cupy.ElementwiseKernel``/``ReductionKernel``), memoised."""
    args = {k: v for k, v in spec.items() if k != "kind"}
    return (reduction_kernel if spec["kind"] == "reduction" else elementwise_kernel)(**args)


# --- arrays on either device ----------------------------------------------------------

def get_array_module(*arrays):
    """``numpy`` or ``cupy``: the module of the first CuPy array among ``arrays``.

    A CuPy array can only exist once ``cupy`` is imported, so ``sys.modules``
    is asked, never an import.
    """
    cupy = sys.modules.get("cupy")
    device_array = getattr(cupy, "ndarray", None)
    if device_array is not None:
        for a in arrays:
            if isinstance(a, device_array):
                return cupy
    return np


def is_cupy(x):
    return get_array_module(x) is not np


def to_host(x):
    """A NumPy array (a copy from the device if ``x`` lives there)."""
    return x.get() if is_cupy(x) else np.asarray(x)


def physical_memory_bytes():
    """This machine's RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def device_free_bytes(xp):
    """The free memory of ``xp``'s device in bytes (CuPy: ``cudaMemGetInfo``'s free
    figure); None for NumPy, whose limit is ``physical_memory_bytes``."""
    if xp is np:
        return None
    return int(xp.cuda.runtime.memGetInfo()[0])


UPLOAD_CHUNK_BYTES = 64 << 20


def upload(host, xp, dtype, chunk_bytes=UPLOAD_CHUNK_BYTES):
    """``xp.asarray(host, dtype)``, on CuPy copied ``chunk_bytes`` of rows at a time.

    CuPy stages a host → device copy of pageable memory through pinned
    (page-locked) host memory from its pinned pool, and the pool keeps the
    buffer for reuse: one copy of a 2.5 GB training set would leave 2.5 GB of
    the host's memory pinned. Row chunks of 64 MiB leave one chunk's worth.
    """
    if xp is np:
        return np.asarray(host, dtype=dtype)
    out = xp.empty(host.shape, dtype=dtype)
    rows = max(1, chunk_bytes // max(1, np.dtype(dtype).itemsize * (host[:1].size or 1)))
    for start in range(0, len(host), rows):
        out[start:start + rows] = xp.asarray(np.asarray(host[start:start + rows], dtype=dtype))
    return out


def to_device(x, device="cpu"):
    """Move ``x`` to ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy)."""
    if device == "cpu":
        return to_host(x)
    return array_module(device).asarray(x)


def ndtr(x):
    """Φ(x), the standard normal CDF, elementwise, by the library of ``x``'s
    device: ``scipy.special.ndtr`` or ``cupyx.scipy.special.ndtr``.
    (``layers.normal_cdf``, the GELU's Φ, calls it.)"""
    if is_cupy(x):
        import cupyx.scipy.special
        return cupyx.scipy.special.ndtr(x)
    import scipy.special
    return scipy.special.ndtr(x)


def default_rng(seed, xp=np):
    """The dropout's random numbers for the array module ``xp``.

    NumPy: ``np.random.default_rng(seed)``, a Generator. CuPy: a
    ``CounterDropout``: no generator object at all; the dropout kernels hash
    (key, step, draw, element index) into their uniforms (``COUNTER_UNIFORM``).
    ``seed`` may be a list of ints (e.g. ``[seed, epoch, 1]``); CuPy's key is
    derived from it through NumPy's SeedSequence.
    """
    if xp is np:
        return np.random.default_rng(seed)
    return CounterDropout(seed, xp)


COUNTER_UNIFORM = (
    "unsigned long long hz = i; "
    "hz = key + ((step * 16 + draw) * 4294967296 + hz) * 0x9E3779B97F4A7C15; "
    "hz = (hz ^ (hz >> 30)) * 0xBF58476D1CE4E5B9; "
    "hz = (hz ^ (hz >> 27)) * 0x94D049BB133111EB; "
    "hz = hz ^ (hz >> 31); "
    "T u = (hz >> 40) * 5.9604644775390625e-08; ")
"""The C statements that give a kernel with parameters ``uint64 key, uint64 step,
uint64 draw`` its uniform ``u`` in [0, 1) at element ``i``: splitmix64 (Steele,
Lea, Flood 2014, the finaliser of Java's SplittableRandom) at counter
``n = (16·step + draw)·2³² + i`` of the Weyl sequence ``key + n·γ``, γ =
0x9E3779B97F4A7C15 (mod 2⁶⁴); ``u`` is its top 24 bits times 2⁻²⁴, exact in
float32 and float64. Distinct (step, draw < 16, i < 2³²) are distinct counters,
so the numbers of a run depend only on (key, step, draw, i): a resumed epoch
draws what the straight run drew. The integer literals need no suffix: a hex
literal that does not fit in ``long`` is ``unsigned long`` (64 bits under
NVRTC and gcc on Linux). The CuPy path only; NumPy's dropout draws from its
Generator as before."""


class CounterDropout:
    """CuPy's dropout randomness of one epoch: ``key`` (a host number, from the
    seed), ``step`` (a device uint64 scalar, so a replayed CUDA graph that
    advances it in-graph stays correct) and the host's count of draws in the
    step. ``args()`` gives the next draw's kernel arguments; ``advance()`` (one
    elementwise kernel) moves to the next step."""

    def __init__(self, seed, xp):
        self.key = np.uint64(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])
        self.step = xp.zeros((), dtype=xp.uint64)
        self.draw = 0

    def args(self):
        """``(key, step, draw)`` of the next draw of this step."""
        if self.draw >= 16:
            raise ValueError("more than 16 dropout draws in one step: COUNTER_UNIFORM's counter would overlap")
        self.draw += 1
        return self.key, self.step, np.uint64(self.draw - 1)

    def advance(self):
        self.step += 1
        self.draw = 0


# --- the calls a CUDA-graph capture cannot hold ---------------------------------------

_recorders = []     # the active graphs.StepGraphs recording, if any (innermost last)


def matmul(a, b):
    """``a @ b``: every matrix product of the library goes through here.

    CuPy refuses cuBLAS calls while a stream is captured into a CUDA graph
    (CuPy issue 6290), so a recording ``graphs.StepGraphs`` cuts the step at
    each product: the product runs eagerly and is replayed as one call.
    Otherwise, and always on NumPy, it is just ``a @ b``.
    """
    if _recorders:
        return _recorders[-1].cut(lambda out=None: get_array_module(a).matmul(a, b, out=out))
    return a @ b


# --- host memory ----------------------------------------------------------------------

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 32 << 20     # the largest glibc accepts on 64-bit: arrays ≤ 32 MiB come from the heap
TRIM_THRESHOLD_BYTES = 1 << 30      # free memory at the top of the heap is returned to the OS above 1 GiB


@functools.cache
def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for the next allocation; True if it agreed.

    A training step allocates its temporaries afresh (a B × B float32 matrix is
    4 MiB at B = 1024). By default glibc serves each of these from a new
    ``mmap`` (its threshold adapts to the sizes freed so far), and the kernel
    must map and zero every page again on first touch; after the free it gives
    the pages back. With both thresholds set, arrays up to 32 MiB come from the
    heap, and the heap keeps up to 1 GiB of freed memory, so the next step
    reuses pages already mapped; the step is faster with it (docs/perf.md,
    "The allocator").

    It changes the whole process's allocator, so the library never calls it by
    itself: train.py, eval.py and bench.py do, once, at start. Elsewhere than
    glibc (macOS, musl) it does nothing and returns False. Asked again, it gives the
    first answer without a second call.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
