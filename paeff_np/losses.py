"""The three losses of PAEFF, each a forward/backward pair (protocol: ``layers.py``).

``x_forward`` returns ``(loss, cache)`` with the loss a 0-d array;
``x_backward(dloss, cache)`` returns ``dloss`` times the gradient of the loss
with respect to each differentiable input (``dloss`` is the loss's weight in
the total, a scalar). Derivations: ``docs/math.md``.
"""
from typing import Any, NamedTuple

import numpy as np

from .backend import get_array_module, kernel, matmul, to_host
from .layers import L2NormalizeCache, l2_normalize_backward, l2_normalize_forward

OPL_EPS = 1e-6    # pos = Σ M⁺⊙G / (Σ M⁺ + 1e-6): a batch without pairs gives 0, not 0/0


# CuPy kernels (ElementwiseKernel / ReductionKernel, built by backend.kernel): each
# fuses the NumPy code of the function it sits beside, which stays the reference.
# Their C bodies are compiled and checked on the CPU by tests/test_kernels.py.
EXP_SUM_KERNEL = dict(kind="reduction", in_params="T x, T shift", out_params="T z", map_expr="exp(x - shift)",
                      reduce_expr="a + b", post_map_expr="z = a", identity="0", name="paeff_exp_sum")
"""``Σ e^{x − shift}`` along the reduced axis: a softmax's sum, by row (axis 1) or by column (axis 0)."""
SCALED_SUM_KERNEL = dict(kind="reduction", in_params="T x, T scale", out_params="T y", map_expr="x * scale",
                         reduce_expr="a + b", post_map_expr="y = a", identity="0", name="paeff_scaled_sum")
"""``Σ x·scale``: a mean with its sign (``scale = −1/B``)."""


# --- softmax cross-entropy ---

class SoftmaxCrossEntropyCache(NamedTuple):
    probs: Any          # B × K, softmax(s)
    y: Any              # (B,) integer labels


class _SoftmaxCrossEntropyDeviceCache(NamedTuple):
    """The CuPy form of ``SoftmaxCrossEntropyCache``: what the backward's one kernel
    recomputes the softmax from, instead of a B × K array of it."""
    s: Any              # B × K logits
    row_max: Any        # B × 1
    row_sum: Any        # B × 1, Σ_k e^{s_ik − m_i}
    y: Any              # (B,) integer labels


LABEL_LOG_SOFTMAX_KERNEL = dict(
    kind="elementwise", in_params="raw T s, T row_max, T row_sum, I y, int64 k", out_params="T logp",
    body="logp = (s[i * k + y] - row_max) - log(row_sum);", name="paeff_label_log_softmax")
"""``log softmax(s_i)[y_i] = (s_{i,y_i} − m_i) − log Z_i``, one row i per element (s: B × k, read raw)."""
SOFTMAX_CROSS_ENTROPY_BACKWARD_KERNEL = dict(
    kind="elementwise", in_params="T s, T row_max, T row_sum, I y, int64 k, T w", out_params="T ds",
    body="ds = exp(s - row_max) / row_sum * w - (i % k == y) * w;", name="paeff_softmax_ce_backward")
"""``ds = (softmax(s) − onehot(y))·w``, ``w = dloss/B``: ``softmax_cross_entropy_backward``."""


def _softmax_cross_entropy_forward_cupy(s, y):
    """``softmax_cross_entropy_forward`` in four CuPy calls (the kernels above)."""
    n, k = s.shape
    row_max = s.max(axis=1, keepdims=True)
    row_sum = kernel(EXP_SUM_KERNEL)(s, row_max, axis=1, keepdims=True)
    logp_y = kernel(LABEL_LOG_SOFTMAX_KERNEL)(s, row_max, row_sum, y[:, None], k)
    loss = kernel(SCALED_SUM_KERNEL)(logp_y, -1.0 / n)
    return loss, _SoftmaxCrossEntropyDeviceCache(s, row_max, row_sum, y)


def softmax_cross_entropy_forward(s, y):
    """``L = −(1/B) Σ_i log softmax(s_i)[y_i]``; ``s``: B × K logits, ``y``: (B,) labels in 0..K−1.

    Stable for |s| ~ 1e4, row by row: with ``m_i = max_k s_ik`` and
    ``Z_i = Σ_k e^{s_ik − m_i}``, ``log softmax(s_i)[y_i] = (s_iy − m_i) − log Z_i``
    and ``softmax(s_i) = e^{s_i − m_i}/Z_i``, kept for the backward.

    Derivation: docs/math.md §9.
    """
    xp = get_array_module(s)
    if xp is not np:
        return _softmax_cross_entropy_forward_cupy(s, y)
    n = s.shape[0]
    row_max = s.max(axis=1, keepdims=True)
    probs = xp.exp(s - row_max)
    z = probs.sum(axis=1, keepdims=True)
    probs /= z
    logp_y = (s[xp.arange(n), y] - row_max[:, 0]) - xp.log(z[:, 0])
    return -logp_y.mean(), SoftmaxCrossEntropyCache(probs, y)


