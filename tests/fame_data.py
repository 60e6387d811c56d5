"""A generator of small MAV-Celeb-shaped data sets on disk, for the FAME tests.

Written apart from ``paeff_np.fame.world`` on purpose (a test of the command must not share
the code of the world it ships): identities are Gaussian centres pushed through fixed random
maps, the second language adds a rotation of the voice space, features are written as CSV
text the way the organisers' files are (headerless, the identity last in the training files).

``write_dataset(root)`` makes ``root/feats/<ver>/<Lang>/``, ``root/lists/<ver>/`` and
``root/labels/`` and returns a dict of what it wrote and the truth of every trial.
"""
import os

import numpy as np

FACE_DIM, VOICE_DIM = 40, 16


def _csv(path, matrix, labels=None):
    rows = [",".join(f"{x:.7g}" for x in row) + ("" if labels is None else f",{labels[i]}")
            for i, row in enumerate(matrix)]
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")


def write_dataset(root, version="v3", languages=("English", "German"), unheard_names="unheard",
                  identities=30, rows_per_identity=16, test_people=8, trials=60, seed=7,
                  extra_test_column=True):
    """Write the layout; ``unheard_names``: "unheard" (``<L>_faces_unheard_test.csv``) or "plain"
    (``<L>_faces_test.csv``, the organisers' test.py). English identities are labelled ``id0001``,
    the other language's by integers. With ``extra_test_column`` the command must ignore one
    more column: numbers in the second language's test CSVs, text in the first language's
    unheard copy."""
    rng = np.random.default_rng(seed)
    k = 6
    centre = rng.normal(size=(identities + test_people, k))
    to_face = rng.normal(size=(k, FACE_DIM))
    to_voice = rng.normal(size=(k, VOICE_DIM))
    rotation = {languages[0]: np.eye(k), languages[1]: np.linalg.qr(rng.normal(size=(k, k)))[0] * 0.5 + np.eye(k) * 0.5}

    def face(who):
        return np.maximum(centre[who] @ to_face + 0.7 * rng.normal(size=(len(who), FACE_DIM)), 0)

    def voice(who, language):
        v = (centre[who] @ rotation[language]) @ to_voice + 0.7 * rng.normal(size=(len(who), VOICE_DIM))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    feats, lists, labels = (os.path.join(root, d) for d in ("feats", "lists", "labels"))
    os.makedirs(os.path.join(lists, version))
    os.makedirs(labels)
    truth, test_rows = {}, {}
    for language in languages:
        ids, same = [], []
        who_face = identities + rng.integers(test_people, size=trials)
        same = rng.random(trials) < 0.5
        other = identities + (who_face - identities + rng.integers(1, test_people, size=trials)) % test_people
        who_voice = np.where(same, who_face, other)
        ids = [f"{language[:2].lower()}{rng.integers(10**6):06d}x{i}" for i in range(trials)]
        test_rows[language] = (face(who_face), voice(who_voice, language))
        truth[language] = dict(zip(ids, same))
        with open(os.path.join(lists, version, f"{language}_test.txt"), "w") as f:
            f.writelines(f"{t} voices/{language}/{i:05d}.wav faces/{language}/{i:05d}.jpg\n"
                         for i, t in enumerate(ids))
        order = rng.permutation(trials)                       # labels in any order
        with open(os.path.join(labels, f"{language}_test_labels.txt"), "w") as f:
            f.writelines(f"{ids[i]} {int(same[i])}\n" for i in order)
    for n, language in enumerate(languages):
        folder = os.path.join(feats, version, language)
        os.makedirs(folder)
        who = rng.permutation(np.repeat(np.arange(identities), rows_per_identity))
        names = [f"id{i + 1:04d}" for i in who] if n == 0 else [str(100 + i) for i in who]
        _csv(os.path.join(folder, f"{language}_faces_train.csv"), face(who), names)
        _csv(os.path.join(folder, f"{language}_voices_train.csv"), voice(who, language), names)
        for test_language in languages:
            f_rows, v_rows = test_rows[test_language]
            tail = None
            if extra_test_column and test_language == languages[1]:      # a numeric extra column
                f_rows = np.hstack([f_rows, np.arange(len(f_rows))[:, None]])
                v_rows = np.hstack([v_rows, np.arange(len(v_rows))[:, None]])
            elif extra_test_column and test_language != language:       # a text one: the row's name
                tail = [f"row{i}" for i in range(len(f_rows))]
            middle = "_" if test_language == language or unheard_names == "plain" else "_unheard_"
            for modality, matrix in (("faces", f_rows), ("voices", v_rows)):
                _csv(os.path.join(folder, f"{test_language}_{modality}{middle}test.csv"), matrix, tail)
    return dict(feats=feats, lists=lists, labels=labels, version=version, languages=languages, truth=truth)
