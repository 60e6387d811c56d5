"""What the hyperbolic alignment really does (docs/math.md §16).

Every row of e has norm 1, so p = expmap0(e) = ρ·e with ρ = tanh(√c)/√c and the
projection never acts. Hence the hyperbolic alignment with temperature τ is the
Euclidean one with temperature τ/ρ², and the Riemannian scaling multiplies the
alignment gradient by the constant κ = (1 − cρ²)²/4. These tests prove it on
the whole model: the alignment loss and every gradient agree to rounding.
"""
import math

import numpy as np
import pytest

import paeff_np as pn
from paeff_np.hyperbolic import unit_row_ball_norm, unit_row_riemannian_factor
from conftest import SMALL
from paeff_np.model import euclidean_equivalent

EQUIVALENCE_TOL = 1e-13          # measured worst ≈ 2e-15 (float64)
VARIANTS = [dict(), dict(egff_kernel=5, egff_mix="raw"), dict(egff_gate="concat"),
            dict(fusion="gated")]


def test_constants_at_paper_curvature():
    assert unit_row_ball_norm(0.05) == pytest.approx(0.98366, abs=5e-6)
    assert 0.07 / unit_row_ball_norm(0.05) ** 2 == pytest.approx(0.07234, abs=5e-6)
    assert unit_row_riemannian_factor(0.05) == pytest.approx(0.22640, abs=5e-6)
    assert unit_row_riemannian_factor(0.05) == pytest.approx(1.0 / math.cosh(math.sqrt(0.05)) ** 4 / 4,
                                                             rel=1e-14)


def batch(seed=0, B=8):
    rng = np.random.default_rng(seed)
    face = rng.standard_normal((B, SMALL["face_dim"]))
    voice = rng.standard_normal((B, SMALL["voice_dim"]))
    return face, voice, np.array([0, 1, 2, 0, 1, 2, 0, 1])[:B]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
@pytest.mark.parametrize("riemannian_grad", [True, False])
@pytest.mark.parametrize("curvature,temperature", [(0.05, 0.07), (0.5, 0.2)])
def test_hyperbolic_alignment_is_rescaled_euclidean(variant, riemannian_grad, curvature, temperature):
    cfg_h = pn.Config(**SMALL, **variant, alignment="hyperbolic", curvature=curvature,
                      temperature=temperature, riemannian_grad=riemannian_grad, dropout=0.4)
    cfg_e = euclidean_equivalent(cfg_h)
    params, buffers = pn.init_params(cfg_h, seed=1, dtype=np.float64)
    face, voice, labels = batch()
    loss_h, terms_h, grads_h, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg_h,
                                                    rng=np.random.default_rng(3))
    loss_e, terms_e, grads_e, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg_e,
                                                    rng=np.random.default_rng(3))
    # the alignment loss itself is the same number; the other terms do not see it
    for name in ("align", "opl", "ce"):
        assert abs(float(terms_h[name]) - float(terms_e[name])) < EQUIVALENCE_TOL * max(1.0, abs(float(terms_h[name])))
    # the total differs only by the loss weight the Riemannian factor moved into α₁
    a1 = cfg_h.loss_weights[0]
    expected_gap = (a1 - cfg_e.loss_weights[0]) * float(terms_h["align"])
    assert abs(float(loss_h) - float(loss_e) - expected_gap) < EQUIVALENCE_TOL
    # every gradient, normwise against the largest gradient of the model
    assert grads_h.keys() == grads_e.keys()
    scale = max(np.abs(g).max() for g in grads_h.values())
    for name in grads_h:
        err = np.abs(grads_h[name] - grads_e[name]).max() / scale
        assert err < EQUIVALENCE_TOL, f"{name}: {err:.1e}"
        own = np.abs(grads_h[name]).max()
        if own > 1e-8 * scale:      # not a pre-BatchNorm bias (zero up to rounding, §2)
            assert np.abs(grads_h[name] - grads_e[name]).max() / own < EQUIVALENCE_TOL, name


def test_a_different_temperature_is_not_equivalent():
    """The test can fail: keep τ instead of τ/ρ² and the alignment gradients differ."""
    cfg_h = pn.Config(**SMALL, alignment="hyperbolic", riemannian_grad=False, dropout=0.0)
    cfg_e = pn.Config(**SMALL, alignment="euclidean", dropout=0.0)
    params, buffers = pn.init_params(cfg_h, seed=1, dtype=np.float64)
    face, voice, labels = batch()
    _, terms_h, grads_h, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg_h)
    _, terms_e, grads_e, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg_e)
    assert abs(float(terms_h["align"]) - float(terms_e["align"])) > 1e-6
    w = "face_branch.fc1.4.weight"
    assert np.abs(grads_h[w] - grads_e[w]).max() > 1e-6 * np.abs(grads_h[w]).max()
