"""The FAME challenge's files: the feature layout, trial lists, labels, score files, submission.

Plumbing only: nothing here trains or embeds (``paeff_np.fame.__main__`` does).

Layout (README "FAME 2026"), for a version ``ver`` and its two languages A and B::

    FEATS/<ver>/<A>/<A>_faces_train.csv  <A>_voices_train.csv    training pairs, last column the identity
    FEATS/<ver>/<A>/<A>_faces_test.csv   <A>_voices_test.csv     A's test trials, for A's model
    FEATS/<ver>/<A>/<B>_faces_unheard_test.csv  (or <B>_faces_test.csv, the organisers' test.py name)
    FEATS/<ver>/<A>/<B>_voices_unheard_test.csv (or <B>_voices_test.csv)   B's test trials, for A's model
    LISTS/<ver>/<A>_test.txt             one trial per line: <id> <voice path> <face path>
    LABELS/<A>_test_labels.txt           (optional) <id> <label>, 1 = same person, any order

and the same with A and B swapped. Row i of a list is row i of that language's
face and voice test CSVs in both folders. Test CSVs hold features only; columns
beyond the training files' width are ignored.

The submission (``submission_entries``): ``sub_score_<X>_heard.txt`` is the model
trained on X scoring X's list; ``sub_score_<Y>_unheard.txt`` is the other language's
model scoring Y's list; lines ``'%s %f\\n' % (id, L2 distance)`` in the list's order.
The zip holds exactly the four files at its root.
"""
from __future__ import annotations

import io
import os
import re
import zipfile
from dataclasses import dataclass

import numpy as np

from ..data import DataError
from ..data.csv import check_regular_file, read_features, read_train
from ..metrics import verification

# the two languages of each version (the organisers' computeScore.py; v2, English/Hindi, is FAME 2024's)
VERSION_LANGUAGES = {"v1": ("English", "Urdu"), "v3": ("English", "German")}

# The FOP baseline's published EERs (%), per version and condition, as the issue that asked
# for this command quotes them (README "FAME 2026" says where they come from).
BASELINE_EER = {
    "v1": {"English_heard": 29.3, "Urdu_unheard": 37.9, "English_unheard": 40.4, "Urdu_heard": 25.8,
           "overall": 33.4},
    "v3": {"English_heard": 35.3, "German_unheard": 48.0, "English_unheard": 45.1, "German_heard": 37.9,
           "overall": 41.6},
}

SUBMISSION_NAME = "submission.zip"
RESULTS_NAME = "fame.json"
LANGUAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


class Condition:
    """One scored list: the model trained on ``model`` scoring the list of ``test``."""

    def __init__(self, model, test):
        self.model, self.test = model, test

    @property
    def heard(self):
        return self.model == self.test

    @property
    def name(self):
        """``English_heard``, ``German_unheard``: named by the list's language."""
        return f"{self.test}_{'heard' if self.heard else 'unheard'}"

    @property
    def score_file(self):
        return f"sub_score_{self.name}.txt"

    def __repr__(self):
        return f"Condition({self.model!r}, {self.test!r})"


def conditions(languages):
    """The four conditions in the table's order: A's model on A and B, then B's on A and B."""
    a, b = languages
    return [Condition(a, a), Condition(a, b), Condition(b, a), Condition(b, b)]


def check_language_names(languages):
    """Two distinct names usable in file names (``--languages``)."""
    for name in languages:
        if not LANGUAGE_NAME.fullmatch(name):
            raise DataError(f"--languages: {name!r} is not a language name (letters, digits, _ or -, "
                            f"starting with a letter)")
    if languages[0] == languages[1]:
        raise DataError(f"--languages: the two languages must differ, got {languages[0]} twice")


# --- the feature folders -------------------------------------------------------------------

def train_paths(feats, version, language):
    """``(face, voice)`` training CSVs of ``language``'s model."""
    folder = os.path.join(feats, version, language)
    return (os.path.join(folder, f"{language}_faces_train.csv"),
            os.path.join(folder, f"{language}_voices_train.csv"))


def test_paths(feats, version, model, test):
    """``(face, voice)`` test CSVs of the list of ``test`` in the folder of ``model``'s language.

    The heard files are ``<L>_faces_test.csv``; the unheard ones ``<L>_faces_unheard_test.csv``
    (computeScore.py) or, as the organisers' test.py reads them, ``<L>_faces_test.csv``:
    the first that exists; a missing file is named under both names."""
    folder = os.path.join(feats, version, model)
    paths = []
    for modality in ("faces", "voices"):
        plain = os.path.join(folder, f"{test}_{modality}_test.csv")
        if model == test:
            paths.append(plain)
            continue
        unheard = os.path.join(folder, f"{test}_{modality}_unheard_test.csv")
        found = next((p for p in (unheard, plain) if os.path.exists(p)), None)
        if found is None:
            raise DataError(f"{unheard}: file not found (nor {os.path.basename(plain)}, the other "
                            f"accepted name): {model}'s folder needs {test}'s {modality[:-1]} test features")
        paths.append(found)
    return tuple(paths)


