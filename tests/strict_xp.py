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

With ``counting()`` active it also COUNTS what each call would cost CuPy
(see "launch counting" below): kernels, host-side device calls, host syncs
with their source lines, host → device copies.

``ElementwiseKernel`` interprets the kernel's CUDA C body (statements
``name = expression;`` of arithmetic, comparisons, CUDA's math functions
``sqrt``, ``exp``, ``atanh``, ``normcdf`` and the like, ``c ? a : b`` with each
branch evaluated on its own lanes as C does (inside parentheses: both, then a
``where``), the loop index ``i`` and ``raw`` arrays read by a flat C-order index)
with NumPy, so the library's kernel source is what runs, not a copy of its
formula; ``fmax``/``fmin`` keep C's rule (a NaN operand gives the other one).
"""
import re
import sys
import types
import weakref

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
        if _capture and id(a) in _capture[-1].fresh_ids:
            _capture[-1].track(self)

    # the explicit copy to the host, and what CuPy refuses
    def get(self):
        _count_sync("get()")
        return self._a.copy()

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly. "
                        "(strict CuPy test double)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _count("cublas" if ufunc is np.matmul else
               "reduction" if method in ("reduce", "accumulate") else "elementwise",
               size=_size_of(inputs[0]) if method == "reduce" and kwargs.get("axis", 0) is None else 0)
        out = kwargs.get("out")
        np_inputs, np_kwargs = _unwrap(inputs), _unwrap(kwargs)
        result = _device_op(lambda: getattr(ufunc, method)(*np_inputs, **np_kwargs),
                            in_place=out is not None, inputs=np_inputs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result, inputs)

    def __array_function__(self, func, types_, args, kwargs):
        return _function(func)(*args, **kwargs)

    # one element to a Python number: allowed, as in CuPy (a synchronising copy)
    def __float__(self):
        _count_sync("float()")
        return float(self._a)

    def __int__(self):
        _count_sync("int()")
        return int(self._a)

    def __bool__(self):
        _count_sync("bool()")
        return bool(self._a)

    def item(self):
        _count_sync("item()")
        return self._a.item()

    def tolist(self):
        _count_sync("tolist()")
        return self._a.tolist()

    def set(self, arr, stream=None):
        """``a.set(host_array, stream=None)``: the explicit copy of host data into this
        array (one h2d) on ``stream`` (default: the current one), with CuPy's checks."""
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray (strict CuPy test double)")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array (strict CuPy test double)")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        _count("h2d", stream=stream)
        self._a[...] = arr

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
        _count_indexing(index, None)
        a, np_index = self._a, _unwrap(index)
        return _wrap(_device_op(lambda: a[np_index], inputs=(a,)), (self,))

    def __setitem__(self, index, value):
        _count_indexing(index, value)
        a, np_index, np_value = self._a, _unwrap(index), _unwrap(value)
        _device_op(lambda: a.__setitem__(np_index, np_value), in_place=True)

    def __getattr__(self, name):            # methods: sum, reshape, astype, copy, ...
        if name.startswith("__"):           # no __array_interface__ etc.: no implicit path to NumPy
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr, (self,))

        def method(*args, **kwargs):
            np_args, np_kwargs = _unwrap(args), _unwrap(kwargs)
            in_place = name in _IN_PLACE_METHODS or "out" in kwargs
            result = _device_op(lambda: attr(*np_args, **np_kwargs), in_place=in_place, inputs=(self._a,))
            _count_method(name, self, result, args, kwargs)
            if result is None and "out" in kwargs:     # recorded, not run (a capture): CuPy returns out
                return kwargs["out"]
            return _wrap(result, (self,))
        return method

    def __repr__(self):
        return f"strict_xp.ndarray({self._a!r})"


def _function(np_func):
    """A module-level function of the double: NumPy's, on device arrays only."""
    name = getattr(np_func, "__name__", "?")

    def device_function(*args, **kwargs):
        np_args, np_kwargs = _unwrap(args), _unwrap(kwargs)
        in_place = name in _IN_PLACE_FUNCTIONS or "out" in kwargs
        result = _device_op(lambda: np_func(*np_args, **np_kwargs), in_place=in_place,
                            inputs=[a for a in np_args if isinstance(a, np.ndarray)])
        _count_function(name, np_func, args, kwargs, result)
        if result is None and "out" in kwargs:         # recorded, not run (a capture): CuPy returns out
            return kwargs["out"]
        return _wrap(result, args)
    return device_function


def _transfer(np_func):
    """``xp.asarray(x)``: the explicit copy of host data to the device."""
    def to_device(obj, *args, **kwargs):
        if isinstance(obj, ndarray):
            a = obj._a
            result = _device_op(lambda: np_func(a, *args, **kwargs), inputs=(a,))
            if result is not obj._a and not np.shares_memory(result, obj._a):
                _count("elementwise")             # a dtype conversion or a copy on the device
            return _wrap(result, (obj,))
        _count("h2d")
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

        def draw(*args, **kwargs):
            _count("random")
            return _wrap(method(*_unwrap(args), **_unwrap(kwargs)))
        return draw


random = types.SimpleNamespace(default_rng=_Generator)


# --- kernels: the CUDA C body interpreted with NumPy -------------------------------

def _normcdf(x):
    import scipy.special
    return scipy.special.ndtr(x)


