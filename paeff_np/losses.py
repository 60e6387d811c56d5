"""The three losses of PAEFF, each a forward/backward pair (protocol: ``layers.py``).

``x_forward`` returns ``(loss, cache)`` with the loss a 0-d array;
``x_backward(dloss, cache)`` returns ``dloss`` times the gradient of the loss
with respect to each differentiable input (``dloss`` is the loss's weight in
the total, a scalar). Derivations: ``docs/math.md``.
"""
import functools
from typing import Any, NamedTuple

import numpy as np

from .backend import get_array_module, to_host
from .layers import L2NormalizeCache, l2_normalize_backward, l2_normalize_forward
from .parallel import for_row_blocks

OPL_EPS = 1e-6    # pos = Σ M⁺⊙G / (Σ M⁺ + 1e-6): a batch without pairs gives 0, not 0/0


def log_softmax(s, axis=1):
    """``s − max − log Σ exp(s − max)`` along ``axis`` (stable for |s| ~ 1e4); ``s``: any shape.

    Derivation: docs/math.md §9.
    """
    xp = get_array_module(s)
    shifted = s - s.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


# --- softmax cross-entropy ---

class SoftmaxCrossEntropyCache(NamedTuple):
    logp: Any           # B × K, log softmax(s)
    y: Any              # (B,) integer labels


def softmax_cross_entropy_forward(s, y):
    """``L = −(1/B) Σ_i log softmax(s_i)[y_i]``; ``s``: B × K logits, ``y``: (B,) labels in 0..K−1.

    Derivation: docs/math.md §9.
    """
    xp = get_array_module(s)
    logp = xp.empty_like(s)

    def block(rows):                    # B × K: row blocks on threads (for_row_blocks)
        logp[rows] = log_softmax(s[rows])

    for_row_blocks(block, s.shape[0], s.shape[1], xp)
    rows = xp.arange(s.shape[0])
    return -logp[rows, y].mean(), SoftmaxCrossEntropyCache(logp, y)


def softmax_cross_entropy_backward(dloss, cache):
    """``dL/ds = (softmax(s) − onehot(y)) / B``, times ``dloss``.

    Derivation: docs/math.md §9.
    """
    logp, y = cache
    xp = get_array_module(logp)
    ds = xp.empty_like(logp)

    def block(rows):
        d = ds[rows]
        xp.exp(logp[rows], out=d)
        d[xp.arange(d.shape[0]), y[rows]] -= 1.0
        d /= logp.shape[0]
        d *= dloss

    for_row_blocks(block, logp.shape[0], logp.shape[1], xp)
    return ds


# --- symmetric cross-entropy (CLIP) ---

class SymmetricCrossEntropyFromLogitsCache(NamedTuple):
    softmax_rows: Any   # B × B, softmax of S over each row
    softmax_cols: Any   # B × B, softmax of S over each column


def symmetric_cross_entropy_from_logits_forward(S):
    """CLIP loss on given logits: ``L = ½[CE(S, diag) + CE(Sᵀ, diag)]``;
    ``S``: B × B, row i and column i the matching pair.

    CE(Sᵀ, diag) is the cross-entropy of S's *columns*: with the log-softmax
    over rows (axis 1) and over columns (axis 0),
    ``L = −(1/2B) Σ_i [log softmax_row(S)_ii + log softmax_col(S)_ii]``.

    Stable as ``log_softmax``: each row (column) is shifted by its max before
    ``exp``. The B × B work runs in row blocks (``for_row_blocks``): a column's
    max and sum are combined from the blocks' partial ones.

    Derivation: docs/math.md §10 (on distance logits: §17.6).
    """
    xp = get_array_module(S)
    n = S.shape[0]
    row_max, row_sum = xp.empty((n, 1), S.dtype), xp.empty((n, 1), S.dtype)
    softmax_rows, softmax_cols = xp.empty_like(S), xp.empty_like(S)

    def max_of_rows(rows):              # max of each row, partial max of each column
        s = S[rows]
        row_max[rows] = s.max(axis=1, keepdims=True)
        return s.max(axis=0)

    col_max = functools.reduce(xp.maximum, for_row_blocks(max_of_rows, n, n, xp))
    def exp_shifted(rows):              # e^{S − row max} (normalised here), e^{S − col max}
        s, p, q = S[rows], softmax_rows[rows], softmax_cols[rows]
        xp.exp(xp.subtract(s, row_max[rows], out=p), out=p)
        row_sum[rows] = p.sum(axis=1, keepdims=True)
        p /= row_sum[rows]
        xp.exp(xp.subtract(s, col_max, out=q), out=q)
        return q.sum(axis=0)            # partial column sums

    col_sum = sum(for_row_blocks(exp_shifted, n, n, xp))
    for_row_blocks(lambda rows: xp.divide(softmax_cols[rows], col_sum, out=softmax_cols[rows]),
                   n, n, xp)
    # log softmax(S)_ii = (S_ii − max) − log Σ e^{S − max}, along the row and along the column
    S_diag = xp.diagonal(S)
    logp_rows_diag = (S_diag - row_max[:, 0]) - xp.log(row_sum[:, 0])
    logp_cols_diag = (S_diag - col_max) - xp.log(col_sum)
    loss = -0.5 * (logp_rows_diag.mean() + logp_cols_diag.mean())
    return loss, SymmetricCrossEntropyFromLogitsCache(softmax_rows, softmax_cols)


