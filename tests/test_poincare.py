"""Feature clipping, the closed-form Poincaré distance matrix and its logits:
formulas against a direct transcription, gradients by finite differences, guards,
and the B × B × D array that must never exist; then the whole model with
``alignment="poincare"``, its Config field and its command-line flags."""
import argparse
import os
import sys
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest

import paeff_np as pn
from paeff_np import check_layer, check_op, hyperbolic, model
from paeff_np.backend import default_rng, to_host
from paeff_np.hyperbolic import ball_radius, to_ball_backward, to_ball_forward
from paeff_np.losses import (symmetric_cross_entropy_backward, symmetric_cross_entropy_forward,
                             symmetric_cross_entropy_from_logits_backward,
                             symmetric_cross_entropy_from_logits_forward)
from paeff_np.poincare import (ARTANH_EPS, CLIP_EPS, MOBIUS_EPS, distance_logits_backward,
                               distance_logits_forward, distance_matrix_backward,
                               distance_matrix_forward, feature_clip_backward,
                               feature_clip_forward, poincare_alignment_backward,
                               poincare_alignment_forward)
from conftest import SMALL, pre_batchnorm_biases, small_batch, to_xp

CURVATURES = [0.05, 1.0]


def in_ball(xp, n, d, c, low, high, seed):
    """``n`` random points of the ball with √c‖x‖ uniform in [low, high]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x *= rng.uniform(low, high, (n, 1)) / (np.sqrt(c) * np.linalg.norm(x, axis=1, keepdims=True))
    return xp.asarray(x)


def direct_distance_matrix(x, y, c):
    """The definition, transcribed with the B × B × D tensor of Möbius sums (hyptorch's
    ``dist_matrix``): d = (2/√c) artanh(clip(√c ‖(−x_i) ⊕_c y_j‖))."""
    x, y = np.asarray(to_host(x)), np.asarray(to_host(y))
    u, v = -x[:, None, :], y[None, :, :]
    uv = (u * v).sum(-1, keepdims=True)
    uu = (u * u).sum(-1, keepdims=True)
    vv = (v * v).sum(-1, keepdims=True)
    num = (1 + 2 * c * uv + c * vv) * u + (1 - c * uu) * v
    mobius = num / (1 + 2 * c * uv + c * c * uu * vv + MOBIUS_EPS)
    z = np.sqrt(c) * np.linalg.norm(mobius, axis=-1)
    return 2 / np.sqrt(c) * np.arctanh(np.clip(z, -1 + ARTANH_EPS, 1 - ARTANH_EPS))


# --- feature clipping ----------------------------------------------------------

def _rows_with_norms(rand, xp, norms):
    h = rand(len(norms), 5)
    return h / xp.sqrt((h * h).sum(1, keepdims=True)) * xp.asarray(np.array(norms))[:, None]


def test_feature_clip_formula(rand, xp):
    r = 2.3
    h = _rows_with_norms(rand, xp, [0.5, 2.0, 2.3, 3.0, 40.0])
    out, cache = feature_clip_forward(h, r)
    hn = np.asarray(to_host(h))
    norms = np.linalg.norm(hn, axis=1, keepdims=True)
    expected = hn * np.minimum(1.0, r / (norms + CLIP_EPS))
    np.testing.assert_allclose(to_host(out), expected, rtol=1e-15)
    assert to_host(cache.active).ravel().tolist() == [False, False, True, True, True]
    assert (to_host(out)[:2] == hn[:2]).all()         # inactive rows pass bit for bit
    assert (np.linalg.norm(to_host(out), axis=1) < r).all()


@pytest.mark.parametrize("norms", [[0.3, 1.0, 2.2], [2.5, 7.0, 100.0], [0.4, 3.0, 1.5, 9.0]],
                         ids=["inactive", "active", "mixed"])
def test_feature_clip_gradient(rand, xp, norms):
    h = _rows_with_norms(rand, xp, norms)
    check_layer(feature_clip_forward, feature_clip_backward, [h], settings=dict(radius=2.3))


def test_feature_clip_zero_row_with_tiny_radius(xp):
    """r < 1e-5 makes even h = 0 an active row: h̃ = r h/(‖h‖ + 1e-5), whose
    Jacobian at 0 is (r/1e-5) I. The radial term must not turn 0/0 into NaN."""
    r = 1e-6
    h = xp.asarray(np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]]))
    out, cache = feature_clip_forward(h, r)
    assert bool(cache.active.all())
    dh = to_host(feature_clip_backward(xp.ones_like(h), cache))
    assert np.isfinite(dh).all()
    np.testing.assert_allclose(dh[0], r / CLIP_EPS, rtol=1e-15)


# --- the distance matrix: forward ------------------------------------------------

@pytest.mark.parametrize("c", CURVATURES)
def test_distance_matrix_matches_direct_transcription(xp, c):
    x = in_ball(xp, 9, 6, c, 0.05, 0.99, seed=1)
    y = in_ball(xp, 7, 6, c, 0.05, 0.99, seed=2)
    dist, _ = distance_matrix_forward(x, y, c)
    expected = direct_distance_matrix(x, y, c)
    assert dist.shape == (9, 7)
    np.testing.assert_allclose(to_host(dist), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("c", CURVATURES)
def test_distance_matrix_properties(xp, c):
    """Symmetric, and from the origin d(0, y) = (2/√c) artanh(√c‖y‖/(1 + 1e-5))."""
    x = in_ball(xp, 5, 4, c, 0.1, 0.9, seed=3)
    y = in_ball(xp, 5, 4, c, 0.1, 0.9, seed=4)
    d_xy, _ = distance_matrix_forward(x, y, c)
    d_yx, _ = distance_matrix_forward(y, x, c)
    np.testing.assert_allclose(to_host(d_xy), to_host(d_yx).T, rtol=1e-13)
    d_0y, _ = distance_matrix_forward(xp.zeros((1, 4)), y, c)
    norms = np.linalg.norm(to_host(y), axis=1)
    expected = 2 / np.sqrt(c) * np.arctanh(np.sqrt(c) * norms / (1 + MOBIUS_EPS))
    np.testing.assert_allclose(to_host(d_0y)[0], expected, rtol=1e-13)


# --- the distance matrix: gradients ---------------------------------------------

@pytest.mark.parametrize("c", CURVATURES)
def test_distance_matrix_gradient(xp, c):
    x = in_ball(xp, 6, 5, c, 0.05, 0.95, seed=5)
    y = in_ball(xp, 5, 5, c, 0.05, 0.95, seed=6)
    check_layer(distance_matrix_forward, distance_matrix_backward, [x, y], settings=dict(c=c))


@pytest.mark.parametrize("c", CURVATURES)
def test_distance_matrix_gradient_with_artanh_clamp_active(xp, c):
    """Rows 0 and 1 of x and y lie at the projection's radius (1 − 1e-3)/√c, with
    y_0 = −x_0 and y_1 = −x_1. For the antipodal pairs √c‖(−x)⊕y‖ ≈ 1 − 3e-6 > 1 − 1e-5,
    so artanh's argument is clamped and those entries pass no gradient (nor,
    here, do (0, 1) and (1, 0)). The other entries reach √c‖(−x)⊕y‖ ≈ 0.9998."""
    x = in_ball(xp, 6, 4, c, 0.1, 0.8, seed=7)
    y = in_ball(xp, 6, 4, c, 0.1, 0.8, seed=8)
    r = ball_radius(c)
    x[0] = in_ball(xp, 1, 4, c, 1.0, 1.0, seed=9)[0] * (r * np.sqrt(c))
    y[0] = -x[0]
    x[1] = in_ball(xp, 1, 4, c, 1.0, 1.0, seed=10)[0] * (r * np.sqrt(c))
    y[1] = -x[1]
    _, cache = distance_matrix_forward(x, y, c)
    clamped = ~to_host(cache.artanh_active)
    assert clamped[:2, :2].all() and clamped.sum() == 4
    check_layer(distance_matrix_forward, distance_matrix_backward, [x, y], settings=dict(c=c))


def _coincident_points(xp, c):
    """Rows 0 and 2 of x and y coincide, with dyadic coordinates (scaled by
    1/√c = 4 or 1, also exact), so ‖num‖² = 0 exactly; row 1 coincides with
    non-dyadic coordinates, so ‖num‖² is rounding noise."""
    x = np.array([[0.25, 0.125, 0.0], [0.1, -0.3, 0.2], [0.125, 0.125, -0.0625], [0.2, 0.1, 0.3]])
    y = np.array([[0.25, 0.125, 0.0], [0.1, -0.3, 0.2], [0.125, 0.125, -0.0625], [-0.3, 0.0, 0.1]])
    return xp.asarray(x / np.sqrt(c)), xp.asarray(y / np.sqrt(c))


@pytest.mark.parametrize("c", [1.0, 0.0625])
def test_distance_matrix_coincident_points_guard(xp, c):
    """At x_i = y_j the distance is a cone tip: 0, with no gradient. The guard
    ‖num‖² ≥ MIN_NUM_SQ keeps √ and its derivative finite. Where it acts, ‖num‖
    is the constant 1e-10 and the entry passes only the gradient of 1e-10/den,
    ~1e-10: next to the cone's slope λ ≥ 2, zero (a subgradient of the cone)."""
    x, y = _coincident_points(xp, c)
    dist, cache = distance_matrix_forward(x, y, c)
    dist = to_host(dist)
    guarded = ~to_host(cache.num_active)
    assert guarded[0, 0] and guarded[2, 2]
    assert abs(dist[0, 0]) < 1e-9 and abs(dist[2, 2]) < 1e-9
    assert abs(dist[1, 1]) < 1e-7         # the closed form resolves ‖num‖ only to ~1e-8
    for i, j in [(0, 0), (2, 2)]:
        dD = xp.zeros((4, 4))
        dD[i, j] = 1.0
        dx, dy = distance_matrix_backward(dD, cache)
        assert float(xp.abs(dx).max()) < 1e-9 and float(xp.abs(dy).max()) < 1e-9
    dx, dy = distance_matrix_backward(xp.ones((4, 4)), cache)
    assert bool(xp.isfinite(dx).all() and xp.isfinite(dy).all())


