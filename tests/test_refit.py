"""The refit, --val-dir and the training curves (README "Model selection").

The refit chooses e* on the validation split, trains the same schedule again on
every training row in RUN/refit/, and reports that run's epoch-e* model as
best.npz. It must be the model a run on all rows stopped at e* gives, bit for
bit, and a kill at any instant of it must leave a folder that evaluates and
resumes to the same end. Killed runs are subprocesses (the bootstrap of
tests/test_crash.py, keyed by the renamed file); everything else runs in this
process on the tiny world of conftest.data_dir.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import one_line_error, recorded_renames

from paeff_np.data.synth import make_synthetic
from paeff_np.run import checkpoint as ckpt
from paeff_np.run.cli import run as run_cli
from paeff_np.run.training import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as eval_cli    # noqa: E402
import train as train_cli  # noqa: E402

TINY_RUN = ["--epochs", "4", "--batch-size", "32", "--embed-dim", "16", "--lr", "3e-3"]

# Runs a script with os.replace wrapped: the CRASH_NTH-th rename onto CRASH_TARGET (an absolute
# path) kills the process just before it (CRASH_WHEN=before) or just after it (after).
BOOTSTRAP = r"""
import os, runpy, signal, sys
target, nth, when = os.environ["CRASH_TARGET"], int(os.environ["CRASH_NTH"]), os.environ["CRASH_WHEN"]
real_replace, calls = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    hit = os.path.abspath(dst) == target
    calls[0] += hit
    if hit and calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *args, **kwargs)
    if hit and calls[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train(*args):
    return run_cli(lambda: train_cli.main(list(map(str, args))), "train.py")


def evaluate(*args):
    return run_cli(lambda: eval_cli.main(list(map(str, args))), "eval.py")


def same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """A default run (the refit is on: the data has seen-heard lists), and the
    targets of its renames, in order, relative to its folder."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    targets = recorded_renames(out, lambda: train("--data-dir", data_dir, *TINY_RUN, "--out", out))
    assert os.path.exists(os.path.join(out, "metrics.json"))
    return out, targets


def test_the_refit_is_the_all_rows_run_stopped_at_the_selected_epoch(straight, data_dir, tmp_path, capsys):
    out, targets = straight
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    selection = metrics["selection"]
    e = selection["epoch"]
    assert selection["refit"]["epoch"] == e and selection["refit"]["training_rows"] == \
        len(make_synthetic(n_identities=24, seed=5, face_dim=32, voice_dim=16, test_rows=40).train)
    best = ckpt.load(os.path.join(out, "best.npz"))
    assert best.epoch == e and best.config["refit_of"] == {"epoch": e, "rule": "val"}
    refit = ckpt.load(os.path.join(out, "refit"))
    assert refit.epoch == e and "validation" not in refit.config
    assert targets[-3:] == ["best.npz", "best.json", "metrics.jsonl"] or targets[-4:-1] == [
        "best.npz", "best.json", "refit/metrics.jsonl"]
    assert targets[-1] == "metrics.json"
    # the same recipe on all rows, stopped at e*, is the reported model bit for bit
    again = str(tmp_path / "all-rows")
    assert train("--data-dir", data_dir, *TINY_RUN, "--val-identities", "0", "--val-rows", "0",
                 "--select", "last", "--out", again, "--stop-after", e) == 0
    all_rows = ckpt.load(again)
    same_params(best.params, all_rows.params)
    assert best.cfg == all_rows.cfg and list(best.label_values) == list(all_rows.label_values)
    # ... and evaluates the same: eval.py on the folder evaluates best.npz, the refit's model
    capsys.readouterr()
    assert evaluate("--checkpoint", out, "--json") == 0
    captured = capsys.readouterr()
    assert f"evaluating {os.path.join(out, 'best.npz')}: epoch {e}, selected by rule val on the split " \
           f"and trained again on every training row" in captured.err
    got = json.loads(captured.out)
    assert evaluate("--checkpoint", again, "--json") == 0
    want = json.loads(capsys.readouterr().out)
    for key in want:
        assert got[key]["eer"] == metrics[key]["eer"] == want[key]["eer"]


def test_the_refit_prints_its_cost(data_dir, tmp_path, capsys):
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "refit: epoch" in out and "training the same schedule again on all" in out and "more" in out
    assert "refit: reported model trained again on all" in out and "× in all)" in out
    assert "refit epoch   1/4" in out                               # the refit's progress lines


def kill_points(straight):
    """(target, n-th rename of it) of the kill points: mid-refit (its epoch-1 checkpoint), the
    refit's best.npz commit (the last rename of best.npz), the results."""
    out, targets = straight
    return {"mid-refit": ("refit/checkpoint.npz", 2),
            "refit-best": ("best.npz", targets.count("best.npz")),
            "results": ("metrics.json", 1)}


@pytest.mark.parametrize("point,when", [("mid-refit", "before"), ("refit-best", "before"),
                                        ("refit-best", "after"), ("results", "before")])
def test_a_kill_in_the_refit_leaves_a_run_that_evaluates_and_resumes(straight, data_dir, tmp_path, capsys,
                                                                    point, when):
    straight_out, _ = straight
    out = str(tmp_path / "killed")
    target, nth = kill_points(straight)[point]
    env = dict(os.environ, CRASH_TARGET=os.path.join(os.path.abspath(out), target), CRASH_NTH=str(nth),
               CRASH_WHEN=when)
    proc = subprocess.run([sys.executable, "-c", BOOTSTRAP, os.path.join(ROOT, "train.py"), "--data-dir",
                           data_dir, *TINY_RUN, "--out", out], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    e = json.load(open(os.path.join(straight_out, "metrics.json")))["selection"]["epoch"]
    best_is_refit = ckpt.load(os.path.join(out, "best.npz")).config.get("refit_of") is not None
    assert best_is_refit == (point == "results" or when == "after")

    assert evaluate("--checkpoint", out, "--json") == 0
    err = capsys.readouterr().err
    if point == "mid-refit":          # the split run's model, said so
        assert "the refit on all training rows is not finished" in err and "--resume" in err
    else:                             # the refit's model: best.npz, or its checkpoint of epoch e*
        reported = "best.npz" if best_is_refit else os.path.join("refit", "checkpoint.npz")
        assert f"evaluating {os.path.join(out, reported)}: epoch {e}" in err

    assert train("--resume", out) == 0
    resumed = capsys.readouterr().out
    assert ("best.npz held the model selected on the split (a save cut short)" in resumed) == \
        (point == "refit-best" and when == "before")
    for name in ("best.npz", "checkpoint.npz", os.path.join("refit", "checkpoint.npz")):
        a, b = ckpt.load(os.path.join(out, name)), ckpt.load(os.path.join(straight_out, name))
        assert a.epoch == b.epoch
        same_params(a.params, b.params)
    got, want = (json.load(open(os.path.join(d, "metrics.json"))) for d in (out, straight_out))
    assert {k: v for k, v in got.items() if k != "selection"} == {k: v for k, v in want.items() if k != "selection"}
    assert got["selection"]["epoch"] == want["selection"]["epoch"]
    assert [json.loads(line)["loss"] for line in open(os.path.join(out, "refit", "metrics.jsonl"))] == \
        [json.loads(line)["loss"] for line in open(os.path.join(straight_out, "refit", "metrics.jsonl"))]


def test_stop_after_counts_both_runs_and_resume_finishes_the_refit(straight, data_dir, tmp_path, capsys):
    straight_out, _ = straight
    out = str(tmp_path / "run")
    e = json.load(open(os.path.join(straight_out, "metrics.json")))["selection"]["epoch"]
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--stop-after", 5) == 0
    assert f"stopped after the refit's epoch 1/{e}" in capsys.readouterr().out
    assert train("--resume", out) == 0
    assert f"refit: resuming {os.path.join(out, 'refit')} at epoch 1/{e}" in capsys.readouterr().out
    same_params(ckpt.load(os.path.join(out, "best.npz")).params,
                ckpt.load(os.path.join(straight_out, "best.npz")).params)


def test_a_second_writer_during_the_refit_is_refused(data_dir, tmp_path, monkeypatch, capsys):
    """While the refit trains, the run folder and the refit folder are both locked: a
    second train.py into either is one line, and the refit goes on to its end."""
    out = str(tmp_path / "run")
    tried, real_train = [], Trainer.train

    def train_refit(self, *args, **kwargs):
        if self.refit_of is not None and not tried:
            capsys.readouterr()
            for target in (out, os.path.join(out, "refit")):
                tried.append(train("--resume", target))
                one_line_error(capsys, "in use by process")
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", train_refit)
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out) == 0
    assert tried == [2, 2]
    assert ckpt.load(os.path.join(out, "best.npz")).config.get("refit_of") is not None


def test_the_refit_folder_is_resumed_through_its_run_and_keeps_its_schedule(straight, tmp_path, capsys):
    import shutil
    out = str(tmp_path / "copy")
    shutil.copytree(straight[0], out)
    assert train("--resume", os.path.join(out, "refit")) == 2
    one_line_error(capsys, "is the refit of the run in", f"--resume {out}")
    assert train("--resume", out, "--epochs", 8) == 2
    one_line_error(capsys, "--epochs 8", "refit", "has started", "new run")
    assert train("--resume", out, "--no-refit") == 2
    one_line_error(capsys, "drop --refit")


def test_refit_with_nothing_held_out_is_refused(data_dir, tmp_path, capsys):
    assert train("--data-dir", data_dir, *TINY_RUN, "--val-identities", "0", "--val-rows", "0",
                 "--select", "last", "--refit", "--out", tmp_path / "run") == 2
    one_line_error(capsys, "--refit", "both 0", "drop --refit")
    assert not (tmp_path / "run").exists()


# --- --val-dir -------------------------------------------------------------------------

def write_val_dir(folder, rows=60, face_dim=32, voice_dim=16, prefix="v", seed=9):
    """faceVal.csv / voiceVal.csv of 6 identities not in training (labels v0..v5)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    labels = [f"{prefix}{i % 6}" for i in range(rows)]
    for name, dim in (("faceVal.csv", face_dim), ("voiceVal.csv", voice_dim)):
        x = rng.standard_normal((rows, dim))
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(",".join(f"{v:.6f}" for v in row) + f",{label}\n" for row, label in zip(x, labels))
    return str(folder)


def test_val_dir_selects_on_its_lists_and_carves_nothing(data_dir, tmp_path, capsys):
    val = write_val_dir(tmp_path / "val")
    out = str(tmp_path / "run")
    assert train("--data-dir", data_dir, *TINY_RUN, "--val-dir", val, "--out", out) == 0
    stdout = capsys.readouterr().out
    assert f"validation: {val} (--val-dir), unseen 60 pairs" in stdout
    saved = ckpt.load(out)
    n_rows = len(make_synthetic(n_identities=24, seed=5, face_dim=32, voice_dim=16, test_rows=40).train)
    assert saved.config["validation"]["training_rows"] == n_rows           # nothing carved
    assert saved.config["train"]["val_dir"] == val and saved.config["train"]["refit"] is False
    assert not os.path.exists(os.path.join(out, "refit"))                  # nothing to refit
    log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert all("val/unseen/eer" in r and "val/seen/eer" not in r for r in log)
    selection = json.load(open(os.path.join(out, "metrics.json")))["selection"]
    assert selection["val_part"] == "unseen"
    assert selection["epoch"] == min(log, key=lambda r: r["val/unseen/eer"])["epoch"]
    # resume reads the recorded folder and checks that its lists are the same
    assert train("--resume", out, "--epochs", 5) == 0
    with open(os.path.join(val, "faceVal.csv"), "a") as f:
        f.write(",".join(["0.5"] * 32) + ",v1\n" + ",".join(["0.5"] * 32) + ",v2\n")
    with open(os.path.join(val, "voiceVal.csv"), "a") as f:
        f.write(",".join(["0.5"] * 16) + ",v1\n" + ",".join(["0.5"] * 16) + ",v2\n")
    capsys.readouterr()
    assert train("--resume", out, "--epochs", 6) == 2
    one_line_error(capsys, "validation split", "differs")


def test_val_dir_rows_of_training_identities_form_the_seen_part(data_dir, tmp_path, capsys):
    val = write_val_dir(tmp_path / "val", prefix="1000")    # labels 10000..10005: four are training ones
    assert train("--data-dir", data_dir, *TINY_RUN, "--val-dir", val, "--out", tmp_path / "run",
                 "--stop-after", 1) == 0
    # 50 rows of five training identities; the 10 of identity 10000 alone make no unseen part
    assert "(--val-dir), seen 50 pairs" in capsys.readouterr().out


def bad_val(folder, problem):
    write_val_dir(folder)
    face, voice = (os.path.join(folder, n) for n in ("faceVal.csv", "voiceVal.csv"))
    lines = open(face).read().splitlines()
    if problem == "missing":
        os.remove(voice)
    elif problem == "width":
        write_val_dir(folder, face_dim=31)
    elif problem == "nan":
        lines[3] = "nan," + lines[3].split(",", 1)[1]
    elif problem == "labels":
        lines[4] = lines[4].rsplit(",", 1)[0] + ",v5"
    elif problem == "ragged":
        lines[2] = lines[2].split(",", 1)[1]
    elif problem == "one-identity":
        lines = [line.rsplit(",", 1)[0] + ",v0" for line in lines]
        voice_lines = open(voice).read().splitlines()
        open(voice, "w").write("".join(line.rsplit(",", 1)[0] + ",v0\n" for line in voice_lines))
    elif problem == "too-few":
        write_val_dir(folder, rows=12)
        return str(folder)
    if problem in ("nan", "labels", "ragged", "one-identity"):
        open(face, "w").write("\n".join(lines) + "\n")
    return str(folder)


@pytest.mark.parametrize("problem,words", [
    ("none", ["no such folder (missing)"]),
    ("missing", ["voiceVal.csv"]),
    ("width", ["31/16 wide", "32/16"]),
    ("nan", ["faceVal.csv", "row 4"]),
    ("labels", ["faceVal.csv", "row 5", "label"]),
    ("ragged", ["faceVal.csv", "row 3"]),
    ("one-identity", ["faceVal.csv", "2 identities"]),
    ("too-few", ["12 rows", "needs 20 rows"]),
])
def test_a_bad_val_dir_is_one_line_before_training(data_dir, tmp_path, monkeypatch, capsys, problem, words):
    monkeypatch.setattr(Trainer, "train", lambda *a, **k: pytest.fail("trained"))
    folder = str(tmp_path / "val") if problem == "none" else bad_val(tmp_path / "val", problem)
    out = tmp_path / "run"
    assert train("--data-dir", data_dir, *TINY_RUN, "--val-dir", folder, "--out", out) == 2
    one_line_error(capsys, *words)
    assert not out.exists()


@pytest.mark.parametrize("flags,words", [
    (["--val-identities", "0.2"], ["--val-dir replaces the split", "drop --val-identities"]),
    (["--refit"], ["--refit", "--val-dir keeps every training row"]),
])
def test_val_dir_refuses_the_split_and_the_refit(data_dir, tmp_path, capsys, flags, words):
    val = write_val_dir(tmp_path / "val")
    assert train("--data-dir", data_dir, *TINY_RUN, "--val-dir", val, *flags, "--out", tmp_path / "run") == 2
    one_line_error(capsys, *words)


# --- the training curves ---------------------------------------------------------------

def test_curves_without_matplotlib_is_one_line_before_any_work(straight, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)             # import matplotlib fails
    monkeypatch.setattr(ckpt, "load", lambda *a, **k: pytest.fail("read the run"))
    assert evaluate("--checkpoint", straight[0], "--curves", tmp_path / "c.png") == 2
    one_line_error(capsys, "--curves needs matplotlib", "pip install matplotlib")
    assert not (tmp_path / "c.png").exists()


def test_curves_draws_the_run_and_never_overwrites(straight, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    assert evaluate("--checkpoint", straight[0], "--curves", png) == 0
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().err
    before = open(png, "rb").read()
    assert evaluate("--checkpoint", straight[0], "--curves", png) == 2
    one_line_error(capsys, "already exists")
    assert open(png, "rb").read() == before
