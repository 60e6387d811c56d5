"""The building blocks, each a forward/backward pair, and the protocol every
op of the library follows (layers, hyperbolic, fusion, losses, model)::

    out, cache            = x_forward(*inputs, *settings)
    out, new_state, cache = x_forward(*inputs, state, *settings)   # an op with state
    grads                 = x_backward(dout, cache)

- **Cache last.** The cache holds exactly what the backward needs: one array,
  or a ``NamedTuple`` named after the op (``LinearCache``), read by field name.
- **One differentiable output.** ``out`` is an array (a 0-d array for a loss).
  An op that also hands out values that take no gradient (the fusion's
  evaluation embeddings, the model's loss terms, reported only) returns a
  ``NamedTuple`` whose first field is the differentiable output; ``dout`` is
  the gradient of that field.
- **State explicit.** An op with state (BatchNorm's running statistics) takes
  it as an argument and returns the new state between ``out`` and ``cache``;
  nothing is updated in place.
- **Gradients in input order.** ``x_backward`` returns the gradient of every
  differentiable input, in the order of the forward's arguments: one array,
  or a tuple. A loss's ``dout`` is the scalar weight of the loss.

Rows are samples: ``x`` is B × features; formulas use row vectors, so a
linear map reads ``x Wᵀ``. Every function works on NumPy and CuPy arrays
alike. Docstrings give each argument's shape; type annotations appear only
where Python's syntax needs them (NamedTuple and dataclass fields, where
``Any`` is a NumPy or CuPy array). Derivations: ``docs/math.md``.
"""
from typing import Any, NamedTuple

import math

import numpy as np

from .backend import COUNTER_UNIFORM, get_array_module, kernel, matmul, ndtr

NORMALIZE_EPS = 1e-12   # F.normalize: e = h / max(‖h‖, 1e-12)
BATCHNORM_EPS = 1e-5
BATCHNORM_MOMENTUM = 0.1


# CuPy kernels (ElementwiseKernel / ReductionKernel, built by backend.kernel): each
# fuses the NumPy code of the function it sits beside, which stays the reference.
# Their C bodies are compiled and checked on the CPU by tests/test_kernels.py.
DOT_KERNEL = dict(kind="reduction", in_params="T x, T y", out_params="T z", map_expr="x * y",
                  reduce_expr="a + b", post_map_expr="z = a", identity="0", name="paeff_dot")
"""``Σ x·y`` along the reduced axis: ``row_dot`` (axis 1), BatchNorm's column sums (axis 0)."""
NORM_KERNEL = dict(kind="reduction", in_params="T x", out_params="T z", map_expr="x * x",
                   reduce_expr="a + b", post_map_expr="z = sqrt(a)", identity="0", name="paeff_norm")
"""``√Σ x²`` along the reduced axis: ``row_norm``."""


def row_dot(x, y):
    """``⟨x_i, y_i⟩`` for each row i, as a column: B × D, B × D → B × 1.

    ``einsum("ij,ij->i")`` is one pass with no B × D temporary, faster than
    ``(x * y).sum(axis=1)`` (docs/perf.md). CuPy: one reduction
    (``DOT_KERNEL``), not einsum's batch of 1 × 1 products.

    See docs/math.md §4.
    """
    xp = get_array_module(x)
    if xp is not np:
        return kernel(DOT_KERNEL)(x, y, axis=1)[:, None]
    return xp.einsum("ij,ij->i", x, y)[:, None]


def row_norm(x):
    """``‖x_i‖ = √⟨x_i, x_i⟩`` for each row i, as a column: B × D → B × 1
    (CuPy: one reduction, ``NORM_KERNEL``).

    See docs/math.md §4.
    """
    xp = get_array_module(x)
    if xp is not np:
        return kernel(NORM_KERNEL)(x, axis=1)[:, None]
    return xp.sqrt(row_dot(x, x))


# --- linear ---