def read_language_train(feats, version, language):
    """The training pairs of ``language``'s model (``data.csv.read_train``: the last column is the
    identity, text such as ``id0001`` or an integer)."""
    return read_train(*train_paths(feats, version, language))


def read_test_features(face_path, voice_path, face_dim, voice_dim, widths_of):
    """The test features of one list, ``face_dim`` / ``voice_dim`` wide, the model's widths
    (``widths_of`` says whose, for the message): wider files' other columns are ignored,
    narrower ones refused."""
    out = []
    for path, width, modality in ((face_path, face_dim, "face"), (voice_path, voice_dim, "voice")):
        matrix = read_features(path)
        if matrix.shape[1] < width:
            raise DataError(f"{path}: {matrix.shape[1]} columns, but the {modality} features of "
                            f"{widths_of} are {width} wide: a width other than the training files'")
        out.append(matrix[:, :width])
    if len(out[0]) != len(out[1]):
        raise DataError(f"{face_path} has {len(out[0])} rows but {voice_path} has {len(out[1])}; "
                        f"row i of both files is trial i")
    return out[0], out[1]


# --- trial lists and labels ----------------------------------------------------------------

def list_path(lists, version, language):
    return os.path.join(lists, version, f"{language}_test.txt")


def labels_path(labels_dir, language):
    return os.path.join(labels_dir, f"{language}_test_labels.txt")