def softmax_cross_entropy_backward(dloss, cache):
    """``dL/ds = (softmax(s) − onehot(y)) / B``, times ``dloss``.

    Derivation: docs/math.md §9.
    """
    if isinstance(cache, _SoftmaxCrossEntropyDeviceCache):      # CuPy: one kernel
        n, k = cache.s.shape
        return kernel(SOFTMAX_CROSS_ENTROPY_BACKWARD_KERNEL)(cache.s, cache.row_max, cache.row_sum,
                                                             cache.y[:, None], k, dloss / n)
    n = cache.probs.shape[0]
    ds = cache.probs * (dloss / n)
    ds[get_array_module(ds).arange(n), cache.y] -= dloss / n
    return ds


# --- symmetric cross-entropy (CLIP) ---

def shared_shift_spread(dtype):
    """How far below S's overall max M every row max and every column max may
    lie for the one shift M to serve both softmaxes:
    ``T = log(1/tiny) − 27``, 60.3 for float32 and 681.4 for float64.

    With the shift M, ``e^{S_ij − M}`` underflows (below ``tiny``) only when
    ``S_ij − M < log(tiny)``. If row i's max r_i ≥ M − T, that needs
    ``S_ij < r_i − 27``: such an entry weighs under ``e^{−27} ≈ 1.9e-12`` of the
    row's largest one, so the B entries a row can lose change its sum by at
    most ``B·1.9e-12`` (relative), below float32's rounding for B < 30 000.
    The largest entry itself, ``e^{r_i − M} ≥ e^{−T}``, stays a normal number.
    The same holds for the columns.

    Derivation: docs/math.md §10.
    """
    return float(-np.log(np.finfo(dtype).tiny)) - 27.0


class SymmetricCrossEntropyFromLogitsCache(NamedTuple):
    exp_rows: Any       # B × B, e^{S − row shift}: softmax_row(S) = exp_rows / row_sum
    row_sum: Any        # B × 1, Σ_j exp_rows
    exp_cols: Any       # B × B, e^{S − column shift} (exp_rows itself when the shift is shared)
    col_sum: Any        # (B,), Σ_i exp_cols


class _SymmetricCrossEntropyDeviceCache(NamedTuple):
    """The CuPy form of ``SymmetricCrossEntropyFromLogitsCache``: the backward's one
    kernel recomputes both exponentials from S and the shifts."""
    S: Any              # B × B logits
    row_max: Any        # B × 1
    row_sum: Any        # B × 1, Σ_j e^{S_ij − row_max_i}
    col_max: Any        # (B,)
    col_sum: Any        # (B,), Σ_i e^{S_ij − col_max_j}


SYMMETRIC_CE_LOSS_KERNEL = dict(
    kind="reduction", in_params="T d, T row_max, T row_sum, T col_max, T col_sum, T scale", out_params="T loss",
    map_expr="(((d - row_max) - log(row_sum)) + ((d - col_max) - log(col_sum))) * scale",
    reduce_expr="a + b", post_map_expr="loss = a", identity="0", name="paeff_symmetric_ce_loss")
"""``−(1/2B) Σ_i [log softmax_row(S)_ii + log softmax_col(S)_ii]`` from the diagonal and each shift and sum."""
SYMMETRIC_CE_BACKWARD_KERNEL = dict(
    kind="elementwise", in_params="T S, T row_max, T row_sum, T col_max, T col_sum, T w, T w_diag, int64 n1",
    out_params="T dS",
    body="dS = exp(S - row_max) * (w / row_sum) + exp(S - col_max) * (w / col_sum) - (i % n1 == 0) * w_diag;",
    name="paeff_symmetric_ce_backward")
"""``dS = softmax_row(S)·w + softmax_col(S)·w − I·w_diag``, ``w = dloss/2B``, ``w_diag = dloss/B``
(``i % (B + 1) == 0``: the diagonal of a B × B array)."""


