"""Alignment by geodesic distance in the Poincaré ball (HypViT, Ermolov et al. 2022).

Each op is a forward/backward pair following the protocol of ``layers.py``
(``x_forward(...) -> (out, cache)``, ``x_backward(dout, cache) -> gradients``;
a loss's backward takes its weight ``dloss`` first), for NumPy and CuPy alike.
In the model (``model.forward``) the chain reads, row by row,

    h (before the L2-normalisation) → feature_clip → expmap0 → project
      → distance_matrix → logits S = −D/τ → symmetric cross-entropy

with ``expmap0``, the projection and the Riemannian scaling from ``hyperbolic.py``.
The B × B distance matrix is computed in closed form from the Gram matrix and
the squared norms: no B × B × D array is ever built. ``docs/math.md`` §17
derives every formula and every backward pass.
"""
from typing import Any, NamedTuple

from .backend import get_array_module
from .layers import row_dot, row_norm
from .losses import (SymmetricCrossEntropyFromLogitsCache, symmetric_cross_entropy_from_logits_backward,
                     symmetric_cross_entropy_from_logits_forward)

CLIP_EPS = 1e-5        # h̃ = h · min(1, r/(‖h‖ + 1e-5)): no division by zero at h = 0
MOBIUS_EPS = 1e-5      # hyptorch's mobius_add divides by (denominator + 1e-5)
ARTANH_EPS = 1e-5      # artanh's argument is clamped to [−1 + 1e-5, 1 − 1e-5]
MIN_NUM_SQ = 1e-20     # ‖num‖² is clamped below at 1e-20 (‖num‖ ≥ 1e-10) before the √


# --- feature clipping ----------------------------------------------------------

class FeatureClipCache(NamedTuple):
    h: Any             # B × D, the input
    norm: Any          # B × 1, ‖h‖
    factor: Any        # B × 1, min(1, r/(‖h‖ + CLIP_EPS))
    active: Any        # B × 1 bool, r/(‖h‖ + CLIP_EPS) < 1: the row is shrunk


def feature_clip_forward(h, radius):
    """Feature clipping (Guo et al. 2022; hyptorch's ``ToPoincare(clip_r)``), row by row:

        h̃ = h · min(1, r / (‖h‖ + CLIP_EPS))

    ``h``: B × D, ``radius`` r > 0; returns h̃: B × D. A row with ‖h‖ + 1e-5 ≤ r
    passes unchanged; a longer one is shrunk to norm r·‖h‖/(‖h‖ + 1e-5) < r.

    Derivation: docs/math.md §17.2.
    """
    xp = get_array_module(h)
    norm = row_norm(h)
    ratio = radius / (norm + CLIP_EPS)
    active = ratio < 1.0
    factor = xp.where(active, ratio, 1.0)
    return h * factor, FeatureClipCache(h, norm, factor, active)


def feature_clip_backward(dout, cache):
    """Inactive rows: ``dh = dout``. Active rows, where h̃ = r·h/(‖h‖ + ε):

        dh = f · (dout − h ⟨h, dout⟩ / (‖h‖ (‖h‖ + ε))),    f = r/(‖h‖ + ε)

    (at h = 0 the radial term is 0: ``‖h‖`` is replaced by 1 where it is 0).

    Derivation: docs/math.md §17.2.
    """
    h, norm = cache.h, cache.norm
    xp = get_array_module(h)
    safe_norm = xp.where(norm > 0, norm, 1.0)
    radial = row_dot(h, dout) / (safe_norm * (norm + CLIP_EPS))
    return xp.where(cache.active, cache.factor * (dout - radial * h), dout)


# --- the geodesic distance matrix ---------------------------------------------

class DistanceMatrixCache(NamedTuple):
    x: Any                 # B × D, points in the ball (faces)
    y: Any                 # B × D, points in the ball (voices)
    sq_x: Any              # B × 1, ‖x_i‖²
    sq_y: Any              # 1 × B, ‖y_j‖²
    gram: Any              # B × B, G_ij = ⟨x_i, y_j⟩
    coef_a: Any            # B × B, A = 1 − 2cG + c‖y_j‖²
    coef_b: Any            # B × 1, B' = 1 − c‖x_i‖²
    num_norm: Any          # B × B, ‖num‖ = √max(‖num‖², MIN_NUM_SQ)
    num_active: Any        # B × B bool, ‖num‖² > MIN_NUM_SQ
    den: Any               # B × B, 1 − 2cG + c²‖x_i‖²‖y_j‖² + MOBIUS_EPS
    artanh_arg: Any        # B × B, the clamped √c‖(−x_i) ⊕_c y_j‖
    artanh_active: Any     # B × B bool, the clamp did not act
    c: float


