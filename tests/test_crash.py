"""A run folder survives ``kill -9`` at any instant of a save.

A training subprocess is started through a bootstrap that wraps ``os.replace``
(every file the project writes is renamed into place by it, see atomic.py) and
sends itself SIGKILL just before or just after one chosen call. The killed
folder must then be evaluated by eval.py and finished by ``--resume``, with
``metrics.jsonl`` agreeing with the uninterrupted run line for line. Only the
killed runs are subprocesses; eval.py and train.py run in this process
(their ``main``) to keep the suite fast.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import recorded_renames
from paeff_np.run import checkpoint as ckpt
from paeff_np.run.atomic import TEMPORARY_SUFFIX
from paeff_np.data.synth import make_synthetic, save_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--epochs", "3", "--batch-size", "32", "--embed-dim", "16", "--lr", "3e-3", "--no-refit"]   # the refit: test_refit.py

# Runs a script with os.replace wrapped: CRASH_BEFORE/CRASH_AFTER=N kill the process just before/after the N-th call
# that renames into the folder CRASH_IN.
BOOTSTRAP = r"""
import os, runpy, signal, sys
folder = os.path.abspath(os.environ.get("CRASH_IN", "/"))
before, after = (int(os.environ.get(k, 0)) for k in ("CRASH_BEFORE", "CRASH_AFTER"))
real_replace, calls = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    counted = os.path.dirname(os.path.abspath(dst)) == folder
    calls[0] += counted
    if counted and calls[0] == before:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *args, **kwargs)
    if counted and calls[0] == after:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(script, *args, **crash):
    env = dict(os.environ, **{k: str(v) for k, v in crash.items()})
    proc = subprocess.run([sys.executable, "-c", BOOTSTRAP, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


sys.path.insert(0, ROOT)
import eval as eval_cli    # noqa: E402
import train as train_cli  # noqa: E402


def temporaries(folder):
    return [n for n in os.listdir(folder) if n.endswith(TEMPORARY_SUFFIX)]


def losses(out):
    return [(r["epoch"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """An uninterrupted run, and the targets of its os.replace calls in order."""
    out = str(tmp_path_factory.mktemp("straight"))
    targets = recorded_renames(out, lambda: train_cli.main(["--data-dir", data_dir, *TINY_RUN, "--out", out]))
    return out, targets


def in_run(straight):
    out, targets = straight
    return [t for t in targets if not t.startswith("..")]


def test_a_save_commits_with_one_rename(straight):
    """Each epoch's save renames the checkpoint first (the commit point), then its copy; when
    the epoch is the one now selected, best.npz (the second commit point) and its copy follow."""
    out, _ = straight
    log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    expected, best = ["checkpoint.npz", "config.json", "metrics.jsonl"], None
    for r in log:
        improves = best is None or r["val/unseen/eer"] < best
        best = r["val/unseen/eer"] if improves else best
        expected += ["checkpoint.npz", "config.json"] + ["best.npz", "best.json"] * improves + ["metrics.jsonl"]
    assert in_run(straight) == expected + ["metrics.json"]      # epochs 0..3, then the results
    assert in_run(straight)[5:7] == ["best.npz", "best.json"]   # epoch 1 is always the best so far


def rename_number(straight, epoch, name):
    """1-based number of the rename of ``name`` in the save of ``epoch`` (as the bootstrap counts)."""
    renames = in_run(straight)
    starts = [i for i, t in enumerate(renames) if t == "checkpoint.npz"]
    save = renames[starts[epoch]:starts[epoch + 1] if epoch + 1 < len(starts) else None]
    return starts[epoch] + save.index(name) + 1


def selected_epoch(straight_out, last_epoch):
    """The epoch rule val selects among epochs 1..``last_epoch`` of the uninterrupted run:
    the lowest validation EER, the earliest on a tie."""
    log = [json.loads(line) for line in open(os.path.join(straight_out, "metrics.jsonl"))]
    return min((r for r in log if r["epoch"] <= last_epoch), key=lambda r: r["val/unseen/eer"])["epoch"]


# kill points: before each rename of the save of epoch 2 and after its last; before each
# rename of the best.npz commit of epoch 1 (the first epoch is always the best so far) and
# after it. (when, save's epoch, rename, the checkpoint's epoch after the kill)
KILLS = [("CRASH_BEFORE", 2, "checkpoint.npz", 1), ("CRASH_BEFORE", 2, "config.json", 2),
         ("CRASH_BEFORE", 2, "metrics.jsonl", 2), ("CRASH_AFTER", 2, "metrics.jsonl", 2),
         ("CRASH_BEFORE", 1, "best.npz", 1), ("CRASH_BEFORE", 1, "best.json", 1),
         ("CRASH_AFTER", 1, "best.json", 1)]


@pytest.mark.parametrize("when,save,rename,epoch", KILLS, ids=[
    "before-npz", "before-config", "before-log", "after-log", "before-best", "before-best-json", "after-best"])
def test_kill_during_a_save_leaves_a_run_that_evaluates_and_resumes(straight, data_dir, tmp_path, capsys,
                                                                    when, save, rename, epoch):
    straight_out, _ = straight
    out = str(tmp_path / "killed")
    rc, _, err = run("train.py", "--data-dir", data_dir, *TINY_RUN, "--out", out,
                     CRASH_IN=out, **{when: rename_number(straight, save, rename)})
    assert rc == -signal.SIGKILL, err
    assert ckpt.load(out).epoch == epoch                     # the last complete epoch
    best_written = os.path.exists(os.path.join(out, "best.npz"))
    assert best_written == (save > 1 or rename != "best.npz" or when == "CRASH_AFTER")

    eval_cli.main(["--checkpoint", out, "--json"])
    captured = capsys.readouterr()
    assert "unseenunheard/random" in json.loads(captured.out)
    # the model rule val selects at the kill, either way: best.npz when it holds that epoch,
    # else checkpoint.npz (the epoch just saved, its best.npz commit cut short)
    selected = selected_epoch(straight_out, epoch)
    holds = best_written and ckpt.load(os.path.join(out, "best.npz")).epoch == selected
    evaluated = "best.npz" if holds else "checkpoint.npz"
    assert f"evaluating {os.path.join(out, evaluated)}: epoch {selected}" in captured.err

    train_cli.main(["--resume", out])
    resumed = capsys.readouterr().out
    assert f"resuming {out} at epoch {epoch}/3" in resumed
    assert ("best.npz was missing (a save cut short)" in resumed) == (not best_written)
    assert temporaries(out) == []
    assert losses(out) == losses(straight_out)               # no epoch lost, none twice
    for name in ("checkpoint.npz", "best.npz"):
        a, b = ckpt.load(os.path.join(out, name)), ckpt.load(os.path.join(straight_out, name))
        assert a.epoch == b.epoch
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], b.params[k])
    assert json.load(open(os.path.join(out, "config.json")))["epoch"] == 3
    assert json.load(open(os.path.join(out, "metrics.json")))["selection"] == \
        json.load(open(os.path.join(straight_out, "metrics.json")))["selection"]


def test_a_temporary_of_a_killed_cache_write_is_removed_at_the_next_start(tmp_path):
    data = tmp_path / "data"
    save_dir(make_synthetic(n_identities=24, seed=5, face_dim=32, voice_dim=16, test_rows=40), data)
    out = str(tmp_path / "run")
    cache = data / ".paeff_cache"
    rc, _, err = run("train.py", "--data-dir", data, *TINY_RUN, "--out", out, CRASH_IN=cache, CRASH_BEFORE=1)
    assert rc == -signal.SIGKILL, err
    cache = data / ".paeff_cache"
    assert len(temporaries(cache)) == 1                      # the half-made cache of faceTrain.csv
    assert not os.path.exists(out)                           # no run folder before the first save
    train_cli.main(["--data-dir", str(data), *TINY_RUN, "--out", out, "--stop-after", "1"])
    assert temporaries(cache) == []


def test_a_kill_in_the_first_save_leaves_a_folder_a_new_start_takes(data_dir, tmp_path):
    out = str(tmp_path / "run")
    rc, _, err = run("train.py", "--data-dir", data_dir, *TINY_RUN, "--out", out, CRASH_IN=out, CRASH_BEFORE=1)
    assert rc == -signal.SIGKILL, err
    assert len(temporaries(out)) == 1 and not os.path.exists(os.path.join(out, "checkpoint.npz"))
    train_cli.main(["--data-dir", data_dir, *TINY_RUN, "--out", out, "--stop-after", "1"])
    assert temporaries(out) == [] and ckpt.load(out).epoch == 1
