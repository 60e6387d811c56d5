"""AdamW against a plain transcription of docs/spec.md §4, and the cosine schedule."""
import math

import numpy as np
import pytest

import paeff_np as pn
from paeff_np.backend import to_host


def test_adamw_matches_formula_over_many_steps(xp):
    rng = np.random.default_rng(0)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.01
    p_ref = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    params = {k: xp.asarray(v.copy()) for k, v in p_ref.items()}
    m = {k: np.zeros_like(v) for k, v in p_ref.items()}
    v = {k: np.zeros_like(x) for k, x in p_ref.items()}
    opt = pn.AdamW(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for t in range(1, 201):
        step_lr = pn.cosine_lr(t, lr, 200)
        grads = {k: rng.standard_normal(x.shape) for k, x in p_ref.items()}
        for k in p_ref:
            g = grads[k]
            p_ref[k] = p_ref[k] * (1 - step_lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g ** 2
            m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            p_ref[k] = p_ref[k] - step_lr * m_hat / (np.sqrt(v_hat) + eps)
        opt.step(params, {k: xp.asarray(g) for k, g in grads.items()}, lr=step_lr)
    # CuPy tolerance: each step rounds differently from the transcription (FMAs in the kernel, the bias
    # corrections applied in another order), ≤ ~4 ulp of |p|; 200 steps: ≲ 800 ulp ≈ 2e-13 < 1e-12
    for k in p_ref:
        np.testing.assert_allclose(to_host(params[k]), p_ref[k], rtol=1e-12, atol=1e-14)
    assert opt.t == 200


def test_adamw_state_round_trip():
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal(5)}
    a = pn.AdamW(lr=1e-3)
    for _ in range(3):
        a.step(params, {"w": rng.standard_normal(5)})
    b = pn.AdamW()
    b.load_state_dict(*a.state_dict())
    p1, p2, g = dict(w=params["w"].copy()), dict(w=params["w"].copy()), {"w": rng.standard_normal(5)}
    a.step(p1, g)
    b.step(p2, g)
    np.testing.assert_array_equal(p1["w"], p2["w"])


@pytest.mark.parametrize("epoch", [0, 1, 7, 25, 49, 50])
def test_cosine_lr(epoch):
    base, T, eta_min = 2e-5, 50, 1e-8
    expected = eta_min + (base - eta_min) * (1 + math.cos(math.pi * epoch / T)) / 2
    assert pn.cosine_lr(epoch, base, T, eta_min=eta_min) == pytest.approx(expected, rel=1e-15)
    assert pn.cosine_lr(0, base, T) == pytest.approx(base, rel=1e-15)
    assert pn.cosine_lr(T, base, T) == pytest.approx(1e-8, rel=1e-9)