def distance_matrix_forward(x, y, c):
    """Geodesic distances between the rows of ``x`` and of ``y`` (hyptorch's
    ``dist_matrix``):

        D_ij = d_c(x_i, y_j) = (2/√c) · artanh(clip(√c ‖(−x_i) ⊕_c y_j‖, −1 + ε, 1 − ε))

    with the Möbius sum u ⊕_c y = [(1 + 2c⟨u,y⟩ + c‖y‖²) u + (1 − c‖u‖²) y]
    / (1 + 2c⟨u,y⟩ + c²‖u‖²‖y‖² + MOBIUS_EPS) and ε = ARTANH_EPS.

    Computed from G = x yᵀ and the squared norms, never the B × B × D sums:
    with A = 1 − 2cG_ij + c‖y_j‖², B' = 1 − c‖x_i‖²,

        ‖num‖² = A²‖x_i‖² − 2AB'G_ij + B'²‖y_j‖²     (clamped below at MIN_NUM_SQ)
        ‖(−x_i) ⊕_c y_j‖ = ‖num‖ / (1 − 2cG_ij + c²‖x_i‖²‖y_j‖² + MOBIUS_EPS)

    ``x``: B × D, ``y``: B′ × D (B′ = B in the model); returns D: B × B′.

    Derivation: docs/math.md §17.3–§17.4, §17.6 (the guards).
    """
    xp = get_array_module(x, y)
    sqrt_c = c ** 0.5
    sq_x = row_dot(x, x)              # B × 1
    sq_y = row_dot(y, y).T            # 1 × B′
    gram = x @ y.T
    coef_b = 1.0 - c * sq_x
    # B × B work in place, one pass per line (the B × 1 and 1 × B terms broadcast)
    minus_2cg = gram * (-2.0 * c)
    den = (c * c * sq_x) * sq_y
    den += minus_2cg
    den += 1.0 + MOBIUS_EPS                     # den = 1 − 2cG + c²‖x‖²‖y‖² + ε
    coef_a = minus_2cg
    coef_a += 1.0 + c * sq_y                    # A = 1 − 2cG + c‖y‖²
    num_sq = coef_a * sq_x
    num_sq -= (2.0 * coef_b) * gram
    num_sq *= coef_a
    num_sq += (coef_b * coef_b) * sq_y          # ‖num‖² = A(A‖x‖² − 2B'G) + B'²‖y‖²
    num_active = num_sq > MIN_NUM_SQ
    num_norm = xp.sqrt(xp.maximum(num_sq, MIN_NUM_SQ, out=num_sq), out=num_sq)
    scaled = num_norm * sqrt_c
    scaled /= den                               # √c‖(−x) ⊕ y‖ ≥ 0: only the upper clamp can act
    artanh_active = scaled <= 1.0 - ARTANH_EPS
    artanh_arg = xp.clip(scaled, -1.0 + ARTANH_EPS, 1.0 - ARTANH_EPS, out=scaled)
    dist = xp.arctanh(artanh_arg)
    dist *= 2.0 / sqrt_c
    return dist, DistanceMatrixCache(x, y, sq_x, sq_y, gram, coef_a, coef_b, num_norm,
                                     num_active, den, artanh_arg, artanh_active, c)


