"""The FAME protocol end to end (README "FAME 2026"): the command on a data set made by
tests/fame_data.py (not the built-in world's code), both naming schemes of the unheard
files, the submission zip's content and format, list order, labels, every bad input, a
stopped run continued, eval.py --scores, and the built-in world."""
import importlib.util
import os
import re
import shutil
import zipfile

import numpy as np
import pytest
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_curve

from conftest import no_hang
from fame_data import write_dataset
from paeff_np.fame import __main__ as command
from paeff_np.fame import protocol as fame
from paeff_np.fame.world import LANGUAGES, make_fame_world
from paeff_np.run import training
from paeff_np.run.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "3", "--batch-size", "64", "--embed-dim", "16", "--lr", "3e-3"]
SCORE_LINE = re.compile(r"^(\S+) (\d+\.\d{6})$")
FOUR = {"sub_score_English_heard.txt", "sub_score_German_unheard.txt",
        "sub_score_English_unheard.txt", "sub_score_German_heard.txt"}


def fame_args(data, out, *extra, labels=True):
    argv = ["--features", data["feats"], "--lists", data["lists"], "--version", data["version"], "--out", out, *TINY]
    return argv + (["--labels", data["labels"]] if labels else []) + list(extra)


def run_fame(argv, capsys):
    rc = run(lambda: command.main(argv), command.PROG)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def list_ids(data, language):
    with open(os.path.join(data["lists"], data["version"], f"{language}_test.txt")) as f:
        return [line.split()[0] for line in f if line.strip()]


def organisers_eer(scores, same):
    """The EER as the organisers' test.py computes it: brentq on the interpolated ROC."""
    fpr, tpr, _ = roc_curve(same, -np.asarray(scores))
    return brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("fame")))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """One full run of the command on the generated data, with labels."""
    out = str(tmp_path_factory.mktemp("runs") / "out")
    rc = run(lambda: command.main(fame_args(data, out)), command.PROG)
    assert rc == 0
    return out


def test_the_zip_holds_exactly_the_four_score_files(finished):
    with zipfile.ZipFile(os.path.join(finished, "submission.zip")) as archive:
        assert set(archive.namelist()) == FOUR             # at the root: no folder in any name
        assert archive.testzip() is None
        for name in FOUR:
            with open(os.path.join(finished, name), "rb") as f:
                assert archive.read(name) == f.read()


def test_score_files_follow_their_lists_line_by_line(finished, data):
    for name in FOUR:
        language = name.split("_")[2]
        with open(os.path.join(finished, name)) as f:
            lines = f.read().split("\n")
        assert lines[-1] == ""                             # '%s %f\n' per trial
        matches = [SCORE_LINE.match(line) for line in lines[:-1]]
        assert all(matches), name
        assert [m[1] for m in matches] == list_ids(data, language)


def test_fame_json_holds_each_conditions_eer_and_their_mean(finished, data):
    import json
    with open(os.path.join(finished, "fame.json")) as f:
        record = json.load(f)
    assert set(record["conditions"]) == {n[len("sub_score_"):-len(".txt")] for n in FOUR}
    eers = []
    for name, entry in record["conditions"].items():
        ids, scores = fame.read_scores(os.path.join(finished, f"sub_score_{name}.txt"))
        truth = data["truth"][entry["test"]]
        expected = organisers_eer(scores, [truth[i] for i in ids])
        assert entry["eer"] == pytest.approx(expected, abs=2e-3)   # scores are rounded to 6 places
        assert entry["model"] == (entry["test"] if name.endswith("_heard") else
                                  ({"English", "German"} - {entry["test"]}).pop())
        eers.append(entry["eer"])
    assert record["overall"] == pytest.approx(np.mean(eers))


def test_each_language_has_a_run_folder_that_selected_on_its_own_split(finished):
    for language in ("English", "German"):
        folder = os.path.join(finished, language)
        for name in ("checkpoint.npz", "best.npz", "metrics.jsonl", "metrics.json"):
            assert os.path.exists(os.path.join(folder, name)), name
        with open(os.path.join(folder, "metrics.json")) as f:
            assert '"rule": "val"' in f.read()


