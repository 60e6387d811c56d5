"""Evaluate a model on test lists: verification and matching (docs/spec.md §5).

Shared by ``train.py`` (the results table at the end of a run) and
``eval.py``. Embeddings are computed on the model's device in chunks; the
metrics run on the host.
"""
import numpy as np

from ..backend import get_array_module, to_host
from ..metrics import (OFFICIAL_FOLDS, OFFICIAL_MIN_PAIRS, matching_sizes_that_fit, matching_table, official_protocol_fits,
                      pair_distances, verification, verification_curves)
from ..model import embed

EMBED_CHUNK = 4096
DIRECTION_LABELS = {"voice_to_face": "V→F", "face_to_voice": "F→V"}   # probe → gallery
# the test splits as tables and plots print them; files and metrics.json keep the raw names
SPLIT_NAMES = {"seenheard": "seen-heard", "unseenunheard": "unseen-unheard"}


def list_name(key):
    """``"seen-heard/random"`` for the key ``"seenheard/random"`` (a split alone too)."""
    split, sep, kind = key.partition("/")
    return SPLIT_NAMES.get(split, split) + sep + kind


def embedded_chunks(params, buffers, face, voice, cfg, chunk=EMBED_CHUNK):
    """Eval-mode embeddings ``(emb_f, emb_v)`` of paired host rows, ``chunk``
    rows at a time, on the model's device: one pair of arrays per chunk."""
    xp = get_array_module(*params.values())
    dtype = params["res_mix.weight"].dtype
    for start in range(0, len(face), chunk):
        f = xp.asarray(face[start:start + chunk], dtype=dtype)
        v = xp.asarray(voice[start:start + chunk], dtype=dtype)
        yield embed(params, buffers, f, v, cfg)


def embed_rows(params, buffers, face, voice, cfg, chunk=EMBED_CHUNK):
    """Eval-mode embeddings of paired rows, ``chunk`` rows at a time; host arrays."""
    out_f, out_v = [], []
    for emb_f, emb_v in embedded_chunks(params, buffers, face, voice, cfg, chunk):
        out_f.append(to_host(emb_f))
        out_v.append(to_host(emb_v))
    return np.concatenate(out_f), np.concatenate(out_v)


def l2_scores(params, buffers, face, voice, cfg, chunk=EMBED_CHUNK):
    """The score of each paired row: the L2 distance ||f_i - v_i|| of the evaluation embeddings
    (``embed_rows``), lower for the same person: what FAME's score files and
    ``eval.py --scores`` write (its square is what ``verification`` ranks: the same EER)."""
    emb_f, emb_v = embed_rows(params, buffers, face, voice, cfg, chunk)
    return np.sqrt(pair_distances(emb_f, emb_v))


def validation_figures(params, buffers, face, voice, same, cfg, chunk=EMBED_CHUNK):
    """Exact EER and AUC of verification pairs held on the model's device.

    The eval-mode embeddings and d_i = ||f_i - v_i||² are computed there,
    ``chunk`` rows at a time; only the distances come to the host, for the
    exact ROC (``metrics.verification``)."""
    dist = [to_host(pair_distances(emb_f, emb_v))
            for emb_f, emb_v in embedded_chunks(params, buffers, face, voice, cfg, chunk)]
    return verification(np.concatenate(dist), same, official=False)


def matching_pairs(test_list, emb_f, emb_v):
    """The positive pairs of a list (even rows) and their identities for matching."""
    ids = None if test_list.ids is None else np.asarray(test_list.ids)[0::2, 0]
    return emb_f[0::2], emb_v[0::2], ids