@pytest.mark.parametrize("c", [1.0, 0.0625])
def test_distance_matrix_gradient_with_coincident_points(xp, c):
    """Finite differences with coincident pairs present. At a cone tip the
    function is not differentiable, so those entries get weight 0: the check
    shows the guard keeps every other gradient exact (without it, 0/0 = NaN
    would spread through dG to whole rows of dx and dy)."""
    x, y = _coincident_points(xp, c)
    keep = xp.ones((4, 4))
    keep[0, 0] = keep[1, 1] = keep[2, 2] = 0.0
    cache = {}

    def forward(x, y):
        dist, cache["d"] = distance_matrix_forward(x, y, c)
        return dist * keep

    def backward(dD):
        return distance_matrix_backward(dD * keep, cache["d"])
    check_op(forward, backward, [x, y])


@pytest.mark.parametrize("c", CURVATURES)
def test_distance_matrix_gradient_with_coincident_points_at_origin(xp, c):
    """x_0 = y_0 = 0: d(t e_k, 0) = (2/√c) artanh(√c|t|/(1 + 1e-5)) is even in t,
    so the central difference is 0 there, as is the guarded gradient."""
    x = in_ball(xp, 4, 3, c, 0.1, 0.9, seed=11)
    y = in_ball(xp, 4, 3, c, 0.1, 0.9, seed=12)
    x[0] = 0.0
    y[0] = 0.0
    _, cache = distance_matrix_forward(x, y, c)
    assert not bool(cache.num_active[0, 0])
    check_layer(distance_matrix_forward, distance_matrix_backward, [x, y], settings=dict(c=c))