def test_a_rerun_reuses_the_finished_runs(finished, data, capsys):
    before = {n: open(os.path.join(finished, n), "rb").read() for n in FOUR | {"submission.zip"}}
    rc, out, _ = run_fame(fame_args(data, finished), capsys)
    assert rc == 0
    assert "English: " in out and "holds this run, finished" in out and "epoch   1/" not in out
    assert {n: open(os.path.join(finished, n), "rb").read() for n in before} == before


def test_other_flags_into_a_finished_run_are_refused(finished, data, capsys):
    rc, _, err = run_fame(fame_args(data, finished)[:-2] + ["--epochs", "4"], capsys)
    assert rc == 2 and "other settings (epochs 3, not 4)" in err


def test_plain_names_and_a_shuffled_list_give_the_same_scores_in_the_lists_order(finished, data, tmp_path, capsys):
    """The organisers' test.py names the unheard files <L>_faces_test.csv; the English list and
    its rows in both folders shuffled the same way: each trial keeps its score, the file its order."""
    plain = write_dataset(str(tmp_path / "plain"), unheard_names="plain")
    assert os.path.exists(os.path.join(plain["feats"], "v3", "English", "German_faces_test.csv"))
    assert not os.path.exists(os.path.join(plain["feats"], "v3", "English", "German_faces_unheard_test.csv"))
    order = np.random.default_rng(3).permutation(len(list_ids(plain, "English")))
    path = os.path.join(plain["lists"], "v3", "English_test.txt")
    lines = open(path).read().splitlines(keepends=True)
    open(path, "w").writelines(lines[i] for i in order)
    for folder in ("English", "German"):
        for modality in ("faces", "voices"):
            csv = os.path.join(plain["feats"], "v3", folder, f"English_{modality}_test.csv")
            rows = open(csv).read().splitlines(keepends=True)
            open(csv, "w").writelines(rows[i] for i in order)
    out = str(tmp_path / "out")
    rc, _, err = run_fame(fame_args(plain, out), capsys)
    assert rc == 0, err
    for name in FOUR:
        ids, scores = fame.read_scores(os.path.join(out, name))
        assert ids == list_ids(plain, name.split("_")[2])
        first = dict(zip(*fame.read_scores(os.path.join(finished, name))))
        assert [first[i] for i in ids] == pytest.approx(scores, abs=2e-6)


def test_a_stopped_run_continues_where_it_stopped(finished, data, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the German model's second epoch; the same command again finishes both runs
    with the straight run's scores."""
    out = str(tmp_path / "out")
    real = training.Trainer.run_epoch
    calls = []

    def interrupted(self):
        calls.append(self.out_dir)
        if self.out_dir.endswith("German") and self.epoch == 1:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(training.Trainer, "run_epoch", interrupted)
    rc, _, err = run_fame(fame_args(data, out), capsys)
    assert rc == 130 and "run the same command again" in err
    assert not os.path.exists(os.path.join(out, "submission.zip"))
    monkeypatch.setattr(training.Trainer, "run_epoch", real)
    rc, stdout, _ = run_fame(fame_args(data, out), capsys)
    assert rc == 0 and "German holds this run, continuing after epoch 1/3" in stdout
    for name in FOUR | {"submission.zip"}:
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(finished, name), "rb").read()


def test_ctrl_c_just_after_the_checkpoint_rename_names_the_epoch_saved(data, tmp_path, capsys, monkeypatch):
    """SIGINT between the rename of checkpoint.npz (epoch 2 committed) and its readable
    copy: the message names epoch 2, the epoch on disk, not the one saved before."""
    from paeff_np.run import checkpoint as ckpt
    out = str(tmp_path / "out")
    real = ckpt.write_json

    def interrupted(path, obj):
        if path.endswith(os.path.join("English", ckpt.CONFIG_NAME)) and obj["epoch"] == 2:
            raise KeyboardInterrupt          # the npz of epoch 2 is already in place
        return real(path, obj)

    monkeypatch.setattr(ckpt, "write_json", interrupted)
    rc, _, err = run_fame(fame_args(data, out), capsys)
    assert rc == 130 and ckpt.load(os.path.join(out, "English")).epoch == 2
    assert f"the checkpoint of epoch 2 in {os.path.join(out, 'English')} is intact" in err, err


