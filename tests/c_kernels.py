"""The library's CuPy kernels compiled with the machine's C compiler and run on
NumPy arrays, under the semantics of CuPy's ``ElementwiseKernel`` and
``ReductionKernel`` (a test harness; it replaces no GPU run):

* typed parameters: ``T x`` (T: the dtype of the call's T arrays, float or
  double), ``bool m``, ``float32``/``float64``/``int32``/``int64``/``uint64``, and any
  other type name a placeholder of its own (``I y``: the dtype of its array);
  a Python number for a non-array parameter is cast to its type, as CuPy does;
* ``raw`` parameters (elementwise): the whole array, C-contiguous, indexed by
  the body with a flat C-order index (``s[i * K + y]``), as CuPy's
  ``CArray::operator[](ptrdiff_t)`` does; ``i`` is the loop index;
* broadcasting: every input but the raw ones is broadcast to the loop's shape
  (elementwise: that of the non-raw inputs, or of the given outputs) or to the
  reduction's input shape;
* an elementwise body runs once per output element ``i``, with the inputs as
  ``const`` values and the outputs as variables written back;
* a reduction starts from ``identity``, folds ``map_expr`` of each element
  into ``a`` by ``reduce_expr`` (``a`` the running value, ``b`` the next
  mapped one), then runs ``post_map_expr`` on ``a``, along one axis.

The body is compiled as C++ (``gcc -x c++``: ``sqrt(float)`` is the float
overload, as in CUDA C++), with no fast-math and no FMA contraction; NVRTC
contracts a·b + c into FMAs by default, one of the reasons the comparisons
allow a few ulps (tests/test_kernels.py). ``cpu_cupy(monkeypatch)`` installs
the strict CuPy double with these compiled kernels in place of its
interpreter, so the library's CuPy path runs the C bodies themselves.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

import strict_xp

COMPILER = shutil.which("gcc") or "/usr/bin/gcc"
CACHE = os.path.join(tempfile.gettempdir(), f"paeff-c-kernels-{os.getuid()}")
_C_TYPES = {"float32": ("float", np.float32), "float64": ("double", np.float64),
            "bool": ("bool", np.bool_), "int32": ("int", np.int32), "int64": ("long long", np.int64),
            "uint64": ("unsigned long long", np.uint64)}
_INTEGER_C = {np.dtype(np.int32): "int", np.dtype(np.int64): "long long"}


def compiler_missing():
    """``None`` when the C++ compiler works, else one line saying why not."""
    try:
        proc = subprocess.run([COMPILER, "-x", "c++", "-fsyntax-only", "-"], input="int x;\n",
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no C++ compiler ({COMPILER}: {exc})"
    return None if proc.returncode == 0 else f"{COMPILER} cannot compile C++: {proc.stderr.strip()[:200]}"


def _params(text):
    return [tuple(p.split()[-2:]) for p in text.split(",")]


def _raw(text):
    return {p.split()[-1] for p in text.split(",") if p.split()[0] == "raw"}


def _ctype(kind, t_dtype):
    if kind == "T":
        return "T", np.dtype(t_dtype)
    if kind not in _C_TYPES:            # a placeholder of its own: typedef'd in the header
        return kind, None
    return _C_TYPES[kind][0], np.dtype(_C_TYPES[kind][1])


def _load(source):
    os.makedirs(CACHE, exist_ok=True)
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    so = os.path.join(CACHE, f"k{digest}.so")
    if not os.path.exists(so):
        src = os.path.join(CACHE, f"k{digest}.cpp")
        with open(src, "w") as f:
            f.write(source)
        tmp = f"{so}.{os.getpid()}"
        proc = subprocess.run([COMPILER, "-x", "c++", "-O1", "-ffp-contract=off", "-fno-fast-math", "-shared",
                               "-fPIC", "-o", tmp, src], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"the kernel does not compile:\n{proc.stderr}\n--- source ---\n{source}")
        os.replace(tmp, so)
    return ctypes.CDLL(so)


CPU_PRELUDE = (
    "#include <cmath>\nusing namespace std;\n"
    # CUDA's normcdf(x) (float and double overloads; at most 5 ulp in float32, 5 in
    # float64, CUDA C Programming Guide, Mathematical Functions): on the CPU, erfc in
    # double, the argument x/sqrt(2) rounded once in double, then rounded to the type
    "static inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752440); }\n"
    "static inline float normcdf(float x) { return (float)normcdf((double)x); }\n")
"""What the CPU build adds before a kernel: the C++ math library and stand-ins for
CUDA's device functions that it lacks (the NVRTC compile leaves it out)."""


