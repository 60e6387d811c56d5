"""Gradient checks of every layer in paeff_np.layers, plus their guards."""
import math

import numpy as np
import pytest

from conftest import TOL
from paeff_np import check_layer
from paeff_np.backend import default_rng, to_host
from paeff_np.layers import (NORMAL_CDF_SERIES, BatchNormState, batchnorm_backward, batchnorm_forward, conv1d_backward,
                             conv1d_forward, dropout_backward, dropout_forward,
                             gelu_backward, gelu_forward, l2_normalize_backward,
                             l2_normalize_forward, linear_backward, linear_forward, normal_cdf,
                             relu_backward, relu_forward, sigmoid_backward, sigmoid_forward,
                             tanh_backward, tanh_forward)

# CuPy tolerance: the numeric gradient's rounding noise is ~k·ε/h with h = 1e-5, k ≤ 5 ulp
# (CUDA's normcdf; exp/log 1, tanh/pow 2): ≈ 1e-10, a thousand times below TOL.


def test_linear(rand):
    x, W, b = rand(5, 4, seed=1), rand(3, 4, seed=2), rand(3, seed=3)
    check_layer(linear_forward, linear_backward, [x, W, b])


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm(rand, xp, train):
    x, g, b = rand(6, 4, seed=1, scale=3.0) + 1.0, rand(4, seed=2), rand(4, seed=3)
    state = BatchNormState(rand(4, seed=4), xp.abs(rand(4, seed=5)) + 0.5)
    check_layer(batchnorm_forward, batchnorm_backward, [x, g, b],
                settings=dict(state=state, train=train))


def test_batchnorm_running_statistics_over_steps(xp):
    """Several train steps, then eval, against a plain transcription of docs/spec.md §2."""
    rng = np.random.default_rng(0)
    D = 5
    gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
    state = BatchNormState(xp.zeros(D), xp.ones(D))
    ref_mean, ref_var = np.zeros(D), np.ones(D)
    for step in range(7):
        x = rng.standard_normal((8 + step, D)) * (step + 1) + step
        y, state, _ = batchnorm_forward(
            xp.asarray(x), xp.asarray(gamma), xp.asarray(beta), state, train=True)
        expected = gamma * (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) + beta
        # CuPy tolerance: + × ÷ √ are IEEE-exact on CUDA; the means/variances over ≤ 14 rows are summed
        # in another order (≲ 14 ulp ≈ 3e-15, × the ratio |x|/σ ≈ 10): 1e-12 leaves ≥ 30×
        np.testing.assert_allclose(to_host(y), expected, rtol=1e-12, atol=1e-12)
        ref_mean = 0.9 * ref_mean + 0.1 * x.mean(0)
        ref_var = 0.9 * ref_var + 0.1 * x.var(0, ddof=1)
    # CuPy tolerance: 7 moving averages of sums over ≤ 14 rows in another order: ≲ 100 ulp ≈ 2e-14
    np.testing.assert_allclose(to_host(state.running_mean), ref_mean, rtol=1e-13)
    np.testing.assert_allclose(to_host(state.running_var), ref_var, rtol=1e-13)
    x = rng.standard_normal((3, D))
    y, new_state, _ = batchnorm_forward(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta),
                                        state, train=False)
    np.testing.assert_allclose(to_host(y), gamma * (x - ref_mean) / np.sqrt(ref_var + 1e-5) + beta,
                               rtol=1e-12)
    # eval leaves the statistics alone
    assert new_state.running_mean is state.running_mean and new_state.running_var is state.running_var


def test_relu(rand):
    check_layer(relu_forward, relu_backward, [rand(6, 5)])


def test_dropout(rand, xp):
    x = rand(50, 40)
    # the same seed at every call: the same mask, so the check is deterministic
    fwd = lambda x: dropout_forward(x, 0.4, default_rng(7, xp))
    check_layer(fwd, dropout_backward, [x[:4, :5]])
    y, mask = dropout_forward(x, 0.4, default_rng(7, xp))
    kept = to_host(mask) > 0
    assert 0.5 < kept.mean() < 0.7                                       # about 1 − p kept
    np.testing.assert_allclose(to_host(y)[kept], to_host(x)[kept] / 0.6)  # inverted scaling
    assert (to_host(y)[~kept] == 0).all()
    assert dropout_forward(x, 0.0, None)[0] is x
    with pytest.raises(ValueError):
        dropout_forward(x, 0.4, None)


