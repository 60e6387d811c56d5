"""Issue 21's hostile inputs, each tried as a user would meet it: a first row longer than
the reader's sniffed head, cells and labels of tens of MB, a named pipe where a file
should be, a damaged cache header, a recorded data folder that is gone, a kernel wider
than the embedding. Each ends in a clean read or in one line naming the file."""
import contextlib
import io
import os
import shutil
import signal
import sys

import numpy as np
import pytest

from conftest import no_hang, one_line_error
from test_data_csv import data_error as one_line
from paeff_np.data import DataError, load_dir, read_train
from paeff_np.data.csv import _SNIFF_BYTES, CACHE_DIR_NAME, read_features, read_matrix
from paeff_np.fame.protocol import read_trial_list
from paeff_np.model import Config
from paeff_np.run.cli import run as run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as eval_cli    # noqa: E402
import train as train_cli  # noqa: E402


def train(*args):
    return run_cli(lambda: train_cli.main(list(map(str, args))), "train.py")


def evaluate(*args):
    return run_cli(lambda: eval_cli.main(list(map(str, args))), "eval.py")


# --- wide rows: the format checks judge the whole first row, not the sniffed head -------

def wide_rows(path, n_rows=6, width=4096, label=True, trailing=""):
    """Rows of ``width`` values written with %.18e (about 100 KB each), the first row's
    first cell padded so that the sniffed head ends exactly after a comma."""
    values = np.random.default_rng(0).random((n_rows, width)).astype(np.float32)
    cell = len("%.18e" % 0.5) + 1                        # 24 characters and a comma
    first = "1." + "0" * ((_SNIFF_BYTES % cell) - 3)     # then the head ends on a comma
    values[0, 0] = 1.0
    with open(path, "w") as f:
        for i, row in enumerate(values):
            cells = ["%.18e" % x for x in row]
            if i == 0:
                cells[0] = first
            f.write(",".join(cells) + (f",id{i % 2}" if label else "") + trailing + "\n")
    assert open(path, "rb").read(_SNIFF_BYTES).endswith(b",")
    return values


def test_a_first_row_longer_than_the_sniffed_head_is_read(tmp_path):
    face = wide_rows(tmp_path / "face.csv")
    voice = np.random.default_rng(1).random((6, 8)).astype(np.float32)
    (tmp_path / "voice.csv").write_text("".join(",".join("%.9g" % x for x in row) + f",id{i % 2}\n"
                                                for i, row in enumerate(voice)))
    train_set = read_train(tmp_path / "face.csv", tmp_path / "voice.csv", cache=False)
    np.testing.assert_array_equal(train_set.face, face)
    matrix = wide_rows(tmp_path / "list.csv", label=False)
    np.testing.assert_array_equal(read_matrix(tmp_path / "list.csv", cache=False), matrix)
    np.testing.assert_array_equal(read_features(tmp_path / "face.csv", cache=False), face)


def test_a_wide_row_that_truly_ends_with_a_comma_is_still_named(tmp_path):
    wide_rows(tmp_path / "list.csv", label=False, trailing=",")
    assert "row 1 ends with a comma" in one_line(read_matrix, tmp_path / "list.csv", cache=False)


# --- huge cells and labels: one line, no MemoryError ---------------------------------------

def small_train(folder, big_cell=None, column=-1, row=3, rows=12):
    values = np.random.default_rng(2).random((rows, 4))
    lines = []
    for i, r in enumerate(values):
        cells = ["%.9g" % x for x in r] + [f"id{i % 3}"]
        if i == row and big_cell is not None:
            cells[column] = big_cell
        lines.append(",".join(cells))
    (folder / "face.csv").write_text("\n".join(lines) + "\n")
    (folder / "voice.csv").write_text("".join(",".join("%.9g" % x for x in r) + f",id{i % 3}\n"
                                              for i, r in enumerate(values)))
    return folder / "face.csv", folder / "voice.csv"


def test_a_label_of_tens_of_megabytes_is_one_line(tmp_path):
    # read as fixed-width text, 12 such labels took 12 × 4 bytes × 20M: 1 GB
    message = one_line(read_train, *small_train(tmp_path, "x" * 20_000_000), cache=False)
    assert "face.csv: row 4: a label of 20,000,000 characters" in message and len(message) < 300


@pytest.mark.parametrize("cell,words", [("1" * 20_000_000, "is inf"), ("a" * 20_000_000, "is not a number")])
def test_a_feature_cell_of_tens_of_megabytes_is_one_line(tmp_path, cell, words):
    message = one_line(read_train, *small_train(tmp_path, cell, column=1), cache=False)
    assert "face.csv: row 4, column 2" in message and words in message and len(message) < 400


