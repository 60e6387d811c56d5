"""The two fusion modules: EGFF (PAEFF, every ablation variant) and the gated
fusion of FOP (the baseline). Each takes the normalised branch outputs
``e_f``, ``e_v`` (B × D) and returns a ``FusionOutput``: the fused ``m``, the
one output the backward takes a gradient for, and the two evaluation
embeddings (protocol: ``layers.py``). Derivations: ``docs/math.md``.
"""
from typing import Any, NamedTuple

import numpy as np

from .backend import get_array_module, kernel
from .layers import (DOT_KERNEL, INV_SQRT_2PI, BatchNormCache, Conv1dCache, GeluCache, LinearCache,
                     batchnorm_backward, batchnorm_forward, conv1d_backward, conv1d_forward,
                     gelu_backward, gelu_forward, linear_backward, linear_forward, relu_backward,
                     relu_forward, sigmoid_backward, sigmoid_forward, tanh_backward, tanh_forward)

EGFF_GATES = ("product", "sum", "concat")
EGFF_MIXES = ("activated", "raw")

# CuPy kernels (built by backend.kernel) beside the NumPy code they fuse, which stays the
# reference; tests/test_kernels.py compiles their C bodies on the CPU and compares.
MIX_KERNEL = dict(kind="elementwise", in_params="T g, T a, T b", out_params="T m",
                  body="m = g * a + (1 - g) * b;", name="paeff_mix")
"""``m = g ⊙ a + (1 − g) ⊙ b``: ``_mix_forward``."""
MIX_BACKWARD_KERNEL = dict(kind="elementwise", in_params="T dm, T g, T a, T b",
                           out_params="T dg, T da, T db",
                           body="dg = dm * (a - b); da = dm * g; db = dm * (1 - g);",
                           name="paeff_mix_backward")
"""``dg = dm ⊙ (a − b)``, ``da = dm ⊙ g``, ``db = dm ⊙ (1 − g)``: ``_mix_backward``."""


class FusionOutput(NamedTuple):
    m: Any              # B × D, the fused representation (the differentiable output)
    emb_f: Any          # B × D, the face embedding used at evaluation
    emb_v: Any          # B × D, the voice embedding used at evaluation


def _mix_forward(g, a, b):
    """``m = g ⊙ a + (1 − g) ⊙ b`` (CuPy: one kernel, ``MIX_KERNEL``)."""
    if get_array_module(g) is not np:
        return kernel(MIX_KERNEL)(g, a, b)
    return g * a + (1.0 - g) * b


def _mix_backward(dm, g, a, b):
    """``dg = dm ⊙ (a − b)``, ``da = dm ⊙ g``, ``db = dm ⊙ (1 − g)`` (CuPy: one kernel)."""
    if get_array_module(g) is not np:
        return kernel(MIX_BACKWARD_KERNEL)(dm, g, a, b)
    return dm * (a - b), dm * g, dm * (1.0 - g)


# --- EGFF ---

class EGFFCache(NamedTuple):
    gate: str
    mix: str
    f_hat: Any          # B × D, GELU(e_f)
    v_hat: Any          # B × D, GELU(e_v)
    g: Any              # B × D, the gate σ(conv(a))
    mix_f: Any          # B × D, what g weighs: f̂ (mix "activated") or e_f (mix "raw")
    mix_v: Any          # B × D, what 1 − g weighs: v̂ or e_v
    gelu_f: GeluCache
    gelu_v: GeluCache
    conv: Conv1dCache
    sigmoid: Any        # B × D, the sigmoid's output


# EGFF with a width-1 convolution (the design card's, the default) on CuPy: the whole
# forward is one kernel per element, the backward one kernel and the conv's two sums.
# The bodies are put together from the pieces below, one kernel per (gate, mix).
_EGFF_GATE_INPUT = {"product": "a = fh * vh; T u = w0 * a + b;",
                    "sum": "a = fh + vh; T u = w0 * a + b;",
                    "concat": "a = fh; T u = w0 * fh + w1 * vh + b;"}
