"""The Poincaré ball of curvature −c: exponential map at the origin, projection
into the ball, and the Riemannian gradient scaling of the authors' code.

Every clamp is named; ``docs/math.md`` derives the backward passes.
Rows are points: ``u``, ``x``, ``p`` are B × D. Each op follows the protocol
of ``layers.py``.
"""
import math
from typing import Any, NamedTuple

import numpy as np

from .backend import get_array_module, kernel
from .layers import row_dot, row_norm

MIN_NORM = 1e-5          # ‖u‖ is clamped below at this before dividing by it
TANH_ARG_MAX = 15.0      # tanh's argument is clamped to [−15, 15]
BALL_EPS = 1e-3          # the projection keeps points within radius (1 − 1e-3)/√c


# --- exponential map at the origin ---

class Expmap0Cache(NamedTuple):
    u: Any              # B × D, the input
    n: Any              # B × 1, max(‖u‖, MIN_NORM)
    a: Any              # B × 1, √c·n
    t: Any              # B × 1, tanh(clip(a, −15, 15))
    s: Any              # B × 1, t/a
    norm_active: Any    # B × 1, ‖u‖ > MIN_NORM: the norm clamp is off
    tanh_active: Any    # B × 1, √c·n < 15: the tanh clamp is off
    sqrt_c: float


def expmap0_forward(u, c):
    """``expmap0(u) = tanh(√c‖u‖) · u / (√c‖u‖)`` row by row; ``u``: B × D, ``c`` > 0.

    Guards: ``n = max(‖u‖, MIN_NORM)``; ``tanh(clip(√c·n, −15, 15))``.
    Written ``y = s(n) u`` with ``s(n) = tanh(√c n)/(√c n)``. Returns ``y``: B × D.

    Derivation: docs/math.md §8.0–§8.1.
    """
    xp = get_array_module(u)
    sqrt_c = c ** 0.5
    norm = row_norm(u)
    n = xp.maximum(norm, MIN_NORM)
    a = sqrt_c * n
    t = xp.tanh(xp.clip(a, -TANH_ARG_MAX, TANH_ARG_MAX))
    s = t / a
    cache = Expmap0Cache(u, n, a, t, s, norm > MIN_NORM, a < TANH_ARG_MAX, sqrt_c)
    return s * u, cache


def expmap0_backward(dy, cache):
    """``du = s·dy + s'(n)·⟨u, dy⟩·u/n`` where ‖u‖ > MIN_NORM (else ``s·dy``),
    ``s'(n) = √c(1 − t²)[√c n < 15]/(√c n) − t/(√c n²)``; ``dy``: B × D.

    Derivation: docs/math.md §8.1.
    """
    n, a, t = cache.n, cache.a, cache.t
    ds_dn = cache.sqrt_c * (1.0 - t * t) * cache.tanh_active / a - t / (a * n)
    radial = row_dot(cache.u, dy) * ds_dn / n * cache.norm_active
    return cache.s * dy + radial * cache.u


# --- projection into the ball ---

def ball_radius(c):
    """``r = (1 − BALL_EPS)/√c``, the largest norm the projection lets through.

    Derivation: docs/math.md §8.2.
    """
    return (1.0 - BALL_EPS) / c ** 0.5


class ProjectCache(NamedTuple):
    x: Any              # B × D, the input
    n: Any              # B × 1, max(‖x‖, MIN_NORM)
    outside: Any        # B × 1, n > r: the row is pulled back to the sphere of radius r;
                        # None when no row is (P is then the identity)
    r: float


def project_forward(x, c):
    """``P(x) = x`` if ‖x‖ ≤ r, else ``x · r/‖x‖`` (‖x‖ clamped below at MIN_NORM),
    row by row; ``x``: B × D, ``r = ball_radius(c)``. Returns ``y``: B × D.

    Derivation: docs/math.md §8.2.
    """
    xp = get_array_module(x)
    r = ball_radius(c)
    n = xp.maximum(row_norm(x), MIN_NORM)
    outside = n > r
    if xp is np and not outside.any():          # every row inside, P(x) = x (always so for unit
        return x, ProjectCache(x, n, None, r)   # rows through expmap0, §16); CuPy: no host read, the
                                                # factor below is 1 on every inside row
    y = x * xp.where(outside, r / n, 1.0)      # the factor per row: x · 1 is x itself
    return y, ProjectCache(x, n, outside, r)


