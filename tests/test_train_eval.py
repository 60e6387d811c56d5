"""train.py and eval.py end to end, on a small synthetic world written as FOP CSV files."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from paeff_np.run import checkpoint as ckpt
from paeff_np.run.atomic import write_atomically, write_json
from paeff_np.data.synth import make_synthetic, save_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_RUN = ["--epochs", "4", "--batch-size", "64", "--embed-dim", "64", "--dropout", "0.2", "--lr", "3e-3"]


def run(script, *args, cwd=ROOT):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def assert_user_error(rc, err, *words):
    """One line on stderr, exit code 2, no traceback, and the words that say what is wrong."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small world: 100 identities at reduced widths, lists of 400 rows."""
    d = tmp_path_factory.mktemp("synth")
    save_dir(make_synthetic(n_identities=100, seed=3, face_dim=512, voice_dim=128, test_rows=400), d)
    return str(d)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    rc, stdout, err = run("train.py", "--data-dir", data_dir, *SMALL_RUN, "--out", out)
    assert rc == 0, err
    return out, stdout


def test_train_writes_its_folder_and_learns(trained):
    out, stdout = trained
    for name in ("checkpoint.npz", "config.json", "metrics.jsonl", "metrics.json", "best.npz", "best.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not [f for f in os.listdir(out) if f.startswith(".")]          # no temp files left
    log = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert {"loss", "align", "opl", "ce", "lr", "samples_per_s",
            "val/unseen/eer", "val/unseen/auc", "val/seen/eer", "val/seen/auc"} <= set(log[0])
    assert not [k for k in log[0] if k.startswith("unseenunheard/")]     # no test list watched
    results = json.load(open(os.path.join(out, "metrics.json")))
    selection = results.pop("selection")
    best = min(log, key=lambda r: (r["val/unseen/eer"], r["epoch"]))
    refit = selection.pop("refit")                   # the default: the data has seen-heard lists
    assert selection == {"rule": "val", "epoch": best["epoch"], "val_eer": best["val/unseen/eer"],
                         "val_auc": best["val/unseen/auc"], "val_part": "unseen", "epochs_run": 4}
    reported = ckpt.load(os.path.join(out, "best.npz"))
    assert reported.epoch == refit["epoch"] == best["epoch"]
    assert reported.config["refit_of"] == {"epoch": best["epoch"], "rule": "val"}
    assert refit["training_rows"] == len(make_synthetic(n_identities=100, seed=3, face_dim=512, voice_dim=128,
                                                        test_rows=400).train)
    assert f"refit: reported model trained again on all {refit['training_rows']:,} training rows" in stdout
    assert set(results) == {f"{s}/{k}" for s in ("seenheard", "unseenunheard")
                            for k in ("random", "G", "N", "A", "GNA")}
    for r in results.values():
        assert {"eer", "auc", "eer_official", "auc_official"} <= set(r)
    assert results["unseenunheard/random"]["eer"] < 0.42           # chance is 0.5
    assert results["seenheard/random"]["eer"] < results["unseenunheard/random"]["eer"]
    assert "unseen-unheard/random" in stdout and "epoch   4/4" in stdout   # split names for people
    assert f"selected: epoch {best['epoch']} of 4 by rule val" in stdout


def test_eval_reproduces_train_results(trained, data_dir):
    out, _ = trained
    rc, stdout, err = run("eval.py", "--checkpoint", out, "--data-dir", data_dir, "--json")
    assert rc == 0, err
    got = json.loads(stdout)
    want = json.load(open(os.path.join(out, "metrics.json")))
    want.pop("selection")
    for key in want:
        for metric in ("eer", "auc", "eer_official", "auc_official"):
            assert got[key][metric] == pytest.approx(want[key][metric], abs=1e-12)
    assert got["unseenunheard/random"]["matching"]["voice_to_face"]["10"] == \
        want["unseenunheard/random"]["matching"]["voice_to_face"]["10"]
    rc, stdout, err = run("eval.py", "--checkpoint", os.path.join(out, "checkpoint.npz"),
                          "--data-dir", data_dir)
    assert rc == 0 and "matching accuracy" in stdout and "unseen-unheard/GNA" in stdout


def test_resume_equals_straight_run_bit_for_bit(trained, data_dir, tmp_path):
    straight, _ = trained
    resumed = str(tmp_path / "resumed")
    rc, stdout, err = run("train.py", "--data-dir", data_dir, *SMALL_RUN, "--out", resumed,
                          "--stop-after", "2")
    assert rc == 0, err
    assert "--resume" in stdout and ckpt.load(resumed).epoch == 2
    rc, stdout, err = run("train.py", "--resume", resumed)
    assert rc == 0, err
    a, b = ckpt.load(straight), ckpt.load(resumed)
    assert a.epoch == b.epoch == 4
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    for k in a.buffers:
        np.testing.assert_array_equal(a.buffers[k], b.buffers[k])
    log_a = [json.loads(l) for l in open(os.path.join(straight, "metrics.jsonl"))]
    log_b = [json.loads(l) for l in open(os.path.join(resumed, "metrics.jsonl"))]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def test_same_seed_same_run(trained, data_dir, tmp_path):
    straight, _ = trained
    again = str(tmp_path / "again")
    assert run("train.py", "--data-dir", data_dir, *SMALL_RUN, "--out", again)[0] == 0
    a, b = ckpt.load(straight), ckpt.load(again)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_diverging_loss_stops_cleanly(data_dir, tmp_path):
    out = str(tmp_path / "nan")
    rc, _, err = run("train.py", "--data-dir", data_dir, *SMALL_RUN[:-1], "1e30", "--out", out)
    assert_user_error(rc, err, "loss became", "checkpoint")
    assert ckpt.load(out).epoch == 0                      # the last good checkpoint is intact


def test_train_refuses_to_overwrite_a_run(trained, data_dir):
    out, _ = trained
    before = open(os.path.join(out, "checkpoint.npz"), "rb").read()
    rc, _, err = run("train.py", "--data-dir", data_dir, *SMALL_RUN, "--out", out)
    assert_user_error(rc, err, out, "--resume")
    assert open(os.path.join(out, "checkpoint.npz"), "rb").read() == before


@pytest.mark.parametrize("args,words", [
    (["--data-dir", "/nonexistent/dir"], ["/nonexistent/dir"]),
    (["--egff-kernel", "4"], ["--egff-kernel 4", "positive odd integer"]),
    (["--batch-size", "100000"], ["batch"]),
])
def test_train_user_errors(data_dir, tmp_path, args, words):
    if "--data-dir" not in args:
        args = ["--data-dir", data_dir, *args]
    rc, _, err = run("train.py", *args, "--out", str(tmp_path / "x"))
    assert_user_error(rc, err, *words)


def test_train_bad_csv_is_one_line(data_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("faceTrain.csv", "voiceTrain.csv"):
        (bad / name).write_text(open(os.path.join(data_dir, name)).read())
    lines = (bad / "voiceTrain.csv").read_text().splitlines()
    lines[4] = lines[4].replace(",", ",x", 1)
    (bad / "voiceTrain.csv").write_text("\n".join(lines) + "\n")
    rc, _, err = run("train.py", "--data-dir", str(bad), "--out", str(tmp_path / "y"))
    assert_user_error(rc, err, "voiceTrain.csv", "5")


def test_gpu_without_cupy_is_one_line(data_dir, tmp_path):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    rc, _, err = run("train.py", "--data-dir", data_dir, "--device", "cuda", "--out", str(tmp_path / "g"))
    assert_user_error(rc, err, "CuPy")


def test_eval_user_errors(trained, tmp_path):
    out, _ = trained
    rc, _, err = run("eval.py", "--checkpoint", str(tmp_path / "missing"))
    assert_user_error(rc, err, "missing", "no such file")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.npz").write_bytes(b"not a zip file")
    (corrupt / "config.json").write_text(open(os.path.join(out, "config.json")).read())
    rc, _, err = run("eval.py", "--checkpoint", str(corrupt))
    assert_user_error(rc, err, "checkpoint.npz", "corrupt")
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    (narrow / "face_veriflist_test_random_unseenunheard.csv").write_text("1,2\n3,4\n")
    (narrow / "voice_veriflist_test_random_unseenunheard.csv").write_text("1,2\n3,4\n")
    rc, _, err = run("eval.py", "--checkpoint", out, "--data-dir", str(narrow))
    assert_user_error(rc, err, "face_veriflist_test_random_unseenunheard.csv", "512")


def test_write_atomically_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    write_json(str(target), {"a": 1})

    def failing(f):
        f.write("{partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        write_atomically(str(target), failing, mode="w")
    assert json.load(open(target)) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_config_json_is_a_copy_never_trusted_over_the_npz(trained, tmp_path):
    out, _ = trained
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "checkpoint.npz").write_bytes(open(os.path.join(out, "checkpoint.npz"), "rb").read())
    config = json.load(open(os.path.join(out, "config.json")))
    config["epoch"] = 1
    config["model"]["embed_dim"] = 3
    (mixed / "config.json").write_text(json.dumps(config))
    loaded = ckpt.load(str(mixed))
    assert loaded.epoch == 4 and loaded.cfg.embed_dim == 64         # the npz decides
    os.remove(mixed / "config.json")
    assert ckpt.load(str(mixed)).epoch == 4                         # and needs no copy


def test_a_format1_checkpoint_is_refused_in_one_line(trained, tmp_path):
    """0.1.0 reads only its own format: a format-1 checkpoint (metadata in config.json
    only) is named as an earlier format, whatever its config.json says."""
    out, _ = trained
    old = tmp_path / "old"
    old.mkdir()
    with np.load(os.path.join(out, "checkpoint.npz")) as data:
        arrays = {k: data[k] for k in data.files if k not in ("config", "history")}
    np.savez(old / "checkpoint.npz", epoch=np.array(4), **arrays)
    config = json.load(open(os.path.join(out, "config.json")))
    config["format_version"] = 1
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ckpt.CheckpointError, match="an earlier format, which 0.1.0 does not read"):
        ckpt.load(str(old))


def test_eval_plots(trained, data_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = trained
    rc, _, err = run("eval.py", "--checkpoint", out, "--data-dir", data_dir, "--plot", str(tmp_path / "p"))
    assert rc == 0, err
    for name in ("roc_seenheard.png", "roc_unseenunheard.png", "matching.png"):
        assert (tmp_path / "p" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_refused_before_evaluating(trained, monkeypatch, tmp_path):
    out, _ = trained
    sys.path.insert(0, ROOT)
    import eval as eval_cli
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(eval_cli.UsageError, match="pip install matplotlib"):
        eval_cli.main(["--checkpoint", out, "--plot", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()