_EGFF_GATE_GRAD = {"product": "T dfh = w0 * du * vh; T dvh = w0 * du * fh;",
                   "sum": "T dfh = w0 * du; T dvh = w0 * du;",
                   "concat": "T dfh = w0 * du; T dvh = w1 * du;"}
_EGFF_MIXED = {"activated": ("fh", "vh"), "raw": ("ef", "ev")}


def _egff_kernels(gate, mix):
    mf, mv = _EGFF_MIXED[mix]
    gelu_grad = "(exp(-0.5 * {x} * {x}) * inv_sqrt_2pi * {x} + {cdf})"
    if mix == "activated":          # the mix's gradient joins f̂'s and v̂'s before the GELU
        de = (f"dfh = dfh + dm * g; dvh = dvh + dm * (1 - g); "
              f"de_f = {gelu_grad.format(x='ef', cdf='cdf_f')} * dfh; "
              f"de_v = {gelu_grad.format(x='ev', cdf='cdf_v')} * dvh;")
    else:                           # ... or e_f's and e_v's after it
        de = (f"de_f = {gelu_grad.format(x='ef', cdf='cdf_f')} * dfh + dm * g; "
              f"de_v = {gelu_grad.format(x='ev', cdf='cdf_v')} * dvh + dm * (1 - g);")
    forward = dict(
        kind="elementwise", in_params="T ef, T ev, T w0, T w1, T b",
        out_params="T fh, T vh, T cdf_f, T cdf_v, T a, T g, T m",
        body=(f"cdf_f = normcdf(ef); cdf_v = normcdf(ev); fh = ef * cdf_f; vh = ev * cdf_v; "
              f"{_EGFF_GATE_INPUT[gate]} T t = exp(-fabs(u)); g = (u >= 0 ? 1 : t) / (1 + t); "
              f"m = g * {mf} + (1 - g) * {mv};"),
        name=f"paeff_egff_{gate}_{mix}")
    backward = dict(
        kind="elementwise",
        in_params="T dm, T g, T fh, T vh, T ef, T ev, T cdf_f, T cdf_v, T w0, T w1, T inv_sqrt_2pi",
        out_params="T de_f, T de_v, T du",
        body=(f"T dg = dm * ({mf} - {mv}); du = dg * g * (1 - g); {_EGFF_GATE_GRAD[gate]} {de}"),
        name=f"paeff_egff_{gate}_{mix}_backward")
    return forward, backward


EGFF_KERNELS = {(gate, mix): _egff_kernels(gate, mix) for gate in EGFF_GATES for mix in EGFF_MIXES}
"""``(forward, backward)`` kernel specs of a width-1 EGFF, by ``(gate, mix)``. Forward, per
element: ``Φ(e)`` and ``f̂ = e_f Φ(e_f)``, ``v̂`` (GELU), the gate input ``a`` and
``u = w·a + b`` (the conv at k = 1; concat: ``w₀f̂ + w₁v̂ + b``), ``g = σ(u)`` (as
``sigmoid_forward``), ``m``. Backward: ``_mix_backward``, ``sigmoid_backward``, the conv's
``dx = w·du``, the gate's product/sum rule and ``gelu_backward``, composed per element;
the conv's ``dw = Σ du·a`` and ``db = Σ du`` are two reductions after it."""


def _egff_width1_forward_cupy(e_f, e_v, conv_w, conv_b, gate, mix):
    """``egff_forward`` at kernel width 1 on CuPy: one kernel; the same cache."""
    xp = get_array_module(e_f)
    w1 = conv_w[0, 1, 0] if gate == "concat" else 0.0
    f_hat, v_hat, cdf_f, cdf_v, a, g, m = kernel(EGFF_KERNELS[gate, mix][0])(
        e_f, e_v, conv_w[0, 0, 0], w1, conv_b[0])
    xpad = xp.stack([f_hat, v_hat], axis=1) if gate == "concat" else a[:, None, :]
    mix_f, mix_v = (f_hat, v_hat) if mix == "activated" else (e_f, e_v)
    cache = EGFFCache(gate, mix, f_hat, v_hat, g, mix_f, mix_v, GeluCache(e_f, cdf_f),
                      GeluCache(e_v, cdf_v), Conv1dCache(xpad, conv_w, e_f.shape[1]), g)
    return FusionOutput(m, f_hat, v_hat), cache