def _symmetric_cross_entropy_from_logits_forward_cupy(S):
    """``symmetric_cross_entropy_from_logits_forward`` in five CuPy calls (the kernels
    above): each row shifted by its max and each column by its own (the two-shift form,
    stable for any S), with no decision to read back."""
    n = S.shape[0]
    xp = get_array_module(S)
    row_max = S.max(axis=1, keepdims=True)
    col_max = S.max(axis=0)
    row_sum = kernel(EXP_SUM_KERNEL)(S, row_max, axis=1, keepdims=True)
    col_sum = kernel(EXP_SUM_KERNEL)(S, col_max, axis=0)
    loss = kernel(SYMMETRIC_CE_LOSS_KERNEL)(xp.diagonal(S), row_max[:, 0], row_sum[:, 0], col_max, col_sum,
                                            -0.5 / n)
    return loss, _SymmetricCrossEntropyDeviceCache(S, row_max, row_sum, col_max, col_sum)


def symmetric_cross_entropy_from_logits_forward(S):
    """CLIP loss on given logits: ``L = ½[CE(S, diag) + CE(Sᵀ, diag)]``;
    ``S``: B × B, row i and column i the matching pair.

    CE(Sᵀ, diag) is the cross-entropy of S's *columns*: with the log-softmax
    over rows (axis 1) and over columns (axis 0),
    ``L = −(1/2B) Σ_i [log softmax_row(S)_ii + log softmax_col(S)_ii]``.

    Stable as ``softmax_cross_entropy_forward``: ``exp`` is taken of S minus
    a shift. When every row and column max is within ``shared_shift_spread``
    of S's overall max M
    (dot-product logits always are: |S| ≤ ‖a‖‖b‖/τ), one ``E = e^{S − M}``
    serves both softmaxes, ``softmax_row = E / row sums``, ``softmax_col = E /
    column sums``; otherwise each row is shifted by its max and each column by
    its own, two exponentials (the plain form; the shared one saves an
    exponential, docs/perf.md). On CuPy, with no decision to read back, each
    row and column always takes its own max, and four reductions and one loss
    kernel do the rest (``_symmetric_cross_entropy_from_logits_forward_cupy``).
    The cache keeps the exponentials and their sums, not the softmaxes.

    Derivation: docs/math.md §10 (on distance logits: §17.7).
    """
    xp = get_array_module(S)
    if xp is not np:
        return _symmetric_cross_entropy_from_logits_forward_cupy(S)
    row_max = S.max(axis=1, keepdims=True)                  # B × 1
    col_max = S.max(axis=0)                                 # (B,)
    overall_max = col_max.max()
    lowest_max = xp.minimum(row_max.min(), col_max.min())
    shared = bool(overall_max - lowest_max <= shared_shift_spread(S.dtype))   # one host read
    if shared:                          # one E = e^{S − M} for both softmaxes
        row_shift = col_shift = overall_max
        exp_rows = exp_cols = xp.exp(S - overall_max)
    else:                               # each row by its max, each column by its own
        row_shift, col_shift = row_max[:, 0], col_max
        exp_rows, exp_cols = xp.exp(S - row_max), xp.exp(S - col_max)
    row_sum = exp_rows.sum(axis=1, keepdims=True)
    col_sum = exp_cols.sum(axis=0)
    # log softmax(S)_ii = (S_ii − shift) − log Σ e^{S − shift}, along the row and along the column
    S_diag = xp.diagonal(S)
    logp_rows_diag = (S_diag - row_shift) - xp.log(row_sum[:, 0])
    logp_cols_diag = (S_diag - col_shift) - xp.log(col_sum)
    loss = -0.5 * (logp_rows_diag.mean() + logp_cols_diag.mean())
    return loss, SymmetricCrossEntropyFromLogitsCache(exp_rows, row_sum, exp_cols, col_sum)


def symmetric_cross_entropy_from_logits_backward(dloss, cache):
    """``dS = dloss · (softmax_row(S) + softmax_col(S) − 2I)/(2B)``: B × B,
    with ``softmax_row = exp_rows / row_sum`` and ``softmax_col = exp_cols / col_sum``.
    When the two exponentials are one E: ``dS = E ⊙ (w_row + w_col) − I·dloss/B``,
    ``w_row = dloss/(2B·row_sum)`` (B × 1), ``w_col = dloss/(2B·col_sum)`` (1 × B).

    Derivation: docs/math.md §10.
    """
    if isinstance(cache, _SymmetricCrossEntropyDeviceCache):     # CuPy: one kernel
        n = cache.S.shape[0]
        return kernel(SYMMETRIC_CE_BACKWARD_KERNEL)(cache.S, cache.row_max, cache.row_sum, cache.col_max,
                                                    cache.col_sum, dloss / (2.0 * n), dloss / n, n + 1)
    exp_rows, exp_cols = cache.exp_rows, cache.exp_cols
    xp = get_array_module(exp_rows)
    n = exp_rows.shape[0]
    w_row = (dloss / (2.0 * n)) / cache.row_sum
    w_col = (dloss / (2.0 * n)) / cache.col_sum
    if exp_cols is exp_rows:            # one exponential: E ⊙ (w_row + w_col)
        dS = w_row + w_col
        dS *= exp_rows
    else:
        dS = exp_rows * w_row
        dS += exp_cols * w_col
    i = xp.arange(n)
    dS[i, i] -= dloss / n
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
    S = matmul(a / temperature, b.T)        # 1/τ on a B × D factor, not on the B × B product
    loss, cache_logits = symmetric_cross_entropy_from_logits_forward(S)
    return loss, SymmetricCrossEntropyCache(a, b, temperature, cache_logits)


