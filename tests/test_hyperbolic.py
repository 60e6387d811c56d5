"""expmap0, projection and the Riemannian scaling: gradients, clamps, formulas."""
import numpy as np
import pytest

from paeff_np import check_layer
from paeff_np.backend import to_host
from paeff_np.hyperbolic import (MIN_NORM, TANH_ARG_MAX, ball_radius, expmap0_backward,
                                 expmap0_forward, project_backward, project_forward,
                                 riemannian_scale_backward, riemannian_scale_forward,
                                 to_ball_backward, to_ball_forward)

C = 0.05


def _check_expmap0(u):
    check_layer(expmap0_forward, expmap0_backward, [u], settings=dict(c=C))


def test_expmap0_gradient(rand):
    _check_expmap0(rand(6, 5))


def test_expmap0_gradient_with_tanh_clamp_active(rand, xp):
    """‖u‖ > 15/√c: tanh's argument is clamped, s(n) = tanh(15)/(√c n)."""
    u = rand(4, 5)
    u = u / xp.sqrt((u * u).sum(1, keepdims=True)) * (1.5 * TANH_ARG_MAX / np.sqrt(C))
    _, cache = expmap0_forward(u, C)
    assert not bool(cache.tanh_active.any())   # the clamp is active on every row
    assert bool(cache.norm_active.all())
    _check_expmap0(u)


def test_expmap0_formula_and_zero_row(rand, xp):
    u = rand(4, 3)
    u[2] = 0.0
    y, cache = expmap0_forward(u, C)
    un = np.asarray(to_host(u))
    n = np.linalg.norm(un, axis=1, keepdims=True)
    expected = np.tanh(np.sqrt(C) * n) * un / (np.sqrt(C) * np.maximum(n, MIN_NORM))
    # CuPy tolerance: tanh ≤ 2 ulp, + × ÷ √ IEEE over 3-term norms: ≤ 8 ulp ≈ 1.8e-15
    np.testing.assert_allclose(to_host(y), expected, rtol=1e-14)
    du = expmap0_backward(xp.ones_like(u), cache)
    assert bool(xp.isfinite(du).all())
    # at the origin expmap0 is (to first order) the identity: du = s·dy with s ≈ 1
    # (s ≈ 1 − (√c·1e-5)²/3: 1e-9 bounds the approximation, not rounding)
    np.testing.assert_allclose(to_host(du[2]), 1.0, rtol=1e-9)
    assert float(xp.abs(y[2]).max()) == 0.0


def test_expmap0_stays_in_ball(xp):
    u = xp.asarray(np.array([[1e6, 0.0], [10.0, 10.0], [1e-7, 0.0]]))
    y, _ = expmap0_forward(u, C)
    norms = to_host(xp.sqrt((y * y).sum(1)))
    assert (norms <= 1 / np.sqrt(C)).all() and np.isfinite(norms).all()


@pytest.mark.parametrize("scale, rows_outside", [(0.5, 0), (1.5, 3), (3.0, 5)],
                         ids=["inside", "mixed", "outside"])    # r ≈ 4.47
def test_project_gradient(rand, xp, scale, rows_outside):
    x = rand(5, 4)
    x = x / xp.sqrt((x * x).sum(1, keepdims=True)) * scale * ball_radius(C) * xp.asarray(
        np.linspace(0.5, 1.0, 5))[:, None]
    _, cache = project_forward(x, C)
    assert (0 if cache.outside is None else int(cache.outside.sum())) == rows_outside
    check_layer(project_forward, project_backward, [x], settings=dict(c=C))


def test_project_inside_is_the_identity_both_ways(rand, xp):
    """No row outside: P returns its input and the backward its dy, no pass over B × D."""
    x = rand(6, 4) * 0.1
    y, cache = project_forward(x, C)
    assert y is x and cache.outside is None
    dy = rand(6, 4, seed=3)
    assert project_backward(dy, cache) is dy


def test_project_keeps_inside_and_clips_outside(xp):
    r = ball_radius(C)
    x = xp.asarray(np.array([[0.5 * r, 0.0], [0.0, 2.0 * r], [0.0, 0.0]]))
    y, _ = project_forward(x, C)
    y = to_host(y)
    # CuPy tolerance: only IEEE-exact + × ÷ √ and sums with one non-zero term: ≤ 3 half-ulps ≈ 3.3e-16
    np.testing.assert_allclose(y[0], [0.5 * r, 0.0], rtol=1e-15)
    np.testing.assert_allclose(y[1], [0.0, r], rtol=1e-15)
    assert (y[2] == 0).all()


def test_riemannian_scale_is_identity_forward_and_scales_backward(rand, xp):
    p = rand(5, 3) * 0.5
    out, scale = riemannian_scale_forward(p, C)
    assert out is p
    dp = rand(5, 3, seed=9)
    got = to_host(riemannian_scale_backward(dp, scale))
    pn = to_host(p)
    expected = to_host(dp) * ((1 - C * (pn ** 2).sum(1, keepdims=True)) ** 2 / 4)
    # CuPy tolerance: pow ≤ 2 ulp (the square), + × ÷ IEEE, 3-term sums: ≤ 6 ulp ≈ 1.3e-15
    np.testing.assert_allclose(got, expected, rtol=1e-14)


def test_to_ball_gradient_without_scaling(rand):
    """P(expmap0(e)) composed, on unit rows (as the branch outputs are) and large rows."""
    for scale in (1.0, 40.0):
        check_layer(to_ball_forward, to_ball_backward, [rand(6, 4) * scale],
                    settings=dict(c=C, riemannian_grad=False))


def test_to_ball_with_scaling_is_scaled_derivative(rand, xp):
    """With the Riemannian scaling the backward is the true backward applied to
    the scaled incoming gradient."""
    e, dp = rand(6, 4), rand(6, 4, seed=3)
    p, cache_on = to_ball_forward(e, C, riemannian_grad=True)
    _, cache_off = to_ball_forward(e, C, riemannian_grad=False)
    factor = (1 - C * (p * p).sum(1, keepdims=True)) ** 2 / 4
    # CuPy tolerance: both sides on the device, the same ops up to the factor's pow (≤ 2 ulp): ≲ 10 ulp
    np.testing.assert_allclose(to_host(to_ball_backward(dp, cache_on)),
                               to_host(to_ball_backward(dp * factor, cache_off)), rtol=1e-14)