_C_FUNCTIONS = {"sqrt": np.sqrt, "exp": np.exp, "log": np.log, "tanh": np.tanh, "fabs": np.abs,
                "fmax": np.fmax, "fmin": np.fmin, "atanh": np.arctanh, "normcdf": _normcdf,
                "_select": np.where}


def _matching(text, start):
    """The index of the ``)`` that closes the ``(`` at ``text[start]``."""
    depth = 0
    for k in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[k], 0)
        if depth == 0:
            return k
    raise ValueError(f"unbalanced parentheses in {text!r}")


def _python_expression(text):
    """A C expression of the kernels' subset as Python: ``c ? a : b`` (the conditional
    operator, lowest precedence, nested or in parentheses) becomes ``_select(c, a, b)``,
    elementwise; the rest (arithmetic, comparisons, function calls) reads the same."""
    out, k = [], 0
    while k < len(text):                         # parenthesised groups first, inside out
        if text[k] == "(":
            end = _matching(text, k)
            out.append("(" + _python_expression(text[k + 1:end]) + ")")
            k = end + 1
        else:
            out.append(text[k])
            k += 1
    flat = "".join(out)
    depth, question = 0, None
    for k, ch in enumerate(flat):                # the first top-level '?' and its ':'
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and ch == "?" and question is None:
            question, nested = k, 0
        elif depth == 0 and question is not None and ch == "?":
            nested += 1
        elif depth == 0 and question is not None and ch == ":":
            if nested == 0:
                return (f"_select({flat[:question].strip()}, {flat[question + 1:k].strip()}, "
                        f"{_python_expression(flat[k + 1:].strip())})")
            nested -= 1
    return flat




def _params(text):
    """``"T x, bool m, raw T s"`` → ``[("T", "x"), ("bool", "m"), ("T", "s")]``."""
    return [tuple(p.split()[-2:]) for p in text.split(",")]


def _raw(text):
    """The names of the ``raw`` parameters of ``text``: whole arrays, indexed by the body
    (``s[i * K + y]``, a flat C-order index, as CuPy's ``CArray::operator[]``), not broadcast."""
    return {p.split()[-1] for p in text.split(",") if p.split()[0] == "raw"}


_INTEGER_TYPES = {"int32": np.int32, "int64": np.int64, "uint64": np.uint64}
_TYPES = {"float32": np.float32, "float64": np.float64, "bool": np.bool_, **_INTEGER_TYPES}


def _statements(body, name):
    """``[T ]name = expression;`` statements of a kernel body, compiled as Python: the
    subset of CUDA C that the library's kernels are written in (arithmetic,
    comparisons, the conditional operator ``c ? a : b``, uint64 locals with ``^``/``>>``, sqrt/exp/log/tanh/atanh/fabs/
    fmax/fmin/normcdf), which reads the same in both."""
    pattern = re.compile(r"^\s*(?:(?:const\s+)?(T|float|double|bool|int|unsigned long long)\s+)?"
                         r"([A-Za-z_]\w*)\s*=\s*(.+?)\s*$")
    out = []
    for line in filter(str.strip, body.replace("\n", ";").split(";")):
        match = pattern.match(line)
        if match is None:
            raise ValueError(f"{name}: the test double reads only '[T ]name = expression;', got {line!r}")
        out.append((match.group(2), _ternary(match.group(3), name), match.group(1)))
    return out


def _ternary(expression, name):
    """``cond ? a : b`` (right-nested chains too) → ``(cond, a, b)`` of compiled parts,
    recursively; any other expression → one compiled part. C evaluates only the
    branch it takes, so the double evaluates each on its own lanes (``_evaluate``)."""
    depth, question = 0, None
    for k, ch in enumerate(expression):
        depth += 1 if ch in "([" else -1 if ch in ")]" else 0
        if depth == 0 and ch == "?":
            question = k
            break
    if question is None:                      # conditionals inside parentheses: where()
        return compile(_python_expression(expression.strip()), name, "eval")
    depth, nested = 0, 0
    for k in range(question + 1, len(expression)):
        ch = expression[k]
        depth += 1 if ch in "([" else -1 if ch in ")]" else 0
        if depth == 0 and ch == "?":
            nested += 1
        elif depth == 0 and ch == ":":
            if nested == 0:
                return (compile(expression[:question].strip(), name, "eval"),
                        _ternary(expression[question + 1:k], name), _ternary(expression[k + 1:], name))
            nested -= 1
    raise ValueError(f"{name}: a '?' without its ':' in {expression!r}")


def _names(code):
    """The names a compiled expression (or ternary tree) reads."""
    return set().union(*map(_names, code)) if isinstance(code, tuple) else set(code.co_names)


def _evaluate(code, env, shape):
    """One compiled expression (or ternary tree) over the loop of ``shape``."""
    if not isinstance(code, tuple):
        return eval(code, {"__builtins__": {}}, env)
    cond = np.broadcast_to(eval(code[0], {"__builtins__": {}}, env), shape)
    values = []
    for branch, lanes in ((code[1], cond), (code[2], ~cond)):
        used = _names(branch)
        sub = {k: (np.broadcast_to(v, shape)[lanes] if isinstance(v, np.ndarray) and k not in env["_raw"] else v)
               for k, v in env.items() if k in used or k == "_raw"}
        values.append((lanes, np.asarray(_evaluate(branch, sub, (int(lanes.sum()),)))))
    result = np.empty(shape, np.result_type(*(v for _, v in values)))
    for lanes, value in values:
        result[lanes] = value
    return result


