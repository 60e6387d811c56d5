"""A TEST DOUBLE for CuPy: NumPy arrays behind CuPy's host/device rules.

It replaces no GPU run. It computes with NumPy on the CPU, so it says nothing
about CUDA kernels, cuBLAS, float32 accuracy on the device or speed. What it
does catch, on every CI run and without a GPU, is a host/device leak: library
code that hands a device array to NumPy, or mixes host and device arrays.

``install(monkeypatch)`` puts this module in ``sys.modules`` as ``cupy`` (and
``ndtr`` as ``cupyx.scipy.special``) and forgets the backend's probe, so that
``device="cuda"`` runs every CuPy branch of the library on :class:`ndarray`,
which enforces what CuPy's arrays enforce:

* implicit conversion to NumPy (``np.asarray(a)``, ``a.__array__()``, any
  NumPy function given a device array) raises TypeError; ``a.get()`` is the
  explicit copy to the host;
* a NumPy array as an operand of a device operation (``a + np_array``,
  ``xp.where(c, a, np_array)``, ``a[i] = np_array``) raises TypeError, as
  CuPy's "Unsupported type <class 'numpy.ndarray'>"; Python and NumPy scalars
  are allowed; ``xp.asarray(np_array)`` is the explicit copy to the device;
* ``float(a)``, ``int(a)``, ``bool(a)`` and ``a.item()`` on one element are
  allowed (in CuPy they synchronise and copy one number).

``ElementwiseKernel`` interprets the kernel's CUDA C body (statements
``name = expression;`` of arithmetic and ``sqrt``) with NumPy, so the
library's kernel source is what runs, not a copy of its formula.
"""
import re
import sys
import types

import numpy as np
import numpy.lib.mixins

__version__ = "0.0+strict-test-double"
_EXPLICIT_TRANSFERS = {"asarray", "array", "asanyarray", "ascontiguousarray"}


def _refuse_host(x):
    raise TypeError(f"Unsupported type {type(x)} (strict CuPy test double: a NumPy array "
                    f"among device operands; move it with xp.asarray)")


def _unwrap(x):
    """Device arrays → their NumPy payload; NumPy arrays are refused (as CuPy does)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        _refuse_host(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _owner(a):
    while a.base is not None and isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _wrap(result, parents=()):
    """NumPy results → device arrays; a view keeps its device ``base``."""
    if isinstance(result, tuple):
        return tuple(_wrap(r, parents) for r in result)
    if isinstance(result, list):
        return [_wrap(r, parents) for r in result]
    if isinstance(result, np.ndarray):
        out = ndarray(result)
        if result.base is not None:
            owner = _owner(result)
            for p in parents:
                if isinstance(p, ndarray):
                    if p._a is owner:
                        out._base = p
                    elif p._base is not None and p._base._a is owner:
                        out._base = p._base
        return out
    if isinstance(result, np.generic):      # CuPy reductions return 0-d arrays, not scalars
        return ndarray(np.asarray(result))
    return result


class ndarray(numpy.lib.mixins.NDArrayOperatorsMixin):
    """A device array of the test double (see the module docstring)."""

    def __init__(self, a):
        self._a = a
        self._base = None

    # the explicit copy to the host, and what CuPy refuses
    def get(self):
        return self._a.copy()

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly. "
                        "(strict CuPy test double)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        kwargs = _unwrap(kwargs)
        result = getattr(ufunc, method)(*_unwrap(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result, inputs)

    def __array_function__(self, func, types_, args, kwargs):
        return _function(func)(*args, **kwargs)

    # one element to a Python number: allowed, as in CuPy (a synchronising copy)
    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()

    # shape and views
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    base = property(lambda self: self._base)
    T = property(lambda self: _wrap(self._a.T, (self,)))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        return _wrap(self._a[_unwrap(index)], (self,))

    def __setitem__(self, index, value):
        self._a[_unwrap(index)] = _unwrap(value)

    def __getattr__(self, name):            # methods: sum, reshape, astype, copy, ...
        if name.startswith("__"):           # no __array_interface__ etc.: no implicit path to NumPy
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr, (self,))
        return lambda *args, **kwargs: _wrap(attr(*_unwrap(args), **_unwrap(kwargs)), (self,))

    def __repr__(self):
        return f"strict_xp.ndarray({self._a!r})"


def _function(np_func):
    """A module-level function of the double: NumPy's, on device arrays only."""
    def device_function(*args, **kwargs):
        return _wrap(np_func(*_unwrap(args), **_unwrap(kwargs)), args)
    return device_function


