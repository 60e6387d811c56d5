import numpy as np
import pytest
from sklearn.model_selection import KFold

from paeff_np.metrics import (
    OFFICIAL_THRESHOLDS,
    _draw_distractors,
    matching_accuracy,
    matching_table,
    pair_distances,
    verification,
    verification_curves,
)

T, F = True, False


def interleave(pos, neg):
    """Pairs ordered pos_0, neg_0, pos_1, neg_1, ...: each official fold of
    2 consecutive pairs (20 pairs) holds one positive and one negative."""
    dist = np.empty(2 * len(pos))
    dist[0::2], dist[1::2] = pos, neg
    same = np.tile([T, F], len(pos))
    return dist, same


# ---------------------------------------------------------------------------
# pair_distances
# ---------------------------------------------------------------------------


def test_pair_distances_hand_case():
    face = np.array([[0.0, 0.0], [1.0, 2.0]])
    voice = np.array([[3.0, 4.0], [1.0, 0.0]])
    # (0-3)^2 + (0-4)^2 = 25;  0^2 + 2^2 = 4
    np.testing.assert_array_equal(pair_distances(face, voice), [25.0, 4.0])


def test_pair_distances_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        pair_distances(np.zeros((3, 2)), np.zeros((3, 4)))


# ---------------------------------------------------------------------------
# Exact ROC figures
# ---------------------------------------------------------------------------


def test_perfectly_separated():
    # Positives 0.205..0.385, negatives 1.205..1.385, interleaved.
    # Exact ROC: (0,0) -> (0,1) -> (1,1): AUC 1, EER 0.
    # Official: as the threshold rises mean TPR climbs to 1 while mean FPR = 0,
    # then FPR climbs to 1 with TPR = 1, so the curve is the same square:
    # AUC 1; |FNR - FPR| = 0 first at (0, 1), so EER 0.
    k = np.arange(10)
    dist, same = interleave(0.205 + 0.02 * k, 1.205 + 0.02 * k)
    result = verification(dist, same)
    assert result["eer"] == 0.0
    assert result["auc"] == 1.0
    assert result["eer_official"] == 0.0
    assert result["auc_official"] == pytest.approx(1.0, abs=1e-12)


def test_perfectly_inverted():
    # Every positive is farther than every negative.
    # Exact ROC: (0,0) -> (1,0) -> (1,1): AUC 0; FNR - FPR = 1 - FPR on the
    # first segment reaches 0 at (1,0), so EER 1.
    # Official: curve (0,0) -> (1,0) -> (1,1): AUC 0; |1 - TPR - FPR| = 1 - FPR
    # on the bottom edge, 0 at (1,0), so EER 1.
    k = np.arange(10)
    dist, same = interleave(1.205 + 0.02 * k, 0.205 + 0.02 * k)
    result = verification(dist, same)
    assert result["auc"] == 0.0
    assert result["eer"] == 1.0
    assert result["auc_official"] == pytest.approx(0.0, abs=1e-12)
    assert result["eer_official"] == 1.0


# In the hand cases below each pattern is tiled 3 times (12 pairs) so that
# the official protocol's minimum of 10 pairs is met; repeating every pair
# the same number of times leaves the exact ROC unchanged.


def test_exact_one_overlap():
    # d: 0.1 T, 0.2 F, 0.3 T, 0.4 F (2 positives, 2 negatives).
    # ROC vertices (FPR, TPR) by decreasing -d:
    #   (0,0) (0,.5) (.5,.5) (.5,1) (1,1)
    # AUC = .5*.5 + .5*1 = .75
    # FNR - FPR: 1, .5, 0 -> first vertex with <= 0 is (.5,.5) itself: EER .5
    dist = np.tile([0.1, 0.2, 0.3, 0.4], 3)
    same = np.tile([T, F, T, F], 3)
    result = verification(dist, same)
    assert result["auc"] == pytest.approx(0.75, abs=1e-12)
    assert result["eer"] == pytest.approx(0.5, abs=1e-12)


def test_exact_eer_interpolated_on_horizontal_segment():
    # Positives {0.1, 0.2, 0.4}, negative {0.3}.
    # ROC vertices: (0,0) (0,1/3) (0,2/3) (1,2/3) (1,1); AUC = 1 * 2/3 = 2/3.
    # FNR - FPR at the vertices: 1, 2/3, 1/3, -2/3. Crossing inside the
    # segment (0,2/3)-(1,2/3): fraction (1/3) / (1/3 + 2/3) = 1/3 of the way,
    # so EER = FPR = 1/3 (and FNR = 1 - 2/3 = 1/3 there).
    dist = np.tile([0.1, 0.2, 0.3, 0.4], 3)
    same = np.tile([T, T, F, T], 3)
    result = verification(dist, same)
    assert result["auc"] == pytest.approx(2 / 3, abs=1e-12)
    assert result["eer"] == pytest.approx(1 / 3, abs=1e-12)