def _kernel_inputs(params, args, name, raw=()):
    """The NumPy inputs of a kernel call and the dtype T (that of the T-typed arrays).
    A type named by none of CuPy's dtype names (``I y``) is a placeholder of its own,
    the dtype of its array; a ``raw`` array enters the body flat, in C order."""
    inputs = [_unwrap(a) for a in args]
    t_arrays = [a for (kind, _), a in zip(params, inputs) if kind == "T" and isinstance(a, np.ndarray)]
    if not t_arrays or len({a.dtype for a in t_arrays}) != 1:
        raise TypeError(f"{name}: the arrays of type T must exist and share one dtype (CuPy: 'Type is mismatched')")
    dtype = t_arrays[0].dtype
    env = dict(_C_FUNCTIONS)
    env["_raw"] = set(raw)
    for (kind, pname), a in zip(params, inputs):
        if kind == "T":
            cast = dtype.type
        elif kind in _TYPES:
            cast = np.dtype(_TYPES[kind]).type
        elif isinstance(a, np.ndarray):
            cast = a.dtype.type
        else:
            raise TypeError(f"{name}: the placeholder {kind} of {pname} needs an array")
        if isinstance(a, np.ndarray):
            env[pname] = a.astype(cast, copy=False).reshape(-1) if pname in env["_raw"] else a.astype(cast, copy=False)
        else:
            env[pname] = cast(a)
    return inputs, dtype, env


class ElementwiseKernel:
    """``ElementwiseKernel(in_params, out_params, body, name)``; calling it with
    the inputs (and optionally the outputs, updated in place) runs ``body``."""

    def __init__(self, in_params, out_params, operation, name="kernel"):
        self.in_params, self.out_params = _params(in_params), _params(out_params)
        self.raw = _raw(in_params)
        self.in_names = [n for _, n in self.in_params]
        self.out_names = [n for _, n in self.out_params]
        self.statements = _statements(operation, name)
        self.uses_i = re.search(r"\bi\b", operation) is not None
        self.name = name

    def __call__(self, *args):
        _count("elementwise")
        n_in = len(self.in_names)
        if len(args) not in (n_in, n_in + len(self.out_names)):
            raise TypeError(f"{self.name}: wrong number of arguments ({len(args)})")
        inputs, dtype, env = _kernel_inputs(self.in_params, args[:n_in], self.name, self.raw)
        arrays = [a for (_, n), a in zip(self.in_params, inputs) if isinstance(a, np.ndarray) and n not in self.raw]
        if len(args) > n_in:
            outs = list(args[n_in:])
            shape = outs[0].shape
        else:
            shape = np.broadcast_shapes(*(a.shape for a in arrays))
            outs = [ndarray(np.empty(shape, np.bool_ if kind == "bool" else dtype)) for kind, _ in self.out_params]
            _allocated(outs)
        np_outs = [o._a for o in outs]
        # the inputs are cast (and raw ones flattened) when the kernel runs: a captured node
        # reads them at its launch, as the kernel would, not as they were at the capture
        inputs_now = lambda: _kernel_inputs(self.in_params, args[:n_in], self.name, self.raw)[2]
        _device_op(lambda: self._run(inputs_now(), dtype, shape, np_outs), in_place=True)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _run(self, inputs_env, dtype, shape, np_outs):
        env = dict(inputs_env)
        env.update({n: o.copy() for n, o in zip(self.out_names, np_outs)})
        if self.uses_i:             # the loop index: C order over the output's shape
            env["i"] = np.arange(int(np.prod(shape))).reshape(shape)
        types_ = {n: (np.bool_ if kind == "bool" else dtype) for kind, n in self.out_params}
        # locals declared unsigned long long stay uint64 (wrapping mod 2⁶⁴ as C); others are T
        types_.update({n: np.uint64 for n, _, decl in self.statements if decl == "unsigned long long"})
        for target, expression, _ in self.statements:
            env[target] = np.asarray(_evaluate(expression, env, shape), dtype=types_.get(target, dtype))
        for n, o in zip(self.out_names, np_outs):
            o[...] = env[n]


