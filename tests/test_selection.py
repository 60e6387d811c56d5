"""Model selection: the validation split, the three rules, best.npz, patience, and bad input.

train.py and eval.py run in this process through ``cli.run`` on a tiny world. Where a
test needs a given sequence of EERs (a best epoch that is not the last), the
Trainer's ``validate``/``monitor_eer`` are replaced by scripts: the selection logic
sees exactly what it would see from a real model.
"""
import json
import os
import sys

import numpy as np
import pytest

from conftest import one_line_error

from paeff_np.run import checkpoint as ckpt
from paeff_np.run.cli import run as run_cli
from paeff_np.data import TrainSet
from paeff_np.data.split import MIN_VALIDATION_PAIRS, SplitError, split_validation
from paeff_np.data.synth import make_synthetic
from paeff_np.run.training import NO_SELECTION, Trainer, TrainSettings, selected_epoch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as eval_cli    # noqa: E402
import train as train_cli  # noqa: E402

TINY_RUN = ["--epochs", "5", "--batch-size", "32", "--embed-dim", "16", "--lr", "3e-3", "--no-refit"]   # the refit: test_refit.py
VAL_EERS = [0.30, 0.20, 0.25, 0.26, 0.22]      # best: epoch 2
TEST_EERS = [0.40, 0.35, 0.33, 0.31, 0.34]     # best on the test list: epoch 4


def train(*args):
    return run_cli(lambda: train_cli.main(list(map(str, args))), "train.py")


def evaluate(*args):
    return run_cli(lambda: eval_cli.main(list(map(str, args))), "eval.py")


def script(monkeypatch, val=VAL_EERS, test=TEST_EERS):
    """Replace the per-epoch figures by ``val`` (unseen part) and ``test`` (the monitor)."""
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val/unseen/eer": val[self.epoch - 1],
                                                           "val/unseen/auc": 1 - val[self.epoch - 1]})
    monkeypatch.setattr(Trainer, "monitor_eer", lambda self: test[self.epoch - 1])