def _lines(path):
    """``(line number, fields)`` of each non-blank line; a missing, binary or non-regular
    file (a named pipe) is one DataError."""
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start + 1})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return [(number, line.split()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _excerpt(fields):
    text = " ".join(fields)
    return text if len(text) <= 80 else text[:80] + "..."


def read_trial_list(path):
    """The trial ids of a list, in its order: one ``<id> <voice path> <face path>`` per line
    (blank lines skipped). A line with another number of fields, or an id given twice, is refused."""
    ids, first_line = [], {}
    for number, fields in _lines(path):
        if len(fields) != 3:
            raise DataError(f"{path}: line {number} has {len(fields)} field(s) ({_excerpt(fields)!r}); "
                            f"expected '<id> <voice path> <face path>'")
        trial = fields[0]
        if trial in first_line:
            raise DataError(f"{path}: line {number}: trial id {trial!r} is duplicated (first on line "
                            f"{first_line[trial]})")
        first_line[trial] = number
        ids.append(trial)
    if not ids:
        raise DataError(f"{path}: no trials")
    return ids


def read_labels(path, ids):
    """``same`` (bool, in the order of ``ids``) from ``<id> <label>`` lines in any order: 1 the same
    person, 0 not. An unknown or repeated id, a malformed line or a trial left without a label
    is refused; the list needs both kinds of trial for an EER."""
    position = {trial: i for i, trial in enumerate(ids)}
    same = np.zeros(len(ids), bool)
    seen = {}
    for number, fields in _lines(path):
        if len(fields) != 2 or fields[1] not in ("0", "1"):
            raise DataError(f"{path}: line {number} ({_excerpt(fields)!r}): expected '<id> <label>' "
                            f"with label 1 (same person) or 0")
        trial, label = fields
        if trial not in position:
            raise DataError(f"{path}: line {number}: id {trial!r} is not a trial of its list")
        if trial in seen:
            raise DataError(f"{path}: line {number}: id {trial!r} is duplicated (first on line {seen[trial]})")
        seen[trial] = number
        same[position[trial]] = label == "1"
    if len(seen) != len(ids):
        missing = next(t for t in ids if t not in seen)
        raise DataError(f"{path}: labels {len(seen)} of the list's {len(ids)} trials; {missing!r} "
                        f"has none")
    if same.all() or not same.any():
        raise DataError(f"{path}: every trial is labelled {int(same[0])}; an EER needs both "
                        f"same-person and different-person trials")
    return same


# --- the protocol's data, read and checked before any training ------------------------------

@dataclass
class TrialList:
    """One language's test list: the trial ids in order and, with labels, who is who."""

    language: str
    path: str
    ids: list
    same: np.ndarray | None = None      # bool per trial; None: labels not given


@dataclass
class Protocol:
    """Everything a FAME run needs: per language, its model's training pairs; per condition,
    the test features; per language, the trial list."""

    version: str
    languages: tuple
    train: dict                        # language -> TrainSet
    train_meta: dict                   # language -> what the run folder records of its data
    features: dict                     # condition name -> (face, voice)
    lists: dict                        # language -> TrialList

    def conditions(self):
        return conditions(self.languages)


def load_protocol(feats, lists, version, languages, labels_dir=None, note=print):
    """Read and check every file of the protocol (see the module doc); ``note(line)`` is told
    of a language whose label file is absent from ``labels_dir``."""
    trial_lists = {}
    for language in languages:
        path = list_path(lists, version, language)
        trial_lists[language] = TrialList(language, path, read_trial_list(path))
    train, train_meta = {}, {}
    for language in languages:
        train[language] = read_language_train(feats, version, language)
        train_meta[language] = {"source": "dir", "data_dir": os.path.abspath(os.path.join(feats, version, language)),
                                "train_sha256": train[language].fingerprint(),
                                "fame": {"version": version, "language": language}}
    features = {}
    for condition in conditions(languages):
        face_path, voice_path = test_paths(feats, version, condition.model, condition.test)
        model_train = train[condition.model]
        face, voice = read_test_features(face_path, voice_path, model_train.face_dim, model_train.voice_dim,
                                         f"the training files in {os.path.join(feats, version, condition.model)}")
        trials = trial_lists[condition.test]
        if len(face) != len(trials.ids):
            raise DataError(f"{trials.path} has {len(trials.ids)} trials but {face_path} has {len(face)} "
                            f"rows: row i of the list is row i of its test CSVs")
        features[condition.name] = (face, voice)
    if labels_dir is not None:
        attach_labels(trial_lists, labels_dir, note)
    return Protocol(version, tuple(languages), train, train_meta, features, trial_lists)


def attach_labels(trial_lists, labels_dir, note=print):
    """Read ``labels_dir/<L>_test_labels.txt`` for each list; a language without a file keeps no
    labels (its EERs are not computed, and ``note`` says so); a folder with none is refused."""
    if not os.path.isdir(labels_dir):
        raise DataError(f"--labels {labels_dir}: not a folder")
    found = 0
    for language, trials in trial_lists.items():
        path = labels_path(labels_dir, language)
        if not os.path.exists(path):
            note(f"note: {path} not found: the {language} list's EERs are not computed")
            continue
        trials.same = read_labels(path, trials.ids)
        found += 1
    if not found:
        raise DataError(f"--labels {labels_dir}: none of "
                        f"{', '.join(os.path.basename(labels_path(labels_dir, l)) for l in trial_lists)} is there")


# --- scores, submission, results ---------------------------------------------------------------

def format_scores(ids, scores):
    """The lines of a score file: ``'%s %f\\n'`` per trial, the organisers' format."""
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} ids but {len(scores)} scores")
    return "".join("%s %f\n" % (trial, float(score)) for trial, score in zip(ids, scores))


def read_scores(path):
    """``(ids, scores)`` of a score file (the submission's format)."""
    ids, scores = [], []
    for number, fields in _lines(path):
        try:
            if len(fields) != 2:
                raise ValueError
            scores.append(float(fields[1]))
        except ValueError:
            raise DataError(f"{path}: line {number} ({_excerpt(fields)!r}): expected '<id> <score>'") from None
        ids.append(fields[0])
    return ids, np.asarray(scores)


def submission_bytes(texts):
    """The submission zip: exactly the files of ``texts`` (name -> text) at its root, deflated."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, text in texts.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))   # the same bytes every run
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, text)
    return buffer.getvalue()


def condition_eers(scores, lists, order):
    """``{condition name: EER or None}``: the exact EER (``metrics.verification``) of each scored
    list whose labels are known; the score is a distance, so lower means the same person."""
    out = {}
    for condition in order:
        same = lists[condition.test].same
        out[condition.name] = None if same is None else \
            verification(np.asarray(scores[condition.name], np.float64), same, official=False)["eer"]
    return out


def overall(eers):
    """The challenge's overall score: the mean of the four EERs (None unless all four are known)."""
    values = list(eers.values())
    return None if any(v is None for v in values) else float(np.mean(values))


def results_record(version, languages, eers, lists, order):
    """What fame.json holds: ``{"conditions": {name: {"eer", "model", "test", "trials"}}, "overall"}``."""
    return {"version": version, "languages": list(languages),
            "conditions": {c.name: {"eer": eers[c.name], "model": c.model, "test": c.test,
                                    "trials": len(lists[c.test].ids)} for c in order},
            "overall": overall(eers)}


def format_table(order, eers, baseline=None, baseline_label="FOP baseline"):
    """The four-condition table, EERs in %, with the baseline's published figures beside them."""
    pct = lambda v: f"{100 * v:6.1f}" if v is not None else f"{'–':>6}"
    fig = lambda name: f"{baseline[name]:6.1f}" if baseline and name in baseline else f"{'–':>6}"
    lines = [f"{'condition':<22} {'model':<10} {'test list':<10} {'EER':>6}  {baseline_label}"]
    for c in order:
        label = f"{c.test} {'heard' if c.heard else 'unheard'}"
        lines.append(f"{label:<22} {c.model:<10} {c.test:<10} {pct(eers[c.name])}  {fig(c.name)}")
    lines.append(f"{'overall (mean of 4)':<44} {pct(overall(eers))}  {fig('overall')}")
    return "\n".join(lines)