def _header(t_dtype, placeholders=None):
    """``placeholders``: ``{name: integer dtype}`` of the placeholders other than T."""
    typedefs = "".join(f"typedef {_INTEGER_C[np.dtype(d)]} {n};\n" for n, d in (placeholders or {}).items())
    return (CPU_PRELUDE + f"typedef {'float' if np.dtype(t_dtype) == np.float32 else 'double'} T;\n" + typedefs)


def elementwise_source(in_params, out_params, body, t_dtype, placeholders=None):
    lines = [_header(t_dtype, placeholders), 'extern "C" void run(long _n, void **_args) {',
             "  for (long i = 0; i < _n; i++) {"]
    k = 0
    raw = _raw(in_params)
    for kind, name in _params(in_params):
        ctype, _ = _ctype(kind, t_dtype)
        if name in raw:
            lines.append(f"    const {ctype} *{name} = (const {ctype} *)_args[{k}];")
        else:
            lines.append(f"    const {ctype} {name} = ((const {ctype} *)_args[{k}])[i];")
        k += 1
    outs = []
    for kind, name in _params(out_params):
        ctype, _ = _ctype(kind, t_dtype)
        lines.append(f"    {ctype} {name} = ((const {ctype} *)_args[{k}])[i];")
        outs.append((ctype, name, k))
        k += 1
    lines.append("    " + body.strip().replace("\n", "\n    ") + ";")     # CuPy adds the last ";" too
    lines += [f"    (({ctype} *)_args[{j}])[i] = {name};" for ctype, name, j in outs]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def reduction_source(in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, t_dtype,
                     placeholders=None):
    (out_kind, out_name), = _params(out_params)
    out_ctype, _ = _ctype(out_kind, t_dtype)
    lines = [_header(t_dtype, placeholders), 'extern "C" void run(long _m, long _r, void **_args) {',
             "  for (long _j = 0; _j < _m; _j++) {", f"    {out_ctype} a = ({out_ctype})({identity});",
             "    for (long _l = 0; _l < _r; _l++) {", "      long _e = _j * _r + _l;"]
    ins = _params(in_params)
    for k, (kind, name) in enumerate(ins):
        ctype, _ = _ctype(kind, t_dtype)
        lines.append(f"      const {ctype} {name} = ((const {ctype} *)_args[{k}])[_e];")
    lines += [f"      {out_ctype} b = ({map_expr});", f"      a = ({reduce_expr});", "    }",
              f"    {out_ctype} {out_name};", f"    {post_map_expr};",
              f"    (({out_ctype} *)_args[{len(ins)}])[_j] = {out_name};", "  }", "}"]
    return "\n".join(lines) + "\n"


def _t_dtype(params, inputs, name):
    ts = {np.asarray(a).dtype for (kind, _), a in zip(params, inputs) if kind == "T" and isinstance(a, np.ndarray)}
    if len(ts) != 1:
        raise TypeError(f"{name}: the T arrays must share one dtype, got {sorted(map(str, ts))}")
    return ts.pop()


def _placeholders(params, inputs, name):
    """``{kind: dtype}`` of the placeholders other than T (integer arrays: labels)."""
    out = {}
    for (kind, pname), a in zip(params, inputs):
        if kind != "T" and kind not in _C_TYPES:
            if not isinstance(a, np.ndarray) or a.dtype not in _INTEGER_C:
                raise TypeError(f"{name}: the placeholder {kind} of {pname} needs an int32/int64 array")
            if out.setdefault(kind, a.dtype) != a.dtype:
                raise TypeError(f"{name}: the arrays of placeholder {kind} must share one dtype")
    return out


def _cast(kind, a, t, placeholders):
    dtype = placeholders[kind] if kind in placeholders else _ctype(kind, t)[1]
    return np.asarray(a, dtype)


