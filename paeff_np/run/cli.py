"""What ``train.py`` and ``eval.py`` share: the Config flags, loading the data,
and turning user errors into one line on stderr with exit code 2."""
import argparse
import errno
import os
import sys
import tempfile

from .atomic import FolderInUse, remove_stale_temporaries
from ..backend import GPUUnavailable, keep_freed_memory
from .checkpoint import CheckpointError
from .training import TrainingDiverged
from ..data import DataError, load_dir
from ..data.csv import CACHE_DIR_NAME
from ..data.synth import make_synthetic
from ..model import ALIGNMENTS, FUSIONS, Config
from ..fusion import EGFF_GATES, EGFF_MIXES
from ..usage import UsageError

USER_ERRORS = (DataError, CheckpointError, GPUUnavailable, UsageError, TrainingDiverged, FolderInUse, OSError)

# The synthetic world that `python train.py` uses when no --data-dir is given.
SYNTHETIC_DEFAULT = dict(n_identities=300, seed=0)


def prepare_process(prog):
    """What every command line does first: the allocator keeps freed memory for
    the next step (``keep_freed_memory``). Returns ``(kept, error)``: whether
    glibc agreed, and ``prog: error: ...`` or None (none today)."""
    return keep_freed_memory(), None


def run(main, prog):
    """Call ``main()`` after ``prepare_process``; a user error becomes
    ``prog: error: ...`` and exit 2."""
    _, error = prepare_process(prog)
    if error:
        print(error, file=sys.stderr)
        return 2
    try:
        return main() or 0
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"{prog}: error: {describe_error(exc)}", file=sys.stderr)
        return 2


def describe_error(exc):
    """One line; an OSError says which file and what to do, not only ``[Errno 28] ...``."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"cannot use {exc.filename}: {exc.strerror or exc}"
    return str(exc)


def remove_leftovers(folder):
    """Delete the temporary files of writes killed midway in ``folder`` (see atomic.py)."""
    removed = remove_stale_temporaries(folder)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) left in {folder} by an "
              f"interrupted write", file=sys.stderr)


def check_can_create_in(folder, flag):
    """Refuse (``UsageError`` naming ``flag``) a folder where no file can be created, tried
    by creating one: for root, permission bits say yes where the file system says no. A
    folder still missing is judged by the nearest existing one above it, where the
    writers (``atomic.write_atomically``, ``os.makedirs``) will make it. The temporary
    files that killed writers left there (``remove_leftovers``) are removed: an
    interrupted ``eval.py --plot`` leaves no ``.partial`` file behind its rerun."""
    folder = os.path.abspath(folder)
    if os.path.isdir(folder):
        remove_leftovers(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        if not os.path.isdir(folder):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"{flag}: cannot create a file in {folder} ({exc.strerror or exc}): "
                         f"choose another path") from None


def check_can_write_file(path, flag):
    """Refuse (``UsageError`` naming ``flag``) a path that a later write could not
    replace with a file: empty, a folder, something other than a regular file, or in
    a place where no file can be created (``check_can_create_in``)."""
    if not path:
        raise UsageError(f"{flag} is empty: give the name of a file to write")
    if os.path.isdir(path) or not os.path.basename(path):
        raise UsageError(f"{flag} {path}: is a folder, not a file: give a file name")
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: is not a regular file: give the name of a file to write")
    check_can_create_in(os.path.dirname(os.path.abspath(path)), f"{flag} {path}")


def add_config_flags(parser):
    """One flag per Config field; defaults None so that only given flags override."""
    g = parser.add_argument_group("model (Config) — defaults are PAEFF's")
    g.add_argument("--embed-dim", type=int, help="embedding size D")
    g.add_argument("--fusion", choices=FUSIONS, help="egff (PAEFF) or gated (FOP baseline)")
    g.add_argument("--egff-kernel", type=int, help="odd conv kernel of EGFF (1; authors' code: 5)")
    g.add_argument("--egff-gate", choices=EGFF_GATES, help="gate input of EGFF")
    g.add_argument("--egff-mix", choices=EGFF_MIXES, help="activated (paper eq. 2) or raw (authors' code)")
    g.add_argument("--alignment", choices=ALIGNMENTS)
    g.add_argument("--curvature", type=float, help="curvature c of the Poincaré ball (0.05)")
    g.add_argument("--no-riemannian-grad", dest="riemannian_grad", action="store_const", const=False,
                   help="turn off the Riemannian gradient scaling of the authors' code")
    g.add_argument("--temperature", type=float, help="τ of the alignment loss (0.07)")
    g.add_argument("--clip-radius", type=float, metavar="R",
                   help="feature clipping radius r of --alignment poincare (2.3)")
    g.add_argument("--dropout", type=float, help="dropout in the branches (0.4)")
    g.add_argument("--opl-gamma", type=float, help="γ of the orthogonal projection loss (0.7)")
    g.add_argument("--loss-weights", type=float, nargs=3, metavar=("ALIGN", "OPL", "CE"),
                   help="α₁ α₂ α₃ (0.3 0.35 0.35)")


CONFIG_FLAGS = ("embed_dim", "fusion", "egff_kernel", "egff_gate", "egff_mix", "alignment",
                "curvature", "riemannian_grad", "temperature", "clip_radius", "dropout", "opl_gamma",
                "loss_weights")


def config_overrides(args):
    """The Config fields the user set on the command line."""
    return {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k, None) is not None}


def make_config(train_set, overrides, base=None):
    """A Config whose widths and classes come from the data."""
    fields = dict(base or {})
    fields.update(overrides)
    fields.update(face_dim=train_set.face_dim, voice_dim=train_set.voice_dim,
                  n_classes=train_set.n_classes)
    try:
        return Config(**fields)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def load_data(data_dir=None, synthetic=None, face_dim=None, voice_dim=None, need_train=True):
    """``(dataset, data_meta)``: the FOP CSV folder, or the synthetic world. For a
    folder, ``data_meta`` records the training pairs' fingerprint (``train_sha256``)."""
    if data_dir is not None:
        remove_leftovers(os.path.join(data_dir, CACHE_DIR_NAME))
        dataset = load_dir(data_dir, face_dim=face_dim, voice_dim=voice_dim, need_train=need_train)
        meta = {"source": "dir", "data_dir": os.path.abspath(data_dir)}
        if dataset.train is not None:       # what --resume checks the data against
            meta["train_sha256"] = dataset.train.fingerprint()
        return dataset, meta
    synthetic = dict(SYNTHETIC_DEFAULT, **(synthetic or {}))
    return make_synthetic(**synthetic), {"source": "synthetic", "synthetic": synthetic}


def check_widths(train_set, cfg, source):
    """The features of ``source`` must be as wide as the model (``cfg``) expects."""
    widths = (train_set.face_dim, train_set.voice_dim)
    if widths != (cfg.face_dim, cfg.voice_dim):
        raise DataError(f"{source}: features are {widths[0]}/{widths[1]} wide (face/voice), the "
                        f"checkpoint expects {cfg.face_dim}/{cfg.voice_dim}")


def device_flag(parser):
    parser.add_argument("--device", choices=("cpu", "cuda"), help="cpu (NumPy) or cuda (CuPy)")


def positive_int(text):
    """argparse's type for a count that is no setting (train.py --stop-after); a setting's flag
    is checked by its field's domain instead (``validate``)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