def symmetric_cross_entropy_backward(dloss, cache):
    """``da = dS b/τ``, ``db = dSᵀ a/τ`` with ``dS`` from the logits' backward;
    the 1/τ rides on that backward's weight (``dloss/τ``), which scales dS as
    it is formed, so no pass over a or b is spent on it.

    Derivation: docs/math.md §10.
    """
    dS_over_tau = symmetric_cross_entropy_from_logits_backward(dloss / cache.temperature,
                                                                cache.logits)
    return matmul(dS_over_tau, cache.b), matmul(dS_over_tau.T, cache.a)


# --- orthogonal projection loss (OPL) ---

class OrthogonalProjectionCache(NamedTuple):
    zhat: Any           # B × D, the normalised rows
    G: Any              # B × B, ẑẑᵀ
    pairs: Any          # (i, j): the entries of M⁺ (same_label_pairs)
    w_pos: Any          # 1/(ΣM⁺ + ε)
    w_neg: Any          # 1/(ΣM⁻ + ε)
    gamma: float
    normalize: L2NormalizeCache


def same_label_pairs_plain(y):
    """``same_label_pairs`` in its plain form, the reference the fast one is
    tested against: the nonzero entries of the B × B mask
    ``[y_i = y_j] ∧ [i ≠ j]``, in row-major order; ``y``: (B,) integer labels.

    Derivation: docs/math.md §11.
    """
    labels = to_host(y)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    i, j = np.nonzero(same)
    xp = get_array_module(y)
    return xp.asarray(i), xp.asarray(j)


