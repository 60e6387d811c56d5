"""A run folder is data: validated on load, never overwritten, and every failure is one line.

train.py and eval.py run in this process through ``cli.run`` (exit code and
stderr as on the command line) on a tiny synthetic world, to keep the suite fast.
"""
import errno
import json
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import one_line_error
from paeff_np.run import checkpoint as ckpt
from paeff_np.run.cli import run as run_cli
from paeff_np.data.synth import make_synthetic
from paeff_np.model import Config
from paeff_np.run.training import NO_SELECTION, Trainer, TrainingDiverged, TrainSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as eval_cli    # noqa: E402
import train as train_cli  # noqa: E402

TINY_RUN = ["--epochs", "3", "--batch-size", "32", "--embed-dim", "16", "--lr", "3e-3", "--no-refit"]   # the refit: test_refit.py


def train(*args):
    return run_cli(lambda: train_cli.main(list(map(str, args))), "train.py")


def evaluate(*args):
    return run_cli(lambda: eval_cli.main(list(map(str, args))), "eval.py")


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "r")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out) == 0
    return out


@pytest.fixture
def copy(run_dir, tmp_path):
    """A copy of the finished run to damage."""
    return shutil.copytree(run_dir, str(tmp_path / "copy"))


def edit_metadata(folder, change):
    """Apply ``change(config)`` to the metadata inside checkpoint.npz and to config.json."""
    npz = os.path.join(folder, ckpt.CHECKPOINT_NAME)
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    config = json.loads(str(arrays["config"])) if "config" in arrays else \
        json.load(open(os.path.join(folder, ckpt.CONFIG_NAME)))
    change(config)
    arrays["config"] = np.array(json.dumps(config))
    np.savez(npz, **arrays)
    with open(os.path.join(folder, ckpt.CONFIG_NAME), "w") as f:
        json.dump(config, f)


def edit_arrays(folder, change):
    npz = os.path.join(folder, ckpt.CHECKPOINT_NAME)
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(npz, **arrays)


# --- 4. a run folder is data: every field checked on load -----------------------------

def _set(section, key, value):
    def change(config):
        (config[section] if section else config)[key] = value
    return change


def _drop(section):
    return lambda config: config.pop(section)


METADATA_CASES = [
    ("no model section", _drop("model"), ["model", "missing section"]),
    ("no data section", _drop("data"), ["data", "missing section"]),
    ("no optimizer section", _drop("optimizer"), ["optimizer", "missing section"]),
    ("epoch a string", _set(None, "epoch", "2"), ["epoch", "integer"]),
    ("unknown format", _set(None, "format_version", 7), ["format_version"]),
    ("curvature a string", _set("model", "curvature", "0.05"), ["model.curvature", "number"]),
    ("embed_dim a float", _set("model", "embed_dim", 16.5), ["model.embed_dim", "integer"]),
    ("unknown model field", _set("model", "depth", 3), ["model.depth", "unknown field"]),
    ("fusion unknown", _set("model", "fusion", "attention"), ["model.fusion = attention", "egff or gated"]),
    ("optimizer step a string", _set("optimizer", "t", "x"), ["optimizer.t", "integer"]),
    ("unknown optimizer field", _set("optimizer", "momentum", 0.9), ["optimizer.momentum", "unknown field"]),
    ("betas not a pair", _set("optimizer", "betas", [0.9]), ["optimizer.betas"]),
    ("unknown data source", _set("data", "source", "s3"), ["data.source"]),
    ("data folder a number", _set("data", "data_dir", 5), ["data.data_dir"]),
    ("data folder empty", _set("data", "data_dir", ""), ["data.data_dir"]),
    ("validation a string", _set(None, "validation", "x"), ["validation", "an object or null"]),
    ("validation pairs a number", _set("validation", "pairs", 5), ["validation.pairs"]),
]


@pytest.mark.parametrize("change,words", [c[1:] for c in METADATA_CASES], ids=[c[0] for c in METADATA_CASES])
def test_damaged_metadata_is_one_line_from_eval_and_resume(copy, data_dir, capsys, change, words):
    edit_metadata(copy, change)
    capsys.readouterr()
    assert evaluate("--checkpoint", copy, "--data-dir", data_dir) == 2
    one_line_error(capsys, "checkpoint.npz", *words)
    assert train("--resume", copy) == 2
    one_line_error(capsys, "checkpoint.npz", *words)