class LinearCache(NamedTuple):
    x: Any          # B × in
    W: Any          # out × in


def linear_forward(x, W, b):
    """``y = x Wᵀ + b``.

    ``x``: B × in, ``W``: out × in (PyTorch layout), ``b``: (out,).
    Returns ``y``: B × out.

    Derivation: docs/math.md §1.
    """
    y = matmul(x, W.T)
    y += b                  # in place: no second B × out array
    return y, LinearCache(x, W)


def linear_backward(dy, cache, need_dx=True):
    """``dx = dy W``, ``dW = dyᵀ x``, ``db = Σ_rows dy``; ``dy``: B × out.

    ``need_dx=False`` skips ``dx`` (returned as None) for a layer that reads the
    data: for the 4096-wide face input it is a third of the layer's work.

    Derivation: docs/math.md §1.
    """
    dx = matmul(dy, cache.W) if need_dx else None
    return dx, matmul(dy.T, cache.x), dy.sum(axis=0)


# --- BatchNorm1d ---

class BatchNormState(NamedTuple):
    running_mean: Any   # (D,)
    running_var: Any    # (D,), unbiased


class BatchNormCache(NamedTuple):
    xhat: Any           # B × D, the normalised input
    inv_std: Any        # (D,), 1/√(σ² + eps)
    gamma: Any          # (D,)
    train: bool


BATCHNORM_STATS_KERNEL = dict(
    kind="elementwise",
    in_params="T mean, T shift, T var, T running_mean, T running_var, T momentum, T unbias, T eps",
    out_params="T inv_std, T new_mean, T new_var",
    body="""
    inv_std = 1 / sqrt(var + eps);
    new_mean = (1 - momentum) * running_mean + momentum * (mean + shift);
    new_var = (1 - momentum) * running_var + momentum * var * unbias;
    """, name="paeff_batchnorm_stats")
"""``batchnorm_forward``'s (D,) work in train mode: 1/√(σ² + eps) and the new running statistics.
``shift`` (0 here) is a bias added to every row before the BatchNorm, which the normalisation
cancels and only the running mean sees (the branch's fused path, model.py)."""
BATCHNORM_VAR_KERNEL = dict(kind="reduction", in_params="T x, T mean, T inv_n", out_params="T var",
                            map_expr="(x - mean) * (x - mean) * inv_n", reduce_expr="a + b",
                            post_map_expr="var = a", identity="0", name="paeff_batchnorm_var")
"""The biased batch variance ``Σ_rows (x − μ)²/B``, by column."""
BATCHNORM_APPLY_KERNEL = dict(
    kind="elementwise", in_params="T x, T mean, T inv_std, T gamma, T beta", out_params="T xhat, T y",
    body="""
    xhat = (x - mean) * inv_std;
    y = gamma * xhat + beta;
    """, name="paeff_batchnorm_apply")
"""``x̂ = (x − μ)·inv_std``, ``y = γ x̂ + β``: the B × D work of ``batchnorm_forward``."""
BATCHNORM_BACKWARD_KERNEL = dict(
    kind="elementwise", in_params="T dy, T xhat, T gamma, T inv_std, T dgamma, T dbeta, T inv_n",
    out_params="T dx",
    body="dx = gamma * inv_std * (dy - dbeta * inv_n - xhat * (dgamma * inv_n));",
    name="paeff_batchnorm_backward")
"""``dx = γ ⊙ inv_std ⊙ (dy − dβ/B − x̂ ⊙ dγ/B)``: ``batchnorm_backward`` in train mode."""


def _batchnorm_train_forward_cupy(x, gamma, beta, state, eps, momentum):
    """``batchnorm_forward`` in train mode in four CuPy calls (its kernels above)."""
    n = x.shape[0]
    mean = x.mean(axis=0)
    var = kernel(BATCHNORM_VAR_KERNEL)(x, mean, 1.0 / n, axis=0)
    inv_std, new_mean, new_var = kernel(BATCHNORM_STATS_KERNEL)(
        mean, 0.0, var, state.running_mean, state.running_var, momentum, n / (n - 1), eps)
    xhat, y = kernel(BATCHNORM_APPLY_KERNEL)(x, mean, inv_std, gamma, beta)
    return y, BatchNormState(new_mean, new_var), BatchNormCache(xhat, inv_std, gamma, True)