def symmetric_cross_entropy_from_logits_backward(dloss, cache):
    """``dS = dloss · (softmax_row(S) + softmax_col(S) − 2I)/(2B)``: B × B.

    Derivation: docs/math.md §10.
    """
    softmax_rows, softmax_cols = cache
    xp = get_array_module(softmax_rows)
    n = softmax_rows.shape[0]
    dS = xp.empty_like(softmax_rows)

    def block(rows):
        d = dS[rows]
        xp.add(softmax_rows[rows], softmax_cols[rows], out=d)
        i = xp.arange(rows.start, rows.stop)
        d[i - rows.start, i] -= 2.0
        d *= dloss / (2.0 * n)

    for_row_blocks(block, n, n, xp)
    return dS


class SymmetricCrossEntropyCache(NamedTuple):
    a: Any              # B × D
    b: Any              # B × D
    temperature: float
    logits: SymmetricCrossEntropyFromLogitsCache


def symmetric_cross_entropy_forward(a, b, temperature):
    """CLIP loss of dot-product logits: ``S = a bᵀ/τ``, ``L = ½[CE(S, diag) + CE(Sᵀ, diag)]``;
    ``a``, ``b``: B × D (row i of each is a matching pair), ``τ`` > 0.

    Derivation: docs/math.md §10 (worked by hand: §0.2).
    """
    S = (a / temperature) @ b.T         # 1/τ on a B × D factor, not on the B × B product
    loss, cache_logits = symmetric_cross_entropy_from_logits_forward(S)
    return loss, SymmetricCrossEntropyCache(a, b, temperature, cache_logits)


def symmetric_cross_entropy_backward(dloss, cache):
    """``dS`` from the logits' backward, then ``da = dS b/τ``, ``db = dSᵀ a/τ``.

    Derivation: docs/math.md §10.
    """
    a, b, temperature, cache_logits = cache
    dS = symmetric_cross_entropy_from_logits_backward(dloss, cache_logits)
    da, db = dS @ b, dS.T @ a
    da /= temperature
    db /= temperature
    return da, db


# --- orthogonal projection loss (OPL) ---

class OrthogonalProjectionCache(NamedTuple):
    zhat: Any           # B × D, the normalised rows
    G: Any              # B × B, ẑẑᵀ
    pairs: Any          # (i, j): the entries of M⁺ (same_label_pairs)
    w_pos: Any          # 1/(ΣM⁺ + ε)
    w_neg: Any          # 1/(ΣM⁻ + ε)
    gamma: float
    normalize: L2NormalizeCache