def test_a_list_or_feature_file_that_is_a_named_pipe_is_one_line(data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(os.path.dirname(data["feats"]), root)
    copy = {**data, **{k: str(root / k) for k in ("feats", "lists", "labels")}}
    for name in ("lists/v3/English_test.txt", "feats/v3/German/English_faces_unheard_test.csv"):
        path = str(root / name)
        os.rename(path, path + ".kept")
        os.mkfifo(path)
        with no_hang():
            rc, _, err = run_fame(fame_args(copy, str(tmp_path / "out")), capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and f"{path}: is a named pipe" in lines[0], err
        os.remove(path)
        os.rename(path + ".kept", path)
    assert not os.path.exists(tmp_path / "out")


def test_without_labels_no_eer_and_no_fame_json(data, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, stdout, _ = run_fame(fame_args(data, out, "--epochs", "1", labels=False), capsys)
    assert rc == 0 and "EERs are not computed" in stdout
    assert "35.3" in stdout                    # the baseline's published figures, beside ours
    assert not os.path.exists(os.path.join(out, "fame.json"))
    assert os.path.exists(os.path.join(out, "submission.zip"))


def test_a_rerun_without_labels_leaves_no_earlier_fame_json(data, tmp_path, capsys):
    """fame.json is of the scores beside it: a rerun of a finished run without --labels removes
    the EERs of the run with them (its lists may have changed since)."""
    out = str(tmp_path / "out")
    assert run_fame(fame_args(data, out, "--epochs", "1"), capsys)[0] == 0
    results = os.path.join(out, "fame.json")
    assert os.path.exists(results)
    rc, stdout, _ = run_fame(fame_args(data, out, "--epochs", "1", labels=False), capsys)
    assert rc == 0 and f"removed {results}" in stdout
    assert not os.path.exists(results) and os.path.exists(os.path.join(out, "submission.zip"))
    assert run_fame(fame_args(data, out, "--epochs", "1"), capsys)[0] == 0
    assert os.path.exists(results)


def test_a_language_without_a_label_file_keeps_its_eers_unknown(data, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(os.path.join(data["labels"], "English_test_labels.txt"), labels)
    lists = {l: fame.TrialList(l, "", list_ids(data, l)) for l in ("English", "German")}
    notes = []
    fame.attach_labels(lists, str(labels), notes.append)
    assert lists["German"].same is None and "German_test_labels.txt not found" in notes[0]
    assert list(lists["English"].same) == [data["truth"]["English"][i] for i in lists["English"].ids]
    eers = fame.condition_eers({c.name: np.arange(60.0) for c in fame.conditions(("English", "German"))},
                               lists, fame.conditions(("English", "German")))
    assert eers["German_heard"] is None and eers["English_heard"] is not None
    assert fame.overall(eers) is None


# --- bad input: one line naming the file, exit 2, nothing written -----------------------------

def _edit(path, change):
    lines = open(path).read().splitlines(keepends=True)
    open(path, "w").writelines(change(lines))


def _drop_last(lines):
    return lines[:-1]


def _duplicate_id(lines):
    lines[4] = lines[1].split()[0] + " " + " ".join(lines[4].split()[1:]) + "\n"
    return lines


def _malformed(lines):
    lines[2] = " ".join(lines[2].split()[:2]) + "\n"
    return lines


def _unknown_label(lines):
    return lines[:-1] + ["nosuchtrial 1\n"]


def _narrow(lines):
    return [",".join(line.rstrip("\n").split(",")[:30]) + "\n" for line in lines]


def _bad_label(lines):
    lines[0] = lines[0].split()[0] + " yes\n"
    return lines


BAD = [  # (file under the data root, its change, what the line must say)
    ("lists/v3/German_test.txt", _drop_last, "has 59 trials but"),
    ("feats/v3/English/German_faces_unheard_test.csv", None, "nor German_faces_test.csv"),
    ("lists/v3/English_test.txt", _duplicate_id, "is duplicated (first on line 2)"),
    ("lists/v3/English_test.txt", _malformed, "line 3 has 2 field(s)"),
    ("labels/German_test_labels.txt", _unknown_label, "'nosuchtrial' is not a trial of its list"),
    ("labels/English_test_labels.txt", _bad_label, "expected '<id> <label>'"),
    ("feats/v3/German/English_faces_unheard_test.csv", _narrow, "30 columns, but the face features"),
    ("feats/v3/English/English_voices_train.csv", None, "English_voices_train.csv: file not found"),
]


@pytest.mark.parametrize("name,change,says", BAD, ids=[f"{b[0]}:{b[2][:20]}" for b in BAD])
def test_bad_input_is_one_line_naming_the_file(data, tmp_path, capsys, name, change, says):
    root = tmp_path / "data"
    shutil.copytree(os.path.dirname(data["feats"]), root)
    copy = {**data, **{k: str(root / k) for k in ("feats", "lists", "labels")}}
    path = str(root / name)
    if change is None:
        os.remove(path)
    else:
        _edit(path, change)
    out = str(tmp_path / "out")
    rc, _, err = run_fame(fame_args(copy, out), capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert says in lines[0] and os.path.basename(path) in lines[0], lines[0]
    assert not os.path.exists(out)                                  # nothing written, no folder


BAD_FLAGS = [
    (["--val-rows", "0.2", "--resume", "x"], "--resume, --val-rows: train.py flag(s) that a FAME run does not take"),
    (["--dropout", "0.1"], "--dropout: train.py flag(s)"),
    (["--synthetic"], "--synthetic runs the built-in world: drop --features, --lists, --version"),
    (["--version", "v7"], "--version v7: its languages are not known"),
    (["--version", "v7", "--languages", "English", "English"], "the two languages must differ"),
    (["--lr", "0"], "--lr 0"),
]


@pytest.mark.parametrize("extra,says", BAD_FLAGS)
def test_bad_flags_are_one_line(data, tmp_path, capsys, extra, says):
    out = str(tmp_path / "out")
    argv = fame_args(data, out, labels=False)
    if "--version" in extra:
        argv = argv[:argv.index("--version")] + argv[argv.index("--version") + 2:]
    rc, _, err = run_fame(argv + extra, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not os.path.exists(out)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", "_script"), os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_train_py_flag_is_taken_or_refused_by_name():
    """train.py's flags, as its parser spells them, are the FAME command's training flags and
    its refused ones, nothing left over (a new train.py flag must be placed here)."""
    parser = load_script("train.py").make_parser()
    spelled = {s for action in parser._actions for s in action.option_strings} - {"-h", "--help", "--out"}
    taken = {"--" + name.replace("_", "-") for name in command.TAKEN}
    assert taken <= spelled
    assert set(command.REFUSED) == spelled - taken


@pytest.mark.parametrize("flag", command.REFUSED)
def test_each_refused_flag_is_named_in_one_line(data, tmp_path, capsys, flag):
    out = str(tmp_path / "out")
    rc, _, err = run_fame(fame_args(data, out, flag, labels=False), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"error: {flag}: train.py flag(s) that a FAME run does not take" in err, err
    assert not os.path.exists(out)


def test_a_second_language_the_settings_cannot_train_leaves_nothing(data, tmp_path, capsys):
    """German's training files cut to 100 rows give no validation split: refused before the
    English run folder is made."""
    root = tmp_path / "data"
    shutil.copytree(os.path.dirname(data["feats"]), root)
    for modality in ("faces", "voices"):
        _edit(str(root / f"feats/v3/German/German_{modality}_train.csv"), lambda lines: lines[:100])
    copy = {**data, **{k: str(root / k) for k in ("feats", "lists", "labels")}}
    out = str(tmp_path / "out")
    rc, _, err = run_fame(fame_args(copy, out), capsys)
    assert rc == 2 and err.count("\n") == 1 and "German's training data: --val-identities" in err, err
    assert not os.path.exists(out)


def test_an_out_that_holds_something_else_is_refused(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = run_fame(fame_args(data, str(out)), capsys)
    assert rc == 2 and "holds 'notes.txt'" in err
    assert os.listdir(out) == ["notes.txt"]


def test_a_failed_zip_write_leaves_no_zip(data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")

    def broken(texts):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fame, "submission_bytes", broken)
    rc, _, err = run_fame(fame_args(data, out, "--epochs", "1"), capsys)
    assert rc == 2 and "No space left" in err
    assert not os.path.exists(os.path.join(out, "submission.zip"))
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]


# --- eval.py --scores ---------------------------------------------------------------------------

def load_eval():
    return load_script("eval.py")


def test_eval_scores_an_unlabelled_list_as_the_submission_does(finished, data, tmp_path, capsys):
    folder = os.path.join(data["feats"], "v3", "English")
    scores = str(tmp_path / "scores.txt")
    argv = ["--checkpoint", os.path.join(finished, "English"), "--faces",
            os.path.join(folder, "German_faces_unheard_test.csv"), "--voices",
            os.path.join(folder, "German_voices_unheard_test.csv"),
            "--trials", os.path.join(data["lists"], "v3", "German_test.txt"), "--scores", scores]
    assert run(lambda: load_eval().main(argv), "eval.py") == 0
    assert "no EER" in capsys.readouterr().out
    assert open(scores).read() == open(os.path.join(finished, "sub_score_German_unheard.txt")).read()
    assert run(lambda: load_eval().main(argv), "eval.py") == 2       # never overwritten
    assert "already exists" in capsys.readouterr().err


def test_eval_of_a_fame_model_without_a_list_says_how_to_score_one(finished, capsys):
    """Its training folder has no FOP test lists (and a --synthetic one's world is not
    train.py's): one line naming --faces/--voices/--trials, not another world's figures."""
    argv = ["--checkpoint", os.path.join(finished, "German")]
    assert run(lambda: load_eval().main(argv), "eval.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the German model of a FAME run (v3)" in err[0] and "--faces" in err[0], err


# --- the built-in world -----------------------------------------------------------------------

def test_the_built_in_world_is_mavceleb_shaped_with_hidden_labels():
    world = make_fame_world(seed=1, trials=100)
    p = world.protocol
    assert p.languages == LANGUAGES
    for language in LANGUAGES:
        train = p.train[language]
        assert (train.face_dim, train.voice_dim) == (4096, 512)
        assert list(train.label_values) == list(p.train[LANGUAGES[0]].label_values)   # the same people
        assert p.lists[language].same is None                                        # labels hidden
        same = world.hidden_labels[language]
        assert 0.3 < same.mean() < 0.7 and len(set(p.lists[language].ids)) == 100
        assert not (same[0::2].all() and not same[1::2].any())                       # not alternating
    assert p.features["English_heard"][1] is p.features["English_unheard"][1]        # one list, two models


def test_the_synthetic_run_prints_four_conditions_unheard_harder_than_heard(tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, stdout, err = run_fame(["--synthetic", "--out", out], capsys)
    assert rc == 0, err
    for row in ("English heard", "German unheard", "English unheard", "German heard", "overall"):
        assert row in stdout
    import json
    record = json.load(open(os.path.join(out, "fame.json")))["conditions"]
    assert max(record["English_heard"]["eer"], record["German_heard"]["eer"]) < \
        min(record["English_unheard"]["eer"], record["German_unheard"]["eer"])