def distance_matrix_backward(dD, cache):
    """Returns ``dx, dy``. With a = clip(√c‖num‖/den), per entry (ij):

        dz     = dD · (2/√c) / (1 − a²) · [the clamp did not act]
        dn     = √c dz / den · [‖num‖² > MIN_NUM_SQ],  dden = −√c dz ‖num‖/den²
        ds     = dn / (2‖num‖)                          (s = ‖num‖²)
        dA     = ds (2A‖x_i‖² − 2B'G),    dB' = ds (2B'‖y_j‖² − 2AG)
        dG     = −2AB' ds − 2c dA − 2c dden
        d‖x_i‖² = Σ_j [A² ds − c dB' + c²‖y_j‖² dden]
        d‖y_j‖² = Σ_i [B'² ds + c dA + c²‖x_i‖² dden]

    then ``dx = dG y + 2 d‖x‖² ⊙ x``, ``dy = dGᵀ x + 2 d‖y‖² ⊙ y``: two B × D
    products, the rest elementwise on B × B. Since A + 2cG = 1 + c‖y_j‖², the
    row sum is formed as Σ_j [(A(1 + c‖y_j‖²) − 2cB'‖y_j‖²) ds + c²‖y_j‖² dden],
    without dB'.

    Derivation: docs/math.md §17.5.
    """
    x, y, c, artanh_arg = cache.x, cache.y, cache.c, cache.artanh_arg
    sq_x, sq_y, gram, coef_a, coef_b = cache.sq_x, cache.sq_y, cache.gram, cache.coef_a, cache.coef_b
    xp = get_array_module(x, y)
    sqrt_c = c ** 0.5
    # B × B work in place, one pass per line. dmob = √c dz = 2 dD/(1 − a²)·[clamp off];
    # first dmob/(2 den), from which dden and ds both follow
    half_dmob_over_den = artanh_arg * artanh_arg
    xp.subtract(1.0, half_dmob_over_den, out=half_dmob_over_den)
    xp.divide(dD, half_dmob_over_den, out=half_dmob_over_den)
    half_dmob_over_den *= cache.artanh_active
    half_dmob_over_den /= cache.den
    # dden = −dmob‖num‖/den² = −2·(dmob/(2den))·a/√c (a = √c‖num‖/den where dmob ≠ 0)
    dden = half_dmob_over_den * artanh_arg
    dden *= -2.0 / sqrt_c
    # ds = dmob/(2 den ‖num‖)·[‖num‖² > MIN_NUM_SQ]
    ds = half_dmob_over_den
    ds *= cache.num_active
    ds /= cache.num_norm
    da = coef_a * sq_x
    da -= coef_b * gram
    da *= ds
    da *= 2.0                                   # dA = ds (2A‖x‖² − 2B'G)
    dgram = da + dden
    dgram *= -2.0 * c
    ab_ds = coef_a * coef_b
    ab_ds *= ds
    ab_ds *= 2.0
    dgram -= ab_ds                              # dG = −2AB' ds − 2c dA − 2c dden
    # d‖x_i‖²: A² ds − c dB' = [A(1 + c‖y‖²) − 2cB'‖y‖²] ds, as A + 2cG = 1 + c‖y‖²
    # (dB' = ds (2B'‖y‖² − 2AG) is never formed)
    row_terms = xp.multiply(coef_a, 1.0 + c * sq_y, out=ab_ds)
    row_terms -= (2.0 * c * coef_b) * sq_y
    row_terms *= ds
    dsq_x = row_terms.sum(axis=1, keepdims=True) + (c * c) * (dden @ sq_y.T)
    dsq_y = (ds.T @ (coef_b * coef_b) + c * da.sum(axis=0)[:, None]
             + (c * c) * (dden.T @ sq_x))
    dx = dgram @ y + 2.0 * dsq_x * x
    dy = dgram.T @ x + 2.0 * dsq_y * y
    return dx, dy


# --- logits and the symmetric cross-entropy on them ----------------------------

class DistanceLogitsCache(NamedTuple):
    dist: DistanceMatrixCache
    temperature: float


def distance_logits_forward(x, y, c, temperature):
    """``S_ij = −d_c(x_i, y_j)/τ``; ``x``: B × D, ``y``: B′ × D; returns S: B × B′
    (the closest pair scores highest).

    Derivation: docs/math.md §17.7.
    """
    dist, cache = distance_matrix_forward(x, y, c)
    dist *= -1.0 / temperature                  # in place: S
    return dist, DistanceLogitsCache(cache, temperature)


def distance_logits_backward(dS, cache):
    """``dD = −dS/τ``, then ``distance_matrix_backward``; ``dS``: B × B′. Returns ``dx, dy``.

    Derivation: docs/math.md §17.7.
    """
    return distance_matrix_backward(dS * (-1.0 / cache.temperature), cache.dist)


# --- the alignment loss ------------------------------------------------------------

class PoincareAlignmentCache(NamedTuple):
    logits: DistanceLogitsCache
    ce: SymmetricCrossEntropyFromLogitsCache


def poincare_alignment_forward(p_f, p_v, c, temperature):
    """The alignment loss ``L_A = ½[CE(S, diag) + CE(Sᵀ, diag)]``, S_ij = −d_c(p_f,i, p_v,j)/τ.

    ``p_f``, ``p_v``: B × D points in the ball, row i of each a matching pair;
    returns a 0-d loss and the cache.

    Derivation: docs/math.md §17.7.
    """
    S, cache_logits = distance_logits_forward(p_f, p_v, c, temperature)
    loss, cache_ce = symmetric_cross_entropy_from_logits_forward(S)
    return loss, PoincareAlignmentCache(cache_logits, cache_ce)


def poincare_alignment_backward(dloss, cache):
    """``dp_f, dp_v`` (B × D each) of ``dloss · L_A``: the mirror of the forward.

    Derivation: docs/math.md §17.7.
    """
    dS = symmetric_cross_entropy_from_logits_backward(dloss, cache.ce)
    return distance_logits_backward(dS, cache.logits)