def same_label_pairs(y):
    """The entries of M⁺ (same label, off the diagonal) as two index arrays
    ``(i, j)``, every ordered pair once; ``y``: (B,) integer labels.

    M⁻ is everything else off the diagonal. A batch drawn from many identities
    has few same-label pairs (B = 1024 rows of 901 identities: about 500
    of the 10⁶ entries), so M⁺ is kept as this list and no B × B mask is built.
    Sorting puts each label's rows side by side; a group of n rows gives its
    n² (position, partner) combinations, less the n with itself. Computed on
    the host: B labels are a few kilobytes.

    Derivation: docs/math.md §11.
    """
    xp = get_array_module(y)
    labels = to_host(y)
    n = len(labels)
    order = np.argsort(labels, kind="stable")           # the rows of one label side by side
    sorted_labels = labels[order]
    new_group = np.concatenate([[True], sorted_labels[1:] != sorted_labels[:-1]])
    group = np.cumsum(new_group) - 1                    # the group of each sorted position
    group_start = np.flatnonzero(new_group)             # its first sorted position
    group_size = np.diff(np.append(group_start, n))
    # each sorted position, once per member of its group (itself included),
    # paired with those members counted off from the group's start
    partners = group_size[group]
    first = np.repeat(np.arange(n), partners)
    rank = np.arange(len(first)) - np.repeat(np.cumsum(partners) - partners, partners)
    second = group_start[group[first]] + rank
    distinct = first != second
    return xp.asarray(order[first[distinct]]), xp.asarray(order[second[distinct]])


def orthogonal_projection_forward(z, y, gamma):
    """OPL: ``ẑ = z/‖z‖``, ``G = ẑẑᵀ``, M⁺ same label off the diagonal, M⁻ other label;
    ``pos = Σ M⁺⊙G/(ΣM⁺ + 1e-6)``, ``neg = Σ |M⁻⊙G|/(ΣM⁻ + 1e-6)``,
    ``L = 1 − pos + γ·neg``; ``z``: B × D, ``y``: (B,) labels.

    M⁺ is a list of index pairs (``same_label_pairs``): ``Σ M⁺⊙G`` gathers
    them, ``Σ |M⁻⊙G|`` sums |G| with those entries and the diagonal set to 0.
    ``ΣM⁺`` is the length of the list and ``ΣM⁻ = B² − B − ΣM⁺``.

    G is a general matrix product of ẑ with a copy of ẑ: for ``ẑ @ ẑ.T`` NumPy
    calls the BLAS's symmetric rank-k update (syrk), which does half the
    arithmetic but, in OpenBLAS on two cores, takes 1.6× as long as the full
    product (4.6 ms against 2.8 ms at B = 1024, D = 256).

    Derivation: docs/math.md §11 (worked by hand: §0.2).
    """
    xp = get_array_module(z)
    zhat, cache_norm = l2_normalize_forward(z)
    G = zhat @ zhat.copy().T            # not zhat @ zhat.T: see the docstring
    n = len(y)
    i, j = same_label_pairs(y)
    n_pos = xp.asarray(len(i), dtype=G.dtype)
    n_neg = xp.asarray(n * n - n - len(i), dtype=G.dtype)
    pos_sum = G[i, j].sum()
    abs_neg = xp.abs(G)                 # |G| on M⁻: zero on M⁺ and on the diagonal
    abs_neg[i, j] = 0.0
    xp.fill_diagonal(abs_neg, 0.0)
    neg_sum = abs_neg.sum()
    w_pos = 1.0 / (n_pos + OPL_EPS)
    w_neg = 1.0 / (n_neg + OPL_EPS)
    loss = 1.0 - pos_sum * w_pos + gamma * (neg_sum * w_neg)
    return loss, OrthogonalProjectionCache(zhat, G, (i, j), w_pos, w_neg, gamma, cache_norm)


def orthogonal_projection_backward(dloss, cache):
    """``dG = −M⁺/(ΣM⁺+ε) + γ M⁻⊙sign(G)/(ΣM⁻+ε)``, ``dẑ = (dG + dGᵀ) ẑ = 2 dG ẑ``
    (G and both masks are symmetric, so dG is), then back through the
    normalisation; times ``dloss``.

    dG is ``γ sign(G)/(ΣM⁻+ε)`` everywhere, then the entries of M⁺ are set to
    ``−1/(ΣM⁺+ε)`` and the diagonal to 0.

    Derivation: docs/math.md §11.
    """
    zhat, G, (i, j), w_pos, w_neg, gamma, cache_norm = cache
    xp = get_array_module(zhat)
    dG = xp.sign(G)
    dG *= gamma * w_neg
    dG[i, j] = -w_pos
    xp.fill_diagonal(dG, 0.0)
    dzhat = 2.0 * (dG @ zhat)
    return dloss * l2_normalize_backward(dzhat, cache_norm)
