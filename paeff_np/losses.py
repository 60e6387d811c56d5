"""The three losses of PAEFF, each a forward/backward pair.

``*_forward`` returns ``(loss, cache)`` with the loss a 0-d array;
``*_backward(cache)`` returns the gradient of the loss (dloss = 1) with
respect to each differentiable input. Derivations: ``docs/math.md``.
"""
from .backend import get_array_module
from .layers import l2_normalize_backward, l2_normalize_forward

OPL_EPS = 1e-6    # pos = Σ M⁺⊙G / (Σ M⁺ + 1e-6): a batch without pairs gives 0, not 0/0


def log_softmax(s):
    """``s − max − log Σ exp(s − max)`` row by row (stable for |s| ~ 1e4)."""
    xp = get_array_module(s)
    shifted = s - s.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def softmax_cross_entropy_forward(s, y):
    """``L = −(1/B) Σ_i log softmax(s_i)[y_i]``."""
    xp = get_array_module(s)
    logp = log_softmax(s)
    rows = xp.arange(s.shape[0])
    return -logp[rows, y].mean(), (logp, y)


def softmax_cross_entropy_backward(cache):
    """``dL/ds = (softmax(s) − onehot(y)) / B``."""
    logp, y = cache
    xp = get_array_module(logp)
    ds = xp.exp(logp)
    ds[xp.arange(ds.shape[0]), y] -= 1.0
    return ds / logp.shape[0]


def symmetric_cross_entropy_forward(a, b, temperature):
    """CLIP loss: ``S = a bᵀ/τ``, ``L = ½[CE(S, diag) + CE(Sᵀ, diag)]``."""
    xp = get_array_module(a)
    S = (a @ b.T) / temperature
    diag = xp.arange(S.shape[0])
    loss_ab, cache_ab = softmax_cross_entropy_forward(S, diag)
    loss_ba, cache_ba = softmax_cross_entropy_forward(S.T, diag)
    return 0.5 * (loss_ab + loss_ba), (a, b, temperature, cache_ab, cache_ba)


def symmetric_cross_entropy_backward(cache):
    """``dS = ½[dCE(S) + dCE(Sᵀ)ᵀ]``, ``da = dS b/τ``, ``db = dSᵀ a/τ``."""
    a, b, temperature, cache_ab, cache_ba = cache
    dS = 0.5 * (softmax_cross_entropy_backward(cache_ab)
                + softmax_cross_entropy_backward(cache_ba).T)
    return dS @ b / temperature, dS.T @ a / temperature


def orthogonal_projection_forward(z, y, gamma):
    """OPL: ``ẑ = z/‖z‖``, ``G = ẑẑᵀ``, M⁺ same label off the diagonal, M⁻ other label;
    ``pos = Σ M⁺⊙G/(ΣM⁺ + 1e-6)``, ``neg = Σ |M⁻⊙G|/(ΣM⁻ + 1e-6)``,
    ``L = 1 − pos + γ·neg``."""
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
    return loss, (zhat, G, m_pos, m_neg, w_pos, w_neg, gamma, cache_norm)


def orthogonal_projection_backward(cache):
    """``dG = −M⁺/(ΣM⁺+ε) + γ M⁻⊙sign(G)/(ΣM⁻+ε)``, ``dẑ = (dG + dGᵀ) ẑ``,
    then back through the normalisation."""
    zhat, G, m_pos, m_neg, w_pos, w_neg, gamma, cache_norm = cache
    xp = get_array_module(zhat)
    dG = -m_pos * w_pos + gamma * w_neg * m_neg * xp.sign(G)
    dzhat = (dG + dG.T) @ zhat
    return l2_normalize_backward(dzhat, cache_norm)