class ReductionKernel:
    """``ReductionKernel(in_params, out_params, map_expr, reduce_expr, post_map_expr,
    identity, name)``; ``kernel(*inputs, axis=None, keepdims=False)``: ``map_expr``
    on the broadcast inputs, reduced along ``axis`` by ``reduce_expr`` (``a + b``,
    ``max(a, b)`` or ``min(a, b)``), then ``post_map_expr`` on the reduced value ``a``."""

    _REDUCERS = {"a + b": np.add, "max(a, b)": np.maximum, "min(a, b)": np.minimum}

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity,
                 name="reduce_kernel"):
        self.in_params, self.out_params = _params(in_params), _params(out_params)
        if reduce_expr.strip() not in self._REDUCERS:
            raise ValueError(f"{name}: the test double reduces only by {sorted(self._REDUCERS)}")
        self.reducer = self._REDUCERS[reduce_expr.strip()]
        self.map_expr = _ternary(map_expr, name)
        self.post_map = _statements(post_map_expr, name)
        self.name = name

    def __call__(self, *args, axis=None, keepdims=False):
        inputs, dtype, env = _kernel_inputs(self.in_params, args, self.name)
        shape = np.broadcast_shapes(*(a.shape for a in inputs if isinstance(a, np.ndarray)))
        _count("reduction", size=int(np.prod(shape)) if axis is None else 0)
        inputs_now = lambda: _kernel_inputs(self.in_params, args, self.name)[2]     # at the launch
        return ndarray(_device_op(lambda: self._run(inputs_now(), dtype, shape, axis, keepdims), inputs=inputs))

    def _run(self, inputs_env, dtype, shape, axis, keepdims):
        env = dict(inputs_env)
        mapped = np.broadcast_to(np.asarray(_evaluate(self.map_expr, env, shape), dtype=dtype), shape)
        env["a"] = self.reducer.reduce(mapped, axis=axis, keepdims=keepdims)
        for target, expression, _ in self.post_map:
            env[target] = np.asarray(_evaluate(expression, env, np.shape(env["a"])), dtype=dtype)
        return np.array(env[self.out_params[0][1]])


# --- launch counting: what each call would cost CuPy -------------------------------
#
# The model of CuPy (14.x) that ``counting()`` applies, one rule per kind of call.
# Sources: CuPy's own code (cupy/_core/_routines_indexing.pyx, _reduction.pyx,
# _routines_linalg.pyx, cupy/linalg/_einsum.py) and documentation (the
# ElementwiseKernel/ReductionKernel reference; "CUB/cuTENSOR backend for
# reduction routines" in the routines reference).
#
# * elementwise: a ufunc (``a + b``, ``xp.exp``, a comparison, ``out=`` or not),
#   ``xp.where``/``clip``, ``astype`` to another dtype, ``fill``, ``xp.full``,
#   ``xp.arange``, ``fill_diagonal``, an ``ElementwiseKernel`` call: one
#   kernel, one host call each (CuPy's ElementwiseKernel machinery, one launch
#   per call).
# * reduction: ``sum``/``max``/``min``/``mean``/``any``/``all``/... and a
#   ``ReductionKernel`` call: one host call. Over some axes one kernel; over the
#   whole array of >= 128 elements two kernels, CUB's device reduction
#   (``_ndarray_sum`` etc. try ``cub.cub_reduction`` first when CUB is among
#   the accelerators; CUB's DeviceReduce is a two-pass algorithm).
# * cublas: ``@``/``matmul``/``dot``/``tensordot``: one cuBLAS gemm.
#   ``einsum`` of two operands goes through ``tensordot_core``/batched matmul
#   (cupy/linalg/_einsum.py): ``"ij,ij->i"`` is a batch of B 1×1 products, one
#   batched gemm; counted as one cublas call.
# * fancy-index: ``a[idx]``/``a[idx] = v`` with one integer array: one take /
#   scatter kernel (``_take``, ``_scatter_op_single``); with two or more
#   integer arrays: four (``_prepare_multiple_array_indexing`` folds the index
#   arrays into one flat index elementwise, then one take/scatter); a
#   non-array value ``v`` is first made a device array (``core.array(value)``:
#   a host → device copy). A boolean mask scans the mask and reads its last
#   element back (``int(mask_scanned[-1])`` in ``_prepare_mask_indexing_single``):
#   one sync.
# * copy: ``a.copy()``, ``a[...] = b`` between device arrays, ``xp.asarray`` of a
#   device array to another dtype: one device copy (``copy_from_device_async``
#   or ``elementwise_copy``).
# * memset: ``xp.zeros``/``zeros_like``: one ``cudaMemsetAsync``.
# * random: one draw of a ``Generator``: one kernel.
# * views cost nothing: ``empty``, slicing with ints and slices, ``reshape`` of
#   a contiguous array, ``.T``, ``diagonal``, ``broadcast_to``.
# * h2d: ``xp.asarray(host data)``: one host → device copy (one host call).
# * sync: ``float``/``int``/``bool``/``.item()``/``.tolist()``/``.get()``/
#   ``Device().synchronize()``: the host waits for the device; recorded with the
#   library line that asked for it.
#
# The counts are this model's, exact for the code as it runs; what a launch
# costs in host time is not modelled (bench.py on a GPU measures that).

KERNEL_KINDS = ("elementwise", "reduction", "cublas", "fancy-index", "copy", "memset", "random", "graph")
CUB_MIN_SIZE = 128          # a whole-array reduction at least this big takes CUB's two passes
_FREE = {"empty", "empty_like", "broadcast_to", "reshape", "diagonal", "transpose", "ravel",
         "expand_dims", "squeeze", "result_type", "shape", "ndim", "isscalar", "broadcast_shapes",
         "atleast_1d", "swapaxes", "moveaxis", "may_share_memory", "shares_memory"}
_ELEMENTWISE = {"where", "clip", "full", "full_like", "ones", "ones_like", "arange", "fill_diagonal",
                "outer", "sign", "abs", "exp", "log", "sqrt", "tanh", "maximum", "minimum", "isfinite",
                "isnan", "logaddexp", "nan_to_num", "power", "square", "linspace", "copyto"}