def _pointers(arrays):
    return (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])


class CElementwiseKernel:
    """``cupy.ElementwiseKernel``'s interface, the body compiled for the CPU."""

    def __init__(self, in_params, out_params, operation, name="kernel"):
        self.in_params, self.out_params, self.body, self.name = in_params, out_params, operation, name

    def __call__(self, *args):
        params, outs_p = _params(self.in_params), _params(self.out_params)
        raw = _raw(self.in_params)
        inputs = [a._a if isinstance(a, strict_xp.ndarray) else a for a in args[:len(params)]]
        t = _t_dtype(params, inputs, self.name)
        ph = _placeholders(params, inputs, self.name)
        given = args[len(params):]
        shape = np.broadcast_shapes(*(np.shape(a) for (_, n), a in zip(params, inputs)
                                      if isinstance(a, np.ndarray) and n not in raw),
                                    *(g._a.shape for g in given))
        cast = lambda kind, n, a: (np.ascontiguousarray(_cast(kind, a, t, ph)) if n in raw else
                                   np.ascontiguousarray(np.broadcast_to(_cast(kind, a, t, ph), shape)))
        ins = [cast(kind, n, a) for (kind, n), a in zip(params, inputs)]
        outs = [np.ascontiguousarray(np.broadcast_to(g._a, shape), _ctype(kind, t)[1]) if given
                else np.zeros(shape, _ctype(kind, t)[1]) for (kind, _), g in
                zip(outs_p, given or [None] * len(outs_p))]
        lib = _load(elementwise_source(self.in_params, self.out_params, self.body, t, ph))
        lib.run(ctypes.c_long(int(np.prod(shape))), _pointers(ins + outs))
        strict_xp._count("elementwise")
        if given:
            for g, o in zip(given, outs):
                g._a[...] = o
            results = list(given)
        else:
            results = [strict_xp.ndarray(o) for o in outs]
        return results[0] if len(results) == 1 else tuple(results)


class CReductionKernel:
    """``cupy.ReductionKernel``'s interface (``axis``: an int, a tuple or None), compiled for the CPU."""

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity,
                 name="reduce_kernel"):
        self.spec = (in_params, out_params, map_expr, reduce_expr, post_map_expr, identity)
        self.name = name

    def __call__(self, *args, axis=None, keepdims=False):
        params = _params(self.spec[0])
        inputs = [a._a if isinstance(a, strict_xp.ndarray) else a for a in args]
        t = _t_dtype(params, inputs, self.name)
        ph = _placeholders(params, inputs, self.name)
        shape = np.broadcast_shapes(*(np.shape(a) for a in inputs if isinstance(a, np.ndarray)))
        ndim = len(shape)
        axis_ = (tuple(range(ndim)) if axis is None else
                 tuple(sorted(a % ndim for a in (axis if isinstance(axis, tuple) else (axis,)))))
        kept = [d for d in range(ndim) if d not in axis_]
        out_shape = tuple(shape[d] for d in kept)

        def arrange(kind, a):
            full = np.broadcast_to(_cast(kind, a, t, ph), shape)
            return np.ascontiguousarray(np.transpose(full, kept + list(axis_)))
        ins = [arrange(kind, a) for (kind, _), a in zip(params, inputs)]
        m = int(np.prod(out_shape))
        r = int(np.prod([shape[d] for d in axis_]))
        out = np.zeros(m, _ctype(_params(self.spec[1])[0][0], t)[1])
        lib = _load(reduction_source(*self.spec, t, ph))
        lib.run(ctypes.c_long(m), ctypes.c_long(r), _pointers(ins + [out]))
        strict_xp._count("reduction", size=int(np.prod(shape)) if axis is None else 0)
        result = out.reshape(out_shape)
        if keepdims:
            result = np.expand_dims(result, axis_)
        return strict_xp.ndarray(result)


def cpu_cupy(monkeypatch):
    """The strict CuPy double whose kernels are the compiled C bodies."""
    cupy = strict_xp.install(monkeypatch)
    monkeypatch.setattr(cupy, "ElementwiseKernel", CElementwiseKernel)
    monkeypatch.setattr(cupy, "ReductionKernel", CReductionKernel)
    return cupy