def batchnorm_forward(x, gamma, beta, state, train,
                      eps=BATCHNORM_EPS, momentum=BATCHNORM_MOMENTUM):
    """BatchNorm1d: ``y = γ (x − μ)/√(σ² + eps) + β``.

    ``x``: B × D; ``gamma``, ``beta``: (D,); ``state``: a ``BatchNormState``
    of two (D,) arrays. Train: μ, σ² are the batch mean and *biased* variance;
    the new state is ``(1−m)·running + m·batch`` (unbiased variance, as
    PyTorch). Eval: μ, σ² are the running statistics, and the state is
    returned unchanged. Returns ``(y, new_state, cache)``, ``y``: B × D.

    Derivation: docs/math.md §2.
    """
    running_mean, running_var = state
    if train and get_array_module(x) is not np:
        return _batchnorm_train_forward_cupy(x, gamma, beta, state, eps, momentum)
    if train:
        n = x.shape[0]
        mean = x.mean(axis=0)
        xc = x - mean
        var = get_array_module(x).einsum("ij,ij->j", xc, xc) / n
        new_state = BatchNormState((1 - momentum) * running_mean + momentum * mean,
                                   (1 - momentum) * running_var + momentum * var * (n / (n - 1)))
    else:
        xc = x - running_mean
        var = running_var
        new_state = BatchNormState(running_mean, running_var)
    inv_std = 1.0 / get_array_module(x).sqrt(var + eps)
    xhat = xc * inv_std
    y = gamma * xhat
    y += beta
    return y, new_state, BatchNormCache(xhat, inv_std, gamma, train)


def batchnorm_backward(dy, cache):
    """Returns ``dx, dγ, dβ``; ``dy``: B × D.

    ``dγ = Σ_rows dy ⊙ x̂``, ``dβ = Σ_rows dy``. Train (μ, σ² depend on x):
    ``dx = inv_std · (dx̂ − mean(dx̂) − x̂·mean(dx̂ ⊙ x̂))`` with ``dx̂ = γ ⊙ dy``,
    and since ``mean(dx̂) = γ dβ/B``, ``mean(dx̂ ⊙ x̂) = γ dγ/B``:
    ``dx = γ ⊙ inv_std ⊙ (dy − dβ/B − x̂ ⊙ dγ/B)``. Eval: ``dx = γ ⊙ inv_std ⊙ dy``.

    Derivation: docs/math.md §2.
    """
    xhat, inv_std = cache.xhat, cache.inv_std
    xp = get_array_module(dy)
    n = dy.shape[0]
    if xp is not np and cache.train:   # CuPy: two column reductions and one kernel
        dgamma = kernel(DOT_KERNEL)(dy, xhat, axis=0)
        dbeta = dy.sum(axis=0)
        dx = kernel(BATCHNORM_BACKWARD_KERNEL)(dy, xhat, cache.gamma, inv_std, dgamma, dbeta, 1.0 / n)
        return dx, dgamma, dbeta
    dgamma = xp.einsum("ij,ij->j", dy, xhat)
    dbeta = dy.sum(axis=0)
    if cache.train:                    # in place, in the order of the formula
        dx = xhat * (dgamma / n)
        xp.subtract(dy, dx, out=dx)
        dx -= dbeta / n
        dx *= cache.gamma * inv_std
    else:
        dx = dy * (cache.gamma * inv_std)
    return dx, dgamma, dbeta


# --- ReLU, dropout ---

RELU_KERNEL = dict(kind="elementwise", in_params="T x", out_params="T y, bool mask",
                   body="mask = x > 0; y = x * mask;", name="paeff_relu")
