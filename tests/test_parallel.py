"""Row blocks: they cover the rows once, in order; threads change no bit; the ops
that use them give the same values in blocks as in one call."""
import numpy as np
import pytest

import paeff_np.parallel as parallel
from paeff_np.gradcheck import relative_error
from paeff_np.layers import gelu_backward, gelu_forward, sigmoid_backward, sigmoid_forward
from paeff_np.losses import (orthogonal_projection_backward, orthogonal_projection_forward,
                             softmax_cross_entropy_backward, softmax_cross_entropy_forward,
                             symmetric_cross_entropy_backward, symmetric_cross_entropy_forward)
from paeff_np.parallel import for_row_blocks, row_blocks


@pytest.mark.parametrize("n_rows, row_size", [(1, 7), (300, 300), (1024, 1024), (1000, 3)])
def test_row_blocks_cover_every_row_once_in_order(n_rows, row_size):
    blocks = row_blocks(n_rows, row_size)
    assert blocks[0].start == 0 and blocks[-1].stop == n_rows
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    assert all(b.stop > b.start for b in blocks)


def test_for_row_blocks_runs_every_block_and_keeps_the_order(monkeypatch):
    monkeypatch.setattr(parallel, "n_threads", lambda: 2)
    n = 2000
    out = np.zeros((n, 100))
    def fn(rows):
        out[rows] += 1.0
        return rows.start
    starts = for_row_blocks(fn, n, 100)
    assert len(starts) > 1 and starts == sorted(starts)
    np.testing.assert_array_equal(out, 1.0)       # each row written exactly once


def test_one_call_off_numpy_and_for_small_arrays():
    calls = []
    for_row_blocks(calls.append, 4096, 4096, xp=object())     # not NumPy: CuPy's path
    for_row_blocks(calls.append, 8, 8)                        # too small to pay for a thread
    assert calls == [slice(0, 4096), slice(0, 8)]


def _ops(B=300, D=7, seed=0):
    """Every op that runs in row blocks, forward and backward, at a size that
    uses several blocks (B² > MIN_ELEMENTS), and GELU beside them."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    y = rng.integers(0, 40, B)
    out = {}
    loss, cache = symmetric_cross_entropy_forward(a, b, 0.07)
    out["sce"], out["sce/da"], out["sce/db"] = loss, *symmetric_cross_entropy_backward(1.0, cache)
    loss, cache = orthogonal_projection_forward(a, y, 0.7)
    out["opl"], out["opl/dz"] = loss, orthogonal_projection_backward(1.0, cache)
    x = rng.standard_normal((B, 200)) * 3
    loss, cache = softmax_cross_entropy_forward(x, y)
    out["ce"], out["ce/ds"] = loss, softmax_cross_entropy_backward(0.35, cache)
    y, cache = gelu_forward(x)
    out["gelu"], out["gelu/dx"] = y, gelu_backward(np.ones_like(y), cache)
    s, cache = sigmoid_forward(x * 10)
    out["sigmoid"], out["sigmoid/dx"] = s, sigmoid_backward(np.ones_like(s), cache)
    return out


def test_threads_give_the_same_bits_as_blocks_in_turn(monkeypatch):
    """The blocks depend on the shape only: running them on threads changes no bit."""
    assert 300 * 300 >= parallel.MIN_ELEMENTS and len(row_blocks(300, 300)) > 1
    monkeypatch.setattr(parallel, "n_threads", lambda: 2)
    on_threads = _ops()
    monkeypatch.setattr(parallel, "n_threads", lambda: 1)
    in_turn = _ops()
    for key in in_turn:
        np.testing.assert_array_equal(on_threads[key], in_turn[key], err_msg=key)


def test_blocks_match_one_call(monkeypatch):
    """Blocks and one call differ only in the order of the sums' terms."""
    blocked = _ops()
    monkeypatch.setattr(parallel, "MIN_ELEMENTS", 1 << 40)
    whole = _ops()
    differ = 0
    for key in whole:
        assert relative_error(blocked[key], whole[key]) < 1e-14, key
        differ += not np.array_equal(blocked[key], whole[key])
    assert differ > 0           # the blocks did run: some sum came out in other bits


def test_row_threads_from_the_environment(monkeypatch):
    monkeypatch.delenv("PAEFF_ROW_THREADS", raising=False)
    assert parallel.n_threads() == 1
    monkeypatch.setenv("PAEFF_ROW_THREADS", "3")
    assert parallel.n_threads() == 3
    monkeypatch.setenv("PAEFF_ROW_THREADS", "two")
    with pytest.raises(ValueError, match="PAEFF_ROW_THREADS must be a whole number"):
        parallel.n_threads()


def test_blocked_losses_match_the_formulas(monkeypatch):
    """The losses in blocks against a direct NumPy transcription of the docstrings."""
    monkeypatch.setattr(parallel, "n_threads", lambda: 2)
    rng = np.random.default_rng(1)
    B = 300
    a, b = rng.standard_normal((B, 5)), rng.standard_normal((B, 5))
    y = rng.integers(0, 40, B)
    S = a @ b.T / 0.07
    logsm = lambda M, axis: M - M.max(axis, keepdims=True) - np.log(
        np.exp(M - M.max(axis, keepdims=True)).sum(axis, keepdims=True))
    expected = -0.5 * (np.diag(logsm(S, 1)).mean() + np.diag(logsm(S, 0)).mean())
    assert abs(float(symmetric_cross_entropy_forward(a, b, 0.07)[0]) - expected) < 1e-12
    zh = a / np.linalg.norm(a, axis=1, keepdims=True)
    G = zh @ zh.T
    same = y[:, None] == y[None, :]
    m_pos, m_neg = same & ~np.eye(B, dtype=bool), ~same
    expected = 1 - (G * m_pos).sum() / (m_pos.sum() + 1e-6) + 0.7 * np.abs(G * m_neg).sum() / (m_neg.sum() + 1e-6)
    assert abs(float(orthogonal_projection_forward(a, y, 0.7)[0]) - expected) < 1e-12


def test_adamw_update_in_blocks_gives_the_same_bits(monkeypatch):
    from paeff_np.optim import adamw_update
    rng = np.random.default_rng(2)
    state = [rng.standard_normal(200_000).astype(np.float32) for _ in range(4)]
    state[3] = np.abs(state[3])
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, bias1=0.1,
                 sqrt_bias2=0.03)
    out = {}
    for threads in (2, 1):
        monkeypatch.setattr(parallel, "n_threads", lambda: threads)
        p, g, m, v = (a.copy() for a in state)
        adamw_update(p, g, m, v, **hyper)
        out[threads] = (p, m, v)
    assert len(row_blocks(200_000, 1)) > 1
    for blocked, whole in zip(out[2], out[1]):
        np.testing.assert_array_equal(blocked, whole)


def test_the_callers_errstate_holds_in_the_threads(monkeypatch):
    """``np.errstate`` is a context variable: the blocks run in the caller's context."""
    monkeypatch.setattr(parallel, "n_threads", lambda: 2)
    x = np.full((1000, 100), 1e30, dtype=np.float32)
    with np.errstate(over="raise"):
        with pytest.raises(FloatingPointError):
            for_row_blocks(lambda rows: x[rows] * x[rows], 1000, 100)
    with np.errstate(over="ignore"):
        for_row_blocks(lambda rows: x[rows] * x[rows], 1000, 100)
