"""EGFF (every variant) and FOP's gated fusion: gradients and formulas."""
import numpy as np
import pytest

from paeff_np import check_layer
from paeff_np.backend import to_host
from paeff_np.fusion import (egff_backward, egff_forward, gated_fusion_backward,
                             gated_fusion_forward)
from paeff_np.layers import BatchNormState


@pytest.mark.parametrize("gate", ["product", "sum", "concat"])
@pytest.mark.parametrize("mix", ["activated", "raw"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_egff_gradient(rand, gate, mix, k):
    c_in = 2 if gate == "concat" else 1
    e_f, e_v = rand(4, 6, seed=1), rand(4, 6, seed=2)
    w, b = rand(1, c_in, k, seed=3), rand(1, seed=4)
    check_layer(egff_forward, egff_backward, [e_f, e_v, w, b], settings=dict(gate=gate, mix=mix))


def test_egff_formula_paper_and_code_mix(xp):
    """k = 1, product gate: g = σ(w·f̂v̂ + b); the two mixes of docs/spec.md §2."""
    from scipy.special import expit
    from scipy.stats import norm
    rng = np.random.default_rng(0)
    e_f, e_v = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    w, b = np.array([[[0.7]]]), np.array([-0.2])
    f_hat, v_hat = e_f * norm.cdf(e_f), e_v * norm.cdf(e_v)
    g = expit(0.7 * f_hat * v_hat - 0.2)
    for mix, (a, c) in {"activated": (f_hat, v_hat), "raw": (e_f, e_v)}.items():
        (m, ef_out, ev_out), _ = egff_forward(*(xp.asarray(t) for t in (e_f, e_v, w, b)), "product", mix)
        # CuPy tolerance: normcdf ≤ 5 ulp (f̂, v̂), exp ≤ 1 ulp (σ): ≲ 12 ulp ≈ 3e-15 before the mix's cancellation
        np.testing.assert_allclose(to_host(m), g * a + (1 - g) * c, rtol=1e-13)
        np.testing.assert_allclose(to_host(ef_out), f_hat, rtol=1e-13)
        np.testing.assert_allclose(to_host(ev_out), v_hat, rtol=1e-13)


def _gated_params(rand, D, H=7):
    """``W1, b1, bn_weight, bn_bias, W2, b2``, in the order gated_fusion_forward takes them."""
    return dict(W1=rand(H, 2 * D, seed=11), b1=rand(H, seed=12), bn_weight=rand(H, seed=13),
                bn_bias=rand(H, seed=14), W2=rand(D, H, seed=15), b2=rand(D, seed=16))


@pytest.mark.parametrize("train", [True, False])
def test_gated_fusion_gradient(rand, xp, train):
    D = 5
    p = _gated_params(rand, D)
    state = BatchNormState(rand(7, seed=17) * 0.1, xp.abs(rand(7, seed=18)) + 0.5)
    inputs = [rand(6, D, seed=1), rand(6, D, seed=2), *p.values()]
    b1 = 2 + list(p).index("b1")
    # in train mode b1 feeds a BatchNorm that removes it: its gradient is exactly zero
    check_layer(gated_fusion_forward, gated_fusion_backward, inputs,
                settings=dict(state=state, train=train))    # b1 (exactly 0 in train mode): its noise floor
    if train:
        _, _, cache = gated_fusion_forward(*inputs, state, train)
        grads = gated_fusion_backward(xp.ones((6, D)), cache)
        assert float(xp.abs(grads[b1]).max()) < 1e-14


def test_gated_fusion_formula(rand, xp):
    from scipy.special import expit
    D = 4
    p = _gated_params(rand, D)
    e_f, e_v = rand(5, D, seed=1), rand(5, D, seed=2)
    state = BatchNormState(xp.zeros(7), xp.ones(7))
    (m, f_t, v_t), _, _ = gated_fusion_forward(e_f, e_v, *p.values(), state, train=False)
    h = {k: to_host(v) for k, v in p.items()}
    x = np.concatenate([to_host(e_f), to_host(e_v)], 1)
    bn = (x @ h["W1"].T + h["b1"]) / np.sqrt(1 + 1e-5) * h["bn_weight"] + h["bn_bias"]
    att = expit(np.maximum(bn, 0) @ h["W2"].T + h["b2"])
    expected = att * np.tanh(to_host(e_f)) + (1 - att) * np.tanh(to_host(e_v))
    # CuPy tolerance: cuBLAS products of ≤ 8 terms (FMA, another order), exp ≤ 1 ulp, tanh ≤ 2 ulp: ≲ 1e-14
    np.testing.assert_allclose(to_host(m), expected, rtol=1e-12)
    # CuPy tolerance: CUDA's tanh ≤ 2 ulp + NumPy's ≤ 1 ulp = 6.7e-16
    np.testing.assert_allclose(to_host(f_t), np.tanh(to_host(e_f)), rtol=1e-14)


@pytest.mark.parametrize("setting", [dict(gate="max"), dict(mix="activate")])
def test_egff_refuses_an_unknown_gate_or_mix(setting):
    """A misspelt mix would otherwise run as "raw" without a word."""
    e = np.ones((2, 4))
    with pytest.raises(ValueError, match="egff (gate|mix) must be one of"):
        egff_forward(e, e, np.ones((1, 1, 1)), np.zeros(1), **setting)