_REDUCTIONS = {"sum", "mean", "max", "min", "amax", "amin", "any", "all", "prod", "argmax", "argmin",
               "count_nonzero", "trace", "var", "std", "nansum", "sort", "argsort", "cumsum"}
_CUBLAS = {"matmul", "dot", "tensordot", "einsum", "inner", "vdot"}
_COPIES = {"copy", "concatenate", "stack", "ascontiguousarray", "hstack", "vstack", "take", "tile"}
_MEMSET = {"zeros", "zeros_like"}
_IN_PLACE_FUNCTIONS = {"copyto", "fill_diagonal", "put", "place", "putmask"}
_IN_PLACE_METHODS = {"fill", "sort", "partition", "put", "itemset"}
_SYNCING = {"nonzero", "flatnonzero", "argwhere", "unique", "repeat", "bincount", "searchsorted"}
_METHOD_REDUCTIONS = {"sum", "mean", "max", "min", "any", "all", "prod", "argmax", "argmin", "var",
                      "std", "cumsum", "sort", "argsort"}


class LaunchCount:
    """What one stretch of code would cost CuPy (rules above): ``events`` is a list of
    ``(kind, kernels, module, line)``; syncs are events of kind ``"sync"``."""

    def __init__(self):
        self.events = []

    def kernels(self):
        return sum(k for kind, k, _, _ in self.events if kind in KERNEL_KINDS)

    def host_calls(self):
        """Host-side device calls: each eager kernel, cuBLAS call, copy (h2d included)
        or graph launch counts one; a sync is not one (it is counted apart)."""
        return sum(1 for kind, _, _, _ in self.events if kind != "sync")

    def syncs(self):
        return [line for kind, _, _, line in self.events if kind == "sync"]

    def h2d(self):
        return sum(1 for kind, _, _, _ in self.events if kind == "h2d")

    def _tally(self, field):
        """Host calls (every event but a sync) counted by the event's ``field``-th entry."""
        out = {}
        for event in self.events:
            if event[0] != "sync":
                out[event[field]] = out.get(event[field], 0) + 1
        return out

    def by_kind(self):
        return self._tally(0)

    def by_module(self):
        return self._tally(2)

    def summary(self):
        return dict(host_calls=self.host_calls(), kernels=self.kernels(), syncs=len(self.syncs()),
                    h2d=self.h2d(), by_kind=self.by_kind(), by_module=self.by_module(),
                    sync_lines=self.syncs())


_counter = []               # the active LaunchCount, innermost last


class counting:
    """``with counting() as c: ...`` records every call's cost into ``c`` (a LaunchCount)."""

    def __enter__(self):
        _counter.append(LaunchCount())
        return _counter[-1]

    def __exit__(self, *exc):
        _counter.pop()


_HERE = __file__
_PASS_THROUGH = {"matmul", "ndtr", "<lambda>"}   # backend's pass-throughs: the call is their caller's