"""``mask = [x > 0]``, ``y = x ⊙ mask``: ``relu_forward``."""


def relu_forward(x):
    """``max(x, 0)``; ``x``: any shape. The cache is the mask ``x > 0``
    (CuPy: one kernel, ``RELU_KERNEL``).

    Derivation: docs/math.md §3.
    """
    if get_array_module(x) is not np:
        return kernel(RELU_KERNEL)(x)
    mask = x > 0
    return x * mask, mask


def relu_backward(dy, mask):
    """``dx = dy ⊙ [x > 0]``.

    Derivation: docs/math.md §3.
    """
    return dy * mask


DROPOUT_KERNEL = dict(kind="elementwise", in_params="T x, uint64 key, uint64 step, uint64 draw, T p, T keep",
                      out_params="T y, T mask",
                      body=COUNTER_UNIFORM + "mask = (u >= p) / keep; y = x * mask;", name="paeff_dropout")
"""``mask = [u ≥ p]/(1 − p)``, ``y = x ⊙ mask`` (``keep`` = 1 − p), u from ``backend.COUNTER_UNIFORM``:
``dropout_forward`` with its draw fused."""


def dropout_forward(x, p, rng=None):
    """Inverted dropout: ``y = x ⊙ mask`` with ``mask = [u ≥ p]/(1−p)``, u ~ U[0,1).

    ``x``: any shape; ``rng``: ``backend.default_rng``'s (a NumPy Generator, or
    on CuPy a ``CounterDropout`` whose uniforms the kernel computes). With ``p == 0``
    it may be None and the layer is the identity (cache None). The cache is
    the mask.

    Derivation: docs/math.md §3.
    """
    if p == 0:
        return x, None
    if rng is None:
        raise ValueError("dropout > 0 in train mode needs an rng")
    if get_array_module(x) is not np:       # CuPy: the draw and the mask in one kernel
        return kernel(DROPOUT_KERNEL)(x, *rng.args(), p, 1.0 - p)
    mask = (rng.random(x.shape, dtype=x.dtype) >= p).astype(x.dtype)
    mask /= 1.0 - p
    return x * mask, mask


def dropout_backward(dy, mask):
    """``dx = dy ⊙ mask``.

    Derivation: docs/math.md §3.
    """
    return dy if mask is None else dy * mask


# --- row L2-normalisation ---

class L2NormalizeCache(NamedTuple):
    e: Any          # B × D, the output
    denom: Any      # B × 1, max(‖x‖, eps)
    active: Any     # B × 1, ‖x‖ > eps: the clamp is off


L2_NORMALIZE_BACKWARD_KERNEL = dict(
    kind="elementwise", in_params="T de, T e, T radial, bool active, T denom", out_params="T dx",
    body="dx = (de - e * (radial * active)) / denom;", name="paeff_l2_normalize_backward")
"""``dx = (de − e·⟨e, de⟩[‖x‖ > eps])/max(‖x‖, eps)``: ``l2_normalize_backward`` after its row dot."""


L2_NORMALIZE_ROWS_KERNEL = dict(
    kind="elementwise", in_params="T norm, T eps", out_params="T denom, bool active",
    body="denom = norm < eps ? eps : norm; active = norm > eps;", name="paeff_l2_normalize_rows")
"""``denom = max(‖x‖, eps)`` (NaN stays NaN, as NumPy's maximum), ``active = [‖x‖ > eps]``:
``l2_normalize_forward``'s per-row numbers."""


def l2_normalize_forward(x, eps=NORMALIZE_EPS):
    """``e = x / max(‖x‖, eps)`` row by row (``F.normalize``); ``x``, ``e``: B × D
    (CuPy: the row norm, one per-row kernel, the division).

    Derivation: docs/math.md §4.
    """
    xp = get_array_module(x)
    norm = row_norm(x)
    if xp is not np:
        denom, active = kernel(L2_NORMALIZE_ROWS_KERNEL)(norm, eps)
        e = x / denom
        return e, L2NormalizeCache(e, denom, active)
    active = norm > eps
    denom = xp.maximum(norm, eps)
    e = x / denom
    return e, L2NormalizeCache(e, denom, active)


