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

from paeff_np import checkpoint as ckpt
from paeff_np.atomic import TEMPORARY_SUFFIX
from paeff_np.data.synth import make_synthetic, save_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--epochs", "3", "--batch-size", "32", "--embed-dim", "16", "--lr", "3e-3"]

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
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_dir(make_synthetic(n_identities=24, seed=5, face_dim=32, voice_dim=16, test_rows=40), d)
    return str(d)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """An uninterrupted run, and the targets of its os.replace calls in order."""
    out = str(tmp_path_factory.mktemp("straight"))
    targets, real_replace = [], os.replace

    def replace(src, dst):
        targets.append(os.path.relpath(dst, out))
        real_replace(src, dst)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        train_cli.main(["--data-dir", data_dir, *TINY_RUN, "--out", out])
    return out, targets


def test_a_save_commits_with_one_rename(straight):
    """Each epoch's save renames the checkpoint first (the commit point), then its copies."""
    out, targets = straight
    in_run = [t for t in targets if not t.startswith("..")]
    save = ["checkpoint.npz", "config.json", "metrics.jsonl"]
    assert in_run == save * 4 + ["metrics.json"]              # epochs 0..3, then the results


# kill points in the save of epoch 2 (the third save): before each of its three
# renames, and after the last one
KILLS = [("CRASH_BEFORE", 0, 1), ("CRASH_BEFORE", 1, 2), ("CRASH_BEFORE", 2, 2), ("CRASH_AFTER", 2, 2)]


@pytest.mark.parametrize("when,rename,epoch", KILLS, ids=["before-npz", "before-config", "before-log", "after-log"])
def test_kill_during_a_save_leaves_a_run_that_evaluates_and_resumes(straight, data_dir, tmp_path, capsys,
                                                                    when, rename, epoch):
    straight_out, _ = straight
    out = str(tmp_path / "killed")
    rc, _, err = run("train.py", "--data-dir", data_dir, *TINY_RUN, "--out", out,
                     CRASH_IN=out, **{when: 3 * 2 + rename + 1})
    assert rc == -signal.SIGKILL, err
    assert ckpt.load(out).epoch == epoch                     # the last complete epoch

    eval_cli.main(["--checkpoint", out, "--json"])
    assert "unseenunheard/random" in json.loads(capsys.readouterr().out)

    train_cli.main(["--resume", out])
    assert f"resuming {out} at epoch {epoch}/3" in capsys.readouterr().out
    assert temporaries(out) == []
    assert losses(out) == losses(straight_out)               # no epoch lost, none twice
    a, b = ckpt.load(out), ckpt.load(straight_out)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert json.load(open(os.path.join(out, "config.json")))["epoch"] == 3
    assert os.path.isfile(os.path.join(out, "metrics.json"))


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