# --- no B × B × D array ------------------------------------------------------------

def test_distance_cache_holds_only_batch_sized_arrays(xp):
    b, b2, d = 6, 5, 7
    x = in_ball(xp, b, d, 1.0, 0.1, 0.9, seed=13)
    y = in_ball(xp, b2, d, 1.0, 0.1, 0.9, seed=14)
    _, cache = distance_matrix_forward(x, y, 1.0)
    allowed = {(b, d), (b2, d), (b, b2), (b, 1), (1, b2)}
    shapes = {name: getattr(value, "shape", ()) for name, value in cache._asdict().items()}
    assert all(shape in allowed or shape == () for shape in shapes.values()), shapes


def test_distance_matrix_never_allocates_batch_batch_dim():
    """tracemalloc sees NumPy's buffers: the peak of forward + backward stays far
    below one B × B × D float64 array (here 16 MiB, against B × B = 32 KiB)."""
    b, d = 64, 512
    x = in_ball(np, b, d, 1.0, 0.1, 0.9, seed=15)
    y = in_ball(np, b, d, 1.0, 0.1, 0.9, seed=16)
    dD = np.random.default_rng(17).standard_normal((b, b))
    tracemalloc.start()
    try:
        _, cache = distance_matrix_forward(x, y, 1.0)
        distance_matrix_backward(dD, cache)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < b * b * d * 8 / 8, peak