def protocols_that_fit(test_list, n_cs=range(2, 11)):
    """``(official, n_cs)``: whether the official protocol runs on the list, and which
    matching gallery sizes its positive pairs allow (docs/spec.md §5)."""
    positive_ids = np.arange(len(test_list) // 2) if test_list.ids is None else np.asarray(test_list.ids)[0::2, 0]
    return official_protocol_fits(len(test_list)), matching_sizes_that_fit(positive_ids, n_cs or ())


def protocol_notes(tests, n_cs=range(2, 11)):
    """One note per protocol that a list of ``tests`` is too short for (and that `evaluate` will skip).

    Called before training, so that a short list is reported at the start, not found at the end.
    """
    notes = []
    for key in sorted(tests, key=_list_order):
        official, fitting = protocols_that_fit(tests[key], n_cs if key.endswith("/random") else None)
        n = len(tests[key])
        if not official:
            notes.append(f"note: {key} has {n} pairs, fewer than the {OFFICIAL_MIN_PAIRS} of the official "
                         f"protocol (a positive and a negative pair in each of its {OFFICIAL_FOLDS} folds): "
                         f"its EER*/AUC* are skipped")
        wanted = list(n_cs) if key.endswith("/random") else []
        if wanted and fitting != wanted:
            runs = f"runs for n_c = {', '.join(map(str, fitting))} only" if fitting else "is skipped"
            pairs = f"{n // 2} positive pair{'s' if n // 2 != 1 else ''}"
            notes.append(f"note: {key} has {pairs}, too few distinct identities for "
                         f"1-of-{max(wanted)} matching: matching {runs}")
    return notes


def evaluate_list(params, buffers, cfg, test_list, n_cs=range(2, 11), seed=0, curves=False):
    """Verification figures (exact and official) and matching accuracies of one list.

    Protocols the list is too short for are left out (see `protocols_that_fit`).
    """
    official, n_cs = protocols_that_fit(test_list, n_cs)
    emb_f, emb_v = embed_rows(params, buffers, test_list.face, test_list.voice, cfg)
    dist = pair_distances(emb_f, emb_v)
    result = verification(dist, test_list.same, official=official)
    if n_cs:
        result["matching"] = matching_table(*matching_pairs(test_list, emb_f, emb_v),
                                            n_cs=n_cs, seed=seed)
    if curves:
        result["curves"] = {k: v.tolist()
                            for k, v in verification_curves(dist, test_list.same, official).items()}
    return result


def evaluate(params, buffers, cfg, tests, n_cs=range(2, 11), seed=0, curves=False):
    """``{"<split>/<kind>": evaluate_list(...)}`` for every list in ``tests``.

    Matching runs on the random lists only: it uses a list's positive pairs,
    and the demographic constraint of G/N/A/GNA lives in their negatives.
    """
    return {key: evaluate_list(params, buffers, cfg, tests[key],
                               n_cs if key.endswith("/random") else None, seed, curves)
            for key in sorted(tests, key=_list_order)}


def _list_order(key):
    split, kind = key.split("/")
    kinds = ("random", "G", "N", "A", "GNA")
    return (split != "seenheard", kinds.index(kind) if kind in kinds else len(kinds), kind)


def format_results(results, n_cs_shown=(2, 10)):
    """The results table: EER/AUC (exact and official, %) per list, then matching."""
    lines = [f"{'test list':<22} {'EER':>6} {'AUC':>6} {'EER*':>6} {'AUC*':>6}"]
    pct = lambda r, k: f"{100 * r[k]:6.1f}" if k in r else f"{'–':>6}"
    for key, r in results.items():
        lines.append(f"{list_name(key):<22} {pct(r, 'eer')} {pct(r, 'auc')} {pct(r, 'eer_official')} {pct(r, 'auc_official')}")
    lines.append("(%; EER/AUC exact from the ROC, * = official 10-fold protocol; – = list too short)")
    matching = [(k, r["matching"]) for k, r in results.items() if "matching" in r]
    if matching:
        columns = [(k, d) for k, _ in matching for d in ("voice_to_face", "face_to_voice")]
        short = {"seenheard": "SH", "unseenunheard": "UU"}
        name = lambda k, d: f"{short.get(k.split('/')[0], k)} {DIRECTION_LABELS[d]}"
        lines += ["", "matching accuracy (positive pairs of the random lists)",
                  f"{'n_c':>4} " + " ".join(f"{name(k, d):>8}" for k, d in columns)]
        for n in n_cs_shown:
            lines.append(f"{n:>4} " + " ".join(
                f"{100 * dict(matching)[k][d][n]:8.1f}" if n in dict(matching)[k][d] else f"{'–':>8}"
                for k, d in columns))
        lines.append("(%; SH seen-heard, UU unseen-unheard, V→F voice probe vs faces; chance = 100/n_c)")
    return "\n".join(lines)