def test_l2_normalize(rand, xp):
    check_layer(l2_normalize_forward, l2_normalize_backward, [rand(5, 4)])
    e, _ = l2_normalize_forward(rand(5, 4))
    # CuPy tolerance: IEEE-exact + × ÷ √ and 4-term sums: ≤ 8 ulp ≈ 1.8e-15
    np.testing.assert_allclose(to_host((e * e).sum(1)), 1.0, rtol=1e-14)


def test_l2_normalize_zero_row_is_guarded(rand, xp):
    x = rand(3, 4)
    x[1] = 0.0
    e, cache = l2_normalize_forward(x)
    dx = l2_normalize_backward(xp.ones_like(x), cache)
    assert bool(xp.isfinite(e).all()) and bool(xp.isfinite(dx).all())
    assert float(xp.abs(e[1]).max()) == 0.0
    # with the clamp active the map is x/1e-12, a constant scaling
    np.testing.assert_allclose(to_host(dx[1]), 1e12)


def test_gelu(rand, xp):
    check_layer(gelu_forward, gelu_backward, [rand(6, 5, scale=2.0)])
    from scipy.stats import norm
    x = np.linspace(-6, 6, 25)
    # CuPy tolerance: CUDA's normcdf ≤ 5 ulp over its full range, then × (IEEE): ≤ 6 ulp ≈ 1.4e-15,
    # plus the reference's own few ulp; rtol 1e-13 ≈ 450 ulp
    np.testing.assert_allclose(to_host(gelu_forward(xp.asarray(x))[0]), x * norm.cdf(x), rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("wrong", ["scaled by 1.001", "without the x pdf(x) term"])
def test_gradient_checker_catches_a_wrong_gelu_backward(rand, xp, wrong):
    """Chainer's check_backward tested on itself: a backward that is slightly
    off, or misses a term of GELU' = Φ + x φ, is reported far above TOL."""
    def wrong_backward(dy, cache):
        if wrong == "scaled by 1.001":
            return 1.001 * gelu_backward(dy, cache)
        return dy * cache.cdf
    x = rand(6, 5, scale=2.0)
    with pytest.raises(AssertionError, match="input 0, shape"):
        check_layer(gelu_forward, wrong_backward, [x])
    assert check_layer(gelu_forward, wrong_backward, [x], raises=False).errors[0] > 1e-4


def test_check_layer_no_grads_skips_only_those_inputs(rand):
    def backward_with_zero_db(dy, cache):
        dx, dW, db = linear_backward(dy, cache)
        return dx, dW, 0.0 * db

    x, W, b = rand(5, 4, seed=1), rand(3, 4, seed=2), rand(3, seed=3)
    report = check_layer(linear_forward, backward_with_zero_db, [x, W, b], raises=False)
    errors = report.errors
    assert errors[2] == 1.0 and max(errors[0], errors[1]) < TOL     # the zero db is caught
    report = check_layer(linear_forward, backward_with_zero_db, [x, W, b], no_grads=(2,))
    assert set(report.errors) == {0, 1} and report.ok


@pytest.mark.parametrize("pair", [(sigmoid_forward, sigmoid_backward), (tanh_forward, tanh_backward)])
def test_sigmoid_tanh(rand, pair):
    check_layer(*pair, [rand(6, 5, scale=2.0)])


def test_sigmoid_is_finite_at_extremes(xp):
    s, _ = sigmoid_forward(xp.asarray([-1e4, -40.0, 0.0, 40.0, 1e4]))
    # CuPy tolerance: exp ≤ 1 ulp, 1/(1 + e) IEEE: ≤ 3 ulp; 0, 0.5 and 1 come from exact special values
    # (exp(0) = 1, exp(−1e4) = 0), hence atol 1e-300
    np.testing.assert_allclose(to_host(s), [0.0, 1 / (1 + np.exp(40.0)), 0.5, 1 / (1 + np.exp(-40.0)), 1.0],
                               rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("channels,k", [(1, 1), (1, 3), (1, 5), (2, 1), (2, 3), (2, 5)])
def test_conv1d(rand, channels, k):
    x, w, b = rand(4, channels, 7, seed=1), rand(1, channels, k, seed=2), rand(1, seed=3)
    check_layer(conv1d_forward, conv1d_backward, [x, w, b])


def test_conv1d_matches_direct_sum(xp):
    """The cross-correlation of docs/spec.md §2, written out with explicit zero padding."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((3, 2, 6)), rng.standard_normal((1, 2, 5)), rng.standard_normal(1)
    y, _ = conv1d_forward(xp.asarray(x), xp.asarray(w), xp.asarray(b))
    expected = np.full((3, 6), b[0])
    for n in range(3):
        for d in range(6):
            for c in range(2):
                for j in range(5):
                    i = d + j - 2
                    if 0 <= i < 6:
                        expected[n, d] += w[0, c, j] * x[n, c, i]
    # CuPy tolerance: ≤ 10 IEEE products summed in another order: ≤ 10 ulp × the sum's cancellation
    np.testing.assert_allclose(to_host(y), expected, rtol=1e-13)


@pytest.mark.parametrize("module", ["layers", "hyperbolic", "poincare", "losses", "fusion", "model"])
def test_backwards_read_caches_by_field_name(module):
    """The protocol of ``layers.py``: a cache is read by field name
    (``cache.x``), never unpacked by position (``x, W = cache``), so that a
    field added to a cache cannot shift the others."""
    import ast
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "paeff_np", module + ".py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    unpacked = [f"line {node.lineno}" for node in ast.walk(tree)
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name)
                and "cache" in node.value.id and isinstance(node.targets[0], ast.Tuple)]
    assert not unpacked, f"{module}.py unpacks a cache by position at {', '.join(unpacked)}"


# --- Φ, the normal CDF of the exact GELU ---

def _ulp_error(y, reference):
    return np.abs(y.astype(np.float64) - reference) / np.spacing(np.abs(y)).astype(np.float64)


def test_normal_cdf_series_on_float32_unit_inputs(monkeypatch):
    """float32 inputs within ±1 take the nine-term series, not SciPy: within
    0.51 ulp of the float64 Φ, and SciPy's float32 value at ≥ 99.9% of a grid."""
    import scipy.special
    grid = np.linspace(-1.0, 1.0, 200_001).astype(np.float32)
    reference = scipy.special.ndtr(grid.astype(np.float64))
    scipy_float32 = scipy.special.ndtr(grid)

    def refuse(x):
        raise AssertionError("SciPy's ndtr was called for float32 inputs within ±1")
    monkeypatch.setattr(scipy.special, "ndtr", refuse)
    y = normal_cdf(grid)
    assert y.dtype == np.float32
    assert _ulp_error(y, reference).max() < 0.51
    assert (y == scipy_float32).mean() > 0.999
    assert normal_cdf(np.float32([1.0, -1.0, 0.0]))[2] == 0.5


def test_normal_cdf_series_truncation_bound():
    """The first term the series leaves out bounds its error (the docstring's 1.1e-10)."""
    n = len(NORMAL_CDF_SERIES)
    first_left_out = 1 / (math.sqrt(2 * math.pi) * 2 ** n * math.factorial(n) * (2 * n + 1))
    assert first_left_out < 1.2e-10
    assert first_left_out < 0.02 * np.spacing(np.float32(0.158)) / 2


@pytest.mark.parametrize("x", [np.float32([-1.5, 0.2, 3.0]), np.float32([np.nan, 0.1]),
                               np.linspace(-1, 1, 101), np.float64([-40.0, 0.5])],
                         ids=["float32-beyond-1", "float32-nan", "float64-unit", "float64-tail"])
def test_normal_cdf_outside_the_series_is_scipy(x):
    """Anything else (a float32 input beyond ±1, NaN, float64) is SciPy's ndtr, bit for bit."""
    import scipy.special
    np.testing.assert_array_equal(normal_cdf(x), scipy.special.ndtr(x))
