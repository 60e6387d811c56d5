"""Finite differences, for any forward/backward pair or the whole loss.

Use float64. The derivative is estimated with the fourth-order central
stencil ``(−f(x+2h) + 8f(x+h) − 8f(x−h) + f(x−2h)) / 12h``: its truncation
error is O(h⁴) instead of the O(h²) of ``(f(x+h) − f(x−h))/2h``, so a larger
step (h = 1e-5) can be used and the rounding error, O(ε|f|/h), shrinks tenfold.
That matters for arrays whose gradient is small next to the loss (a conv
kernel of five weights, say); the step stays small enough not to jump over
the kinks of ReLU and |·|. ``docs/math.md`` Appendix A has the error analysis.

The error reported for one input is normwise,
``max|analytic − numeric| / max(max|analytic|, max|numeric|, tiny)``,
so entries that are zero or tiny do not blow it up while a wrong gradient
anywhere in the array still shows at full size.

``python -m paeff_np.gradcheck`` checks every op of the library and the whole
loss of every Config variant in one command (``cases.py`` holds the list,
``report.py`` prints the table).
"""
import math

import numpy as np

from ..backend import get_array_module, to_host

STENCIL = ((2, -1.0), (1, 8.0), (-1, -8.0), (-2, 1.0))   # (offset in h, weight / 12h)
TOLERANCE = 1e-7    # worst relative error accepted by every float64 check


def numerical_gradient(fun, x, h=1e-5):
    """``∂fun/∂x`` by the fourth-order central stencil; ``fun()`` reads ``x``,
    which is perturbed in place one entry at a time and restored exactly.

    Derivation: docs/math.md Appendix A.
    """
    grad = np.zeros(x.shape, dtype=np.float64)
    for idx in np.ndindex(*x.shape):   # indexing, not a flat view: works for strided x too
        old = x[idx].item()
        total = 0.0
        for offset, weight in STENCIL:
            x[idx] = old + offset * h
            total += weight * float(fun())
        x[idx] = old
        grad[idx] = total / (12.0 * h)
    return grad


def relative_error(analytic, numeric, tiny=1e-30):
    """``max|a − n| / max(max|a|, max|n|, tiny)``; ``inf`` when either holds a NaN
    or an infinity, so that no comparison with a tolerance can pass it.

    Derivation: docs/math.md Appendix A.
    """
    a = np.asarray(to_host(analytic), dtype=np.float64)
    n = np.asarray(to_host(numeric), dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"gradient shape {a.shape} != expected {n.shape}")
    if not (np.isfinite(a).all() and np.isfinite(n).all()):
        return math.inf
    scale = max(np.abs(a).max(initial=0.0), np.abs(n).max(initial=0.0), tiny)
    return float(np.abs(a - n).max(initial=0.0) / scale)


def _check_array(key, x):
    """``x`` must be an array (NumPy or CuPy) of at least one axis."""
    if not hasattr(x, "dtype"):
        raise TypeError(f"gradcheck: input {key!r} is a {type(x).__name__}, not an array "
                        f"(give np.asarray(..., dtype=np.float64))")
    if x.ndim == 0:
        raise TypeError(f"gradcheck: input {key!r} has no axis (a scalar); give an array of at "
                        f"least one axis, e.g. np.array([value])")


def _check_perturbable(key, x, float64_only):
    """``x`` must be an array of floats that the stencil can change in place."""
    _check_array(key, x)
    if x.dtype.kind != "f":
        raise TypeError(f"gradcheck: input {key!r} has dtype {x.dtype}; finite differences need floats")
    if float64_only and x.dtype != np.float64:
        raise TypeError(f"gradcheck needs float64 inputs; input {key!r} is {x.dtype} "
                        f"(float64_only=False lets it through, to show how it fails)")
    if not getattr(x.flags, "writeable", True):      # (CuPy's arrays are always writeable)
        raise ValueError(f"gradcheck: input {key!r} is read-only; the check perturbs it in place "
                         f"(pass a copy)")