def test_exact_eer_interpolated_on_tied_diagonal_segment():
    # d: 0.1 T, 0.2 T, 0.2 F, 0.3 F -- a positive and a negative tie at 0.2.
    # ROC vertices: (0,0) (0,.5) (.5,1) (1,1)  (the tie gives a diagonal).
    # AUC = .5 * (.5 + 1) / 2 + .5 * 1 = .875
    # FNR - FPR: 1, .5, -.5 -> halfway along (0,.5)-(.5,1): EER = .25
    dist = np.tile([0.1, 0.2, 0.2, 0.3], 3)
    same = np.tile([T, T, F, F], 3)
    result = verification(dist, same)
    assert result["auc"] == pytest.approx(0.875, abs=1e-12)
    assert result["eer"] == pytest.approx(0.25, abs=1e-12)


def test_exact_auc_equals_mann_whitney_count():
    rng = np.random.default_rng(0)
    dist = np.round(rng.uniform(0, 4, 300), 1)  # rounding creates ties
    same = rng.random(300) < 0.4
    pos, neg = dist[same], dist[~same]
    below = (pos[:, None] < neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    mann_whitney = (below + 0.5 * ties) / (len(pos) * len(neg))
    assert verification(dist, same)["auc"] == pytest.approx(mann_whitney, abs=1e-12)


def test_exact_curves_start_and_end():
    k = np.arange(10)
    dist, same = interleave(0.3 + 0.1 * k, 0.35 + 0.1 * k)
    curves = verification_curves(dist, same)
    assert (curves["fpr"][0], curves["tpr"][0]) == (0.0, 0.0)
    assert (curves["fpr"][-1], curves["tpr"][-1]) == (1.0, 1.0)


# ---------------------------------------------------------------------------
# Official (FOP / facenet calculate_roc) protocol
# ---------------------------------------------------------------------------


def test_official_hand_case_with_overlap():
    # Folds of 2 consecutive pairs, each one positive + one negative, so the
    # mean TPR (FPR) at threshold t is the fraction of all positives
    # (negatives) with d < t.
    # Positives: 8 at 0.505, 2 at 1.505. Negatives: 2 at 1.005, 8 at 2.005.
    #   t <= 0.50        : FPR 0,  TPR 0
    #   0.51 <= t <= 1.00: FPR 0,  TPR .8
    #   1.01 <= t <= 1.50: FPR .2, TPR .8
    #   1.51 <= t <= 2.00: FPR .2, TPR 1
    #   t >= 2.01        : FPR 1,  TPR 1
    # AUC = .2 * .8 + .8 * 1 = .96
    # |1 - TPR - FPR| on those stretches: 1, .2, 0, .2, 1 -> EER = FPR = .2
    dist, same = interleave([0.505] * 8 + [1.505] * 2, [1.005] * 2 + [2.005] * 8)
    curves = verification_curves(dist, same)
    t = {round(x, 2): i for i, x in enumerate(OFFICIAL_THRESHOLDS)}
    for threshold, fpr, tpr in [
        (0.50, 0.0, 0.0),
        (0.51, 0.0, 0.8),
        (1.00, 0.0, 0.8),
        (1.01, 0.2, 0.8),
        (1.51, 0.2, 1.0),
        (2.01, 1.0, 1.0),
    ]:
        i = t[threshold]
        assert curves["fpr_official"][i] == pytest.approx(fpr)
        assert curves["tpr_official"][i] == pytest.approx(tpr)
    result = verification(dist, same)
    assert result["auc_official"] == pytest.approx(0.96, abs=1e-12)
    assert result["eer_official"] == pytest.approx(0.2, abs=1e-12)


def test_official_folds_are_consecutive_not_shuffled():
    # Same 10 positives (0.505) and 10 negatives (1.505) in two orders.
    # Interleaved: every fold has one of each -> square ROC, AUC 1, EER 0.
    # Blocked (10 T then 10 F): folds 0-4 only positives (FPR 0 by convention),
    # folds 5-9 only negatives (TPR 0). Mean TPR tops out at 5/10, mean FPR
    # at 5/10: curve (0,0) -> (0,.5) -> (.5,.5); AUC = .5 * .5 = .25;
    # |1 - TPR - FPR|: 1, .5, 0 -> EER = .5.
    # The exact figures ignore order: AUC 1, EER 0 for both.
    interleaved = verification(*interleave([0.505] * 10, [1.505] * 10))
    assert interleaved["auc_official"] == pytest.approx(1.0, abs=1e-12)
    assert interleaved["eer_official"] == 0.0

    blocked = verification(np.repeat([0.505, 1.505], 10), np.repeat([T, F], 10))
    assert blocked["auc_official"] == pytest.approx(0.25, abs=1e-12)
    assert blocked["eer_official"] == pytest.approx(0.5, abs=1e-12)
    assert blocked["auc"] == 1.0
    assert blocked["eer"] == 0.0


def test_official_uneven_folds_follow_kfold():
    # 12 pairs: KFold(10) gives fold sizes 2,2,1,1,1,1,1,1,1,1 (extra pairs go
    # to the FIRST folds). Positives at 0.505, negatives at 1.505.
    # same = T F | T F | T | T | T | T | T | F | F | F
    # per-fold TPR at large t: 1 1 1 1 1 1 1 0 0 0 -> 0.7
    # per-fold FPR at large t: 1 1 0 0 0 0 0 1 1 1 -> 0.5
    # Curve (0,0) -> (0,.7) -> (.5,.7): AUC = .5 * .7 = .35
    # |1 - TPR - FPR|: 1, .3, .2 -> EER = .5
    # (Extra pairs in the LAST folds would give FPR .4 and AUC .28 instead.)
    same = np.array([T, F, T, F, T, T, T, T, T, F, F, F])
    dist = np.where(same, 0.505, 1.505)
    result = verification(dist, same)
    assert result["auc_official"] == pytest.approx(0.35, abs=1e-12)
    assert result["eer_official"] == pytest.approx(0.5, abs=1e-12)


def reference_calculate_roc(dist, same):
    """Loop-by-loop FOP/facenet calculate_roc with sklearn KFold."""
    tprs = np.zeros((10, len(OFFICIAL_THRESHOLDS)))
    fprs = np.zeros((10, len(OFFICIAL_THRESHOLDS)))
    folds = KFold(n_splits=10, shuffle=False).split(np.arange(len(dist)))
    for f, (_, test) in enumerate(folds):
        for i, threshold in enumerate(OFFICIAL_THRESHOLDS):
            predict = dist[test] < threshold
            actual = same[test]
            tp = np.sum(predict & actual)
            fp = np.sum(predict & ~actual)
            tn = np.sum(~predict & ~actual)
            fn = np.sum(~predict & actual)
            tprs[f, i] = 0 if tp + fn == 0 else tp / (tp + fn)
            fprs[f, i] = 0 if fp + tn == 0 else fp / (fp + tn)
    return fprs.mean(axis=0), tprs.mean(axis=0)


@pytest.mark.parametrize("on_grid", [False, True])
def test_official_matches_loop_reference_on_random_data(on_grid):
    # on_grid: distances equal to grid thresholds check the strict d < t.
    rng = np.random.default_rng(1)
    dist = rng.choice(OFFICIAL_THRESHOLDS, 57) if on_grid else rng.uniform(0, 4, 57)
    same = rng.random(57) < 0.5
    fpr_ref, tpr_ref = reference_calculate_roc(dist, same)
    curves = verification_curves(dist, same)
    np.testing.assert_allclose(curves["fpr_official"], fpr_ref, atol=1e-12)
    np.testing.assert_allclose(curves["tpr_official"], tpr_ref, atol=1e-12)
    eer_ref = fpr_ref[np.argmin(np.abs(1 - tpr_ref - fpr_ref))]
    result = verification(dist, same)
    assert result["eer_official"] == pytest.approx(eer_ref, abs=1e-12)
    assert result["auc_official"] == pytest.approx(np.trapezoid(tpr_ref, fpr_ref), abs=1e-12)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dist, same, message",
    [
        (np.ones(12), np.tile([T, F], 5), "same length"),
        (np.r_[np.nan, np.ones(11)], np.tile([T, F], 6), "NaN"),
        (np.ones(12), np.ones(12, dtype=bool), "both"),
        (np.ones(12), np.zeros(12, dtype=bool), "both"),
        (np.ones((12, 1)), np.tile([T, F], 6), "1-D"),
        (np.ones(12), np.tile([0, 2], 6), "boolean"),
        (np.ones(8), np.tile([T, F], 4), "at least 10"),
    ],
)
def test_verification_rejects_bad_input(dist, same, message):
    with pytest.raises(ValueError, match=message):
        verification(dist, same)