def _caller():
    """``(module, "path:line")`` of the first frame outside this double and NumPy:
    the library line that made the call (module: ``losses``, ``run/training``, ...)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if (path != _HERE and "/numpy/" not in path
                and not (path.endswith("backend.py") and frame.f_code.co_name in _PASS_THROUGH)):
            break
        frame = frame.f_back
    if frame is None:
        return "?", "?"
    path = frame.f_code.co_filename.replace("\\", "/")
    if "/paeff_np/" in path:
        rel = path.rsplit("/paeff_np/", 1)[1]
        return rel[:-3] if rel.endswith(".py") else rel, f"paeff_np/{rel}:{frame.f_lineno}"
    return path.rsplit("/", 1)[-1], f"{path.rsplit('/', 1)[-1]}:{frame.f_lineno}"


def _count(kind, size=0, kernels=None, stream=None):
    if kernels is None:
        kernels = 2 if kind == "reduction" and size >= CUB_MIN_SIZE else 1
    if _capture:
        _capture[-1].add_kernels(kind, kernels)      # a node of the graph, not a host call
        return
    _issue(stream)
    if not _counter:
        return
    module, line = _caller()
    _counter[-1].events.append((kind, kernels, module, line))


def _count_sync(what, waits_for=None, reads=True):
    """A host sync; ``waits_for``: the streams it waits for (default: the current one,
    as CuPy's ``get()``, ``float()``: a copy on the current stream, then its sync);
    ``reads``: it reads device memory, which another stream's work in flight may
    still write (see "Streams" below)."""
    if _capture:
        _capture[-1].invalidated = True
        raise RuntimeError(f"{what} while a stream is capturing: a capture cannot wait for the device "
                           f"(strict CuPy test double; CUDA: operation not permitted when stream is capturing)")
    for s in (list(_pending.values()) if waits_for == "all" else [waits_for or _current()]):
        _pending.pop(id(s), None)
    if waits_for == "all" or (waits_for or _current()) is None:
        _default_busy.clear()
    if _pending and reads:
        _unordered(what)
    if _counter:
        module, line = _caller()
        _counter[-1].events.append(("sync", 0, module, f"{line} {what}"))


def _size_of(x):
    return x.size if isinstance(x, (ndarray, np.ndarray)) else 1


def _is_full(kwargs):
    return kwargs.get("axis") is None


def _count_function(name, np_func, args, kwargs, result):
    if not (_counter or _capture or _watch):
        return
    first = args[0] if args else None
    if name in _FREE:
        return
    if name in _CUBLAS:
        _count("cublas")
    elif isinstance(np_func, np.ufunc) or name in _ELEMENTWISE:
        _count("elementwise")
    elif name in _REDUCTIONS:
        _count("reduction", size=_size_of(first) if _is_full(kwargs) and len(args) < 2 else 0)
    elif name in _COPIES:
        for _ in (first if name in ("concatenate", "stack", "hstack", "vstack") else [first]):
            _count("copy")
    elif name in _MEMSET:
        _count("memset")
    elif name == "pad":
        _count("memset")
        _count("copy")
    elif name in _SYNCING:
        _count("elementwise")
        _count_sync(f"{name}() (its length is read back)")
    else:
        _count("unmodelled:" + name)


def _count_method(name, self, result, args, kwargs):
    if not (_counter or _capture or _watch):
        return
    if name in _METHOD_REDUCTIONS:
        _count("reduction", size=self.size if _is_full(kwargs) and not args else 0)
    elif name == "astype":
        if isinstance(result, np.ndarray) and result is not self._a:
            _count("elementwise" if result.dtype != self.dtype else "copy")
    elif name == "copy":
        _count("copy")
    elif name == "fill":
        _count("elementwise")
    elif name in ("dot",):
        _count("cublas")
    elif name in ("reshape", "ravel", "view", "transpose", "squeeze", "swapaxes", "flatten"):
        if isinstance(result, np.ndarray) and not np.shares_memory(result, self._a):
            _count("copy")
    else:
        _count("unmodelled:." + name)


def _count_indexing(index, value):
    """``a[index]`` (value None) or ``a[index] = value``, by CuPy's indexing rules above."""
    if not (_counter or _capture or _watch):
        return
    parts = index if isinstance(index, tuple) else (index,)
    arrays = [p for p in parts if isinstance(p, (ndarray, np.ndarray, list))]
    masks = [p for p in arrays if getattr(p, "dtype", None) == np.bool_]
    if masks:
        _count("elementwise")               # the scan of the mask
        _count_sync("a boolean mask index (its count is read back)")
        _count("fancy-index")
    elif arrays:
        if value is not None and not isinstance(value, ndarray):
            _count("h2d")                   # core.array(value)
        for _ in range(1 if len(arrays) == 1 else 4):
            _count("fancy-index")
    elif value is not None:                 # basic indexing: a fill or a copy into the view
        _count("copy" if isinstance(value, ndarray) else "elementwise")


# --- stream capture and CUDA graphs ----------------------------------------------
#
# CuPy: ``s = cupy.cuda.Stream(non_blocking=True)``; ``with s: s.begin_capture();
# ...; g = s.end_capture()``; ``g.launch(s)``. While a stream captures, no
# kernel runs: each is a node of the graph, run when the graph is launched
# (every launch runs them all again, on the same memory). The double keeps that
# meaning with NumPy:
#
# * an operation that writes into existing memory (``out=``, ``a[i] = v``, a
#   kernel's given outputs, ``fill``, ``copyto``) is recorded and NOT run;
# * an operation that makes a new array runs (for its shape and dtype), is
#   recorded to recompute into that same array, and the array is POISONED
#   (NaN, or a value no index takes) when the capture ends: code that reads
#   a captured result before launching the graph reads garbage, as on a GPU;
# * what CuPy refuses during capture raises: cuBLAS calls NotImplementedError
#   as CuPy does (its tests/cupy_tests/cuda_tests/test_graph.py), and so do the
#   Generator's draws (CuPy refuses cuRAND's host API, the legacy
#   ``cupy.random.random``; its ``Generator`` draws are kernels on device
#   state that CuPy does not refuse, but the library cuts at them anyway, and
#   the double holds it to that); host → device copies of host data and any
#   sync raise RuntimeError, and a sync leaves the capture invalidated:
#   ``end_capture`` then raises (cudaErrorStreamCaptureInvalidated), as CUDA;
# * ``Graph.launch()`` is one host call running all the graph's kernels
#   (counted as kind "graph", with the kernels of its nodes).
#
# Streams, as CUDA orders them (tracked once a non-blocking stream exists).
# ``with stream:`` makes ``stream`` current (else the legacy default stream).
# Work issued on a stream is "in flight" until that stream
# (``Stream.synchronize()``), the device (``Device().synchronize()``) or a
# read on that stream (``get()``, ``float()``) waits for it. CUDA does not
# order a non-blocking stream with the default one, so work or a read on the
# default stream while a non-blocking stream has work in flight raises
# RuntimeError, and so does work on a non-blocking stream while the default
# stream has work in flight (the step would read inputs not yet written).
#
# Memory, as CuPy's pools hand it out. The double's "addresses" are its NumPy
# arrays, which every node keeps alive; on a GPU a graph holds addresses
# only. So an array made during a capture is tracked: when its last device
# array is dropped, CuPy gives its memory back to the allocator it came
# from. The default pool (no ``using_allocator``) or raw cudaMalloc hands it
# to the next array anyone makes: the graph then writes memory it no longer
# owns, and ``launch()`` raises. A private ``MemoryPool`` (``with
# using_allocator(pool.malloc)``) keeps it for its own allocations, until
# ``pool.free_all_blocks()`` gives it to the device: a graph launched after
# that raises too.

_REFUSED_IN_CAPTURE = {"cublas": "a cuBLAS call", "random": "a cuRAND draw",
                       "h2d": "a host -> device copy of host data"}
_capture = []               # the active capture (one stream captures at a time)
_streams = []               # the streams entered (``with stream:``), innermost last
_pending = {}               # id(stream) -> non-blocking stream with work in flight
_default_busy = []          # non-empty: the default stream has work in flight (tracked once _watch)
_watch = []                 # non-empty once a non-blocking stream exists: streams are tracked
_allocators = []            # the allocators of ``using_allocator``, innermost last


class _Memory:
    """What a graph's memory has become: ``lost`` says why it no longer owns some."""

    def __init__(self):
        self.lost = None


class _Capture:
    def __init__(self, stream):
        self.stream, self.nodes, self.fresh, self.kernels = stream, [], [], 0
        self.fresh_ids, self.live, self.invalidated = set(), {}, False
        self.memory = _Memory()

    def add_kernels(self, kind, kernels):
        if kind in _REFUSED_IN_CAPTURE:
            error = NotImplementedError if kind in ("cublas", "random") else RuntimeError
            raise error(f"{_REFUSED_IN_CAPTURE[kind]} while a stream is capturing: CuPy refuses it "
                        f"(strict CuPy test double; CuPy issue 6290)")
        self.kernels += kernels

    def add_fresh(self, arrays):
        self.fresh.extend(arrays)
        self.fresh_ids.update(id(a) for a in arrays)

    def track(self, device_array):
        """A device array of memory made during this capture: when the last one of a
        payload goes, CuPy frees the memory into the allocator active at the capture."""
        key = id(device_array._a)
        self.live[key] = self.live.get(key, 0) + 1
        pool = getattr(_allocators[-1] if _allocators else None, "__self__", None)
        memory = self.memory

        def freed(live=self.live):
            live[key] -= 1
            if live[key] == 0 and memory.lost is None:
                if isinstance(pool, MemoryPool):
                    pool._graphs.append(memory)
                else:
                    memory.lost = ("an array made during the capture was freed into the default memory "
                                   "pool, which gives it to the next array made (record under "
                                   "cupy.cuda.using_allocator(pool.malloc) of a private MemoryPool)")
        weakref.finalize(device_array, freed)


def _current():
    return _streams[-1] if _streams else None


def _unordered(what):
    names = ", ".join(repr(s) for s in _pending.values())
    raise RuntimeError(f"{what} on the default stream while {names} has work in flight: CUDA does not "
                       f"order them; synchronize that stream first (strict CuPy test double)")


def _issue(stream=None):
    """Device work issued (not captured) on ``stream`` (default: the current one)."""
    if not _watch:
        return
    stream = stream or _current()
    if stream is not None and stream.non_blocking:
        if _default_busy:
            raise RuntimeError(f"device work on {stream!r} while the default stream has work in flight: "
                               f"CUDA does not order them; Device().synchronize() first (strict CuPy "
                               f"test double)")
        _pending[id(stream)] = stream
    else:
        if _pending:
            _unordered("device work")
        _default_busy[:] = [True]


def _arrays_of(result):
    if isinstance(result, np.ndarray):
        return [result]
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in _arrays_of(r)]
    return []