# --- a named pipe or another non-regular file is refused before anything opens it ---------

@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.csv"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("reader", [read_matrix, read_features, lambda p, cache=True: read_train(p, p),
                                    lambda p, cache=True: read_trial_list(str(p))],
                         ids=["read_matrix", "read_features", "read_train", "fame trial list"])
def test_a_named_pipe_is_refused_in_one_line(fifo, reader):
    with no_hang():
        message = one_line(reader, fifo)
    assert str(fifo) in message and "named pipe" in message and "not a regular file" in message


def test_a_folder_or_a_device_is_no_list_either(tmp_path):
    assert "is a folder, not a regular file" in one_line(read_matrix, tmp_path)
    assert "is a device, not a regular file" in one_line(read_matrix, os.devnull)


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert train("--data-dir", data_dir, "--epochs", "1", "--batch-size", "32", "--embed-dim", "8",
                 "--no-refit", "--out", out) == 0
    return str(out)


def test_eval_and_train_refuse_a_test_list_that_is_a_named_pipe(data_dir, run_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns(CACHE_DIR_NAME))
    name = "face_veriflist_test_random_unseenunheard.csv"
    os.remove(data / name)
    os.mkfifo(data / name)
    capsys.readouterr()
    with no_hang():
        assert evaluate("--checkpoint", run_dir, "--data-dir", data) == 2
    one_line_error(capsys, str(data / name), "named pipe")
    with no_hang():
        assert train("--data-dir", data, "--epochs", "1", "--embed-dim", "8", "--out", tmp_path / "new") == 2
    one_line_error(capsys, str(data / name), "named pipe")
    assert not (tmp_path / "new").exists()


# --- a damaged cache header is rebuilt from the CSV with a one-line note --------------------

def test_every_damaged_byte_of_a_cache_header_is_rebuilt_with_a_note(tmp_path):
    face, voice = small_train(tmp_path)
    first = read_train(face, voice)
    cached = tmp_path / CACHE_DIR_NAME / "face.csv.npy"
    original = cached.read_bytes()
    header = original.index(b"\n") + 1
    outcomes = {"noted": 0, "same header": 0}
    for offset in range(header):
        for value in (0x00, 0xFF, ord("{"), ord("("), ord("9"), ord(" ")):
            if original[offset] == value:
                continue
            damaged = bytearray(original)
            damaged[offset] = value
            cached.write_bytes(bytes(damaged))
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                again = read_train(face, voice)
            np.testing.assert_array_equal(again.face, first.face)
            np.testing.assert_array_equal(again.labels, first.labels)
            lines = err.getvalue().splitlines()
            if lines:
                assert len(lines) == 1 and "cache face.csv.npy is damaged" in lines[0] \
                    and "rebuilding it from the CSV" in lines[0], lines
                outcomes["noted"] += 1
            else:                                  # a blank of the header: the same array
                np.testing.assert_array_equal(np.load(io.BytesIO(bytes(damaged))), first.face)
                outcomes["same header"] += 1
            cached.write_bytes(original)
    assert outcomes["noted"] > 5 * header // 2, outcomes


# --- a recorded data folder that no longer exists is missing, not "not a directory" --------