def test_verification_accepts_device_arrays(monkeypatch):
    """Device arrays reach the host through ``backend.to_host`` (``.get()``);
    the strict CuPy test double refuses any implicit conversion."""
    import strict_xp
    cupy = strict_xp.install(monkeypatch)
    dist = np.tile([0.1, 0.2, 0.2, 0.3], 3)
    same = np.tile([T, T, F, F], 3)
    result = verification(cupy.asarray(dist), cupy.asarray(same))
    assert result["eer"] == pytest.approx(0.25, abs=1e-12)  # as in the tie case


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------


def test_matching_identical_true_item_is_always_found():
    # Gallery = probe: the true item is at distance 0, every distractor (a
    # different random row) is at distance > 0.
    emb = np.random.default_rng(2).normal(size=(50, 8))
    for n_c in range(2, 11):
        rng = np.random.default_rng(n_c)
        assert matching_accuracy(emb, emb, n_c, rng) == 1.0


def test_matching_random_embeddings_is_chance():
    rng = np.random.default_rng(3)
    probe = rng.normal(size=(4000, 16))
    gallery = rng.normal(size=(4000, 16))
    for n_c in (2, 4):
        acc = matching_accuracy(probe, gallery, n_c, np.random.default_rng(n_c))
        assert abs(acc - 1 / n_c) < 0.03