def _as_arrays(result):
    if isinstance(result, np.generic):
        return np.asarray(result)
    if isinstance(result, (tuple, list)):
        return type(result)(_as_arrays(r) for r in result)
    return result


def _copy_into(targets, values):
    for target, value in zip(targets, values):
        np.copyto(target, value)


def _allocated(outs):
    """Device arrays a kernel call allocates for its outputs: poisoned when the capture ends."""
    if _capture:
        _capture[-1].add_fresh([o._a for o in outs])
        for o in outs:
            _capture[-1].track(o)


def _device_op(compute, in_place=False, inputs=()):
    """Run ``compute()`` (a NumPy computation on device payloads), or, while a stream
    captures, record it as a graph node (rules above)."""
    if not _capture:
        return compute()
    capture = _capture[-1]
    if in_place:
        capture.nodes.append(compute)
        return None
    result = _as_arrays(compute())          # a NumPy scalar: CuPy's 0-d array, recomputed too
    inputs = [a for a in inputs if isinstance(a, np.ndarray)]
    new = [i for i, r in enumerate(_arrays_of(result)) if not any(np.shares_memory(r, a) for a in inputs)]
    if new:
        targets = [_arrays_of(result)[i] for i in new]
        capture.nodes.append(lambda: _copy_into(targets, [_arrays_of(_as_arrays(compute()))[i] for i in new]))
        capture.add_fresh(targets)
    return result


def _poison(a):
    if a.dtype.kind in "fc":
        a[...] = np.nan
    elif a.dtype.kind in "iu":
        a[...] = np.iinfo(a.dtype).max
    elif a.dtype == np.bool_:
        np.logical_not(a, out=a)


class Graph:
    """A captured graph: ``launch(stream=None)`` runs its nodes in order, on ``stream``
    (default: the current one)."""

    def __init__(self, nodes, kernels, memory):
        self._nodes, self.kernels, self._memory = nodes, kernels, memory

    def launch(self, stream=None):
        if _capture:
            raise RuntimeError("a graph launched while a stream is capturing (strict CuPy test double)")
        if self._memory.lost:
            raise RuntimeError(f"a graph launched on memory it no longer owns: {self._memory.lost} "
                               f"(strict CuPy test double)")
        _count("graph", kernels=self.kernels, stream=stream)
        for node in self._nodes:
            node()