def l2_normalize_backward(de, cache):
    """``dx = (de − e·⟨e, de⟩)/‖x‖`` where ‖x‖ > eps; ``de/eps`` where clamped.

    Derivation: docs/math.md §4.
    """
    e = cache.e
    if get_array_module(e) is not np:       # CuPy: the row dot, then one kernel
        return kernel(L2_NORMALIZE_BACKWARD_KERNEL)(de, e, row_dot(e, de), cache.active, cache.denom)
    radial = row_dot(e, de) * cache.active
    dx = e * radial
    get_array_module(de).subtract(de, dx, out=dx)     # dx = (de − e·radial)/denom, in place
    dx /= cache.denom
    return dx


# --- exact GELU ---

INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Φ(x) = ½ + x·Σ_n NORMAL_CDF_SERIES[n]·x²ⁿ: the Taylor series of ½ erf(x/√2), nine terms
NORMAL_CDF_SERIES = tuple((-1) ** n / (math.sqrt(2.0 * math.pi) * 2 ** n * math.factorial(n)
                                        * (2 * n + 1)) for n in range(9))
NORMAL_CDF_SERIES_MAX = 1.0     # |x| up to which the series serves float32 inputs


def normal_cdf(x):
    """Φ(x), the standard normal CDF, elementwise; ``x``: any shape.

    - NumPy, float32 input with every |x| ≤ ``NORMAL_CDF_SERIES_MAX`` (EGFF's
      inputs are unit rows, so always there): the series

          Φ(x) = ½ + (1/√(2π)) Σ_{n=0}^{8} (−1)ⁿ x^{2n+1} / (2ⁿ n! (2n+1))

      by Horner's rule in x², in float64, rounded once to float32. The terms
      alternate and shrink, so the first one left out bounds the error:
      0.399/(2⁹·9!·19) = 1.1e-10, under 2% of float32's half-ulp anywhere
      Φ ≥ Φ(−1) = 0.159. On a grid of 2·10⁶ points of [−1, 1] it returns
      SciPy's float32 ndtr exactly at 99.98% of them and the neighbouring
      float32 at the rest (where Φ lies within 1.1e-10 of a rounding tie;
      0.507 ulp at worst); it is faster than ndtr (docs/perf.md).
    - Otherwise ``backend.ndtr``: SciPy's (Cephes: ``½ + ½ erf(x/√2)`` for
      |x| < 1 and ``½ erfc(|x|/√2)`` beyond, in float64 whatever the input's
      dtype, so the left tail keeps its relative precision) or CuPy's (CUDA's
      ``normcdf``, ≤ 5 ulp).

    Derivation: docs/math.md §5.
    """
    series_serves = (get_array_module(x) is np and x.dtype == np.float32 and x.size > 0
                     and -NORMAL_CDF_SERIES_MAX <= x.min() and x.max() <= NORMAL_CDF_SERIES_MAX)
    if not series_serves:
        return ndtr(x)
    x64 = x.astype(np.float64)
    z = x64 * x64
    total = np.full_like(z, NORMAL_CDF_SERIES[-1])
    for coefficient in NORMAL_CDF_SERIES[-2::-1]:       # Horner: c₀ + z(c₁ + z(c₂ + …))
        total *= z
        total += coefficient
    total *= x64
    total += 0.5
    return total.astype(np.float32)


class GeluCache(NamedTuple):
    x: Any          # the input
    cdf: Any        # Φ(x), same shape


GELU_FORWARD_KERNEL = dict(kind="elementwise", in_params="T x", out_params="T y, T cdf",
                           body="cdf = normcdf(x); y = x * cdf;", name="paeff_gelu_forward")