def test_matching_ids_exclude_same_identity_distractors():
    # 50 identities x 2 rows; both rows of an identity are the same point, and
    # identities are far apart (10 * one-hot). A same-identity distractor
    # would tie with the true item (distance 0) and make the trial wrong.
    ids = np.repeat(np.arange(50), 2)
    emb = 10.0 * np.eye(50)[ids]
    with_ids = matching_accuracy(emb, emb, 10, np.random.default_rng(0), ids=ids)
    assert with_ids == 1.0
    # Without ids the twin row is a candidate distractor (chance 9/99 each).
    without_ids = matching_accuracy(emb, emb, 10, np.random.default_rng(0))
    assert without_ids < 0.97


def test_draw_distractors_are_distinct_and_of_other_identity():
    # 6 rows, ids 0 0 1 1 2 2: every probe has exactly 4 rows of another
    # identity, so drawing 4 without replacement must return all of them.
    ids = np.array([0, 0, 1, 1, 2, 2])
    probes = np.arange(6)
    drawn = _draw_distractors(probes, ids, 4, np.random.default_rng(0))
    for i, row in enumerate(drawn):
        assert sorted(row) == [j for j in range(6) if ids[j] != ids[i]]


def test_matching_trials_argument():
    emb = np.random.default_rng(4).normal(size=(20, 4))
    assert matching_accuracy(emb, emb, 5, np.random.default_rng(0), trials=300) == 1.0
    assert matching_accuracy(emb, emb[::-1], 5, np.random.default_rng(0), trials=300) < 1.0


@pytest.mark.parametrize(
    "n_c, ids, message",
    [
        (1, None, "at least 2"),
        (11, None, "distractors"),  # 10 rows leave only 9 distractors
        (3, np.array([0] * 9 + [1]), "distractors"),  # rows 0-8: 1 other-identity row
    ],
)
def test_matching_rejects_bad_input(n_c, ids, message):
    emb = np.zeros((10, 3))
    with pytest.raises(ValueError, match=message):
        matching_accuracy(emb, emb, n_c, np.random.default_rng(0), ids=ids)


def test_matching_table_directions_and_reproducibility():
    # Faces all at the origin, voices random. voice->face: a voice probe sees
    # a gallery of identical faces, every trial is a tie, accuracy 0.
    # face->voice: probe at the origin, correct when the true voice has the
    # smallest norm in the gallery, which happens in some trials.
    rng = np.random.default_rng(5)
    face = np.zeros((200, 8))
    voice = rng.normal(size=(200, 8))
    table = matching_table(face, voice, n_cs=range(2, 6), seed=0)
    assert set(table) == {"voice_to_face", "face_to_voice"}
    assert list(table["voice_to_face"]) == [2, 3, 4, 5]
    assert all(acc == 0.0 for acc in table["voice_to_face"].values())
    assert all(acc > 0.0 for acc in table["face_to_voice"].values())

    again = matching_table(face, voice, n_cs=range(2, 6), seed=0)
    assert again == table
    other_seed = matching_table(face, voice, n_cs=range(2, 6), seed=1)
    assert other_seed["face_to_voice"] != table["face_to_voice"]


