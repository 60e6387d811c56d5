"""The three losses: gradients, guards, extreme logits."""
import numpy as np
import pytest

from paeff_np import check_layer
from paeff_np.backend import to_host
from paeff_np.layers import l2_normalize_backward
from paeff_np import losses
from paeff_np.losses import (orthogonal_projection_backward, orthogonal_projection_forward,
                             same_label_pairs, same_label_pairs_plain, softmax_cross_entropy_backward, softmax_cross_entropy_forward,
                             symmetric_cross_entropy_backward, symmetric_cross_entropy_forward,
                             symmetric_cross_entropy_from_logits_backward,
                             symmetric_cross_entropy_from_logits_forward)


def test_softmax_cross_entropy_gradient(rand, xp):
    s, y = rand(6, 4), xp.asarray([0, 3, 1, 1, 2, 0])
    check_layer(softmax_cross_entropy_forward, softmax_cross_entropy_backward, [s],
                settings=dict(y=y))


def test_softmax_cross_entropy_value(xp):
    s = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    y = np.array([2, 1])
    expected = -np.mean([s[i, y[i]] - np.log(np.exp(s[i]).sum()) for i in range(2)])
    loss, _ = softmax_cross_entropy_forward(xp.asarray(s), xp.asarray(y))
    # CuPy tolerance: exp/log ≤ 1 ulp over 3 terms of values ≈ 1–3: ≲ 10 ulp ≈ 2e-15
    assert abs(float(loss) - expected) < 1e-14


def test_softmax_cross_entropy_extreme_logits(xp):
    s = xp.asarray(np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]]))
    loss, cache = softmax_cross_entropy_forward(s, xp.asarray([1, 1]))
    ds = to_host(softmax_cross_entropy_backward(1.0, cache))
    assert float(loss) == pytest.approx(1e4)              # row 0: 2e4 wrong, row 1: 0
    # CuPy tolerance: exact: exp(0) = 1 and exp(−1e4) = 0 are exact special values on CUDA too
    np.testing.assert_allclose(ds, [[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], atol=1e-300)


def test_symmetric_cross_entropy_gradient(rand):
    a, b = rand(5, 3, seed=1), rand(5, 3, seed=2)
    check_layer(symmetric_cross_entropy_forward, symmetric_cross_entropy_backward, [a, b],
                settings=dict(temperature=0.07))


def test_symmetric_cross_entropy_value(xp):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    S = a @ b.T / 0.5
    ce = lambda M: -np.mean(np.diag(M) - np.log(np.exp(M).sum(1)))
    loss, _ = symmetric_cross_entropy_forward(xp.asarray(a), xp.asarray(b), 0.5)
    # CuPy tolerance: exp/log ≤ 1 ulp, cuBLAS 3-term products, 4-term sums: ≲ 20 ulp of values ≈ 1 (4.4e-15)
    assert abs(float(loss) - 0.5 * (ce(S) + ce(S.T))) < 1e-14


def symmetric_ce_reference(S):
    """The CLIP loss and dS in float64 on the host, each softmax shifted by its own max."""
    S = np.asarray(S, dtype=np.float64)
    n = len(S)
    log_rows = S - S.max(1, keepdims=True)
    log_rows -= np.log(np.exp(log_rows).sum(1, keepdims=True))
    log_cols = S - S.max(0, keepdims=True)
    log_cols -= np.log(np.exp(log_cols).sum(0, keepdims=True))
    loss = -0.5 * (np.diag(log_rows).mean() + np.diag(log_cols).mean())
    return loss, (np.exp(log_rows) + np.exp(log_cols) - 2 * np.eye(n)) / (2 * n)


def test_symmetric_ce_one_shift_equals_two(rand, xp, monkeypatch):
    """Logits within ``shared_shift_spread`` take one exponential; forcing the
    two-shift path gives the same loss and dS to rounding. (CuPy always takes the
    two shifts, in its own cache: the values are what it is held to.)"""
    S = rand(7, 7, seed=3, scale=3.0)
    loss_one, cache_one = symmetric_cross_entropy_from_logits_forward(S)
    assert xp is not np or cache_one.exp_cols is cache_one.exp_rows
    dS_one = symmetric_cross_entropy_from_logits_backward(0.7, cache_one)
    monkeypatch.setattr(losses, "shared_shift_spread", lambda dtype: -1.0)
    loss_two, cache_two = symmetric_cross_entropy_from_logits_forward(S)
    assert xp is not np or cache_two.exp_cols is not cache_two.exp_rows
    dS_two = symmetric_cross_entropy_from_logits_backward(0.7, cache_two)
    # CuPy tolerance: exp/log within 1–2 ulp on CUDA; both paths sum 7 terms ≈ 1e-15
    np.testing.assert_allclose(float(loss_one), float(loss_two), rtol=1e-14)
    np.testing.assert_allclose(to_host(dS_one), to_host(dS_two), rtol=1e-13, atol=1e-17)
    ref_loss, ref_dS = symmetric_ce_reference(to_host(S))
    np.testing.assert_allclose(float(loss_one), ref_loss, rtol=1e-14)
    np.testing.assert_allclose(to_host(dS_one), 0.7 * ref_dS, rtol=1e-13, atol=1e-17)


@pytest.mark.parametrize("dtype, offset", [(np.float64, 800.0), (np.float32, 100.0)])
def test_symmetric_ce_wide_logits_take_two_shifts(xp, dtype, offset):
    """One row far above the rest (``offset`` > ``shared_shift_spread``): under
    the one shift M, the other rows' sums would underflow. The guard takes two
    shifts and the loss stays exact."""
    S = np.random.default_rng(4).standard_normal((6, 6))
    S[2] += offset
    assert offset > losses.shared_shift_spread(dtype)
    loss, cache = symmetric_cross_entropy_from_logits_forward(xp.asarray(S.astype(dtype)))
    assert xp is not np or cache.exp_cols is not cache.exp_rows
    ref_loss, ref_dS = symmetric_ce_reference(S.astype(dtype))
    rtol = 1e-13 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(float(loss), ref_loss, rtol=rtol)
    dS = to_host(symmetric_cross_entropy_from_logits_backward(1.0, cache))
    np.testing.assert_allclose(dS, ref_dS, rtol=rtol, atol=rtol * 1e-3)


def test_symmetric_ce_wide_logits_would_fail_with_one_shift(monkeypatch):
    """The guard matters: forced to one shift, float32 logits 100 apart lose rows to underflow."""
    S = np.random.default_rng(4).standard_normal((6, 6))
    S[2] += 100.0
    monkeypatch.setattr(losses, "shared_shift_spread", lambda dtype: np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss, _ = symmetric_cross_entropy_from_logits_forward(S.astype(np.float32))
    ref_loss, _ = symmetric_ce_reference(S)
    assert not abs(float(loss) - ref_loss) < 1e-5 * abs(ref_loss)


def test_symmetric_ce_wide_logits_gradient(xp):
    S = np.random.default_rng(5).standard_normal((5, 5))
    S[:, 1] -= 900.0                    # a column far below: two shifts in float64 too
    check_layer(symmetric_cross_entropy_from_logits_forward,
                symmetric_cross_entropy_from_logits_backward, [xp.asarray(S)])


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 0], [0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1]])
def test_orthogonal_projection_gradient(rand, xp, labels):
    """Mixed labels; no positive pair (all distinct); no negative pair (all equal)."""
    z, y = rand(6, 4), xp.asarray(labels)
    check_layer(orthogonal_projection_forward, orthogonal_projection_backward, [z],
                settings=dict(y=y, gamma=0.7))