"""``Φ(x)`` (CUDA's ``normcdf``, the function CuPy's ndtr calls), ``y = x Φ(x)``: ``gelu_forward``."""


def gelu_forward(x):
    """``GELU(x) = x Φ(x)``, ``Φ(x) = ½(1 + erf(x/√2)) = ½ erfc(−x/√2)``;
    ``x``: any shape (CuPy: one kernel, ``GELU_FORWARD_KERNEL``).

    Φ is ``normal_cdf`` (SciPy's or CuPy's ndtr), which takes the erfc
    form in the left tail: ``1 + erf(·)`` cancels for x ≪ 0 and would lose the
    relative precision there. On NumPy, SciPy's ndtr works in float64 for
    float32 input too and rounds once (no float32 rounding of x/√2), and
    float32 inputs within ±1 (EGFF's unit rows) take a nine-term series in
    float64, as accurate and faster; CuPy's float32 ndtr is CUDA's
    ``normcdff``, within 5 ulp.

    Derivation: docs/math.md §5.
    """
    if get_array_module(x) is not np:
        y, cdf = kernel(GELU_FORWARD_KERNEL)(x)
        return y, GeluCache(x, cdf)
    cdf = normal_cdf(x)
    return x * cdf, GeluCache(x, cdf)


GELU_BACKWARD_KERNEL = dict(
    kind="elementwise", in_params="T dy, T x, T cdf, T inv_sqrt_2pi", out_params="T dx",
    body="T phi = exp(-0.5 * x * x) * inv_sqrt_2pi; dx = (phi * x + cdf) * dy;", name="paeff_gelu_backward")
"""``dx = (Φ(x) + x φ(x)) ⊙ dy``, ``φ(x) = e^{−x²/2}/√(2π)``: ``gelu_backward``."""


def gelu_backward(dy, cache):
    """``GELU'(x) = Φ(x) + x φ(x)`` with ``φ(x) = e^{−x²/2}/√(2π)``.

    Derivation: docs/math.md §5.
    """
    x = cache.x
    xp = get_array_module(x)
    if xp is not np:                    # CuPy: one kernel
        return kernel(GELU_BACKWARD_KERNEL)(dy, x, cache.cdf, INV_SQRT_2PI)
    dx = -0.5 * x * x
    xp.exp(dx, out=dx)
    dx *= INV_SQRT_2PI                  # φ(x)
    dx *= x
    dx += cache.cdf                     # Φ(x) + x φ(x)
    dx *= dy
    return dx


# --- sigmoid, tanh ---

SIGMOID_KERNEL = dict(kind="elementwise", in_params="T x", out_params="T s",
                      body="T t = exp(-fabs(x)); s = (x >= 0 ? 1 : t) / (1 + t);", name="paeff_sigmoid")
"""``t = e^{−|x|}``, ``σ = (x ≥ 0 ? 1 : t)/(1 + t)``: ``sigmoid_forward`` (a NaN input gives NaN)."""
SIGMOID_BACKWARD_KERNEL = dict(kind="elementwise", in_params="T dy, T s", out_params="T dx",
                               body="dx = dy * s * (1 - s);", name="paeff_sigmoid_backward")
"""``dx = dy ⊙ σ ⊙ (1 − σ)``: ``sigmoid_backward``."""


def sigmoid_forward(x):
    """``σ(x) = 1/(1 + e^{−x})``; ``x``: any shape. The cache is the output σ
    (CuPy: one kernel, ``SIGMOID_KERNEL``).

    Evaluated with ``t = e^{−|x|} ≤ 1`` as ``1/(1 + t)`` for x ≥ 0 and
    ``t/(1 + t)`` for x < 0: no overflow, and full relative precision in both
    tails. The numerator, 1 for x ≥ 0 and t for x < 0, is ``max(t, [x ≥ 0])``
    (t ≤ 1): the values of ``where(x ≥ 0, 1, t)``, without its branch on a
    random sign, which is slower (docs/perf.md).

    Derivation: docs/math.md §6.
    """
    xp = get_array_module(x)
    if xp is not np:
        s = kernel(SIGMOID_KERNEL)(x)
        return s, s
    t = xp.exp(-xp.abs(x))
    s = xp.maximum(t, x >= 0)
    t += 1.0
    s /= t
    return s, s


