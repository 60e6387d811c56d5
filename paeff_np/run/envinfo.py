"""What a benchmark figure depends on: Python, NumPy, the BLAS behind it and
its threads, the CPU and how busy it already is, and on a GPU the CuPy,
driver and runtime versions, the device and ``CUPY_TF32``.

``environment(cupy)`` gathers it as a JSON-ready dict and ``summary_lines``
says it in a few lines; bench.py prints both and writes the dict to its JSON.
"""
import os
import platform
import time

import numpy as np

OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
OPENBLAS_ADVICE = ("OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE are set: they can pin OpenBLAS to a slower "
                   "kernel or block size, so the figures may be well below this machine's; "
                   "for comparable figures run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench.py")


def cpu_busy(seconds=1.0):
    """Fraction of all CPUs busy over ``seconds`` (Linux ``/proc/stat``; None elsewhere):
    sampled before the run, it is the load of other processes."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]                 # total, idle + iowait
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except OSError:
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def cpu_model():
    """The processor's name (Linux ``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def blas_libraries():
    """The thread pools loaded (threadpoolctl): NumPy's and SciPy's BLAS, and
    OpenMP where scikit-learn brought it; None when threadpoolctl is missing."""
    try:
        import scipy.special  # noqa: F401  (loaded by the step anyway: list its BLAS too)
        import threadpoolctl
    except ImportError:
        return None
    return [{k: lib.get(k) for k in ("user_api", "internal_api", "version", "architecture",
                                     "num_threads", "threading_layer", "filepath")}
            for lib in threadpoolctl.threadpool_info()]


def _cuda_version(number):
    """CUDA's integer versions (12040) as text ("12.4")."""
    return f"{number // 1000}.{number % 1000 // 10}"


def cuda_info(cupy):
    """The GPU of ``cupy`` (a probed module): device, CuPy, driver and runtime versions."""
    device = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
    driver, runtime = cupy.cuda.runtime.driverGetVersion(), cupy.cuda.runtime.runtimeGetVersion()
    return dict(device_name=name.decode() if isinstance(name, bytes) else name,
                compute_capability=device.compute_capability, cupy=cupy.__version__,
                driver_version=_cuda_version(driver), runtime_version=_cuda_version(runtime))


def environment(cupy=None):
    """Everything above as a JSON-ready dict; ``cuda`` is None without ``cupy``."""
    return dict(python=platform.python_version(), numpy=np.__version__,
                machine=f"{platform.system()} {platform.machine()}", cpu_model=cpu_model(),
                cpus=os.cpu_count(),
                loadavg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                cpu_busy_before=cpu_busy(),
                openblas_env={k: os.environ.get(k) for k in OPENBLAS_VARS}, blas=blas_libraries(),
                cupy_tf32=os.environ.get("CUPY_TF32"),
                cuda=cuda_info(cupy) if cupy is not None else None)


def summary_lines(env):
    """The environment in a few lines, with a warning where figures will suffer."""
    load = env["loadavg"]
    lines = [f"Python {env['python']}, NumPy {env['numpy']}, {env['machine']}, {env['cpus']} CPUs"
             + (f" ({env['cpu_model']})" if env["cpu_model"] else "")
             + (f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else "")]
    if env["blas"] is None:
        lines.append("BLAS: threadpoolctl is not installed (it comes with scikit-learn)")
    for lib in env["blas"] or []:
        path = lib["filepath"] or ""
        if lib["user_api"] != "blas":         # e.g. the OpenMP runtime scikit-learn loads
            lines.append(f"{lib['user_api']}: {lib['internal_api']}, {lib['num_threads']} threads, "
                         f"{os.path.basename(path)}")
            continue
        owner = "numpy" if "numpy" in path else "scipy" if "scipy" in path else "?"
        lines.append(f"BLAS ({owner}): {lib['internal_api']} {lib['version']}, kernel {lib['architecture']}, "
                     f"{lib['num_threads']} threads ({lib['threading_layer']}), {os.path.basename(path)}")
    lines.append(", ".join(f"{k}={v!r}" if v is not None else f"{k} unset"
                           for k, v in env["openblas_env"].items()))
    if any(v is not None for v in env["openblas_env"].values()):
        lines.append("WARNING: " + OPENBLAS_ADVICE)
    if "keep_freed_memory" in env:
        lines.append("allocator: " + ("glibc keeps freed memory (backend.keep_freed_memory), as in train.py"
                                      if env["keep_freed_memory"] else
                                      "the platform's default (keep_freed_memory is glibc only)"))
    busy = env["cpu_busy_before"]
    if busy is not None:
        lines.append(f"CPU busy over 1 s before the run (other processes): {100 * busy:.0f}%")
        if busy > 0.1:
            lines.append("WARNING: other processes use the CPUs: the figures below will be low and noisy "
                         "(a busy core slows OpenBLAS's threads most)")
    cuda = env["cuda"]
    if cuda is not None:
        lines.append(f"GPU: {cuda['device_name']} (compute capability {cuda['compute_capability']}), "
                     f"CuPy {cuda['cupy']}, CUDA driver {cuda['driver_version']}, runtime "
                     f"{cuda['runtime_version']}, CUPY_TF32={env['cupy_tf32'] or 'unset (float32 products)'}")
    return lines