TRAIN_CASES = [
    ("no train section", _drop("train"), ["train", "missing section"]),
    ("lr a string", _set("train", "lr", "fast"), ["train.lr", "number"]),
    ("unknown dtype", _set("train", "dtype", "bfloat16"), ["train.dtype", "float32"]),
    ("unknown device", _set("train", "device", "tpu"), ["train.device"]),
    ("unknown setting", _set("train", "warmup", 3), ["train.warmup", "unknown field"]),
    ("epochs zero", _set("train", "epochs", 0), ["train.epochs", ">= 1"]),
    ("unknown rule", _set("train", "select", "bogus"), ["train.select", "val or last or test"]),
    ("batch size zero", _set("train", "batch_size", 0), ["train.batch_size", ">= 2"]),
]


@pytest.mark.parametrize("change,words", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_damaged_training_settings_are_one_line_from_eval_and_resume(copy, data_dir, capsys,
                                                                     change, words):
    edit_metadata(copy, change)
    capsys.readouterr()
    assert evaluate("--checkpoint", copy, "--data-dir", data_dir) == 2     # eval reads the rule
    one_line_error(capsys, "checkpoint.npz", *words)
    assert train("--resume", copy) == 2
    one_line_error(capsys, "checkpoint.npz", *words)


def _edit_best_history(folder):
    npz = os.path.join(folder, "best.npz")
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    history = json.loads(str(arrays["history"]))
    history[0]["loss"] += 1e-3
    arrays["history"] = np.array(json.dumps(history))
    np.savez(npz, **arrays)


def test_a_best_npz_from_another_run_is_refused(copy, data_dir, tmp_path, capsys):
    other = str(tmp_path / "other")
    assert train("--data-dir", data_dir, *TINY_RUN, "--egff-kernel", "3", "--out", other) == 0
    shutil.copy(os.path.join(copy, "checkpoint.npz"), os.path.join(tmp_path, "kept.npz"))
    shutil.copy(os.path.join(other, "best.npz"), os.path.join(copy, "best.npz"))
    capsys.readouterr()
    assert evaluate("--checkpoint", copy, "--data-dir", data_dir) == 2
    one_line_error(capsys, "best.npz", "not from the run", "model configuration")
    assert train("--resume", copy, "--epochs", "4") == 2
    one_line_error(capsys, "best.npz", "not from the run", "model configuration")
    with open(os.path.join(copy, "checkpoint.npz"), "rb") as now, \
            open(os.path.join(tmp_path, "kept.npz"), "rb") as before:
        assert now.read() == before.read()                 # the refused resume wrote nothing


def test_a_best_npz_with_other_records_is_refused(copy, data_dir, capsys):
    _edit_best_history(copy)              # same model and labels: only the records tell
    assert evaluate("--checkpoint", copy, "--data-dir", data_dir) == 2
    one_line_error(capsys, "best.npz", "not from the run", "training records")


def test_resume_keeps_the_run_in_its_own_folder(copy, data_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert train("--resume", copy, "--epochs", "4", "--out", other) == 2
    one_line_error(capsys, "--resume", "own folder", "drop --out")
    assert os.listdir(other) == ["notes.txt"] and (other / "notes.txt").read_text() == "mine"
    assert train("--resume", copy, "--epochs", "4", "--out", copy + os.sep) == 0   # its own: fine


def _retype(key, dtype):
    def change(arrays):
        arrays[key] = arrays[key].astype(dtype)
    return change


def _put(key, value):
    def change(arrays):
        arrays[key] = value
    return change


ARRAY_CASES = [
    ("a parameter of integers", _retype("params/res_mix.weight", np.int32), ["res_mix.weight", "dtype"]),
    ("a parameter of float16", _retype("params/res_mix.weight", np.float16), ["res_mix.weight", "float16"]),
    ("an unknown parameter", _put("params/extra.weight", np.zeros(3, np.float32)), ["extra.weight", "unknown"]),
    ("a negative variance", lambda a: a["buffers/face_branch.fc1.1.running_var"].__setitem__(0, -1.0),
     ["running_var", "negative"]),
    ("labels of the wrong count", _put("label_values", np.array(["a", "b"])), ["label_values"]),
    ("an AdamW moment of another shape", _put("optimizer/m/res_mix.weight", np.zeros(3, np.float32)),
     ["optimizer/m/res_mix.weight"]),
    ("history shorter than the epochs", _put("history", np.array("[]")), ["history"]),
    ("metadata not JSON", _put("config", np.array("{model")), ["'config'", "damaged"]),
]


@pytest.mark.parametrize("change,words", [c[1:] for c in ARRAY_CASES], ids=[c[0] for c in ARRAY_CASES])
def test_damaged_arrays_are_one_line(copy, data_dir, capsys, change, words):
    edit_arrays(copy, change)
    capsys.readouterr()
    assert evaluate("--checkpoint", copy, "--data-dir", data_dir) == 2
    one_line_error(capsys, "checkpoint.npz", *words)


# --- 3. never overwrite, never leave debris --------------------------------------------

def test_ablation_into_a_used_folder_is_refused(data_dir, tmp_path, capsys):
    base = tmp_path / "ablation"
    (base / "gated").mkdir(parents=True)
    (base / "gated" / "checkpoint.npz").write_bytes(b"an earlier ablation")
    assert train("--ablation", "--data-dir", data_dir, *TINY_RUN, "--out", base) == 2
    one_line_error(capsys, str(base), "not empty")
    assert (base / "gated" / "checkpoint.npz").read_bytes() == b"an earlier ablation"


def test_a_refused_start_leaves_no_run_folder(data_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert train("--data-dir", data_dir, "--batch-size", "100000", "--out", out) == 2
    one_line_error(capsys, "batch")
    assert not out.exists()


def test_out_is_a_file_or_a_used_folder(data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", tmp_path / "file") == 2
    one_line_error(capsys, "file", "--out")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", tmp_path / "used") == 2
    one_line_error(capsys, "used", "not empty")
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


def test_plot_never_overwrites_a_file(run_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "matching.png").write_bytes(b"mine")
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    assert evaluate("--checkpoint", run_dir, "--data-dir", "unused", "--plot", plots) == 2
    one_line_error(capsys, "matching.png", "already exists")
    assert (plots / "matching.png").read_bytes() == b"mine"


def test_synth_never_overwrites_a_file(tmp_path, capsys):
    from paeff_np.data.__main__ import main as data_main
    (tmp_path / "faceTrain.csv").write_text("mine\n")
    assert data_main(["synth", "--out", str(tmp_path), "--identities", "12", "--test-rows", "20"]) == 2
    one_line_error(capsys, "faceTrain.csv", "already exists")
    assert (tmp_path / "faceTrain.csv").read_text() == "mine\n"


# --- 5 and 6: no silent wrong results, messages a person can act on ---------------------

def test_non_finite_batchnorm_statistics_stop_training():
    """Features finite in float32 but too large for its squares: the loss stays finite
    (train-mode BatchNorm normalises them away) while the running variance overflows."""
    dataset = make_synthetic(n_identities=24, seed=5, face_dim=32, voice_dim=16, test_rows=40)
    dataset.train.face[:] = dataset.train.face * np.float32(1e30)
    cfg = Config(face_dim=32, voice_dim=16, embed_dim=16, n_classes=dataset.train.n_classes)
    trainer = Trainer(dataset, cfg, TrainSettings(epochs=2, lr=1e-3, batch_size=32, **NO_SELECTION), "unused", log=None)
    with pytest.raises(TrainingDiverged, match="running_var became NaN or Inf in epoch 1.*last good checkpoint"):
        trainer.run_epoch()
    assert trainer.epoch == 0


def test_a_full_disk_names_the_file_and_how_to_resume(data_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "full")
    real_savez, saves = np.savez, []

    def savez(file, **arrays):
        saves.append(1)
        if len(saves) == 4:                    # the save of epoch 2 (after epoch 1's best.npz)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_savez(file, **arrays)
    monkeypatch.setattr(np, "savez", savez)
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out) == 2
    one_line_error(capsys, os.path.join(out, "checkpoint.npz"), "No space left on device",
                   "checkpoint of epoch 1", "intact", f"--resume {out}")
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    monkeypatch.setattr(np, "savez", real_savez)
    assert train("--resume", out) == 0
    assert [json.loads(l)["epoch"] for l in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]


def test_resume_with_fewer_epochs_than_done_is_refused(copy, capsys):
    assert train("--resume", copy, "--epochs", "2") == 2
    one_line_error(capsys, "--epochs 2", "3 epochs already done")


def test_resume_with_more_epochs_says_so_and_records_it(copy, capsys):
    before = json.load(open(os.path.join(copy, "metrics.json")))
    assert train("--resume", copy, "--epochs", "5") == 0
    stdout = capsys.readouterr().out
    assert "--epochs 5 (the run was set to 3)" in stdout and "cosine schedule" in stdout
    log = [json.loads(l) for l in open(os.path.join(copy, "metrics.jsonl"))]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5]
    assert f"learning rate of epoch 4 is {log[3]['lr']:.2e}" in stdout
    saved = ckpt.load(copy).config
    assert saved["train"]["epochs"] == 5
    assert saved["epochs_changed"] == [{"at_epoch": 3, "from": 3, "to": 5}]
    assert json.load(open(os.path.join(copy, "metrics.epoch3.json"))) == before   # kept, not stale
    assert json.load(open(os.path.join(copy, "metrics.json"))) != before


def test_eval_uses_the_recorded_data_folder(run_dir, capsys):
    assert evaluate("--checkpoint", run_dir, "--json") == 0
    captured = capsys.readouterr()
    assert "the data folder recorded in the checkpoint" in captured.err
    got = json.loads(captured.out)
    want = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert {k: r["eer"] for k, r in got.items()} == {k: r["eer"] for k, r in want.items() if k != "selection"}


def test_eval_says_when_the_recorded_data_folder_is_gone(copy, tmp_path, capsys):
    edit_metadata(copy, _set("data", "data_dir", str(tmp_path / "gone")))
    assert evaluate("--checkpoint", copy) == 2
    one_line_error(capsys, "gone")


@pytest.mark.parametrize("content,words", [(b"label,f1\n1,0.5\n", "not an .npz archive"),
                                           (b"", "an empty file")], ids=["a CSV", "empty"])
def test_a_file_that_is_not_an_npz_is_named_so(tmp_path, capsys, content, words):
    path = tmp_path / "model.npz"
    path.write_bytes(content)
    assert evaluate("--checkpoint", path) == 2
    line = one_line_error(capsys, str(path), "not a checkpoint", words)
    assert "allow_pickle" not in line


def test_a_pickled_entry_is_refused_without_advice_to_unpickle(tmp_path, capsys):
    path = str(tmp_path / "model.npz")
    np.savez(path, a=np.array([{"x": 1}], dtype=object))
    assert evaluate("--checkpoint", path) == 2
    line = one_line_error(capsys, path, "pickled objects, never loaded")
    assert "allow_pickle" not in line


def test_an_empty_checkpoint_path_is_named(capsys):
    assert evaluate("--checkpoint", "") == 2
    one_line_error(capsys, "checkpoint path is empty")


def test_eval_says_which_file_it_evaluated_after_the_protocol_notes(run_dir, tmp_path, capsys):
    from paeff_np.data.synth import save_dir
    short = tmp_path / "short"          # lists of 2 rows: every protocol note is printed
    save_dir(make_synthetic(n_identities=24, seed=5, face_dim=32, voice_dim=16, test_rows=2), short)
    capsys.readouterr()
    assert evaluate("--checkpoint", run_dir, "--data-dir", short) == 0
    notes = capsys.readouterr().err.splitlines()
    assert notes[-1].startswith(f"note: evaluating {os.path.join(run_dir, 'best.npz')}")
    assert len(notes) == len(set(notes)) and not any(n.startswith("note: note:") for n in notes)
    assert any("has 1 positive pair, " in n for n in notes)


def test_training_data_without_test_lists_says_so(data_dir, tmp_path, capsys):
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    for name in ("faceTrain.csv", "voiceTrain.csv"):
        shutil.copy(os.path.join(data_dir, name), train_only / name)
    assert train("--data-dir", train_only, *TINY_RUN, "--out", tmp_path / "r") == 0
    out, err = capsys.readouterr()
    assert "note: the data has no test lists" in err and "eval.py --checkpoint" in err
    assert "no test lists: nothing was tested" in out


def test_resume_refuses_training_pairs_that_changed(data_dir, tmp_path, capsys):
    data = shutil.copytree(data_dir, tmp_path / "data", ignore=shutil.ignore_patterns(".paeff_cache"))
    out = tmp_path / "run"
    assert train("--data-dir", data, *TINY_RUN, "--stop-after", "1", "--out", out) == 0
    moved = shutil.copytree(data, tmp_path / "moved")          # the same pairs elsewhere: fine
    face = data / "faceTrain.csv"
    lines = face.read_text().splitlines()
    cells = lines[5].split(",")
    cells[0] = repr(float(cells[0]) + 0.25)                   # one value; labels and split unchanged
    face.write_text("\n".join(lines[:5] + [",".join(cells)] + lines[6:]) + "\n")
    capsys.readouterr()
    assert train("--resume", out) == 2
    one_line_error(capsys, str(data), "training pairs differ", "fingerprint")
    assert train("--resume", out, "--data-dir", moved, "--stop-after", "1") == 0


def test_a_damaged_history_figure_is_one_line_from_eval_and_resume(copy, data_dir, capsys):
    def change(arrays):
        history = json.loads(str(arrays["history"]))
        history[0]["val/unseen/eer"] = "abc"
        arrays["history"] = np.array(json.dumps(history))
    edit_arrays(copy, change)
    assert evaluate("--checkpoint", copy, "--data-dir", data_dir) == 2
    one_line_error(capsys, "checkpoint.npz", "history[0].val/unseen/eer", "finite number")
    assert train("--resume", copy) == 2
    one_line_error(capsys, "checkpoint.npz", "history[0].val/unseen/eer")


def test_eval_of_a_named_file_checks_its_training_settings(copy, data_dir, capsys):
    edit_metadata(copy, _set("train", "select", "bogus"))
    assert evaluate("--checkpoint", os.path.join(copy, "checkpoint.npz"), "--data-dir", data_dir) == 2
    one_line_error(capsys, "checkpoint.npz", "train.select")


def test_eval_says_when_best_npz_is_missing(copy, data_dir, capsys):
    def select_epoch_1(arrays):          # epoch 1 the best: its model only best.npz could hold
        history = json.loads(str(arrays["history"]))
        for key in [k for k in history[0] if k.startswith("val/") and k.endswith("/eer")]:
            history[0][key] = 0.0
        arrays["history"] = np.array(json.dumps(history))
    edit_arrays(copy, select_epoch_1)
    os.remove(os.path.join(copy, "best.npz"))
    assert evaluate("--checkpoint", copy, "--data-dir", data_dir) == 2
    one_line_error(capsys, "best.npz is missing", "selects epoch 1", "deleted?")


@pytest.mark.parametrize("make,words", [
    (lambda p: np.savez(p, a=np.arange(3)), "not a paeff_np checkpoint"),
], ids=["plain npz"])
def test_an_npz_that_is_no_checkpoint_is_named(tmp_path, capsys, make, words):
    path = str(tmp_path / "plain.npz")
    make(path)
    assert evaluate("--checkpoint", path) == 2
    one_line_error(capsys, "plain.npz", words)


def test_a_device_file_is_not_called_missing(capsys):
    if not os.path.exists(os.devnull):
        pytest.skip("no null device")
    assert evaluate("--checkpoint", os.devnull) == 2
    one_line_error(capsys, os.devnull, "not a regular file")


def test_resume_names_its_folder_not_a_copy_or_a_link(copy, tmp_path, capsys):
    snapshot = os.path.join(copy, "snapshot.npz")
    shutil.copy(os.path.join(copy, "checkpoint.npz"), snapshot)
    assert train("--resume", snapshot, "--epochs", "4") == 2
    one_line_error(capsys, "snapshot.npz", "give the run folder")
    link = tmp_path / "link.npz"
    link.symlink_to(os.path.join(copy, "checkpoint.npz"))
    assert train("--resume", link, "--epochs", "4") == 0          # resumes where the link points
    assert ckpt.load(copy).epoch == 4 and sorted(os.listdir(tmp_path)) == ["copy", "link.npz"]
    capsys.readouterr()
    assert train("--resume", "") == 2
    one_line_error(capsys, "--resume", "path is empty")


def test_an_empty_out_is_refused(data_dir, capsys):
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", "") == 2
    one_line_error(capsys, "--out is empty")


def test_synth_refuses_an_empty_out(tmp_path, monkeypatch, capsys):
    from paeff_np.data.__main__ import main as data_main
    monkeypatch.chdir(tmp_path)
    assert data_main(["synth", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err and os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags,named", [(["--fusion", "gated"], "--fusion"),
                                         (["--egff-gate", "sum"], "--egff-gate"),
                                         (["--alignment", "none"], "--alignment"),
                                         (["--stop-after", "1"], "--stop-after")])
def test_ablation_refuses_the_flags_its_rows_set(data_dir, tmp_path, capsys, flags, named):
    """Else every row would silently train with them, under the rows' labels."""
    out = tmp_path / "ablation"
    assert train("--ablation", "--data-dir", data_dir, *TINY_RUN, *flags, "--out", out) == 2
    one_line_error(capsys, "--ablation", f"drop {named}")
    assert not out.exists()


def test_the_resume_hint_can_be_pasted(data_dir, tmp_path, monkeypatch, capsys):
    from train import resume_command
    assert resume_command("runs/a b") == "python train.py --resume 'runs/a b'"
    assert resume_command("-run") == "python train.py --resume ./-run"
    monkeypatch.chdir(tmp_path)
    assert train("--data-dir", data_dir, *TINY_RUN, "--stop-after", "1", "--out", "my run") == 0
    assert "continue with python train.py --resume 'my run'" in capsys.readouterr().out


def lock_holder(folder):
    """A process that holds ``folder``'s run lock (``atomic.folder_lock``) until killed."""
    import subprocess
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from paeff_np.run.atomic import folder_lock\n"
                               "with folder_lock(sys.argv[1]):\n"
                               "    print('locked', flush=True); time.sleep(60)", str(folder)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_second_writer_of_a_run_folder_is_refused(data_dir, tmp_path, capsys):
    """Two train.py into one folder would interleave their saves: whichever comes second,
    a fresh start (which sees only the lock of one that has not saved yet) or a resume,
    is refused at once, and the holder's folder is left as it was."""
    from paeff_np.run.atomic import LOCK_NAME
    out = tmp_path / "run"
    out.mkdir()
    holder = lock_holder(out)
    try:
        assert train("--data-dir", data_dir, *TINY_RUN, "--out", out) == 2
        one_line_error(capsys, str(out), f"in use by process {holder.pid}")
        assert os.listdir(out) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


def test_a_resume_of_a_folder_in_use_is_refused(copy, capsys):
    from paeff_np.run.atomic import LOCK_NAME
    holder = lock_holder(copy)
    try:
        before = open(os.path.join(copy, "checkpoint.npz"), "rb").read()
        assert train("--resume", copy, "--epochs", "4") == 2
        one_line_error(capsys, copy, f"in use by process {holder.pid}")
        assert open(os.path.join(copy, "checkpoint.npz"), "rb").read() == before
    finally:
        holder.kill()
        holder.wait()
    assert train("--resume", copy, "--epochs", "4") == 0       # its holder gone (kill -9): free
    assert not os.path.exists(os.path.join(copy, LOCK_NAME))


def test_a_lock_file_of_a_process_that_is_gone_is_taken_over(data_dir, tmp_path):
    import subprocess
    from paeff_np.run.atomic import _HOST, LOCK_NAME
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{_HOST}-{gone.pid}\n")
    assert train("--data-dir", data_dir, *TINY_RUN, "--out", out, "--stop-after", "1") == 0
    assert ckpt.load(str(out)).epoch == 1 and not (out / LOCK_NAME).exists()


def test_an_interrupted_ablation_says_what_it_kept(data_dir, tmp_path, monkeypatch, capsys):
    real_train, calls = Trainer.train, []

    def train_then_interrupt(self, *args, **kwargs):
        calls.append(self.out_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "train", train_then_interrupt)
    out = tmp_path / "ablation"
    assert train("--ablation", "--data-dir", data_dir, *TINY_RUN, "--out", out) == 130
    err = capsys.readouterr().err
    assert f"the ablation stopped in row '+ EGFF'; finished rows kept in {out}: gated." in err
    assert f"python train.py --resume {out / 'egff'}" in err
    assert not (out / ".paeff.lock").exists()


def test_a_huge_loss_prints_in_scientific_notation():
    from paeff_np.run.training import format_progress
    record = dict(epoch=1, loss=4.7e30, align=1.0, opl=0.5, ce=2e7, lr=1e-3, samples_per_s=10.0, seconds=1.0)
    line = format_progress(record, 3, 2.0)
    assert "loss 4.7000e+30 (align 1.000 opl 0.500 ce 2.000e+07)" in line


def test_plot_into_a_file_or_an_unwritable_place_is_refused_before_evaluating(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    assert evaluate("--checkpoint", run_dir, "--plot", a_file) == 2
    one_line_error(capsys, f"--plot {a_file}: is a file, not a folder")
    assert evaluate("--checkpoint", run_dir, "--plot", a_file / "sub") == 2
    one_line_error(capsys, f"--plot {a_file / 'sub'}: cannot create a file in {a_file}")
    assert a_file.read_text() == "kept"
