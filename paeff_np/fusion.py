"""The two fusion modules: EGFF (PAEFF, every ablation variant) and the gated
fusion of FOP (the baseline). Each takes the normalised branch outputs
``e_f``, ``e_v`` (B × D) and returns the fused ``m`` and the two evaluation
embeddings. Derivations: ``docs/math.md``.
"""
from .backend import get_array_module
from .layers import (batchnorm_backward, batchnorm_forward, conv1d_backward,
                     conv1d_forward, gelu_backward, gelu_forward, linear_backward,
                     linear_forward, relu_backward, relu_forward, sigmoid_backward,
                     sigmoid_forward, tanh_backward, tanh_forward)

EGFF_GATES = ("product", "sum", "concat")
EGFF_MIXES = ("activated", "raw")


def _mix_forward(g, a, b):
    """``m = g ⊙ a + (1 − g) ⊙ b``."""
    return g * a + (1.0 - g) * b


def _mix_backward(dm, g, a, b):
    """``dg = dm ⊙ (a − b)``, ``da = dm ⊙ g``, ``db = dm ⊙ (1 − g)``."""
    return dm * (a - b), dm * g, dm * (1.0 - g)


def egff_forward(e_f, e_v, conv_w, conv_b, gate="product", mix="activated"):
    """Enhanced gated feature fusion.

    ``f̂ = GELU(e_f)``, ``v̂ = GELU(e_v)``;
    gate input ``a`` = ``f̂ ⊙ v̂`` (product), ``f̂ + v̂`` (sum) or [f̂; v̂] (concat, 2 channels);
    ``g = σ(conv(a))``;
    ``m = g ⊙ f̂ + (1 − g) ⊙ v̂`` (mix "activated", paper eq. 2) or
    ``m = g ⊙ e_f + (1 − g) ⊙ e_v`` (mix "raw", the authors' code).
    Returns ``(m, f̂, v̂, cache)``; ``f̂, v̂`` are the evaluation embeddings.
    """
    xp = get_array_module(e_f)
    f_hat, cache_gelu_f = gelu_forward(e_f)
    v_hat, cache_gelu_v = gelu_forward(e_v)
    if gate == "product":
        a = (f_hat * v_hat)[:, None, :]
    elif gate == "sum":
        a = (f_hat + v_hat)[:, None, :]
    elif gate == "concat":
        a = xp.stack([f_hat, v_hat], axis=1)
    else:
        raise ValueError(f"egff gate must be one of {EGFF_GATES}, got {gate!r}")
    u, cache_conv = conv1d_forward(a, conv_w, conv_b)
    g, cache_sigmoid = sigmoid_forward(u)
    mixed = (f_hat, v_hat) if mix == "activated" else (e_f, e_v)
    m = _mix_forward(g, *mixed)
    cache = (gate, mix, f_hat, v_hat, g, mixed,
             cache_gelu_f, cache_gelu_v, cache_conv, cache_sigmoid)
    return m, f_hat, v_hat, cache


def egff_backward(dm, cache):
    """The mirror of ``egff_forward``: returns ``de_f, de_v, dconv_w, dconv_b``."""
    (gate, mix, f_hat, v_hat, g, mixed,
     cache_gelu_f, cache_gelu_v, cache_conv, cache_sigmoid) = cache
    dg, dmix_f, dmix_v = _mix_backward(dm, g, *mixed)
    du = sigmoid_backward(dg, cache_sigmoid)
    da, dconv_w, dconv_b = conv1d_backward(du, cache_conv)
    if gate == "product":
        df_hat, dv_hat = da[:, 0] * v_hat, da[:, 0] * f_hat
    elif gate == "sum":
        df_hat, dv_hat = da[:, 0], da[:, 0]
    else:  # concat
        df_hat, dv_hat = da[:, 0], da[:, 1]
    if mix == "activated":
        df_hat, dv_hat = df_hat + dmix_f, dv_hat + dmix_v
    de_f = gelu_backward(df_hat, cache_gelu_f)
    de_v = gelu_backward(dv_hat, cache_gelu_v)
    if mix == "raw":
        de_f, de_v = de_f + dmix_f, de_v + dmix_v
    return de_f, de_v, dconv_w, dconv_b


def gated_fusion_forward(e_f, e_v, p, running, train):
    """FOP's gated fusion:
    ``att = σ(W₂ ReLU(BN(W₁ [e_f, e_v] + b₁)) + b₂)``, ``f̃ = tanh(e_f)``,
    ``ṽ = tanh(e_v)``, ``m = att ⊙ f̃ + (1 − att) ⊙ ṽ``.

    ``p``: dict with ``W1, b1, bn_weight, bn_bias, W2, b2``; ``running``:
    ``(running_mean, running_var)`` of the BatchNorm. Returns
    ``(m, f̃, ṽ, new_running, cache)``.
    """
    xp = get_array_module(e_f)
    x = xp.concatenate([e_f, e_v], axis=1)
    h1, cache_lin1 = linear_forward(x, p["W1"], p["b1"])
    h2, new_running, cache_bn = batchnorm_forward(h1, p["bn_weight"], p["bn_bias"],
                                                  *running, train=train)
    h3, cache_relu = relu_forward(h2)
    h4, cache_lin2 = linear_forward(h3, p["W2"], p["b2"])
    att, cache_sigmoid = sigmoid_forward(h4)
    f_tilde, cache_tanh_f = tanh_forward(e_f)
    v_tilde, cache_tanh_v = tanh_forward(e_v)
    m = _mix_forward(att, f_tilde, v_tilde)
    cache = (att, f_tilde, v_tilde, cache_lin1, cache_bn, cache_relu, cache_lin2,
             cache_sigmoid, cache_tanh_f, cache_tanh_v)
    return m, f_tilde, v_tilde, new_running, cache


def gated_fusion_backward(dm, cache):
    """The mirror of ``gated_fusion_forward``: returns ``de_f, de_v, grads``
    with ``grads`` keyed like the parameter dict ``p``."""
    (att, f_tilde, v_tilde, cache_lin1, cache_bn, cache_relu, cache_lin2,
     cache_sigmoid, cache_tanh_f, cache_tanh_v) = cache
    datt, df_tilde, dv_tilde = _mix_backward(dm, att, f_tilde, v_tilde)
    de_f = tanh_backward(df_tilde, cache_tanh_f)
    de_v = tanh_backward(dv_tilde, cache_tanh_v)
    dh4 = sigmoid_backward(datt, cache_sigmoid)
    dh3, dW2, db2 = linear_backward(dh4, cache_lin2)
    dh2 = relu_backward(dh3, cache_relu)
    dh1, dbn_weight, dbn_bias = batchnorm_backward(dh2, cache_bn)
    dx, dW1, db1 = linear_backward(dh1, cache_lin1)
    D = de_f.shape[1]
    grads = dict(W1=dW1, b1=db1, bn_weight=dbn_weight, bn_bias=dbn_bias, W2=dW2, b2=db2)
    return de_f + dx[:, :D], de_v + dx[:, D:], grads
