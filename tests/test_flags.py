"""Everything is checked before the first epoch (issue 8 §2): hyperparameters when the flags
are parsed (one line naming the flag, exit 2, before any data is read or any folder is made),
and every test list against the protocols that will run on it."""
import argparse
import importlib.util
import os

import pytest

from paeff_np.run.cli import run
from paeff_np.run.validate import validate_hyperparameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", "_script"), os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_script():
    return load_script("train.py")


def refused(script, prog, argv, capsys):
    """Run script.main(argv) as the command line does; return its one line on stderr."""
    assert run(lambda: script.main(argv), prog) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


BAD_FLAGS = [
    (["--clip-radius", "-1"], "--clip-radius -1"),
    (["--lr", "1e-9"], "--lr 1e-09"),
    (["--lr", "0"], "--lr 0"),
    (["--lr=-1e-3"], "--lr -0.001"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"),
    (["--temperature", "0"], "--temperature 0"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--curvature", "-0.05"], "--curvature -0.05"),
    (["--curvature", "inf"], "--curvature inf"),
    (["--opl-gamma", "nan"], "--opl-gamma nan"),
    (["--opl-gamma", "-1"], "--opl-gamma -1"),
    (["--dropout", "1"], "--dropout 1"),
    (["--dropout", "nan"], "--dropout nan"),
    (["--dropout", "-0.1"], "--dropout -0.1"),
    (["--loss-weights", "0", "0", "0"], "--loss-weights 0 0 0"),
    (["--loss-weights", "0.3", "-0.35", "0.35"], "--loss-weights 0.3 -0.35 0.35"),
    (["--loss-weights", "0.3", "nan", "0.35"], "--loss-weights 0.3 nan 0.35"),
    (["--batch-size", "1"], "--batch-size 1: must be an integer >= 2"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 2"),
    (["--epochs", "0"], "--epochs 0: must be an integer >= 1"),
    (["--patience", "-1"], "--patience -1: must be an integer >= 0"),
    (["--seed", "-1"], "--seed -1"),
    (["--embed-dim", "0"], "--embed-dim 0"),
    (["--embed-dim", "1000000"], "--embed-dim 1000000"),
    (["--egff-kernel", "4"], "--egff-kernel 4"),
    (["--alignment", "none", "--loss-weights", "1", "0", "0"], "--loss-weights 1 0 0 with --alignment none"),
    (["--val-identities", "0", "--val-rows", "0"], "--select val needs a validation split"),
    (["--patience", "2", "--select", "last", "--val-identities", "0", "--val-rows", "0"], "--patience 2 watches"),
]


@pytest.mark.parametrize("flags, named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_train_refuses_a_hyperparameter_outside_its_domain_before_reading_data(
        train_script, flags, named, tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(train_script, "train.py", ["--data-dir", str(tmp_path / "no-such-folder"),
                                              "--out", str(out), *flags], capsys)
    assert line.startswith(f"train.py: error: {named}"), line
    assert not out.exists()


def test_eval_refuses_a_negative_seed(capsys, tmp_path):
    line = refused(load_script("eval.py"), "eval.py", ["--checkpoint", str(tmp_path), "--seed", "-1"], capsys)
    assert line.startswith("eval.py: error: --seed -1: must be an integer >= 0")


def test_boundary_values_are_accepted():
    args = argparse.Namespace(lr=2e-8, temperature=1e-3, curvature=1.0, opl_gamma=0.0, dropout=0.0,
                              loss_weights=[0.0, 0.0, 1.0], batch_size=2, seed=0, egff_kernel=5,
                              embed_dim=1024)
    validate_hyperparameters(args, memory_bytes=1 << 30)
    validate_hyperparameters(argparse.Namespace())  # nothing given: nothing to check
    validate_hyperparameters(argparse.Namespace(patience=0))  # the library's "never", as a flag too


def test_embedding_width_is_checked_against_the_memory_given():
    from paeff_np.usage import UsageError
    with pytest.raises(UsageError, match=r"--embed-dim 8192: .* more than this machine's 1 GiB"):
        validate_hyperparameters(argparse.Namespace(embed_dim=8192), memory_bytes=1 << 30)


def test_a_test_list_too_short_for_a_protocol_is_noted_before_training_and_skipped(tmp_path):
    import json
    import subprocess
    import sys

    from paeff_np.data.synth import make_synthetic, save_dir

    data = tmp_path / "data"
    save_dir(make_synthetic(n_identities=24, seed=1, face_dim=24, voice_dim=12, test_rows=8), data)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data-dir", str(data), "--out", str(out),
                           "--epochs", "1", "--batch-size", "32", "--embed-dim", "16"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout
    assert "Traceback" not in proc.stdout
    lines = proc.stdout.splitlines()
    note = ("note: unseenunheard/random has 8 pairs, fewer than the 20 of the official protocol "
            "(a positive and a negative pair in each of its 10 folds): "
            "its EER*/AUC* are skipped")
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch   1/1"))
    assert note in lines[:first_epoch]
    assert any("matching runs for n_c = 2, 3, 4 only" in line for line in lines[:first_epoch])
    results = json.loads((out / "metrics.json").read_text())
    assert set(results["unseenunheard/random"]) == {"eer", "auc", "matching"}
    assert set(results["seenheard/G"]) == {"eer", "auc"}


@pytest.mark.parametrize("script_name,argv,words", [
    ("train.py", ["--stop-after", "0"], ["argument --stop-after", "must be >= 1"]),  # no setting: argparse
    ("train.py", ["--lr", "fast"], ["argument --lr", "invalid float value"]),
    ("eval.py", [], ["--checkpoint", "required"]),
    ("bench.py", ["--repeats", "x"], ["argument --repeats", "invalid int value"]),
])
def test_a_flag_argparse_refuses_is_one_line_too(script_name, argv, words, capsys):
    """Not the whole usage block first: one line, as for every other user error."""
    script = load_script(script_name)
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script_name}: error: "), lines
    assert lines[0].endswith("(see --help)") and all(w in lines[0] for w in words), lines[0]


def test_the_command_line_checks_the_settings_own_tables(monkeypatch):
    """One home for each rule: a domain changed in Config's or TrainSettings' table is
    what the flags are checked by, and the same rule refuses the library call."""
    from paeff_np.domains import Domain, FieldError
    from paeff_np.model import Config
    from paeff_np.run.training import TrainSettings
    from paeff_np.usage import UsageError
    monkeypatch.setitem(Config.DOMAINS, "temperature", Domain(lambda v: v >= 1, "at least 1 (a test's rule)"))
    with pytest.raises(UsageError, match=r"^--temperature 0.5: must be at least 1 \(a test's rule\)$"):
        validate_hyperparameters(argparse.Namespace(temperature=0.5))
    with pytest.raises(FieldError, match=r"^Config: temperature = 0.5: must be at least 1"):
        Config(temperature=0.5)
    monkeypatch.setitem(TrainSettings.DOMAINS, "seed", Domain(lambda v: v < 10, "below 10 (a test's rule)"))
    with pytest.raises(UsageError, match=r"^--seed 12: must be below 10"):
        validate_hyperparameters(argparse.Namespace(seed=12))