class Stream:
    """``cupy.cuda.Stream``: a context (the current stream) that can capture."""

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self.non_blocking = non_blocking and not null
        self.ptr = 0 if null else id(self)
        if self.non_blocking and not _watch:
            _watch[:] = [True]      # from now on the double tracks which stream has work in flight,
            _default_busy[:] = [True]   # and what ran before on the default stream may still run

    def __repr__(self):
        return f"<Stream {self.ptr:#x}{' (non-blocking)' if self.non_blocking else ''}>"

    def __enter__(self):
        _streams.append(self)
        return self

    def __exit__(self, *exc):
        _streams.pop()
        return False

    def begin_capture(self, mode=None):
        if not self.non_blocking:
            raise RuntimeError("stream capture needs a non-blocking stream (strict CuPy test double; CUDA "
                               "refuses capture on a stream that synchronises with the legacy default stream)")
        if _capture:
            raise RuntimeError("a stream is already capturing (strict CuPy test double)")
        _capture.append(_Capture(self))

    def is_capturing(self):
        return bool(_capture) and _capture[-1].stream is self

    def end_capture(self):
        if not self.is_capturing():
            raise RuntimeError("end_capture on a stream that is not capturing (strict CuPy test double)")
        capture = _capture.pop()
        for a in capture.fresh:
            _poison(a)
        if capture.invalidated:
            raise RuntimeError("cudaErrorStreamCaptureInvalidated: the capture was invalidated by an "
                               "operation it cannot hold (strict CuPy test double)")
        return Graph(capture.nodes, capture.kernels, capture.memory)

    def synchronize(self):
        _count_sync("Stream.synchronize()", waits_for=self, reads=False)


class MemoryPool:
    """``cupy.cuda.MemoryPool``: the double's memory is its NumPy arrays; the pool
    keeps what a capture's arrays gave back to it until ``free_all_blocks``."""

    def __init__(self, allocator=None):
        self._graphs = []           # the _Memory of graphs whose arrays were freed into this pool

    def malloc(self, size):
        raise NotImplementedError("the strict CuPy test double allocates no raw memory")

    def free_all_blocks(self, stream=None):
        for memory in self._graphs:
            if memory.lost is None:
                memory.lost = ("its private pool's free blocks were given back to the device "
                               "(MemoryPool.free_all_blocks)")
        self._graphs = []


class using_allocator:
    """``cupy.cuda.using_allocator(malloc)``: the allocator of the arrays made inside
    (here: where a capture's freed arrays go, see above)."""

    def __init__(self, allocator=None):
        self.allocator = allocator

    def __enter__(self):
        _allocators.append(self.allocator)
        return self

    def __exit__(self, *exc):
        _allocators.pop()
        return False


# --- the device ----------------------------------------------------------------

class _Device:
    def __init__(self, device_id=0):
        self.id = device_id
        self.compute_capability = "00"

    def synchronize(self):
        _count_sync("Device.synchronize()", waits_for="all", reads=False)


_runtime = types.SimpleNamespace(
    getDeviceCount=lambda: 1,
    getDeviceProperties=lambda device_id: {"name": b"strict CuPy test double (NumPy)"},
    runtimeGetVersion=lambda: 0,
    driverGetVersion=lambda: 0,
    memGetInfo=lambda: (FREE_BYTES[0], 80 << 30),
    streamCaptureModeRelaxed=2)
FREE_BYTES = [80 << 30]     # what memGetInfo says is free; a test may set it
cuda = types.SimpleNamespace(runtime=_runtime, Device=_Device, Stream=Stream, MemoryPool=MemoryPool,
                             using_allocator=using_allocator)


def ndtr(x):
    """``cupyx.scipy.special.ndtr``: a ufunc, one elementwise kernel."""
    import scipy.special
    _count("elementwise")
    a = _unwrap(x)
    return _wrap(_device_op(lambda: scipy.special.ndtr(a), inputs=(a,)))


class _Patches:
    """The two calls of pytest's monkeypatch that ``install`` makes, undone by ``undo``."""

    def __init__(self):
        self._undo = []

    def setitem(self, mapping, key, value):
        old = mapping.get(key, _Patches)
        self._undo.append(lambda: mapping.pop(key) if old is _Patches else mapping.__setitem__(key, old))
        mapping[key] = value

    def setattr(self, obj, name, value):
        old = getattr(obj, name)
        self._undo.append(lambda: setattr(obj, name, old))
        setattr(obj, name, value)

    def undo(self):
        while self._undo:
            self._undo.pop()()


class installed:
    """``with installed() as cupy:`` ``install`` outside pytest (bench.py's count), undone on exit."""

    def __enter__(self):
        self._patches = _Patches()
        return install(self._patches)

    def __exit__(self, *exc):
        self._patches.undo()


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
    for name, empty in (("_capture", []), ("_streams", []), ("_pending", {}), ("_allocators", []),
                        ("_default_busy", []), ("_watch", [])):
        monkeypatch.setattr(this, name, empty)      # no stream state left over from another test
    return this