def gradcheck(fun, inputs, analytic, h=1e-5, float64_only=True, tol=None):
    """Compare analytic gradients with finite differences.

    ``fun()``: a scalar computed from the float64 arrays in the dict ``inputs``;
    ``analytic``: a dict of gradients for some or all of those keys.
    Returns ``{key: worst relative error}``; with ``tol`` (e.g. ``TOLERANCE``,
    1e-7) it also raises ``AssertionError`` naming every input whose error is
    above ``tol`` (a NaN or an infinity counts as ``inf``). A gradient that is
    exactly zero in exact arithmetic (e.g. a bias feeding a train-mode
    BatchNorm) has no meaningful relative error: check its size instead.
    ``float64_only=False`` lets float32 through, only to show how its finite
    differences fail.

    Derivation: docs/math.md Appendix A.
    """
    if not (isinstance(h, (int, float)) and h > 0 and math.isfinite(h)):
        raise ValueError(f"gradcheck: the step h must be a positive number, got {h!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"gradcheck: tol must be a positive number, got {tol!r}")
    if not analytic:
        raise ValueError("gradcheck: no gradient to check (from check_op or check_layer: the "
                         "backward returned None for every input, or no_grads skips them all)")
    report = {}
    for key, grad in analytic.items():
        if key not in inputs:
            raise ValueError(f"gradcheck: a gradient for {key!r}, which is not one of the inputs "
                             f"{list(inputs)}")
        x = inputs[key]
        _check_perturbable(key, x, float64_only)
        report[key] = relative_error(grad, numerical_gradient(fun, x, h))
    failed = {k: e for k, e in report.items() if tol is not None and not e <= tol}
    if failed:
        raise AssertionError(f"gradient check failed (tolerance {tol:g}): "
                             + ", ".join(f"input {k!r}: relative error {e:.2e}" for k, e in failed.items()))
    return report


def check_op(forward, backward, inputs, seed=0, h=1e-5, no_grads=(), float64_only=True, tol=None):
    """Gradient check of one forward/backward pair.

    ``forward(*inputs)`` returns an array or a tuple of arrays;
    ``backward(douts)`` returns one gradient per input (None where an input is
    not differentiable), ``douts`` matching the forward's outputs. The scalar
    checked is ``L = Σ_k ⟨R_k, out_k⟩`` with fixed random ``R_k``, whose
    gradient with respect to ``out_k`` is ``R_k``. ``no_grads``: indices of
    inputs not to check (a gradient that is exactly zero in exact arithmetic,
    say, has no meaningful relative error: test its size instead);
    ``float64_only``, ``tol``: as in ``gradcheck``.
    Returns ``{input index: worst relative error}``.

    Derivation: docs/math.md Appendix A.
    """
    if hasattr(inputs, "dtype"):
        raise TypeError("gradcheck: inputs is one array; give a list of arrays, e.g. [x]")
    inputs = list(inputs)
    for i, x in enumerate(inputs):      # before the forward meets them
        _check_array(i, x)
    xp = get_array_module(*inputs)
    outs = forward(*inputs)
    single = not isinstance(outs, tuple)
    outs = (outs,) if single else outs
    rng = np.random.default_rng([seed, 0x5EED])   # not the stream a test drew its inputs from
    weights = [xp.asarray(rng.standard_normal(o.shape), dtype=o.dtype) for o in outs]

    def scalar():
        o = forward(*inputs)
        o = (o,) if single else o
        return sum(float((w * oi).sum()) for w, oi in zip(weights, o))

    grads = backward(weights[0] if single else tuple(weights))
    grads = (grads,) if not isinstance(grads, tuple) else grads
    if len(grads) != len(inputs):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(inputs)} inputs")
    named = {i: x for i, x in enumerate(inputs)}
    checked = {i: g for i, g in enumerate(grads) if g is not None and i not in no_grads}
    return gradcheck(scalar, named, checked, h, float64_only, tol)


def check_layer(forward, backward, inputs, seed=0, h=1e-5, no_grads=(), float64_only=True,
                tol=None, **settings):
    """``check_op`` for a pair that follows the op protocol of ``layers.py``:
    ``forward(*inputs, **settings)`` returns ``(out, cache)``, or
    ``(out, new_state, cache)`` for an op with state (the state is passed in
    ``settings`` and is not checked); ``out`` is an array or a NamedTuple
    whose first field is the differentiable output. ``backward(dout, cache)``
    returns the gradient of each input in ``inputs``: one array or a tuple.

    Example: ``check_layer(gelu_forward, gelu_backward, [x])``;
    ``check_layer(batchnorm_forward, batchnorm_backward, [x, gamma, beta],
    state=BatchNormState(mean, var), train=True)``.

    Derivation: docs/math.md Appendix A.
    """
    cache = None

    def forward_out(*xs):
        nonlocal cache
        result = forward(*xs, **settings)
        out, cache = result[0], result[-1]
        return out[0] if isinstance(out, tuple) else out

    def backward_grads(dout):   # check_op calls it right after the first, unperturbed forward
        grads = backward(dout, cache)
        return grads if isinstance(grads, tuple) else (grads,)
    return check_op(forward_out, backward_grads, inputs, seed, h, no_grads, float64_only, tol)