# --- logits and the symmetric cross-entropy ------------------------------------------

def test_logits_are_minus_distance_over_temperature(xp):
    x = in_ball(xp, 4, 3, 0.05, 0.1, 0.9, seed=18)
    y = in_ball(xp, 4, 3, 0.05, 0.1, 0.9, seed=19)
    S, _ = distance_logits_forward(x, y, 0.05, 0.2)
    dist, _ = distance_matrix_forward(x, y, 0.05)
    np.testing.assert_allclose(to_host(S), -to_host(dist) / 0.2, rtol=1e-15)
    check_layer(distance_logits_forward, distance_logits_backward, [x, y],
                settings=dict(c=0.05, temperature=0.2))


def test_symmetric_cross_entropy_from_logits_matches_losses(rand):
    """With S = a bᵀ/τ it is ``losses.symmetric_cross_entropy``, loss and gradient."""
    a, b, tau = rand(6, 4, seed=20), rand(6, 4, seed=21), 0.3
    loss_ref, cache_ref = symmetric_cross_entropy_forward(a, b, tau)
    da_ref, db_ref = symmetric_cross_entropy_backward(1.0, cache_ref)
    loss, cache = symmetric_cross_entropy_from_logits_forward(a @ b.T / tau)
    dS = symmetric_cross_entropy_from_logits_backward(1.0, cache)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-15)
    np.testing.assert_allclose(to_host(dS @ b / tau), to_host(da_ref), rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(to_host(dS.T @ a / tau), to_host(db_ref), rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("c", CURVATURES)
def test_poincare_alignment_gradient(xp, c):
    p_f = in_ball(xp, 6, 5, c, 0.1, 0.95, seed=22)
    p_v = in_ball(xp, 6, 5, c, 0.1, 0.95, seed=23)
    cache = {}

    def forward(p_f, p_v):
        loss, cache["a"] = poincare_alignment_forward(p_f, p_v, c, 0.2)
        return loss

    def backward(dloss):
        return poincare_alignment_backward(dloss, cache["a"])
    check_op(forward, backward, [p_f, p_v])


@pytest.mark.parametrize("c", CURVATURES)
@pytest.mark.parametrize("radius_sqrt_c", [20.0, 0.2], ids=["clip-inactive", "clip-active"])
def test_chain_from_features_to_loss_gradient(rand, xp, c, radius_sqrt_c):
    """h → clip → expmap0 → project → distance → logits → symmetric CE, the model's
    chain (Riemannian scaling off: it is not a derivative, see hyperbolic.py).
    √c‖h‖ ≈ 1.1 keeps expmap0 off saturation, where 1 − tanh² ~ 1e-3 would shrink
    the gradient next to the loss and leave finite differences to rounding."""
    clip_radius = radius_sqrt_c / np.sqrt(c)
    h_f = rand(6, 5, seed=24, scale=0.5 / np.sqrt(c))
    h_v = rand(6, 5, seed=25, scale=0.5 / np.sqrt(c))
    cache = {}

    def forward(h_f, h_v):
        g_f, cache["clip_f"] = feature_clip_forward(h_f, clip_radius)
        g_v, cache["clip_v"] = feature_clip_forward(h_v, clip_radius)
        p_f, cache["ball_f"] = to_ball_forward(g_f, c, False)
        p_v, cache["ball_v"] = to_ball_forward(g_v, c, False)
        loss, cache["align"] = poincare_alignment_forward(p_f, p_v, c, 0.2)
        return loss

    def backward(dloss):
        dp_f, dp_v = poincare_alignment_backward(dloss, cache["align"])
        dh_f = feature_clip_backward(to_ball_backward(dp_f, cache["ball_f"]), cache["clip_f"])
        dh_v = feature_clip_backward(to_ball_backward(dp_v, cache["ball_v"]), cache["clip_v"])
        return dh_f, dh_v
    forward(h_f, h_v)
    active = bool(cache["clip_f"].active.all() and cache["clip_v"].active.all())
    inactive = not bool(cache["clip_f"].active.any() or cache["clip_v"].active.any())
    assert active if radius_sqrt_c < 1.0 else inactive
    check_op(forward, backward, [h_f, h_v])


def test_symmetric_cross_entropy_from_logits_scales_with_dloss(rand):
    S = rand(5, 5, seed=26)
    _, cache = symmetric_cross_entropy_from_logits_forward(S)
    np.testing.assert_allclose(to_host(symmetric_cross_entropy_from_logits_backward(0.3, cache)),
                               0.3 * to_host(symmetric_cross_entropy_from_logits_backward(1.0, cache)),
                               rtol=1e-15)


# --- the whole model with alignment="poincare" ----------------------------------------

class FrozenRiemannianScale:
    """Stands in for ``hyperbolic.riemannian_scale_forward`` so that the Riemannian
    gradient becomes a true derivative, checkable by finite differences.

    At the unperturbed parameters θ₀ it records, per call (face, then voice), the
    point p₀ and the factor s = (1 − c‖p₀‖²)²/4, and from then on returns
    p′ = p₀ + s ⊙ (p − p₀) with s fixed. At θ₀, p′ = p (same loss), and
    dp′/dp = s: the gradient of the loss through p′ is exactly the model's
    Riemannian gradient dp · s.
    """
    def __init__(self):
        self.frozen, self.calls = [], 0

    def __call__(self, p, c):
        if len(self.frozen) < 2:
            p0, scale = REAL_RIEMANNIAN_SCALE_FORWARD(p, c)
            self.frozen.append((p0.copy(), scale))
        p0, scale = self.frozen[self.calls % 2]
        self.calls += 1
        return p0 + scale * (p - p0), scale


REAL_RIEMANNIAN_SCALE_FORWARD = hyperbolic.riemannian_scale_forward

POINCARE_CASES = [dict(riemannian_grad=r, clip=clip, curvature=c, fusion="egff")
                  for r in (False, True) for clip in ("active", "inactive") for c in (0.05, 1.0)]
POINCARE_CASES += [dict(riemannian_grad=False, clip="active", curvature=0.05, fusion="gated"),
                   dict(riemannian_grad=True, clip="inactive", curvature=1.0, fusion="gated")]


@pytest.mark.parametrize("case", POINCARE_CASES,
                         ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_whole_loss_gradient_poincare(xp, monkeypatch, case):
    """Every parameter, alignment="poincare": the clipping acts on every row
    (r = 0.005) or on none (r = 100), c = 0.05 and 1, Riemannian scaling off and
    on (on: through ``FrozenRiemannianScale``), EGFF and the gated fusion.
    At c = 1 the branches' last Linear is scaled by 0.4 so that √c‖h‖ ≤ 1.5
    (‖h‖ ∈ [0.02, 3.6] unscaled): off expmap0's saturation, where 1 − tanh²
    ~ 1e-3 and (1 − c‖p‖²)² ~ 1e-5 would leave the alignment's share of the
    gradient to rounding. (Not smaller: ‖h‖ ~ 0.006 makes e = h/‖h‖ move by
    ~1e-2 per finite-difference step, across a ReLU kink of the gated fusion.)"""
    case = dict(case)
    clip_radius = 0.005 if case.pop("clip") == "active" else 100.0
    cfg = pn.Config(**SMALL, **case, alignment="poincare", clip_radius=clip_radius,
                    temperature=0.2, dropout=0.0)
    if cfg.riemannian_grad:
        monkeypatch.setattr(hyperbolic, "riemannian_scale_forward", FrozenRiemannianScale())
    params, buffers = pn.init_params(cfg, seed=1, dtype=np.float64)
    for key in params:
        if ".fc1.4." in key:
            params[key] *= min(1.0, 0.4 / np.sqrt(cfg.curvature))
    params, buffers = to_xp(params, xp), to_xp(buffers, xp)
    face, voice, labels = small_batch(xp)

    (_, terms), _, cache = model.forward(params, buffers, face, voice, labels, cfg)
    for clip in (cache.align.clip_f, cache.align.clip_v):
        assert bool(clip.active.all()) if clip_radius < 1 else not bool(clip.active.any())
    assert float(terms["align"]) > 0.1           # the alignment is in the loss

    def loss():
        return pn.loss_and_grads(params, buffers, face, voice, labels, cfg)[0]
    _, _, grads, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg)
    assert set(grads) == set(params)
    zero = pre_batchnorm_biases(cfg)
    pn.gradcheck(loss, params, {k: g for k, g in grads.items() if k not in zero})


def test_riemannian_scaling_changes_the_poincare_gradient():
    """The scaling is applied on this path too: same loss, other branch gradients."""
    face, voice, labels = small_batch(np)
    out = {}
    for on in (False, True):
        cfg = pn.Config(**SMALL, alignment="poincare", dropout=0.0, riemannian_grad=on)
        params, buffers = pn.init_params(cfg, seed=1, dtype=np.float64)
        out[on] = pn.loss_and_grads(params, buffers, face, voice, labels, cfg)
    assert float(out[False][0]) == float(out[True][0])
    np.testing.assert_array_equal(out[False][2]["logits_layer.weight"], out[True][2]["logits_layer.weight"])
    assert pn.gradcheck.__module__ and not np.allclose(out[False][2]["face_branch.fc1.0.weight"],
                                                       out[True][2]["face_branch.fc1.0.weight"])


def test_poincare_alignment_reads_h_and_fusion_reads_normalised_h():
    """Scaling a branch's last Linear by k > 0 scales h by k: the fusion (on
    e = normalize(h)) does not move, the Poincaré term does."""
    face, voice, labels = small_batch(np)
    cfg = pn.Config(**SMALL, alignment="poincare", dropout=0.0, clip_radius=100.0)
    params, buffers = pn.init_params(cfg, seed=1, dtype=np.float64)
    scaled = dict(params)
    for key in ("face_branch.fc1.4.weight", "face_branch.fc1.4.bias"):
        scaled[key] = 2.0 * params[key]
    (_, t1), _, _ = model.forward(params, buffers, face, voice, labels, cfg)
    (_, t2), _, _ = model.forward(scaled, buffers, face, voice, labels, cfg)
    np.testing.assert_allclose(float(t1["ce"]), float(t2["ce"]), rtol=1e-12)
    assert abs(float(t1["align"]) - float(t2["align"])) > 1e-3


def _arrays(tree):
    """Every array in a nest of NamedTuples/tuples."""
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _arrays(item)


def test_poincare_step_holds_only_batch_sized_arrays(xp):
    """The alignment's caches at B = 1024, D = 256 (float32) hold B × B and
    B × D arrays (and B × 1 / 1 × B columns), never B × B × D."""
    B, D = 1024, 256
    cfg = pn.Config(face_dim=8, voice_dim=8, embed_dim=D, n_classes=5, alignment="poincare")
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float32)
    params, buffers = to_xp(params, xp), to_xp(buffers, xp)
    rng = np.random.default_rng(0)
    face = xp.asarray(rng.standard_normal((B, 8)).astype(np.float32))
    voice = xp.asarray(rng.standard_normal((B, 8)).astype(np.float32))
    labels = xp.asarray(rng.integers(0, 5, B))
    (loss, _), _, cache = model.forward(params, buffers, face, voice, labels, cfg,
                                     rng=default_rng(0, xp))
    grads = model.backward(1.0, cache)
    assert bool(xp.isfinite(loss)) and all(bool(xp.isfinite(g).all()) for g in grads.values())
    allowed = {(B, B), (B, D), (B, 1), (1, B), (B,), ()}
    shapes = {tuple(a.shape) for a in _arrays(cache.align)}
    assert (B, B) in shapes and shapes <= allowed, shapes


def test_poincare_step_never_allocates_batch_batch_dim():
    """tracemalloc sees NumPy's buffers: the peak of a whole float32 step
    (forward + backward) at B = 1024, D = 256 stays far below one B × B × D
    float32 array (1 GiB); B × B is 4 MiB."""
    B, D = 1024, 256
    cfg = pn.Config(face_dim=8, voice_dim=8, embed_dim=D, n_classes=5, alignment="poincare")
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float32)
    rng = np.random.default_rng(0)
    face = rng.standard_normal((B, 8)).astype(np.float32)
    voice = rng.standard_normal((B, 8)).astype(np.float32)
    labels = rng.integers(0, 5, B)
    tracemalloc.start()
    try:
        pn.loss_and_grads(params, buffers, face, voice, labels, cfg, rng=np.random.default_rng(0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < B * B * D * 4 / 8, peak


# --- Config and the command line ------------------------------------------------------

@pytest.mark.parametrize("radius", [0.0, -1.0, float("nan"), float("inf")])
def test_clip_radius_is_validated(radius):
    with pytest.raises(ValueError, match="clip_radius"):
        pn.Config(alignment="poincare", clip_radius=radius)


def test_config_from_dict_needs_every_field():
    """0.1.0 reads only its own format: a Config dict without clip_radius is refused by name."""
    d = pn.Config().to_dict()
    del d["clip_radius"]
    with pytest.raises(ValueError, match="^Config: clip_radius: missing$"):
        pn.Config.from_dict(d)
    assert pn.Config.from_dict(pn.Config(alignment="poincare", clip_radius=1.5).to_dict()).clip_radius == 1.5


def test_poincare_adds_no_parameters():
    cfg = pn.Config(**SMALL)
    params, buffers = pn.init_params(cfg)
    params_p, buffers_p = pn.init_params(pn.Config(**SMALL, alignment="poincare"))
    assert params.keys() == params_p.keys() and buffers.keys() == buffers_p.keys()


def test_cli_flags():
    from paeff_np.usage import UsageError
    from paeff_np.run.cli import add_config_flags, config_overrides, make_config
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    train_set = SimpleNamespace(face_dim=7, voice_dim=5, n_classes=3)
    args = parser.parse_args(["--alignment", "poincare", "--clip-radius", "1.5"])
    cfg = make_config(train_set, config_overrides(args))
    assert cfg.alignment == "poincare" and cfg.clip_radius == 1.5
    assert make_config(train_set, config_overrides(parser.parse_args([]))).clip_radius == 2.3
    with pytest.raises(UsageError, match="clip_radius = 0: must be a finite number > 0"):
        make_config(train_set, config_overrides(parser.parse_args(["--clip-radius", "0"])))


def test_ablation_has_the_poincare_row_in_the_first_group():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train
    first = train.ABLATION_TABLES[0]
    names = [row[0] for row in first]
    assert names.index("Poincaré distance") == names.index("PAEFF (hyperbolic)") + 1
    assert dict(first[names.index("Poincaré distance")][2])["alignment"] == "poincare"
    tables = [[(name, {}, paper) for name, _, _, paper in table] for table in train.ABLATION_TABLES]
    lines = train.format_ablation(tables).splitlines()
    # the blank line separates Table 3's rows from Table 4's (the gate rows)
    assert lines[lines.index("") + 1].startswith("gate: sum")
    assert any(line.startswith("Poincaré distance") for line in lines[:lines.index("")])
