"""One writer per run folder: the lock admits exactly one process, whatever the timing.

``PAEFF_STRESS_ROUNDS`` (default 1) sets how many rounds the stress tests run; CI
keeps one, a night run may ask for many.
"""
import fcntl
import multiprocessing
import os
import random
import subprocess
import sys
import time

import pytest

from paeff_np.run import atomic
from paeff_np.run import checkpoint as ckpt
from paeff_np.run.cli import run as run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as train_cli  # noqa: E402

ROUNDS = int(os.environ.get("PAEFF_STRESS_ROUNDS", "1"))
TINY_RUN = ["--epochs", "30", "--batch-size", "32", "--embed-dim", "16", "--lr", "3e-3"]


def train(*args):
    return run_cli(lambda: train_cli.main(list(map(str, args))), "train.py")


# --- the protocol, with a pause injected before or after every system call -----------

PAUSED_CALLS = [(atomic.os, "open"), (atomic.os, "close"), (atomic.os, "unlink"), (atomic.os, "write"),
                (atomic.os, "ftruncate"), (atomic.os, "stat"), (atomic.os, "fstat"),
                (atomic.os, "fdopen"), (fcntl, "flock")]


def _contender(folder, seed, attempts, start):
    """A forked process: take the lock ``attempts`` times; inside, claim a marker file
    that only one holder at a time can create. Exit status: how many times the marker
    was already there (two holders at once)."""
    rng = random.Random(seed)
    for module, name in PAUSED_CALLS:
        real = getattr(module, name, None)
        if real is None:
            continue

        def paused(*args, real=real, **kwargs):
            if rng.random() < 0.5:
                time.sleep(rng.random() * 0.003)
            result = real(*args, **kwargs)
            if rng.random() < 0.5:
                time.sleep(rng.random() * 0.003)
            return result
        setattr(module, name, paused)
    while time.time() < start:
        time.sleep(0.001)
    overlaps = 0
    marker = os.path.join(folder, "holder")
    for _ in range(attempts):
        try:
            with atomic.folder_lock(folder):
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    overlaps += 1
                    continue
                time.sleep(rng.random() * 0.003)
                os.unlink(marker)
        except atomic.FolderInUse:
            pass
        time.sleep(rng.random() * 0.002)
    os._exit(min(overlaps, 100))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_the_lock_admits_one_process_at_a_time_with_pauses_at_every_step(tmp_path):
    """20 processes take and release one folder's lock over and over, each pausing at
    random before and after every call of the protocol: never two holders at once."""
    ctx = multiprocessing.get_context("fork")
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    for round_ in range(ROUNDS):
        start = time.time() + 0.3
        procs = [ctx.Process(target=_contender, args=(folder, 1000 * round_ + i, 15, start))
                 for i in range(20)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 20, "two processes held the lock at once"
        assert os.listdir(folder) == []          # the last holder removed its lock file


def test_a_refused_process_names_the_holder(tmp_path):
    folder = str(tmp_path / "run")
    with atomic.folder_lock(folder):
        child = subprocess.run([sys.executable, "-c", "import sys\n"
                                "from paeff_np.run.atomic import folder_lock, FolderInUse\n"
                                "try:\n    folder_lock(sys.argv[1]).__enter__()\n"
                                "except FolderInUse as e:\n    print(e)", folder],
                               capture_output=True, text=True, cwd=ROOT)
    assert f"{folder} is in use by process {os.getpid()} of this machine" in child.stdout
    assert not os.path.exists(folder)            # created by the lock, removed when empty


# --- a late starter, default names ------------------------------------------------------

def test_a_late_starter_does_not_replace_a_run_finished_meanwhile(data_dir, tmp_path, monkeypatch, capsys):
    """The first train.py into --out is still reading its data when a second one into the
    same --out starts, finishes and leaves its run: the first is refused when it takes
    the lock, and the finished run is left as it was."""
    out = tmp_path / "run"
    real_load_data, calls = train_cli.load_data, []

    def load_while_another_run_finishes(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--stop-after", "1") == 0
            capsys.readouterr()
        return real_load_data(*args, **kwargs)
    monkeypatch.setattr(train_cli, "load_data", load_while_another_run_finishes)
    before = (out / ckpt.CHECKPOINT_NAME)
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--stop-after", "2") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert ckpt.load(str(out)).epoch == 1 and before.exists()


def test_runs_started_in_the_same_second_get_different_default_folders(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_cli.time, "strftime", lambda fmt: "20261207-170000")
    names = set()
    for pid in (4242, 4243):
        monkeypatch.setattr(train_cli.os, "getpid", lambda pid=pid: pid)
        names.add(train_cli.fresh_out_dir(None))
    assert len(names) == 2


# --- the done-when stress test: 20 trainers, then 20 resumes, on one folder at once ------

def _start_all(commands, env):
    return [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for command in commands]


def _finish_all(procs):
    return [(p.wait(120), *p.communicate()) for p in procs]


def _refusal(err):
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    return lines[0]


def test_twenty_trainers_then_twenty_resumes_on_one_folder(data_dir, tmp_path):
    """Each round: 20 ``train.py --out F`` at once, exactly one trains, the others are
    refused in one line; then 20 ``--resume F --stop-after 1`` at once: the ones that
    ran did so one after the other (the checkpoint's epoch counts them all), the others
    are refused in one line; the folder then evaluates and resumes."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    for round_ in range(ROUNDS):
        out = str(tmp_path / f"run{round_}")
        fresh = [sys.executable, "train.py", "--data-dir", data_dir, *TINY_RUN, "--out", out,
                 "--stop-after", "1"]
        results = _finish_all(_start_all([fresh] * 20, env))
        assert sorted(rc for rc, _, _ in results) == [0] + [2] * 19, [r[2] for r in results]
        for rc, _, err in results:
            if rc == 2:
                line = _refusal(err)
                assert any(w in line for w in ("is in use by", "already holds a run", "is not empty")), line
        assert ckpt.load(out).epoch == 1

        resume = [sys.executable, "train.py", "--resume", out, "--stop-after", "1"]
        results = _finish_all(_start_all([resume] * 20, env))
        ran = [r for r in results if r[0] == 0]
        assert ran and all(rc in (0, 2) for rc, _, _ in results), [r[2] for r in results]
        for rc, _, err in results:
            if rc == 2:
                assert "is in use by" in _refusal(err)
        checkpoint = ckpt.load(out)
        assert checkpoint.epoch == 1 + len(ran)          # no two resumed the same epoch
        assert [r["epoch"] for r in checkpoint.history] == list(range(1, checkpoint.epoch + 1))
        assert not os.path.exists(os.path.join(out, atomic.LOCK_NAME))

        evaluated = subprocess.run([sys.executable, "eval.py", "--checkpoint", out], cwd=ROOT,
                                   env=env, capture_output=True, text=True)
        assert evaluated.returncode == 0, evaluated.stderr
        assert train("--resume", out, "--stop-after", "1") == 0
        assert ckpt.load(out).epoch == checkpoint.epoch + 1