def test_orthogonal_projection_value_and_guards(xp):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 3))
    y = np.array([0, 0, 1, 2, 1])
    zh = z / np.linalg.norm(z, axis=1, keepdims=True)
    G = zh @ zh.T
    same = y[:, None] == y[None, :]
    pos_mask, neg_mask = same & ~np.eye(5, dtype=bool), ~same
    pos = (G * pos_mask).sum() / (pos_mask.sum() + 1e-6)
    neg = np.abs(G * neg_mask).sum() / (neg_mask.sum() + 1e-6)
    loss, _ = orthogonal_projection_forward(xp.asarray(z), xp.asarray(y), 0.7)
    # CuPy tolerance: IEEE + × ÷ √, 3-term products and 25-term sums of |G| ≤ 1: ≲ 30 ulp ≈ 7e-15
    assert abs(float(loss) - (1 - pos + 0.7 * neg)) < 1e-14
    # no positive pair: pos = 0 exactly (0/1e-6), the loss stays finite
    loss, cache = orthogonal_projection_forward(xp.asarray(z), xp.arange(5), 0.7)
    negs = np.abs(G * ~np.eye(5, dtype=bool)).sum() / (20 + 1e-6)
    assert abs(float(loss) - (1 + 0.7 * negs)) < 1e-14
    assert bool(xp.isfinite(orthogonal_projection_backward(1.0, cache)).all())


@pytest.mark.parametrize("labels", [[3], [0, 0, 0, 0], [0, 1, 2, 3], [5, 1, 5, 5, 2, 1, 0, 5],
                                    list(np.random.default_rng(0).integers(0, 40, 300))])
def test_same_label_pairs_are_the_entries_of_the_mask(xp, labels):
    """Every (i, j), i ≠ j, y_i = y_j exactly once, whatever the order of the
    labels: the fast form and the plain one list the same pairs."""
    y = np.asarray(labels)
    mask = (y[:, None] == y[None, :]) & ~np.eye(len(y), dtype=bool)
    expected = sorted(zip(*(a.tolist() for a in np.nonzero(mask))))
    for pairs in (same_label_pairs, same_label_pairs_plain):
        i, j = pairs(xp.asarray(y))
        assert sorted(zip(to_host(i).tolist(), to_host(j).tolist())) == expected, pairs.__name__


def test_opl_gradient_bit_identical_to_the_masked_form():
    """dG from the pair list equals the masked formula of the docstring, entry by entry."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((64, 8)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    _, cache = orthogonal_projection_forward(z, y, 0.7)
    G, w_pos, w_neg = cache.G, cache.w_pos, cache.w_neg
    same = y[:, None] == y[None, :]
    m_pos, m_neg = same & ~np.eye(64, dtype=bool), ~same
    dG = np.sign(G) * m_neg * (0.7 * w_neg) - w_pos * m_pos
    expected = 0.35 * l2_normalize_backward(2.0 * (dG.astype(np.float32) @ cache.zhat), cache.normalize)
    np.testing.assert_array_equal(orthogonal_projection_backward(0.35, cache), expected)