# ---------------------------------------------------------------------------
# Lists too short for a protocol: known before training (issue 8 §2)
# ---------------------------------------------------------------------------


def test_verification_without_the_official_protocol_runs_on_a_short_list():
    from paeff_np.metrics import official_protocol_fits
    dist, same = np.array([0.1, 0.9, 0.2, 0.8]), np.tile([T, F], 2)
    assert not official_protocol_fits(len(dist)) and not official_protocol_fits(19) and official_protocol_fits(20)
    result = verification(dist, same, official=False)
    assert set(result) == {"eer", "auc"}
    full = np.tile(dist, 3)
    assert verification(full, np.tile(same, 3), official=False) == {
        k: v for k, v in verification(full, np.tile(same, 3)).items() if k in ("eer", "auc")}
    assert set(verification_curves(dist, same, official=False)) == {"fpr", "tpr"}


@pytest.mark.parametrize("ids, fitting", [
    (None, [2, 3, 4, 5]),                          # 5 probes of 5 identities: 4 distractors at most
    ([0, 0, 1, 1, 2], [2, 3, 4]),                  # the largest identity has 2 rows: 3 others
    ([0, 0, 0, 0, 1], [2]),
    ([7, 7, 7, 7, 7], []),
])
def test_matching_sizes_that_fit_are_exactly_those_matching_accuracy_runs(ids, fitting):
    from paeff_np.metrics import matching_sizes_that_fit
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((5, 3))
    given = np.arange(5) if ids is None else np.array(ids)
    assert matching_sizes_that_fit(given, range(2, 11)) == fitting
    for n_c in range(2, 11):
        if n_c in fitting:
            matching_accuracy(emb, emb + 0.1, n_c, rng, ids=ids)
        else:
            with pytest.raises(ValueError, match="distractors"):
                matching_accuracy(emb, emb + 0.1, n_c, rng, ids=ids)


def test_evaluate_skips_what_a_short_list_cannot_run_and_says_so_in_advance():
    from paeff_np.data import TestList
    from paeff_np.run.evaluation import evaluate, format_results, protocol_notes
    from paeff_np.model import Config, init_params

    cfg = Config(face_dim=6, voice_dim=4, embed_dim=8, n_classes=3)
    params, buffers = init_params(cfg, seed=0)
    rng = np.random.default_rng(1)
    lists = {f"unseenunheard/{kind}": TestList(face=rng.standard_normal((rows, 6)).astype(np.float32),
                                                voice=rng.standard_normal((rows, 4)).astype(np.float32))
             for kind, rows in (("random", 8), ("G", 6), ("N", 20))}
    lists["seenheard/random"] = TestList(face=rng.standard_normal((40, 6)).astype(np.float32),
                                         voice=rng.standard_normal((40, 4)).astype(np.float32))

    notes = protocol_notes(lists)
    assert notes == [
        "note: unseenunheard/random has 8 pairs, fewer than the 20 of the official protocol "
        "(a positive and a negative pair in each of its 10 folds): its EER*/AUC* are skipped",
        "note: unseenunheard/random has 4 positive pairs, too few distinct identities for 1-of-10 matching: "
        "matching runs for n_c = 2, 3, 4 only",
        "note: unseenunheard/G has 6 pairs, fewer than the 20 of the official protocol "
        "(a positive and a negative pair in each of its 10 folds): its EER*/AUC* are skipped",
    ]
    results = evaluate(params, buffers, cfg, lists)
    assert set(results["unseenunheard/random"]) == {"eer", "auc", "matching"}
    assert sorted(results["unseenunheard/random"]["matching"]["voice_to_face"]) == [2, 3, 4]
    assert set(results["unseenunheard/G"]) == {"eer", "auc"}
    assert {"eer_official", "auc_official"} <= set(results["unseenunheard/N"])
    assert sorted(results["seenheard/random"]["matching"]["face_to_voice"]) == list(range(2, 11))
    table = format_results(results)
    assert "–" in table and "unseen-unheard/G" in table         # split names for people


def test_pair_distances_stay_on_the_device(monkeypatch):
    """On CuPy arrays (the strict test double) the distances are computed there
    and stay there: only they need to cross to the host."""
    import strict_xp
    cupy = strict_xp.install(monkeypatch)
    face = cupy.asarray(np.array([[0.0, 0.0], [1.0, 2.0]]))
    voice = cupy.asarray(np.array([[3.0, 4.0], [1.0, 0.0]]))
    dist = pair_distances(face, voice)
    assert isinstance(dist, cupy.ndarray)
    np.testing.assert_array_equal(dist.get(), [25.0, 4.0])