def log_of(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def traced_train_set(n_classes=30, rows_per_class=(5, 40), seed=0):
    """A TrainSet whose face column 0 is the row's number, to trace rows through a split."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), rng.integers(*rows_per_class, size=n_classes))
    labels = rng.permutation(labels)
    face = rng.standard_normal((len(labels), 3)).astype(np.float32)
    face[:, 0] = np.arange(len(labels))
    voice = rng.standard_normal((len(labels), 2)).astype(np.float32)
    voice[:, 0] = np.arange(len(labels))
    return TrainSet(face=face, voice=voice, labels=labels.astype(np.int64),
                    label_values=np.array([f"id{i:02d}" for i in range(n_classes)]))


# --- the split ---------------------------------------------------------------------------

def test_split_is_deterministic_in_the_seed():
    train = traced_train_set()
    a, b, c = (split_validation(train, 0.1, 0.05, seed) for seed in (3, 3, 4))
    assert a.record == b.record and a.record != c.record
    np.testing.assert_array_equal(a.train.face, b.train.face)
    for part in ("unseen", "seen"):
        np.testing.assert_array_equal(a.lists[part].face, b.lists[part].face)
        np.testing.assert_array_equal(a.lists[part].voice, b.lists[part].voice)
    assert json.loads(json.dumps(a.record)) == a.record              # what the checkpoint keeps


def test_split_is_disjoint_and_removes_the_held_out_rows():
    train = traced_train_set()
    split = split_validation(train, 0.2, 0.1, seed=1)
    held = set(split.record["held_out_identities"])
    assert len(held) == 6 and held.isdisjoint(split.train.label_values)   # 20% of 30 identities
    assert list(split.train.label_values) == [v for v in train.label_values if v not in held]
    kept_rows = split.train.face[:, 0].astype(int)
    np.testing.assert_array_equal(train.label_values[train.labels[kept_rows]],      # renumbered classes
                                  split.train.label_values[split.train.labels])
    unseen, seen = split.lists["unseen"], split.lists["seen"]
    unseen_rows, seen_rows = (lst.face[:, 0].astype(int) for lst in (unseen, seen))
    # every held-out row is in exactly one list, once, and not in training
    assert sorted(np.concatenate([kept_rows, unseen_rows, seen_rows])) == list(range(len(train)))
    assert set(train.label_values[train.labels[unseen_rows]]) == held
    assert held.isdisjoint(train.label_values[train.labels[seen_rows]])
    for lst, rows in ((unseen, unseen_rows), (seen, seen_rows)):
        voice_rows = lst.voice[:, 0].astype(int)
        assert set(voice_rows) <= set(rows)                           # voices from the same part
        same_identity = train.labels[rows] == train.labels[voice_rows]
        np.testing.assert_array_equal(same_identity, lst.same)        # even rows positive, odd negative
        np.testing.assert_array_equal(lst.ids[:, 0] == lst.ids[:, 1], lst.same)
    # the seen part: round(10%) of each kept identity's rows, one row always kept
    counts = np.bincount(train.labels, minlength=30)
    seen_counts = np.bincount(train.labels[seen_rows], minlength=30)
    kept_classes = [i for i, v in enumerate(train.label_values) if v not in held]
    np.testing.assert_array_equal(seen_counts[kept_classes],
                                  np.minimum(np.round(0.1 * counts[kept_classes]), counts[kept_classes] - 1))
    assert split.record["pairs"] == {"unseen": len(unseen), "seen": len(seen)}
    assert split.record["training_rows"] == len(split.train)


def test_a_fraction_of_zero_turns_a_part_off():
    train = traced_train_set()
    only_seen = split_validation(train, 0, 0.1)
    assert set(only_seen.lists) == {"seen"} and only_seen.train.n_classes == 30
    only_unseen = split_validation(train, 0.1, 0)
    assert set(only_unseen.lists) == {"unseen"}
    assert len(only_unseen.train) + len(only_unseen.lists["unseen"]) == len(train)


@pytest.mark.parametrize("identities,rows,words", [
    (1.0, 0.05, ["--val-identities 1", "[0, 1)"]),
    (-0.1, 0.05, ["--val-identities -0.1", "[0, 1)"]),
    (0.1, float("nan"), ["--val-rows nan", "[0, 1)"]),
    (0.97, 0.0, ["--val-identities 0.97", "leaves 1", "training needs two"]),
    (0.01, 0.05, ["--val-identities 0.01", "0 pairs", f"{MIN_VALIDATION_PAIRS} pairs"]),
    (0.0, 0.001, ["--val-rows 0.001", "seen", "0 turns the part off"]),
])
def test_a_split_the_data_cannot_give_is_refused(identities, rows, words):
    with pytest.raises(SplitError) as err:
        split_validation(traced_train_set(), identities, rows)
    for w in words:
        assert w in str(err.value)


# --- the rules ------------------------------------------------------------------------------

def test_val_selects_the_best_validation_epoch_and_keeps_it_in_best_npz(data_dir, tmp_path, monkeypatch, capsys):
    script(monkeypatch)
    out = str(tmp_path / "val")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out) == 0
    stdout = capsys.readouterr().out
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["selection"] == {"rule": "val", "epoch": 2, "val_eer": 0.20, "val_auc": 0.80,
                                    "val_part": "unseen", "epochs_run": 5}
    assert "selected: epoch 2 of 5 by rule val" in stdout
    assert "epoch   2/5" in stdout and "val unseen EER 20.0% (best)" in stdout
    assert "unseenunheard/random EER" not in stdout                # no test list watched per epoch
    assert all("unseenunheard/random/eer" not in r for r in log_of(out))
    best = ckpt.load(os.path.join(out, "best.npz"))
    assert best.epoch == 2 and best.optimizer is None
    assert [r["epoch"] for r in best.history] == [1, 2]
    # best.npz is the model of epoch 2: the same run stopped there
    again = str(tmp_path / "again")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", again, "--stop-after", "2") == 0
    stopped = ckpt.load(again)
    for k in best.params:
        np.testing.assert_array_equal(best.params[k], stopped.params[k])
    # the test lists were evaluated once, on that model: eval.py on the folder agrees
    capsys.readouterr()
    assert evaluate("--checkpoint", out, "--json") == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert got["unseenunheard/random"]["eer"] == metrics["unseenunheard/random"]["eer"]
    assert f"evaluating {os.path.join(out, 'best.npz')}: epoch 2, selected by rule val " \
           f"(checkpoint.npz holds epoch 5)" in captured.err
    # --checkpoint may name either file
    assert evaluate("--checkpoint", os.path.join(out, "checkpoint.npz"), "--json") == 0
    captured = capsys.readouterr()
    assert f"evaluating {os.path.join(out, 'checkpoint.npz')} (epoch 5), the file named" in captured.err
    assert evaluate("--checkpoint", os.path.join(out, "best.npz")) == 0
    assert f"checkpoint {os.path.join(out, 'best.npz')} (epoch 2" in capsys.readouterr().out


def test_last_is_the_plain_run(data_dir, tmp_path, monkeypatch, capsys):
    """--select last without a split trains and reports exactly what a library Trainer
    with NO_SELECTION does; no best.npz."""
    out = str(tmp_path / "last")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--select", "last",
                 "--val-identities", "0", "--val-rows", "0") == 0
    assert "selected: epoch 5 of 5 by rule last" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "best.npz"))
    saved = ckpt.load(out)
    assert "validation" not in saved.config
    settings = {**saved.config["train"], **NO_SELECTION}
    assert settings == saved.config["train"]
    plain = str(tmp_path / "plain")
    os.makedirs(plain)
    from paeff_np.run.cli import load_data
    dataset, meta = load_data(data_dir)
    trainer = Trainer(dataset, saved.cfg, TrainSettings(**settings), plain, meta, log=lambda line: None)
    trainer.train()
    for k in saved.params:
        np.testing.assert_array_equal(saved.params[k], trainer.params[k])
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["selection"] == {"rule": "last", "epoch": 5, "val_eer": None, "val_auc": None,
                                    "epochs_run": 5}
    # with a split, last still reports the last epoch and records the validation figures
    script(monkeypatch)
    out = str(tmp_path / "last-split")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--select", "last") == 0
    selection = json.load(open(os.path.join(out, "metrics.json")))["selection"]
    assert (selection["epoch"], selection["val_eer"]) == (5, 0.22)
    assert not os.path.exists(os.path.join(out, "best.npz"))


def test_test_selects_on_the_test_list_and_says_it_is_optimistic(data_dir, tmp_path, monkeypatch, capsys):
    script(monkeypatch)
    out = str(tmp_path / "test")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--select", "test") == 0
    captured = capsys.readouterr()
    assert "warning: --select test:" in captured.err and "optimistic" in captured.err
    assert "unseen-unheard/random EER 31.0% (best)" in captured.out
    selection = json.load(open(os.path.join(out, "metrics.json")))["selection"]
    assert selection["rule"] == "test" and selection["epoch"] == 4
    assert selection["test_eer"] == 0.31 and selection["val_eer"] == 0.26
    assert "optimistic" in selection["warning"]
    assert ckpt.load(os.path.join(out, "best.npz")).epoch == 4
    assert [r["unseenunheard/random/eer"] for r in log_of(out)] == TEST_EERS


def test_patience_stops_the_run_and_a_resume_stops_there_too(data_dir, tmp_path, monkeypatch, capsys):
    script(monkeypatch, val=[0.30, 0.20, 0.25, 0.26, 0.10])
    out = str(tmp_path / "patience")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--patience", "2") == 0
    stdout = capsys.readouterr().out
    assert "early stop: no better validation EER in the 2 epochs since epoch 2 (patience 2)" in stdout
    assert [r["epoch"] for r in log_of(out)] == [1, 2, 3, 4]          # epoch 5 never ran
    selection = json.load(open(os.path.join(out, "metrics.json")))["selection"]
    assert (selection["epoch"], selection["epochs_run"], selection["stopped_early"]) == (2, 4, True)
    assert train("--resume", out) == 0                                  # a finished run stays finished
    assert [r["epoch"] for r in log_of(out)] == [1, 2, 3, 4]
    saved = open(os.path.join(out, "checkpoint.npz"), "rb").read()
    capsys.readouterr()
    assert train("--resume", out, "--epochs", "8") == 2                 # more epochs would not run
    err = capsys.readouterr().err
    assert "--epochs 8: the run stopped early at epoch 4 (--patience 2" in err and "new run" in err
    assert open(os.path.join(out, "checkpoint.npz"), "rb").read() == saved
    # stopped by --stop-after before patience ran out, the resumed run stops where this one did
    out2 = str(tmp_path / "patience2")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out2, "--patience", "2", "--stop-after", "3") == 0
    assert train("--resume", out2) == 0
    assert [r["loss"] for r in log_of(out2)] == [r["loss"] for r in log_of(out)]


def test_selected_epoch_takes_the_first_lowest():
    history = [{"epoch": 1, "k": 0.3}, {"epoch": 2, "k": 0.2}, {"epoch": 3, "k": 0.2}, {"epoch": 4}]
    assert selected_epoch(history, "val", "k") == 2
    assert selected_epoch(history, "last", "k") == 4
    assert selected_epoch([], "val", "k") is None
    rounded = [{"epoch": 1, "k": 0.226}, {"epoch": 2, "k": 0.22599999999999998}]   # one EER, two roundings
    assert selected_epoch(rounded, "val", "k") == 1


# --- resume and best.npz ------------------------------------------------------------------

def test_resume_keeps_best_npz_and_rewrites_one_that_lags(data_dir, tmp_path, monkeypatch, capsys):
    script(monkeypatch)
    straight = str(tmp_path / "straight")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", straight) == 0
    out = str(tmp_path / "resumed")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--stop-after", "3") == 0
    assert train("--resume", out) == 0
    a, b = ckpt.load(os.path.join(straight, "best.npz")), ckpt.load(os.path.join(out, "best.npz"))
    assert a.epoch == b.epoch == 2
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    # a kill between the checkpoint of epoch 2 and its best.npz: best.npz holds epoch 1
    lagging = str(tmp_path / "lagging")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", lagging, "--stop-after", "1") == 0
    epoch1_best = open(os.path.join(lagging, "best.npz"), "rb").read()
    assert train("--resume", lagging, "--stop-after", "1") == 0
    open(os.path.join(lagging, "best.npz"), "wb").write(epoch1_best)
    capsys.readouterr()
    assert evaluate("--checkpoint", lagging) == 0                       # the checkpoint is the selected model
    assert f"evaluating {os.path.join(lagging, 'checkpoint.npz')}: epoch 2, selected by rule val" \
        in capsys.readouterr().err
    assert train("--resume", lagging) == 0
    assert "best.npz held epoch 1 (a save cut short); the checkpoint selects its own epoch 2" \
        in capsys.readouterr().out
    b = ckpt.load(os.path.join(lagging, "best.npz"))
    assert b.epoch == 2
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_a_best_npz_that_cannot_be_repaired_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    script(monkeypatch)
    out = str(tmp_path / "run")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--stop-after", "3") == 0
    os.remove(os.path.join(out, "best.npz"))                            # epoch 2's model is gone
    capsys.readouterr()
    assert train("--resume", out) == 2
    one_line_error(capsys, "best.npz is missing", "selects epoch 2")
    assert evaluate("--checkpoint", out) == 2
    one_line_error(capsys, "best.npz", "selects epoch 2")


def test_a_full_disk_at_the_best_npz_write_keeps_the_run_resumable(data_dir, tmp_path, monkeypatch, capsys):
    real_savez, saves = np.savez, []

    def savez(file, **arrays):
        saves.append(1)
        if len(saves) == 3:                    # epoch 0, epoch 1, then epoch 1's best.npz
            raise OSError(28, "No space left on device")
        real_savez(file, **arrays)
    monkeypatch.setattr(np, "savez", savez)
    out = str(tmp_path / "full")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out) == 2
    one_line_error(capsys, "best.npz", "No space left", "checkpoint of epoch 1", "intact", f"--resume {out}")
    monkeypatch.setattr(np, "savez", real_savez)
    assert train("--resume", out) == 0
    assert "best.npz was missing" in capsys.readouterr().out
    assert ckpt.load(os.path.join(out, "best.npz")).epoch == \
        json.load(open(os.path.join(out, "metrics.json")))["selection"]["epoch"]


def test_the_split_is_recorded_and_resume_keeps_the_settings(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--stop-after", "1",
                 "--val-identities", "0.2", "--patience", "3") == 0
    saved = ckpt.load(out)
    from paeff_np.run.cli import load_data
    dataset, _ = load_data(data_dir)
    assert saved.config["validation"] == split_validation(dataset.train, 0.2, 0.05, 0).record
    assert saved.config["train"]["val_identities"] == 0.2 and saved.config["train"]["patience"] == 3
    for flag, value in (("--select", "test"), ("--val-rows", "0.1"), ("--patience", "2")):
        assert train("--resume", out, flag, value) == 2
        one_line_error(capsys, "--resume continues a run as it was configured", flag)
    assert train("--resume", os.path.join(out, "best.npz")) == 2
    one_line_error(capsys, "checkpoint.npz", "best.npz keeps the selected model only")
    assert train("--resume", out, "--stop-after", "1") == 0
    assert ckpt.load(out).config["validation"] == saved.config["validation"]


def test_a_checkpoint_without_the_selection_fields_is_refused_by_name(data_dir, tmp_path, capsys):
    """0.1.0 has no old-run defaults: settings that lack a field are a damaged checkpoint,
    named in one line, not read as another rule."""
    out = str(tmp_path / "old")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--stop-after", "1",
                 "--select", "last", "--val-identities", "0", "--val-rows", "0") == 0
    npz = os.path.join(out, "checkpoint.npz")
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    config = json.loads(str(arrays["config"]))
    for k in ("val_identities", "val_rows", "select", "patience"):
        del config["train"][k]
    arrays["config"] = np.array(json.dumps(config))
    np.savez(npz, **arrays)
    capsys.readouterr()
    assert train("--resume", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.npz: train.val_identities: missing" in err[0], err


# --- bad input: one line, exit 2, before training ----------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--val-identities", "1"], ["--val-identities 1", "[0, 1)"]),
    (["--val-rows", "-0.5"], ["--val-rows -0.5", "[0, 1)"]),
    (["--val-rows", "nan"], ["--val-rows nan", "[0, 1)"]),
    (["--val-identities", "0", "--val-rows", "0"], ["--select val", "it is off"]),
    (["--val-identities", "0", "--val-rows", "0", "--select", "test", "--patience", "2"],
     ["--patience 2", "the split is off"]),
    (["--val-identities", "0.95"], ["--val-identities 0.95", "training needs two"]),
    (["--val-identities", "0.02"], ["--val-identities 0.02", "0 pairs", "needs 20 pairs"]),
    (["--val-rows", "0.001"], ["--val-rows 0.001", "seen validation part"]),
    (["--patience", "-1"], ["--patience -1", "an integer >= 0"]),
])
def test_bad_selection_flags_are_one_line_before_training(data_dir, tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.setattr(Trainer, "train", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "run"
    assert train("--data-dir", data_dir, *TINY_RUN, *args, "--out", str(out)) == 2
    one_line_error(capsys, *words)
    assert not out.exists()


def test_the_ablation_selects_each_row_by_validation(tmp_path, monkeypatch, capsys):
    """Every row is selected by its validation EER, and the table prints the epoch."""
    rows = [[("gated baseline", "gated", dict(fusion="gated", alignment="none"), (27.6, 79.2)),
             ("PAEFF (hyperbolic)", "paeff", dict(fusion="egff", alignment="hyperbolic"), (22.9, 84.4))]]
    monkeypatch.setattr(train_cli, "ABLATION_TABLES", rows)
    monkeypatch.setattr(train_cli, "load_data", lambda data_dir=None, synthetic=None: (
        make_synthetic(n_identities=24, seed=5, face_dim=32, voice_dim=16, test_rows=40),
        {"source": "synthetic", "synthetic": dict(n_identities=24, seed=5, face_dim=32, voice_dim=16,
                                                  test_rows=40)}))
    script(monkeypatch)
    out = str(tmp_path / "ablation")
    assert train("--ablation", *TINY_RUN, "--out", out) == 0
    table = open(os.path.join(out, "ablation.txt")).read()
    lines = table.splitlines()
    assert "epoch" in lines[1] and "val EER" in lines[1]
    for line in lines[2:4]:
        assert line.split()[-4:-2] == ["2", "20.0"]                    # selected epoch, its val EER
    assert "selected by rule val" in table
    for slug in ("gated", "paeff"):
        assert ckpt.load(os.path.join(out, slug, "best.npz")).epoch == 2