def same_label_pairs(y):
    """The entries of M⁺ (same label, off the diagonal) as two index arrays
    ``(i, j)``, every ordered pair once; ``y``: (B,) integer labels. The pairs
    of ``same_label_pairs_plain``, grouped by label instead of row-major.

    M⁻ is everything else off the diagonal. A batch drawn from many identities
    has few same-label pairs (B = 1024 rows of 901 identities: about 500
    of the 10⁶ entries), so M⁺ is kept as this list and no B × B mask is built
    (faster than the plain form: docs/perf.md).
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


def same_label_mask(y):
    """M⁺ as a B × B boolean matrix, ``[y_i = y_j]`` off the diagonal: the device
    form of ``same_label_pairs``, of one shape whatever the labels, so a step
    neither syncs nor uploads for it. The CuPy kernels of the OPL form it entry
    by entry (``[y_i = y_j][i ≠ j]``) without storing it; this is their tested
    reference (tests/test_kernels.py).

    Derivation: docs/math.md §11.
    """
    xp = get_array_module(y)
    same = y[:, None] == y[None, :]
    xp.fill_diagonal(same, False)
    return same


class _OrthogonalProjectionDeviceCache(NamedTuple):
    """The CuPy form of ``OrthogonalProjectionCache``: M⁺ is formed by the kernels
    from the labels, element by element, never stored."""
    zhat: Any           # B × D, the normalised rows
    G: Any              # B × B, ẑẑᵀ
    y: Any              # (B,) integer labels
    n_pos: Any          # 0-d, ΣM⁺
    gamma: float
    normalize: L2NormalizeCache


SAME_LABEL_COUNT_KERNEL = dict(
    kind="reduction", in_params="T G, I y_row, I y_col, I row, I col", out_params="T n_pos",
    map_expr="(y_row == y_col) * (row != col)", reduce_expr="a + b", post_map_expr="n_pos = a", identity="0",
    name="paeff_same_label_count")
"""``ΣM⁺ = Σ_ij [y_i = y_j][i ≠ j]`` (``G`` only gives the type T): the mask of ``same_label_mask``, summed."""
OPL_LOSS_KERNEL = dict(
    kind="reduction", in_params="T G, I y_row, I y_col, I row, I col, T n_pos, T n_off, T gamma, T eps",
    out_params="T loss",
    map_expr="y_row != y_col ? fabs(G) * (gamma / ((n_off - n_pos) + eps)) : row != col ? G * (-1 / (n_pos + eps)) : 0",
    reduce_expr="a + b", post_map_expr="loss = a + 1", identity="0", name="paeff_opl_loss")
"""``1 − Σ M⁺⊙G/(ΣM⁺ + ε) + γ Σ |M⁻⊙G|/(ΣM⁻ + ε)``, ``ΣM⁻ = n_off − ΣM⁺``, ``n_off = B² − B``."""
OPL_BACKWARD_KERNEL = dict(
    kind="elementwise", in_params="T G, I y_row, I y_col, T n_pos, T n_off, T gamma, T eps, T scale, int64 n1",
    out_params="T dG",
    body="""
    T sign_g = G > 0 ? 1 : G < 0 ? -1 : G;
    dG = i % n1 == 0 ? 0 : y_row == y_col ? -scale / (n_pos + eps) : sign_g * (scale * gamma / ((n_off - n_pos) + eps));
    """, name="paeff_opl_backward")
"""``dG·scale``, ``dG = −M⁺/(ΣM⁺+ε) + γ M⁻⊙sign(G)/(ΣM⁻+ε)``, 0 on the diagonal (``i % (B + 1) == 0``)."""


def _orthogonal_projection_forward_cupy(z, y, gamma):
    """``orthogonal_projection_forward`` in four CuPy calls after the normalisation:
    G, the row numbers, ΣM⁺ and the loss (the kernels above), no mask stored."""
    xp = get_array_module(z)
    zhat, cache_norm = l2_normalize_forward(z)
    G = matmul(zhat, zhat.T)
    n = len(y)
    rows = xp.arange(n, dtype=y.dtype)
    masks = (G, y[:, None], y[None, :], rows[:, None], rows[None, :])
    n_pos = kernel(SAME_LABEL_COUNT_KERNEL)(*masks)
    loss = kernel(OPL_LOSS_KERNEL)(*masks, n_pos, n * n - n, gamma, OPL_EPS)
    return loss, _OrthogonalProjectionDeviceCache(zhat, G, y, n_pos, gamma, cache_norm)


def orthogonal_projection_forward(z, y, gamma):
    """OPL: ``ẑ = z/‖z‖``, ``G = ẑẑᵀ``, M⁺ same label off the diagonal, M⁻ other label;
    ``pos = Σ M⁺⊙G/(ΣM⁺ + 1e-6)``, ``neg = Σ |M⁻⊙G|/(ΣM⁻ + 1e-6)``,
    ``L = 1 − pos + γ·neg``; ``z``: B × D, ``y``: (B,) labels.

    M⁺ is a list of index pairs (``same_label_pairs``): ``Σ M⁺⊙G`` gathers
    them, ``Σ |M⁻⊙G|`` sums |G| with those entries and the diagonal set to 0.
    ``ΣM⁺`` is the length of the list and ``ΣM⁻ = B² − B − ΣM⁺``. On CuPy, with
    no host read of the labels, the kernels form M⁺ (``same_label_mask``) entry
    by entry from the labels and sum over it
    (``_orthogonal_projection_forward_cupy``).

    Derivation: docs/math.md §11 (worked by hand: §0.2).
    """
    xp = get_array_module(z)
    if xp is not np:
        return _orthogonal_projection_forward_cupy(z, y, gamma)
    zhat, cache_norm = l2_normalize_forward(z)
    G = matmul(zhat, zhat.T)
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
    if isinstance(cache, _OrthogonalProjectionDeviceCache):      # CuPy: dG·2dloss in one kernel
        n = cache.G.shape[0]
        dG = kernel(OPL_BACKWARD_KERNEL)(cache.G, cache.y[:, None], cache.y[None, :], cache.n_pos, n * n - n,
                                         cache.gamma, OPL_EPS, 2.0 * dloss, n + 1)
        return l2_normalize_backward(matmul(dG, cache.zhat), cache.normalize)
    xp = get_array_module(cache.zhat)
    i, j = cache.pairs
    dG = xp.sign(cache.G)
    dG *= cache.gamma * cache.w_neg
    dG[i, j] = -cache.w_pos
    xp.fill_diagonal(dG, 0.0)
    dzhat = 2.0 * matmul(dG, cache.zhat)
    return dloss * l2_normalize_backward(dzhat, cache.normalize)