def _egff_width1_backward_cupy(dm, cache):
    """``egff_backward`` at kernel width 1 on CuPy: one kernel, then ``dw`` (one reduction
    over the conv's input channels) and ``db``."""
    conv = cache.conv
    w1 = conv.w[0, 1, 0] if cache.gate == "concat" else 0.0
    de_f, de_v, du = kernel(EGFF_KERNELS[cache.gate, cache.mix][1])(
        dm, cache.g, cache.f_hat, cache.v_hat, cache.gelu_f.x, cache.gelu_v.x, cache.gelu_f.cdf,
        cache.gelu_v.cdf, conv.w[0, 0, 0], w1, INV_SQRT_2PI)
    dw = kernel(DOT_KERNEL)(du[:, None, :], conv.xpad, axis=(0, 2)).reshape(conv.w.shape)
    return de_f, de_v, dw, du.sum().reshape(1)


def egff_forward(e_f, e_v, conv_w, conv_b, gate="product", mix="activated"):
    """Enhanced gated feature fusion.

    ``e_f``, ``e_v``: B × D; ``conv_w``: 1 × C × k (C = 2 for the concat gate,
    else 1), ``conv_b``: (1,).
    ``f̂ = GELU(e_f)``, ``v̂ = GELU(e_v)``;
    gate input ``a`` = ``f̂ ⊙ v̂`` (product), ``f̂ + v̂`` (sum) or [f̂; v̂] (concat, 2 channels);
    ``g = σ(conv(a))``;
    ``m = g ⊙ f̂ + (1 − g) ⊙ v̂`` (mix "activated", paper eq. 2) or
    ``m = g ⊙ e_f + (1 − g) ⊙ e_v`` (mix "raw", the authors' code).
    Returns ``(FusionOutput(m, f̂, v̂), cache)``; ``f̂, v̂`` are the evaluation embeddings.

    Derivation: docs/math.md §12.
    """
    xp = get_array_module(e_f)
    if mix not in EGFF_MIXES:
        raise ValueError(f"egff mix must be one of {EGFF_MIXES}, got {mix!r}")
    if xp is not np and conv_w.shape[2] == 1 and gate in EGFF_GATES:   # CuPy: the kernels above
        return _egff_width1_forward_cupy(e_f, e_v, conv_w, conv_b, gate, mix)
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
    mix_f, mix_v = (f_hat, v_hat) if mix == "activated" else (e_f, e_v)
    m = _mix_forward(g, mix_f, mix_v)
    cache = EGFFCache(gate, mix, f_hat, v_hat, g, mix_f, mix_v,
                      cache_gelu_f, cache_gelu_v, cache_conv, cache_sigmoid)
    return FusionOutput(m, f_hat, v_hat), cache


def egff_backward(dm, cache):
    """The mirror of ``egff_forward``; ``dm``: B × D.
    Returns ``de_f, de_v, dconv_w, dconv_b``.

    Derivation: docs/math.md §12.
    """
    if get_array_module(dm) is not np and cache.conv.w.shape[2] == 1:
        return _egff_width1_backward_cupy(dm, cache)
    dg, dmix_f, dmix_v = _mix_backward(dm, cache.g, cache.mix_f, cache.mix_v)
    du = sigmoid_backward(dg, cache.sigmoid)
    da, dconv_w, dconv_b = conv1d_backward(du, cache.conv)
    if cache.gate == "product":
        df_hat, dv_hat = da[:, 0] * cache.v_hat, da[:, 0] * cache.f_hat
    elif cache.gate == "sum":
        df_hat, dv_hat = da[:, 0], da[:, 0]
    else:  # concat
        df_hat, dv_hat = da[:, 0], da[:, 1]
    if cache.mix == "activated":
        df_hat, dv_hat = df_hat + dmix_f, dv_hat + dmix_v
    de_f = gelu_backward(df_hat, cache.gelu_f)
    de_v = gelu_backward(dv_hat, cache.gelu_v)
    if cache.mix == "raw":
        de_f, de_v = de_f + dmix_f, de_v + dmix_v
    return de_f, de_v, dconv_w, dconv_b