def sigmoid_backward(dy, s):
    """``σ' = σ(1 − σ)`` (CuPy: one kernel, ``SIGMOID_BACKWARD_KERNEL``).

    Derivation: docs/math.md §6.
    """
    if get_array_module(s) is not np:
        return kernel(SIGMOID_BACKWARD_KERNEL)(dy, s)
    return dy * s * (1.0 - s)


def tanh_forward(x):
    """``tanh(x)``; ``x``: any shape. The cache is the output.

    Derivation: docs/math.md §6.
    """
    t = get_array_module(x).tanh(x)
    return t, t


TANH_BACKWARD_KERNEL = dict(kind="elementwise", in_params="T dy, T t", out_params="T dx",
                            body="dx = dy * (1 - t * t);", name="paeff_tanh_backward")
"""``dx = dy ⊙ (1 − t²)``: ``tanh_backward``."""


def tanh_backward(dy, t):
    """``tanh' = 1 − tanh²`` (CuPy: one kernel, ``TANH_BACKWARD_KERNEL``).

    Derivation: docs/math.md §6.
    """
    if get_array_module(t) is not np:
        return kernel(TANH_BACKWARD_KERNEL)(dy, t)
    return dy * (1.0 - t * t)


# --- 1-D convolution along the feature axis ---

class Conv1dCache(NamedTuple):
    xpad: Any       # B × C × (D + k − 1), the zero-padded input
    w: Any          # 1 × C × k
    D: int


def conv1d_forward(x, w, b):
    """One-output-channel cross-correlation along the feature axis, same padding.

    ``x``: B × C × D, ``w``: 1 × C × k (k odd), ``b``: (1,).
    ``y[n, d] = b + Σ_c Σ_j w[0, c, j] · x[n, c, d + j − (k−1)/2]`` with zeros
    outside 0..D−1. Returns ``y``: B × D.

    Derivation: docs/math.md §7.
    """
    xp = get_array_module(x)
    C, k = w.shape[1], w.shape[2]
    pad = (k - 1) // 2
    D = x.shape[2]
    xpad = xp.pad(x, ((0, 0), (0, 0), (pad, pad))) if pad else x
    y = xp.full((x.shape[0], D), b[0], dtype=x.dtype)
    for c in range(C):
        for j in range(k):
            y += w[0, c, j] * xpad[:, c, j:j + D]
    return y, Conv1dCache(xpad, w, D)


def conv1d_backward(dy, cache):
    """``dw[0,c,j] = Σ_{n,d} dy[n,d] x_pad[n,c,d+j]``, ``db = Σ dy``,
    ``dx[n,c,i] = Σ_j w[0,c,j] dy[n, i − j + (k−1)/2]`` (a full correlation
    with the flipped kernel, cropped back to D); ``dy``: B × D.
    Returns ``dx, dw, db``.

    Derivation: docs/math.md §7.
    """
    xpad, w, D = cache.xpad, cache.w, cache.D
    xp = get_array_module(dy)
    C, k = w.shape[1], w.shape[2]
    pad = (k - 1) // 2
    dw = xp.empty_like(w)
    dxpad = xp.zeros_like(xpad)
    for c in range(C):
        for j in range(k):
            dw[0, c, j] = (dy * xpad[:, c, j:j + D]).sum()
            dxpad[:, c, j:j + D] += w[0, c, j] * dy
    dx = dxpad[:, :, pad:pad + D] if pad else dxpad
    return dx, dw, dy.sum().reshape(1)