def project_backward(dy, cache):
    """Inside: ``dx = dy``. Outside: ``dx = (r/‖x‖)(dy − x̂⟨x̂, dy⟩)``, x̂ = x/‖x‖;
    ``dy``: B × D.

    Derivation: docs/math.md §8.2.
    """
    outside, n = cache.outside, cache.n
    if outside is None:                 # every row inside: dx = dy
        return dy
    xp = get_array_module(dy)
    xhat = cache.x / n
    # inside rows: ⟨x̂, dy⟩ := 0 and r/‖x‖ := 1, so dx = dy exactly (no where on B × D)
    radial = xp.where(outside, row_dot(xhat, dy), 0.0)
    dx = xhat
    xp.multiply(xhat, radial, out=dx)
    xp.subtract(dy, dx, out=dx)
    dx *= xp.where(outside, cache.r / n, 1.0)
    return dx


# --- Riemannian gradient scaling ---

def riemannian_scale_forward(p, c):
    """Identity on ``p``: B × D. The cache is the factor ``(1 − c‖p‖²)²/4``
    (B × 1) the backward multiplies by.

    Derivation: docs/math.md §8.3.
    """
    sq = row_dot(p, p)
    return p, (1.0 - c * sq) ** 2 / 4.0


def riemannian_scale_backward(dp, scale):
    """``dp · (1 − c‖p‖²)²/4``: the Euclidean gradient turned Riemannian
    (the inverse of the Poincaré metric's conformal factor λ² = 4/(1 − c‖p‖²)²).
    Not the derivative of the forward pass.

    Derivation: docs/math.md §8.3.
    """
    return dp * scale


# --- unit rows: what the ball does to an L2-normalised embedding ---

def unit_row_ball_norm(c):
    """``ρ = tanh(√c)/√c``: the norm of ``P(expmap0(e))`` for every unit row
    ``e`` (the projection never acts: ρ < 1/√c). 0.98366 at c = 0.05.

    Derivation: docs/math.md §16.
    """
    return math.tanh(math.sqrt(c)) / math.sqrt(c)


def unit_row_riemannian_factor(c):
    """``κ = (1 − cρ²)²/4 = sech⁴(√c)/4``: the Riemannian factor of every unit
    row, one constant for the whole batch. 0.22640 at c = 0.05.

    Derivation: docs/math.md §16.
    """
    return (1.0 - c * unit_row_ball_norm(c) ** 2) ** 2 / 4.0


# --- the map into the ball: P(expmap0(e)) ---

# CuPy kernels of to_ball_forward / to_ball_backward (built by backend.kernel; their C
# bodies are compiled and checked against the NumPy functions by tests/test_kernels.py).
# The forward's per-row numbers, from ‖u‖ alone: ‖q‖ = s‖u‖ for q = s·u, so the
# projection needs no second row norm.
TO_BALL_ROWS_KERNEL = dict(
    kind="elementwise",
    in_params="T norm, T sqrt_c, T c, T r, T min_norm, T tanh_max, bool riemannian",
    out_params="T n, T a, T t, T s, bool norm_active, bool tanh_active, T pn, bool outside, T factor, T scale",
    body="""
    n = norm < min_norm ? min_norm : norm;
    a = sqrt_c * n;
    t = tanh(a < -tanh_max ? -tanh_max : (a > tanh_max ? tanh_max : a));
    s = t / a;
    norm_active = norm > min_norm;
    tanh_active = a < tanh_max;
    pn = s * norm < min_norm ? min_norm : s * norm;
    outside = pn > r;
    factor = outside * (r / pn) + (1 - outside);
    T sq = (factor * s * norm) * (factor * s * norm);
    scale = riemannian * ((1 - c * sq) * (1 - c * sq) / 4) + (1 - riemannian);
    """, name="paeff_to_ball_rows")
"""expmap0's n, a, t, s and clamp flags, the projection's clamped ‖q‖, its flag and
factor r/‖q‖ (1 inside), the Riemannian factor (1 − c‖p‖²)²/4 (1 without it). The clamps
are written as NumPy's maximum/clip compute them: a NaN norm stays NaN (C's fmax would
replace it)."""
TO_BALL_APPLY_KERNEL = dict(kind="elementwise", in_params="T u, T s, T factor", out_params="T q, T p",
                            body="q = s * u; p = q * factor;", name="paeff_to_ball_apply")
