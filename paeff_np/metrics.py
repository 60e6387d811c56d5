"""Evaluation metrics for face-voice association.

Scores are squared Euclidean distances between evaluation embeddings:
a smaller distance means "more likely the same identity".

* Verification (pairs labelled same / different identity):
  exact ROC, AUC and EER, plus the "official" FOP/facenet ``calculate_roc``
  protocol (fixed threshold grid, 10 consecutive folds, averaged curves).
* Cross-modal 1-of-n_c matching: one probe from one modality, a gallery of
  n_c items from the other modality, exactly one of which is the probe's
  identity.

Everything runs on the host (inputs that are CuPy arrays are copied to
NumPy) except ``pair_distances``, which runs where its arrays are, so that
only the distances need to come to the host.
"""

import numpy as np

from .backend import get_array_module, to_host

# Threshold grid of the official protocol: 0, 0.01, ..., 3.99 (400 values).
OFFICIAL_THRESHOLDS = np.arange(0, 4, 0.01)
OFFICIAL_FOLDS = 10


# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------


def _check_paired_rows(a, b, names):
    """Both 2-D and of one shape (row i of each is one pair), else ValueError naming them."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"{names[0]} and {names[1]} must be 2-D with the same shape, got "
            f"{a.shape} and {b.shape}"
        )


def pair_distances(face_emb, voice_emb):
    """Squared Euclidean distance of each (face, voice) row pair, on the
    arrays' device (NumPy or CuPy, both the same).

    d_i = sum_k (f_ik - v_ik)^2
    """
    _check_paired_rows(face_emb, voice_emb, ("face_emb", "voice_emb"))
    diff = face_emb - voice_emb
    return get_array_module(diff).einsum("ij,ij->i", diff, diff)


def _check_pairs(dist, same):
    """Validate and return (dist as float array, same as bool array)."""
    dist, same = to_host(dist), to_host(same)
    if dist.ndim != 1 or same.ndim != 1:
        raise ValueError(
            f"dist and same must be 1-D, got shapes {dist.shape} and {same.shape}"
        )
    if len(dist) != len(same):
        raise ValueError(
            f"dist and same must have the same length, got {len(dist)} and {len(same)}"
        )
    dist = dist.astype(np.float64)
    if not np.all(np.isfinite(dist)):
        raise ValueError("dist contains NaN or infinite values")
    if same.dtype != bool:
        if not np.all((same == 0) | (same == 1)):
            raise ValueError("same must be boolean (or 0/1)")
        same = same.astype(bool)
    if same.all() or not same.any():
        raise ValueError("same must contain both same-identity and different-identity pairs")
    return dist, same


def trapezoid_area(x, y):
    """The area under a curve by the trapezoid rule (scikit-learn's ``auc``)."""
    from sklearn.metrics import auc    # imported on first use: slow to import, a CLI start pays it once
    return auc(x, y)


def _exact_roc(dist, same):
    """Exact ROC over all distance thresholds (score = -distance)."""
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(same, -dist, drop_intermediate=False)
    return fpr, tpr


def _exact_eer(fpr, tpr):
    """EER where FPR and FNR = 1 - TPR cross along the ROC polyline.

    The polyline starts at (0, 0), where FNR - FPR = 1 > 0, and ends at (1, 1),
    where FNR - FPR = -1 <= 0. Take the first vertex k with FNR - FPR <= 0 and
    interpolate linearly on the segment (k-1, k) to the point where FNR = FPR.
    """
    gap = (1.0 - tpr) - fpr
    k = int(np.argmax(gap <= 0))
    fraction = gap[k - 1] / (gap[k - 1] - gap[k])
    return float(fpr[k - 1] + fraction * (fpr[k] - fpr[k - 1]))


def _official_roc(dist, same):
    """Fold-averaged ROC of the FOP/facenet ``calculate_roc`` protocol.

    The pairs are split, in order and without shuffling, into 10 folds of
    consecutive pairs (the first ``n % 10`` folds get one extra pair, as
    ``sklearn.model_selection.KFold(10, shuffle=False)`` does). On each fold
    and each threshold t of ``OFFICIAL_THRESHOLDS`` a pair is predicted
    "same" when d < t, and
        TPR = TP / (TP + FN)   (0 if the fold has no positives),
        FPR = FP / (FP + TN)   (0 if the fold has no negatives).
    Returns the mean FPR and mean TPR over the folds, one value per threshold.
    """
    if len(dist) < OFFICIAL_FOLDS:
        raise ValueError(
            f"the official protocol needs at least {OFFICIAL_FOLDS} pairs, got {len(dist)}"
        )
    fold_tpr, fold_fpr = [], []
    for fold in np.array_split(np.arange(len(dist)), OFFICIAL_FOLDS):
        pos = np.sort(dist[fold][same[fold]])
        neg = np.sort(dist[fold][~same[fold]])
        # Number of distances strictly below each threshold.
        tp = np.searchsorted(pos, OFFICIAL_THRESHOLDS, side="left")
        fp = np.searchsorted(neg, OFFICIAL_THRESHOLDS, side="left")
        fold_tpr.append(tp / len(pos) if len(pos) else np.zeros(len(OFFICIAL_THRESHOLDS)))
        fold_fpr.append(fp / len(neg) if len(neg) else np.zeros(len(OFFICIAL_THRESHOLDS)))
    return np.mean(fold_fpr, axis=0), np.mean(fold_tpr, axis=0)


def _official_eer(mean_fpr, mean_tpr):
    """FPR at the grid threshold where |FNR - FPR| is smallest (first one on ties)."""
    return float(mean_fpr[np.argmin(np.abs((1.0 - mean_tpr) - mean_fpr))])


def verification_curves(dist, same, official=True):
    """ROC curves for plotting.

    Returns ``fpr``, ``tpr`` (exact ROC, all thresholds) and, when ``official``,
    ``fpr_official``, ``tpr_official`` (fold-averaged curves of the official
    protocol, one point per threshold of ``OFFICIAL_THRESHOLDS``).
    """
    dist, same = _check_pairs(dist, same)
    fpr, tpr = _exact_roc(dist, same)
    curves = {"fpr": fpr, "tpr": tpr}
    if official:
        curves["fpr_official"], curves["tpr_official"] = _official_roc(dist, same)
    return curves


def verification(dist, same, official=True):
    """Verification EER and AUC, exact and by the official protocol.

    dist: 1-D squared distances of the pairs; same: 1-D bool, True when the
    pair shows one identity. All results are fractions in [0, 1].

    * ``auc``: area under the exact ROC (score = -dist), which equals the
      Mann-Whitney statistic P(d_pos < d_neg) + 0.5 P(d_pos = d_neg).
    * ``eer``: where FPR = FNR = 1 - TPR, interpolated along the exact ROC.
    * ``auc_official``, ``eer_official``: FOP/facenet protocol, see
      ``_official_roc``; AUC is the trapezoid area under the mean curve and
      EER = mean_fpr[argmin |(1 - mean_tpr) - mean_fpr|].

    The official threshold grid 0, 0.01, ..., 3.99 assumes distances lie in
    about [0, 4], true for the model's evaluation embeddings (GELU of unit
    vectors); distances of 4 or more are never predicted "same".

    official=False leaves out the official figures (a list shorter than
    ``OFFICIAL_FOLDS`` pairs cannot run that protocol; the evaluation asks for
    ``OFFICIAL_MIN_PAIRS``: see `official_protocol_fits`).
    """
    curves = verification_curves(dist, same, official)
    result = {
        "eer": _exact_eer(curves["fpr"], curves["tpr"]),
        "auc": float(trapezoid_area(curves["fpr"], curves["tpr"])),
    }
    if official:
        result["eer_official"] = _official_eer(curves["fpr_official"], curves["tpr_official"])
        result["auc_official"] = float(trapezoid_area(curves["fpr_official"], curves["tpr_official"]))
    return result


OFFICIAL_MIN_PAIRS = 2 * OFFICIAL_FOLDS
"""Pairs the official protocol needs: two consecutive pairs of a list that alternates
positive and negative hold one of each, so every fold has both rates. With fewer, some
fold holds one pair, its other rate is set to 0, and EER*/AUC* lose their meaning
(AUC* at most 25% on 10 pairs)."""


def official_protocol_fits(n_pairs):
    """True when a list of ``n_pairs`` pairs gives every official fold a positive and a
    negative pair: ``n_pairs >= OFFICIAL_MIN_PAIRS``. The evaluation reports EER*/AUC*
    only then; ``verification`` itself computes them from ``OFFICIAL_FOLDS`` pairs on,
    as the authors' code does."""
    return n_pairs >= OFFICIAL_MIN_PAIRS


# ---------------------------------------------------------------------------
# Cross-modal matching
# ---------------------------------------------------------------------------


def _draw_distractors(probes, ids, n_distractors, rng):
    """For each probe index, draw distinct gallery rows of another identity.

    Column by column: draw uniformly, then redraw the entries that share the
    probe's identity or repeat an earlier column, until none do. Each row is
    thus a uniform draw without replacement from the other identities' rows.
    """
    n = len(ids)
    chosen = np.empty((len(probes), n_distractors), dtype=np.int64)
    for c in range(n_distractors):
        column = rng.integers(0, n, size=len(probes))
        while True:
            bad = ids[column] == ids[probes]
            bad |= (chosen[:, :c] == column[:, None]).any(axis=1)
            if not bad.any():
                break
            column[bad] = rng.integers(0, n, size=int(bad.sum()))
        chosen[:, c] = column
    return chosen


def matching_accuracy(probe_emb, gallery_emb, n_c, rng, ids=None, trials=None):
    """Accuracy of 1-of-n_c cross-modal matching.

    Row i of ``probe_emb`` and row i of ``gallery_emb`` show the same identity.
    A trial with probe i uses the gallery {i} plus n_c - 1 distractor rows j
    drawn without replacement among rows of another identity (ids[j] != ids[i]
    when ``ids`` is given, else j != i). The trial is correct when
        d(p_i, g_i) < min_j d(p_i, g_j),   d = squared Euclidean distance,
    so ties count as wrong.

    trials: None runs one trial per probe row, in order; an integer runs that
    many trials with probes drawn uniformly (with replacement) by ``rng``.
    rng: a ``numpy.random.Generator``.
    """
    probe, gallery = to_host(probe_emb), to_host(gallery_emb)
    _check_paired_rows(probe, gallery, ("probe_emb", "gallery_emb"))
    if n_c < 2:
        raise ValueError(f"n_c must be at least 2, got {n_c}")
    n = len(probe)
    ids = np.arange(n) if ids is None else to_host(ids)
    if ids.shape != (n,):
        raise ValueError(f"ids must have shape ({n},), got {ids.shape}")

    probes = np.arange(n) if trials is None else rng.integers(0, n, size=trials)
    _, identity, identity_size = np.unique(ids, return_inverse=True, return_counts=True)
    n_other = n - identity_size[identity[probes]]
    if n_other.min() < n_c - 1:
        raise ValueError(
            f"n_c = {n_c} needs {n_c - 1} distractors of another identity, but some "
            f"probe has only {n_other.min()}"
        )

    distractors = _draw_distractors(probes, ids, n_c - 1, rng)
    true_dist = pair_distances(probe[probes], gallery[probes])
    nearest_distractor = np.min(
        [pair_distances(probe[probes], gallery[column]) for column in distractors.T],
        axis=0,
    )
    return float(np.mean(true_dist < nearest_distractor))


def matching_sizes_that_fit(ids, n_cs):
    """The gallery sizes of ``n_cs`` that `matching_accuracy` can run on probes of identities ``ids``.

    A trial with n_c needs n_c - 1 distractors of another identity for every probe:
        n_c - 1 <= len(ids) - (rows of the largest identity).
    """
    _, counts = np.unique(to_host(ids), return_counts=True)
    fewest_others = len(ids) - (counts.max() if len(counts) else 0)
    return [n_c for n_c in n_cs if 2 <= n_c <= fewest_others + 1]


def matching_table(face_emb, voice_emb, ids=None, n_cs=range(2, 11), seed=0):
    """Matching accuracy in both directions for each gallery size n_c.

    Returns {"voice_to_face": {n_c: acc}, "face_to_voice": {n_c: acc}};
    voice_to_face means a voice probe against a gallery of faces. Each
    (direction, n_c) uses its own generator ``default_rng([seed, n_c, d])``
    with d = 0 for voice_to_face and 1 for face_to_voice, so results are
    reproducible and independent of which n_c values are requested.
    """
    face, voice = to_host(face_emb), to_host(voice_emb)
    directions = {"voice_to_face": (voice, face), "face_to_voice": (face, voice)}
    table = {}
    for d, (name, (probe, gallery)) in enumerate(directions.items()):
        table[name] = {
            n_c: matching_accuracy(
                probe, gallery, n_c, np.random.default_rng([seed, n_c, d]), ids=ids
            )
            for n_c in n_cs
        }
    return table