def _transfer(np_func):
    """``xp.asarray(x)``: the explicit copy of host data to the device."""
    def to_device(obj, *args, **kwargs):
        if isinstance(obj, ndarray):
            return _wrap(np_func(obj._a, *args, **kwargs), (obj,))
        return ndarray(np.array(np_func(obj, *args, **kwargs)))   # device memory is its own
    return to_device


def __getattr__(name):
    """``xp.exp``, ``xp.zeros``, ``xp.float32``, ...: NumPy's, behind the rules."""
    attr = getattr(np, name)
    if name in _EXPLICIT_TRANSFERS:
        return _transfer(attr)
    if isinstance(attr, type) or not callable(attr):     # dtypes, constants
        return attr
    return _function(attr)


# --- random numbers: CuPy's Generator takes one int seed --------------------------

class _Generator:
    def __init__(self, seed):
        if not isinstance(seed, (int, np.integer)):
            raise TypeError(f"CuPy's default_rng takes an int seed, got {type(seed)}")
        self._rng = np.random.default_rng(int(seed))

    def __getattr__(self, name):
        method = getattr(self._rng, name)
        return lambda *args, **kwargs: _wrap(method(*_unwrap(args), **_unwrap(kwargs)))


random = types.SimpleNamespace(default_rng=_Generator)


# --- kernels: the CUDA C body interpreted with NumPy -------------------------------

class ElementwiseKernel:
    """``ElementwiseKernel(in_params, out_params, body, name)``; calling it with
    the inputs (and optionally the outputs, updated in place) runs ``body``."""

    _STATEMENT = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(.+?)\s*$")

    def __init__(self, in_params, out_params, operation, name="kernel"):
        self.in_names = [p.split()[-1] for p in in_params.split(",")]
        self.out_names = [p.split()[-1] for p in out_params.split(",")]
        self.statements = []
        for line in filter(str.strip, operation.replace("\n", ";").split(";")):
            match = self._STATEMENT.match(line)
            if match is None:
                raise ValueError(f"{name}: the test double reads only 'name = expression;', got {line!r}")
            self.statements.append((match.group(1), compile(match.group(2), name, "eval")))
        self.name = name

    def __call__(self, *args):
        n_in = len(self.in_names)
        if len(args) not in (n_in, n_in + len(self.out_names)):
            raise TypeError(f"{self.name}: wrong number of arguments ({len(args)})")
        inputs = [_unwrap(a) for a in args[:n_in]]
        arrays = [a for a in inputs if isinstance(a, np.ndarray)]
        dtype = arrays[0].dtype
        if len(args) > n_in:
            outs = list(args[n_in:])
        else:
            shape = np.broadcast_shapes(*(a.shape for a in arrays))
            outs = [ndarray(np.empty(shape, dtype)) for _ in self.out_names]
        env = {"sqrt": np.sqrt}
        env.update({n: (dtype.type(a) if not isinstance(a, np.ndarray) else a)
                    for n, a in zip(self.in_names, inputs)})          # T scalars are cast to T
        env.update({n: o._a.copy() for n, o in zip(self.out_names, outs)})
        for target, expression in self.statements:
            env[target] = np.asarray(eval(expression, {"__builtins__": {}}, env), dtype=dtype)
        for n, o in zip(self.out_names, outs):
            o._a[...] = env[n]
        return outs[0] if len(outs) == 1 else tuple(outs)


# --- the device ----------------------------------------------------------------

class _Device:
    def __init__(self, device_id=0):
        self.id = device_id
        self.compute_capability = "00"

    def synchronize(self):
        pass


_runtime = types.SimpleNamespace(
    getDeviceCount=lambda: 1,
    getDeviceProperties=lambda device_id: {"name": b"strict CuPy test double (NumPy)"},
    runtimeGetVersion=lambda: 0,
    driverGetVersion=lambda: 0)
cuda = types.SimpleNamespace(runtime=_runtime, Device=_Device)


def ndtr(x):
    import scipy.special
    return _wrap(scipy.special.ndtr(_unwrap(x)))


def install(monkeypatch):
    """Make ``import cupy`` (and ``cupyx.scipy.special``) give this double for
    the rest of the test, with the backend's probe and kernels forgotten."""
    from paeff_np import backend
    this = sys.modules[__name__]
    special = types.SimpleNamespace(ndtr=ndtr)
    cupyx = types.SimpleNamespace(scipy=types.SimpleNamespace(special=special))
    for name, module in (("cupy", this), ("cupyx", cupyx), ("cupyx.scipy", cupyx.scipy),
                         ("cupyx.scipy.special", special)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backend, "_probe_memo", [])
    monkeypatch.setattr(backend, "_kernel_memo", {})
    return this
