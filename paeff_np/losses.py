"""The three losses of PAEFF, each a forward/backward pair (protocol: ``layers.py``).

``x_forward`` returns ``(loss, cache)`` with the loss a 0-d array;
``x_backward(dloss, cache)`` returns ``dloss`` times the gradient of the loss
with respect to each differentiable input (``dloss`` is the loss's weight in
the total, a scalar). Derivations: ``docs/math.md``.
"""
from typing import Any, NamedTuple

from .backend import get_array_module
from .layers import L2NormalizeCache, l2_normalize_backward, l2_normalize_forward

OPL_EPS = 1e-6    # pos = Σ M⁺⊙G / (Σ M⁺ + 1e-6): a batch without pairs gives 0, not 0/0


def log_softmax(s, axis=1):
    """``s − max − log Σ exp(s − max)`` along ``axis`` (stable for |s| ~ 1e4); ``s``: any shape."""
    xp = get_array_module(s)
    shifted = s - s.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


# --- softmax cross-entropy ---

class SoftmaxCrossEntropyCache(NamedTuple):
    logp: Any           # B × K, log softmax(s)
    y: Any              # (B,) integer labels


def softmax_cross_entropy_forward(s, y):
    """``L = −(1/B) Σ_i log softmax(s_i)[y_i]``; ``s``: B × K logits, ``y``: (B,) labels in 0..K−1."""
    xp = get_array_module(s)
    logp = log_softmax(s)
    rows = xp.arange(s.shape[0])
    return -logp[rows, y].mean(), SoftmaxCrossEntropyCache(logp, y)


def softmax_cross_entropy_backward(dloss, cache):
    """``dL/ds = (softmax(s) − onehot(y)) / B``, times ``dloss``."""
    logp, y = cache
    xp = get_array_module(logp)
    ds = xp.exp(logp)
    ds[xp.arange(ds.shape[0]), y] -= 1.0
    return dloss * (ds / logp.shape[0])


# --- symmetric cross-entropy (CLIP) ---

class SymmetricCrossEntropyCache(NamedTuple):
    a: Any              # B × D
    b: Any              # B × D
    temperature: float
    logp_rows: Any      # B × B, log-softmax of S over each row
    logp_cols: Any      # B × B, log-softmax of S over each column


def symmetric_cross_entropy_forward(a, b, temperature):
    """CLIP loss: ``S = a bᵀ/τ``, ``L = ½[CE(S, diag) + CE(Sᵀ, diag)]``;
    ``a``, ``b``: B × D (row i of each is a matching pair), ``τ`` > 0.

    CE(Sᵀ, diag) is the cross-entropy of S's *columns*: with the log-softmax
    over rows (axis 1) and over columns (axis 0),
    ``L = −(1/2B) Σ_i [log softmax_row(S)_ii + log softmax_col(S)_ii]``.
    """
    xp = get_array_module(a)
    S = (a @ b.T) / temperature
    logp_rows = log_softmax(S, axis=1)
    logp_cols = log_softmax(S, axis=0)
    loss = -0.5 * (xp.diagonal(logp_rows).mean() + xp.diagonal(logp_cols).mean())
    return loss, SymmetricCrossEntropyCache(a, b, temperature, logp_rows, logp_cols)


def symmetric_cross_entropy_backward(dloss, cache):
    """``dS = (softmax_row(S) + softmax_col(S) − 2I)/(2B)``,
    ``da = dS b/τ``, ``db = dSᵀ a/τ``, each times ``dloss``."""
    a, b, temperature, logp_rows, logp_cols = cache
    xp = get_array_module(a)
    dS = xp.exp(logp_rows)
    dS += xp.exp(logp_cols)
    diag = xp.arange(dS.shape[0])
    dS[diag, diag] -= 2.0
    dS /= 2.0 * dS.shape[0]
    return dloss * (dS @ b / temperature), dloss * (dS.T @ a / temperature)


# --- orthogonal projection loss (OPL) ---

class OrthogonalProjectionCache(NamedTuple):
    zhat: Any           # B × D, the normalised rows
    G: Any              # B × B, ẑẑᵀ
    m_pos: Any          # B × B, M⁺
    m_neg: Any          # B × B, M⁻
    w_pos: Any          # 1/(ΣM⁺ + ε)
    w_neg: Any          # 1/(ΣM⁻ + ε)
    gamma: float
    normalize: L2NormalizeCache


def orthogonal_projection_forward(z, y, gamma):
    """OPL: ``ẑ = z/‖z‖``, ``G = ẑẑᵀ``, M⁺ same label off the diagonal, M⁻ other label;
    ``pos = Σ M⁺⊙G/(ΣM⁺ + 1e-6)``, ``neg = Σ |M⁻⊙G|/(ΣM⁻ + 1e-6)``,
    ``L = 1 − pos + γ·neg``; ``z``: B × D, ``y``: (B,) labels."""
    xp = get_array_module(z)
    zhat, cache_norm = l2_normalize_forward(z)
    G = zhat @ zhat.T
    same = y[:, None] == y[None, :]
    m_pos = (same & ~xp.eye(len(y), dtype=bool)).astype(z.dtype)
    m_neg = (~same).astype(z.dtype)
    w_pos = 1.0 / (m_pos.sum() + OPL_EPS)
    w_neg = 1.0 / (m_neg.sum() + OPL_EPS)
    pos = (m_pos * G).sum() * w_pos
    neg = xp.abs(m_neg * G).sum() * w_neg
    loss = 1.0 - pos + gamma * neg
    return loss, OrthogonalProjectionCache(zhat, G, m_pos, m_neg, w_pos, w_neg, gamma, cache_norm)


def orthogonal_projection_backward(dloss, cache):
    """``dG = −M⁺/(ΣM⁺+ε) + γ M⁻⊙sign(G)/(ΣM⁻+ε)``, ``dẑ = (dG + dGᵀ) ẑ = 2 dG ẑ``
    (G and both masks are symmetric, so dG is), then back through the
    normalisation; times ``dloss``."""
    zhat, G, m_pos, m_neg, w_pos, w_neg, gamma, cache_norm = cache
    xp = get_array_module(zhat)
    dG = (gamma * w_neg) * m_neg * xp.sign(G)
    dG -= w_pos * m_pos
    dzhat = 2.0 * (dG @ zhat)
    return dloss * l2_normalize_backward(dzhat, cache_norm)