def test_a_recorded_data_folder_that_is_gone_is_reported_missing(data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    out = tmp_path / "run"
    assert train("--data-dir", data, "--epochs", "1", "--batch-size", "32", "--embed-dim", "8",
                 "--no-refit", "--out", out) == 0
    shutil.rmtree(data)
    capsys.readouterr()
    assert evaluate("--checkpoint", out) == 2
    line = one_line_error(capsys, str(data), "is missing", "--data-dir")
    assert "not a directory" not in line
    assert train("--resume", out, "--epochs", "2") == 2
    line = one_line_error(capsys, str(data), "missing")
    assert "not a directory" not in line
    assert "no such folder (missing)" in one_line(load_dir, tmp_path / "gone")


# --- settings that make no sense for the shapes --------------------------------------------

def test_an_egff_kernel_wider_than_2d_minus_1_is_refused_with_its_reason(data_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="kernel wider than 2·D − 1"):
        Config(embed_dim=8, egff_kernel=17)
    Config(embed_dim=8, egff_kernel=15)
    Config(embed_dim=8, egff_kernel=17, fusion="gated")      # the gated fusion has no kernel
    out = tmp_path / "run"
    assert train("--data-dir", tmp_path / "unread", "--egff-kernel", "10001", "--out", out) == 2
    # the quick preset's D (128), not Config's default (256), is the width the run would have
    one_line_error(capsys, "--egff-kernel 10001 with --embed-dim 128", "never meet a feature")
    assert train("--data-dir", tmp_path / "unread", "--egff-kernel", "301", "--out", out) == 2
    one_line_error(capsys, "--egff-kernel 301 with --embed-dim 128")
    assert not out.exists()


# --- eval.py --plot after a kill: the killed writer's .partial files are removed ------------

def test_a_rerun_of_plot_removes_what_a_killed_plot_left(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")             # --plot draws: CI installs no matplotlib
    import subprocess
    from paeff_np.run.atomic import _HOST, TEMPORARY_SUFFIX
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                   # a pid that no longer runs: the killed eval.py
    plots = tmp_path / "plots"
    plots.mkdir()
    left = plots / f".roc_seenheard.png.{_HOST}-{dead.pid}.k1ll3d{TEMPORARY_SUFFIX}"
    left.write_bytes(b"\x89PNG half a figure")
    assert evaluate("--checkpoint", run_dir, "--plot", plots) == 0
    assert sorted(os.listdir(plots)) == sorted(eval_cli.PLOT_FILES)
    assert "removed 1 temporary file(s)" in capsys.readouterr().err


# --- Ctrl-C while a command is still importing: one line -----------------------------------

@pytest.mark.parametrize("command", [["train.py"], ["eval.py", "--checkpoint", "x"], ["bench.py"],
                                     ["-m", "paeff_np.data", "synth", "--out", "x"],
                                     ["-m", "paeff_np.fame", "--synthetic", "--out", "x"],
                                     ["-m", "paeff_np.gradcheck", "--list"]],
                         ids=lambda c: " ".join(c[:3]))
def test_ctrl_c_during_the_imports_of_any_command_is_one_line(tmp_path, command):
    """The Ctrl-C arrives while NumPy is imported (a stand-in numpy raises it there): the
    command says ``<prog>: interrupted`` on one line and dies of the SIGINT, as Python does."""
    import subprocess
    fake = tmp_path / "numpy"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise KeyboardInterrupt\n")
    argv = [os.path.join(ROOT, command[0]), *command[1:]] if command[0].endswith(".py") else command
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=60)
    prog = command[0] if command[0].endswith(".py") else f"python -m {command[1]}"
    assert proc.returncode == -signal.SIGINT, proc.stderr
    assert proc.stderr.strip() == f"{prog}: interrupted", proc.stderr


def test_importing_the_library_leaves_ctrl_c_alone():
    from paeff_np.startup import command_name
    assert command_name() is None                 # pytest is no paeff_np command
    assert not getattr(sys.excepthook, "one_line_interrupts", False)


# --- eval.py on a folder that is still training ---------------------------------------------

@pytest.fixture
def two_epochs(data_dir, tmp_path, monkeypatch):
    """A run whose epoch-0 checkpoint was kept aside (``stale``): the pair a reader meets when
    the trainer commits epoch 1's checkpoint.npz and best.npz between its two reads."""
    from paeff_np.run import training
    out, stale = tmp_path / "run", tmp_path / "stale.npz"
    real = training.RunFolder.save

    def save(self, run):
        real(self, run)
        if run.epoch == 0:
            shutil.copy(os.path.join(self.out_dir, "checkpoint.npz"), stale)
    monkeypatch.setattr(training.RunFolder, "save", save)
    assert train("--data-dir", data_dir, "--epochs", "1", "--batch-size", "32", "--embed-dim", "8",
                 "--no-refit", "--out", out) == 0
    monkeypatch.setattr(training.RunFolder, "save", real)
    return str(out), str(stale)


@pytest.fixture
def live_holder(tmp_path):
    """A live process written into a folder's lock file, as a training train.py holds it."""
    import subprocess
    from paeff_np.run.atomic import _HOST, LOCK_NAME
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

    def hold(folder):
        with open(os.path.join(folder, LOCK_NAME), "w") as f:
            f.write(f"{_HOST}-{proc.pid}\n")
        return proc.pid
    yield hold
    proc.kill()
    proc.wait()


def test_eval_on_a_live_folder_reads_a_consistent_pair_on_its_second_try(two_epochs, live_holder, monkeypatch,
                                                                        capsys):
    """First read: checkpoint.npz of epoch 0 (the trainer had not committed epoch 1 yet),
    best.npz of epoch 1. The pair disagrees; the second read finds both at epoch 1."""
    from paeff_np.run import checkpoint as ckpt
    out, stale = two_epochs
    live_holder(out)
    real, reads = ckpt.load, []

    def load(path):
        reads.append(path)
        return real(stale if reads == [out] else path)   # the first read of checkpoint.npz: epoch 0
    monkeypatch.setattr(ckpt, "load", load)
    capsys.readouterr()
    assert evaluate("--checkpoint", out) == 0
    assert reads.count(out) == 2                          # the pair at odds, then read again
    assert "epoch 1" in capsys.readouterr().err


def test_eval_says_a_live_run_is_still_being_written(two_epochs, live_holder, capsys):
    out, stale = two_epochs
    shutil.copy(stale, os.path.join(out, "checkpoint.npz"))     # still at odds on the second read
    pid = live_holder(out)
    capsys.readouterr()
    assert evaluate("--checkpoint", out) == 2
    one_line_error(capsys, f"{out}: the run is still being written (process {pid} of this machine holds its lock)",
                   "when the run has ended")


def test_the_same_pair_without_a_live_writer_is_the_plain_refusal(two_epochs, capsys):
    out, stale = two_epochs
    shutil.copy(stale, os.path.join(out, "checkpoint.npz"))
    capsys.readouterr()
    assert evaluate("--checkpoint", out) == 2
    line = one_line_error(capsys, "not from the run")
    assert "still being written" not in line


# --- memory: the size settings against what the run allocates, CPU and GPU -----------------

@pytest.mark.parametrize("fusion", ["egff", "gated"])
def test_parameter_count_is_what_init_params_makes(fusion):
    from paeff_np.model import init_params, parameter_count
    for gate in ("product", "concat"):
        cfg = Config(face_dim=40, voice_dim=12, embed_dim=16, n_classes=7, fusion=fusion, egff_gate=gate,
                     egff_kernel=5)
        assert parameter_count(cfg) == sum(v.size for v in init_params(cfg)[0].values())


@pytest.mark.parametrize("widths,D,B,alignment", [((512, 64), 64, 256, "hyperbolic"), ((256, 64), 256, 128, "poincare"),
                                                  ((64, 32), 32, 512, "euclidean")])
def test_run_bytes_bounds_what_an_epoch_allocates(tmp_path, widths, D, B, alignment):
    import tracemalloc
    from paeff_np.data.synth import make_synthetic
    from paeff_np.run.training import NO_SELECTION, Trainer, TrainSettings, run_bytes
    dataset = make_synthetic(40, seed=0, face_dim=widths[0], voice_dim=widths[1], test_rows=20)
    cfg = Config(face_dim=widths[0], voice_dim=widths[1], embed_dim=D, n_classes=dataset.train.n_classes,
                 alignment=alignment)
    settings = TrainSettings(epochs=1, lr=1e-3, batch_size=B, **NO_SELECTION)
    tracemalloc.start()
    try:
        Trainer(dataset, cfg, settings, str(tmp_path), {}, log=lambda line: None).train()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= run_bytes(cfg, settings, len(dataset.train)) <= 5 * peak


def test_sizes_beyond_the_machines_memory_are_refused_with_the_feature_widths(data_dir, tmp_path, capsys,
                                                                             monkeypatch):
    from paeff_np.run import training
    monkeypatch.setattr(training, "physical_memory_bytes", lambda: 1 << 20)     # a 1 MiB machine
    assert train("--data-dir", data_dir, "--epochs", "1", "--embed-dim", "8", "--out", tmp_path / "r") == 2
    line = one_line_error(capsys, "--embed-dim 8 and --batch-size 256 with features 32/16 wide",
                          "GiB of this machine's RAM")
    assert "Traceback" not in line and not (tmp_path / "r").exists()


def test_on_the_gpu_the_free_device_memory_decides(tmp_path, monkeypatch):
    import strict_xp
    from paeff_np.data.synth import make_synthetic
    from paeff_np.domains import FieldError
    from paeff_np.run.training import NO_SELECTION, Trainer, TrainSettings, run_bytes
    strict_xp.install(monkeypatch)
    dataset = make_synthetic(40, seed=0, face_dim=64, voice_dim=16, test_rows=20)
    cfg = Config(face_dim=64, voice_dim=16, embed_dim=16, n_classes=dataset.train.n_classes)
    settings = TrainSettings(epochs=1, lr=1e-3, batch_size=64, device="cuda", **NO_SELECTION)
    needed = run_bytes(cfg, settings, len(dataset.train))
    monkeypatch.setattr(strict_xp, "FREE_BYTES", [needed - 1])
    with pytest.raises(FieldError, match="GiB free on the GPU"):
        Trainer(dataset, cfg, settings, str(tmp_path), {}, log=lambda line: None)
    monkeypatch.setattr(strict_xp, "FREE_BYTES", [needed])
    Trainer(dataset, cfg, settings, str(tmp_path), {}, log=lambda line: None)