"""``q = s·u``, ``p = q·factor``: the B × D work of ``to_ball_forward``."""
TO_BALL_BACKWARD_ROWS_KERNEL = dict(
    kind="elementwise",
    in_params="T ud, T n, T a, T t, T s, bool norm_active, bool tanh_active, T pn, bool outside, T r, "
              "T scale, T sqrt_c",
    out_params="T alpha, T beta",
    body="""
    T factor = outside * (r / pn) + (1 - outside);
    T radial_p = outside * ((s / pn) * scale * ud);
    T ux = factor * (scale * ud - (s / pn) * radial_p * (n * n));
    T ds_dn = sqrt_c * (1 - t * t) * tanh_active / a - t / (a * n);
    alpha = s * factor * scale;
    beta = ux * ds_dn / n * norm_active - s * factor * (s / pn) * radial_p;
    """, name="paeff_to_ball_backward_rows")
"""``du = α·dp + β·u``, from ``ud = ⟨u, dp⟩``: the Riemannian scaling, the projection's
``dx = factor·(dq − x̂⟨x̂, dq⟩)`` (x̂ = s·u/‖q‖) and expmap0's ``s·dx + s'(n)⟨u, dx⟩u/n``
composed per row; ``⟨u, dx⟩`` follows from ``ud`` and ‖u‖² = n² (where the norm clamp is off)."""
AXPBY_KERNEL = dict(kind="elementwise", in_params="T x, T y, T alpha, T beta", out_params="T z",
                    body="z = alpha * x + beta * y;", name="paeff_axpby")
"""``z = α·x + β·y`` with α, β per row: the B × D work of ``to_ball_backward``."""


def _to_ball_forward_cupy(e, c, riemannian_grad):
    """``to_ball_forward`` in three CuPy calls; the same caches, filled by the kernels."""
    sqrt_c = c ** 0.5
    r = ball_radius(c)
    norm = row_norm(e)
    n, a, t, s, norm_active, tanh_active, pn, outside, factor, scale = kernel(TO_BALL_ROWS_KERNEL)(
        norm, sqrt_c, c, r, MIN_NORM, TANH_ARG_MAX, bool(riemannian_grad))
    q, p = kernel(TO_BALL_APPLY_KERNEL)(e, s, factor)
    cache = ToBallCache(Expmap0Cache(e, n, a, t, s, norm_active, tanh_active, sqrt_c),
                        ProjectCache(q, pn, outside, r), scale if riemannian_grad else None)
    return p, cache


def _to_ball_backward_cupy(dp, cache):
    """``to_ball_backward`` in three CuPy calls: one row dot, the per-row α, β, one pass."""
    ex, proj = cache.expmap0, cache.project
    scale = 1.0 if cache.scale is None else cache.scale
    alpha, beta = kernel(TO_BALL_BACKWARD_ROWS_KERNEL)(
        row_dot(ex.u, dp), ex.n, ex.a, ex.t, ex.s, ex.norm_active, ex.tanh_active, proj.n, proj.outside,
        proj.r, scale, ex.sqrt_c)
    return kernel(AXPBY_KERNEL)(dp, ex.u, alpha, beta)

class ToBallCache(NamedTuple):
    expmap0: Expmap0Cache
    project: ProjectCache
    scale: Any          # B × 1, or None without the Riemannian scaling


def to_ball_forward(e, c, riemannian_grad):
    """``p = P(expmap0(e))``, optionally with the Riemannian gradient scaling;
    ``e``, ``p``: B × D.

    Derivation: docs/math.md §8 (and §16 for what it amounts to in PAEFF).
    """
    if get_array_module(e) is not np:       # CuPy: the kernels above
        return _to_ball_forward_cupy(e, c, riemannian_grad)
    q, cache_exp = expmap0_forward(e, c)
    p, cache_proj = project_forward(q, c)
    scale = None
    if riemannian_grad:
        p, scale = riemannian_scale_forward(p, c)
    return p, ToBallCache(cache_exp, cache_proj, scale)


def to_ball_backward(dp, cache):
    """The mirror of ``to_ball_forward``; ``dp``: B × D.

    Derivation: docs/math.md §8.3.
    """
    if get_array_module(dp) is not np:      # CuPy: the kernels above
        return _to_ball_backward_cupy(dp, cache)
    if cache.scale is not None:
        dp = riemannian_scale_backward(dp, cache.scale)
    dq = project_backward(dp, cache.project)
    return expmap0_backward(dq, cache.expmap0)