# --- FOP's gated fusion ---

class GatedFusionCache(NamedTuple):
    att: Any            # B × D, the attention σ(h₄)
    f_tilde: Any        # B × D, tanh(e_f)
    v_tilde: Any        # B × D, tanh(e_v)
    lin1: LinearCache
    bn: BatchNormCache
    relu: Any           # B × H, the ReLU's mask
    lin2: LinearCache
    sigmoid: Any        # B × D, the sigmoid's output
    tanh_f: Any         # B × D, f̃
    tanh_v: Any         # B × D, ṽ


def gated_fusion_forward(e_f, e_v, W1, b1, bn_weight, bn_bias, W2, b2, state, train):
    """FOP's gated fusion:
    ``att = σ(ReLU(BN([e_f, e_v] W₁ᵀ + b₁)) W₂ᵀ + b₂)``, ``f̃ = tanh(e_f)``,
    ``ṽ = tanh(e_v)``, ``m = att ⊙ f̃ + (1 − att) ⊙ ṽ``.

    ``e_f``, ``e_v``: B × D; ``W1``: H × 2D, ``b1``, ``bn_weight``,
    ``bn_bias``: (H,); ``W2``: D × H, ``b2``: (D,); ``state``: the
    BatchNorm's ``BatchNormState``. Returns
    ``(FusionOutput(m, f̃, ṽ), new_state, cache)``.

    Derivation: docs/math.md §13.
    """
    xp = get_array_module(e_f)
    x = xp.concatenate([e_f, e_v], axis=1)
    h1, cache_lin1 = linear_forward(x, W1, b1)
    h2, new_state, cache_bn = batchnorm_forward(h1, bn_weight, bn_bias, state, train)
    h3, cache_relu = relu_forward(h2)
    h4, cache_lin2 = linear_forward(h3, W2, b2)
    att, cache_sigmoid = sigmoid_forward(h4)
    f_tilde, cache_tanh_f = tanh_forward(e_f)
    v_tilde, cache_tanh_v = tanh_forward(e_v)
    m = _mix_forward(att, f_tilde, v_tilde)
    cache = GatedFusionCache(att, f_tilde, v_tilde, cache_lin1, cache_bn, cache_relu,
                             cache_lin2, cache_sigmoid, cache_tanh_f, cache_tanh_v)
    return FusionOutput(m, f_tilde, v_tilde), new_state, cache


def gated_fusion_backward(dm, cache):
    """The mirror of ``gated_fusion_forward``; ``dm``: B × D. Returns
    ``de_f, de_v, dW1, db1, dbn_weight, dbn_bias, dW2, db2``.

    Derivation: docs/math.md §13.
    """
    datt, df_tilde, dv_tilde = _mix_backward(dm, cache.att, cache.f_tilde, cache.v_tilde)
    de_f = tanh_backward(df_tilde, cache.tanh_f)
    de_v = tanh_backward(dv_tilde, cache.tanh_v)
    dh4 = sigmoid_backward(datt, cache.sigmoid)
    dh3, dW2, db2 = linear_backward(dh4, cache.lin2)
    dh2 = relu_backward(dh3, cache.relu)
    dh1, dbn_weight, dbn_bias = batchnorm_backward(dh2, cache.bn)
    dx, dW1, db1 = linear_backward(dh1, cache.lin1)
    D = de_f.shape[1]
    return de_f + dx[:, :D], de_v + dx[:, D:], dW1, db1, dbn_weight, dbn_bias, dW2, db2
