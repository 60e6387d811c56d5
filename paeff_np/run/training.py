"""The training loop that ``train.py`` calls: epochs, progress, NaN guard,
checkpoints every epoch, resume, model selection and the refit.

Randomness is a pure function of ``(seed, epoch)``: the shuffle of epoch e
uses ``default_rng([seed, e, 0])`` and its dropout ``[seed, e, 1]`` (on CuPy a
counter-based hash of that key, the step and the element: backend.COUNTER_UNIFORM). A run
resumed from the checkpoint of epoch e therefore continues exactly as the
uninterrupted run would: bit for bit on the CPU.

Two classes: ``Trainer`` is the epoch loop (the model, the optimizer, the
data, the records); ``RunFolder`` holds the commit points of its folder and
their repair after a kill. Each epoch ends with one save: the checkpoint's
``.npz`` is the commit point and carries the per-epoch records too, so
``metrics.jsonl`` is rewritten from it and always agrees with the checkpoint
after a resume.

Model selection (``TrainSettings.select``, README "Model selection"):

* ``"val"``: after every epoch the exact EER and AUC of the validation lists
  (``data.split``, on the device) go into the epoch's record; the selected
  epoch is the first with the lowest EER of the unseen part (of the seen part
  when the unseen part is off; EERs within ``TIE`` count as equal);
* ``"test"``: the authors' protocol, the lowest EER of the test list
  ``monitor`` (optimistic: the test list picks the model it is scored on);
* ``"last"``: the last epoch.

Which epoch is selected is a function of the records (``selected_epoch``),
so the checkpoint's history says it. Its model is kept in ``best.npz``,
written with the same commit rule, **after** the checkpoint in the save of
the epoch that becomes the best. A kill between the two leaves a checkpoint
whose history selects its own epoch and a ``best.npz`` one selection behind:
the checkpoint then holds the selected model, and ``restore`` rewrites
``best.npz`` from it. Every other instant leaves ``best.npz`` current.
``patience`` stops a run whose validation EER has not improved for that many
epochs; that too is read from the records, so a resumed run stops where the
straight one did.

**The refit** (``TrainSettings.refit``): a split keeps its held-out identities
and rows out of training, and the seen-heard test lists show training
identities, so the model selected on the split has not trained on about 10%
of the people those lists show. After the run, ``refit_trainer`` trains the
same schedule again on every training row (no split, rule ``last``), in the
subfolder ``refit/``, and stops at the epoch e* the run selected; its model of
epoch e* is committed over the run's ``best.npz``, marked ``refit_of``. The
refit is an ordinary run folder with the same commit points: a kill before the
commit of epoch e* leaves the split run's ``best.npz`` (still a whole,
evaluable model) and a refit that a resumed run continues; a kill between the
refit's checkpoint of epoch e* and the ``best.npz`` commit leaves a refit
checkpoint that is itself the reported model, and ``restore`` rewrites
``best.npz`` from it, as above. Its model is the one a run on all rows
(``val_identities = val_rows = 0``) stopped at e* gives, bit for bit.

Messages name the settings' fields (``batch_size = 256``, ``lr = 0.001``:
``domains.FieldError`` and ``TrainingDiverged.describe``); a command line says
them as its flags, and adds how to continue a run (``SaveFailed``).
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import checkpoint as ckpt
from .atomic import write_atomically
from ..backend import (CounterDropout, array_module, default_rng, device_free_bytes, physical_memory_bytes,
                       to_device, upload)
from ..domains import (FRACTION, NON_NEGATIVE, NO_VALUE, POSITIVE, STRING, BOOLEAN, Domain, FieldError,
                       JointRule, check_fields, check_known, integer, one_of)
from .evaluation import embed_rows, list_name, validation_figures
from ..flat import flatten
from ..graphs import StepGraphs
from ..metrics import pair_distances, verification
from ..model import Config, check_labels, init_params, loss_and_grads, parameter_count
from ..optim import ADAMW_SCALARS, AdamW, adamw_scalars, cosine_lr

METRICS_LOG = "metrics.jsonl"
BEST_NAME = "best.npz"
SELECTION_RULES = ("val", "last", "test")
OPTIMISM_WARNING = ("the test list chooses the model it then scores (the authors' protocol): "
                    "these figures are optimistic")

# docs/spec.md §4, the paper's recipe: TrainSettings' defaults, train.py --preset paper, bench.py --e2e
PAPER_RECIPE = dict(epochs=50, lr=2e-5, batch_size=1024, embed_dim=256)


# settings for a plain run: no validation split, the last epoch is the model
NO_SELECTION = dict(val_identities=0.0, val_rows=0.0, select="last")


class TrainingDiverged(Exception):
    """The loss, a parameter or a BatchNorm statistic became NaN or Inf; the last
    good checkpoint is left as it was. ``message`` is a template over the settings
    and Config fields that can cause it (``values``, as in ``domains.FieldError``);
    ``describe(namer)`` says them a caller's way (``--lr 0.001``)."""

    def __init__(self, message, values=None):
        self.message, self.values = message, dict(values or {})
        super().__init__(self.describe())

    def describe(self, namer=None):
        return FieldError(self.message, self.values).describe(namer)


class SaveFailed(ckpt.CheckpointError):
    """A save could not be written (a full disk); ``intact_epoch`` is the epoch whose
    checkpoint is whole on disk (None: none was written)."""

    def __init__(self, message, intact_epoch):
        super().__init__(message)
        self.intact_epoch = intact_epoch


@dataclass
class TrainSettings:
    """How a run trains and selects its model. The defaults are the command line's:
    the paper's recipe (``train.py --preset paper``) with a validation split of 10% of
    the identities and 5% of the other rows, selected by its EER (``select="val"``)."""
    epochs: int = PAPER_RECIPE["epochs"]
    lr: float = PAPER_RECIPE["lr"]
    batch_size: int = PAPER_RECIPE["batch_size"]
    seed: int = 0
    weight_decay: float = 0.01
    eta_min: float = 1e-8
    device: str = "cpu"
    dtype: str = "float32"
    monitor: str = "unseenunheard/random"   # the test list that select="test" selects on
    val_identities: float = 0.1   # fraction of the identities held out (unseen part); 0: off
    val_rows: float = 0.05        # fraction of the other identities' rows held out (seen part); 0: off
    select: str = "val"           # SELECTION_RULES
    patience: int = 0             # stop after this many epochs without a better validation EER; 0: never
    refit: bool = False           # after the run, train again on all rows up to the selected epoch
    val_dir: str = ""             # validation lists from this folder's faceVal/voiceVal.csv ("": the split)

    # each field's domain and the rules that join fields (paeff_np/domains.py): the one
    # home of these checks, read by the command lines and the checkpoint reader too
    DOMAINS = {
        "epochs": integer(1), "lr": POSITIVE, "batch_size": integer(2), "seed": integer(0),
        "weight_decay": NON_NEGATIVE, "eta_min": NON_NEGATIVE,
        "device": one_of(("cpu", "cuda")), "dtype": one_of(("float32", "float64")), "monitor": STRING,
        "val_identities": FRACTION, "val_rows": FRACTION, "select": one_of(SELECTION_RULES),
        "patience": integer(0), "refit": BOOLEAN,
        "val_dir": Domain(lambda v: isinstance(v, str), "a folder name (empty: none)"),
    }
    JOINT_RULES = (
        JointRule(("lr", "eta_min"), lambda v: v["lr"] > v["eta_min"],
                  "{lr}: the learning rate must be above the cosine schedule's floor {eta_min}, "
                  "or it would rise instead of decay"),
        JointRule(("select", "val_identities", "val_rows"),
                  lambda v: v["select"] != "val" or v["val_identities"] > 0 or v["val_rows"] > 0
                  or bool(v.get("val_dir")),
                  "{select} needs a validation split, but it is off ({val_identities}, {val_rows}): "
                  "turn one on, or choose another selection rule"),
        JointRule(("patience", "val_identities", "val_rows"),
                  lambda v: not v["patience"] or v["val_identities"] > 0 or v["val_rows"] > 0
                  or bool(v.get("val_dir")),
                  "{patience} watches the validation EER, but the split is off ({val_identities}, "
                  "{val_rows}): turn one on"),
    )

    def __post_init__(self):
        check_fields(self.__dict__, self.DOMAINS, self.JOINT_RULES, where="TrainSettings")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d, where="TrainSettings"):
        """Settings read back from a checkpoint's ``train`` section: every field there,
        none unknown, each in its domain; else ``FieldError``."""
        check_known(d, cls.DOMAINS, where)
        return cls(**d)


def _epoch_batches(n, batch_size, seed, epoch):
    """The shuffled full batches of one epoch (the last partial batch is dropped)."""
    order = np.random.default_rng([seed, epoch, 0]).permutation(n)
    n_full = n // batch_size
    return order[: n_full * batch_size].reshape(n_full, batch_size)


def run_bytes(cfg, settings, n_rows):
    """An upper bound of the bytes a run holds on its device: the model 8 times over
    (parameters, gradients, AdamW's two moments, their flat copies), the ``n_rows``
    feature rows of the training set and validation lists, as wide as the features, and
    one step's activations and gradients (per batch row: the gathered features 4 times,
    64 D-wide rows, 8 class rows, 16 rows of the B × B matrices). Measured against
    tracemalloc's peak in tests/test_hostile_inputs.py."""
    s, B = np.dtype(settings.dtype).itemsize, settings.batch_size
    width = cfg.face_dim + cfg.voice_dim
    step = B * (4 * width + 64 * cfg.embed_dim + 8 * cfg.n_classes + 16 * B)
    return s * (8 * parameter_count(cfg) + n_rows * width + step)


def check_fits(cfg, settings, n_rows, xp):
    """Refuse (``FieldError`` naming the size settings) a run whose ``run_bytes`` exceed
    the memory it would run in: the GPU's free memory on CuPy, the machine's RAM on NumPy."""
    free = device_free_bytes(xp)
    limit, where = (free, "free on the GPU") if free is not None else (physical_memory_bytes(), "of this machine's RAM")
    needed = run_bytes(cfg, settings, n_rows)
    if limit is not None and needed > limit:
        raise FieldError(f"{{embed_dim}} and {{batch_size}} with features {cfg.face_dim}/{cfg.voice_dim} wide, "
                         f"{n_rows:,} rows and {cfg.n_classes:,} identities: the run needs about "
                         f"{needed / 2**30:,.1f} GiB, more than the {limit / 2**30:,.1f} GiB {where}",
                         {"embed_dim": cfg.embed_dim, "batch_size": settings.batch_size})


class RunFolder:
    """The commit points of one run folder, in their order, and their repair.

    A save renames ``checkpoint.npz`` into ``out_dir`` (the commit point of the
    epoch); then, when the epoch is the one the run reports, ``best.npz`` into
    ``best_dir`` (the run's own folder; the run's parent for a refit), the second
    commit point; then ``metrics.jsonl``, a copy of the records. ``repair_best``
    finds where a kill left ``best.npz`` and rewrites it when it lags one commit
    behind (see the module doc)."""

    def __init__(self, out_dir, best_dir=None, log=print):
        self.out_dir, self.best_dir, self.log = out_dir, best_dir or out_dir, log
        self.saved_epoch = None        # the epoch of the checkpoint on disk (None: none yet)
        self.best_saved_epoch = None   # the epoch of this run's best.npz on disk (None: none)
        self.best_superseded = False   # best.npz holds the refit's model, which replaced this run's

    @property
    def best_path(self):
        return os.path.join(self.best_dir, BEST_NAME)

    def save(self, run):
        """Commit the checkpoint of ``run.epoch``; then best.npz if ``run`` reports this
        epoch; then rewrite metrics.jsonl. An OSError (a full disk) becomes ``SaveFailed``:
        one line naming the file and the epoch whose checkpoint is intact."""
        try:
            ckpt.save(self.out_dir, run.params, run.buffers, run.cfg, epoch=run.epoch,
                      optimizer=run.opt, label_values=run.dataset.train.label_values, meta=run.meta(),
                      history=run.history)
            self.saved_epoch = run.epoch
            if not self.best_superseded and run.epoch > 0 and \
                    run.reported_epoch() == run.epoch != self.best_saved_epoch:
                self.save_best(run)                 # second commit: see the module doc
            write_metrics_log(self.out_dir, run.history)
        except OSError as exc:
            epoch = self.epoch_on_disk()
            intact = (f"no checkpoint was written in {self.out_dir}" if epoch is None else
                      f"the checkpoint of epoch {epoch} in {self.out_dir} is intact")
            raise SaveFailed(f"cannot write {exc.filename}: {exc.strerror or exc}; {intact}", epoch) from None

    def save_best(self, run):
        """Commit best.npz (and best.json): the model of ``run.epoch``, which it reports."""
        ckpt.save(self.best_dir, run.params, run.buffers, run.cfg, epoch=run.epoch,
                  label_values=run.dataset.train.label_values, meta=run.meta(),
                  history=run.history, name=BEST_NAME)
        self.best_saved_epoch = run.epoch

    def epoch_on_disk(self):
        """The epoch of the checkpoint in ``out_dir`` as it is now, read back (None: none
        readable): after an interrupt, ``saved_epoch`` may lag a rename that took effect."""
        try:
            return ckpt.load(self.out_dir).epoch
        except ckpt.CheckpointError:
            return None

    def repair_best(self, run, checkpoint):
        """After ``run`` restored ``checkpoint``: find best.npz's epoch, and rewrite it from
        the checkpoint when a kill left it one commit behind. A best.npz of the other
        kind (the split run's under a refit, the refit's under its split run) is not
        this run's: the refit's replaces the split run's at the refit's last commit."""
        best = ckpt.load(self.best_path) if os.path.exists(self.best_path) else None
        if best is not None:              # a damaged one (never a kill: see atomic.py) is refused
            if (best.config.get("refit_of") is not None) == (run.refit_of is not None):
                ckpt.check_same_run(best, checkpoint)
                self.best_saved_epoch = best.epoch
            elif run.refit_of is None:
                self.best_superseded = True   # the split run is finished; its refit reports
                return
        target = run.reported_epoch()
        if target is None or target == self.best_saved_epoch:
            return
        if target != run.epoch:
            held = "is missing" if self.best_saved_epoch is None else f"holds epoch {self.best_saved_epoch}"
            raise ckpt.CheckpointError(
                f"{self.best_path} {held}, but the {'refit reports' if run.refit_of else 'run selects'} "
                f"epoch {target}, whose model is in neither file (was {BEST_NAME} replaced or deleted?)")
        held = "was missing" if best is None else (
            f"held epoch {self.best_saved_epoch}" if self.best_saved_epoch is not None
            else "held the model selected on the split")
        whose = (f"the refit's checkpoint has reached its epoch {target}" if run.refit_of else
                 f"the checkpoint selects its own epoch {target}")
        self.log(f"note: {BEST_NAME} {held} (a save cut short); {whose}: {BEST_NAME} is rewritten from it")
        self.save_best(run)


class GraphedStep:
    """One training step (``loss_and_grads`` + ``AdamW``) run through CUDA graphs
    (``paeff_np.graphs.StepGraphs``), CuPy only: ``step(batch, lr)`` trains on the rows
    ``batch`` (a device index array) of ``face``/``voice``/``labels``, as the eager
    loop of ``Trainer.run_epoch`` does, bit for bit.

    What a replay reads is held in place: the batch's indices in ``self.idx``,
    AdamW's numbers of the step in ``self.scalars`` (uploaded before each replay;
    ``optim.adamw_scalars``), the BatchNorm buffers written into ``buffers``
    (``[...] =``), the loss terms added into ``sums`` (0-d arrays, if given).
    """

    def __init__(self, xp, params, buffers, opt, cfg, face, voice, labels, batch_size, rng=None, sums=None):
        self.graphs = StepGraphs(xp)
        self.opt, self.sums = opt, sums
        self.idx = xp.empty(batch_size, dtype=xp.int64)
        self.scalars = xp.empty(len(ADAMW_SCALARS), dtype=params.flat.dtype)
        self.hyper = {}

        def step():             # device work only: a replay runs none of this Python
            loss, terms, grads, new_buffers = loss_and_grads(
                params, buffers, face[self.idx], voice[self.idx], labels[self.idx], cfg, rng=rng)
            opt.apply(params, grads, self.hyper, self.scalars)
            if isinstance(rng, CounterDropout):
                rng.advance()       # its step counter lives on the device: advanced in-graph
            for key, value in new_buffers.items():
                buffers[key][...] = value
            if sums is not None:
                sums["loss"] += loss
                for k, v in terms.items():
                    sums[k] += v
        self._step = step

    def __call__(self, batch, lr):
        with self.graphs.stream:
            self.idx[...] = batch
            self.hyper.update(self.opt.advance(lr))
            self.scalars.set(np.asarray(adamw_scalars(**self.hyper), dtype=self.scalars.dtype),
                             stream=self.graphs.stream)
            self.graphs(self._step)


class Trainer:
    """The epoch loop of one run: the model, optimizer, data and records; its
    folder's commit points are ``self.folder`` (a ``RunFolder``).

    ``dataset.train`` is what is trained on; ``validation`` (a
    ``data.split.ValidationSplit``, or None) gives the validation lists and the
    record the checkpoint keeps. ``refit_of`` (``{"epoch": e, "rule": r}``) makes
    it the refit of a run (``refit_trainer``): it stops at epoch e and commits
    that epoch's model as ``best_dir``/best.npz. ``cuda_graphs`` (CuPy only) runs the
    steps as CUDA graphs (``paeff_np.graphs``): the same bits, fewer host calls."""

    def __init__(self, dataset, cfg, settings, out_dir, data_meta=None, log=print, validation=None,
                 refit_of=None, best_dir=None, cuda_graphs=False):
        if cuda_graphs and settings.device != "cuda":
            raise FieldError("CUDA graphs need the GPU, and the run trains on {device}", {"device": settings.device})
        self.cuda_graphs = cuda_graphs
        self.dataset, self.cfg, self.settings = dataset, cfg, settings
        self.out_dir, self.log = out_dir, log
        self.data_meta = data_meta or {}
        self.refit_of = refit_of
        self.stop_at = settings.epochs if refit_of is None else refit_of["epoch"]
        self.folder = RunFolder(out_dir, best_dir, log)
        self.xp = array_module(settings.device)
        train = dataset.train
        if len(train) < settings.batch_size:
            raise FieldError(f"the training set has {len(train)} pairs, fewer than one batch "
                             f"({{batch_size}})", {"batch_size": settings.batch_size})
        lists = validation.lists if validation is not None else {}
        if not lists and (settings.select == "val" or settings.patience):
            field = "select = val" if settings.select == "val" else f"patience = {settings.patience}"
            raise ValueError(f"{field} needs a validation split, but none was given "
                             f"(data.split.split_validation makes one from the settings' fractions)")
        if settings.select == "test" and settings.monitor not in dataset.tests:
            raise FieldError(f"{{select}} selects on the test list {settings.monitor}, "
                             f"which the data does not have", {"select": settings.select})
        dtype = np.dtype(settings.dtype)
        check_fits(cfg, settings, len(train) + sum(len(lst.face) for lst in lists.values()), self.xp)
        # the whole training set lives on the device; batches are gathered there
        self.face = upload(train.face, self.xp, dtype)        # in chunks: no 2.5 GB left pinned
        self.voice = upload(train.voice, self.xp, dtype)
        check_labels(train.labels, cfg.n_classes)      # once, on the host: a step reads none back
        self.labels = self.xp.asarray(train.labels)
        # so do the validation lists: each epoch embeds them there, chunk by chunk
        self.validation = {part: (self.xp.asarray(lst.face, dtype=dtype), self.xp.asarray(lst.voice, dtype=dtype),
                                  lst.same) for part, lst in lists.items()}
        self.validation_record = validation.record if validation is not None else None
        self.val_key = f"val/{'unseen' if 'unseen' in lists else 'seen'}/eer" if lists else None
        params, buffers = init_params(cfg, seed=settings.seed, dtype=dtype)
        # parameters are views into one flat buffer: AdamW updates it in one pass
        _, self.params = flatten({k: to_device(v, settings.device) for k, v in params.items()})
        self.buffers = {k: to_device(v, settings.device) for k, v in buffers.items()}
        self.opt = AdamW(lr=settings.lr, weight_decay=settings.weight_decay)
        self.epoch = 0           # epochs completed
        self.history = []        # one log record per completed epoch
        self.epochs_changed = []  # resumed with another settings.epochs: {"at_epoch", "from", "to"}

    # the folder's state, read where the run is reported on
    saved_epoch = property(lambda self: self.folder.saved_epoch)
    best_saved_epoch = property(lambda self: self.folder.best_saved_epoch)
    best_path = property(lambda self: self.folder.best_path)

    def restore(self, checkpoint):
        """Continue from a loaded checkpoint (its params, buffers, optimizer, epoch)."""
        dev = self.settings.device
        dtype = np.dtype(self.settings.dtype)
        _, self.params = flatten({k: to_device(v.astype(dtype), dev) for k, v in checkpoint.params.items()})
        self.buffers = {k: to_device(v, dev) for k, v in checkpoint.buffers.items()}
        if checkpoint.optimizer is not None:
            self.opt.load_state_dict(*checkpoint.optimizer, device=dev)
        self.epoch = self.folder.saved_epoch = checkpoint.epoch
        self.history = list(checkpoint.history if checkpoint.history is not None
                            else read_metrics_log(self.out_dir, checkpoint.epoch))
        self.epochs_changed = list(checkpoint.config.get("epochs_changed", []))
        self.folder.repair_best(self, checkpoint)
        write_metrics_log(self.out_dir, self.history)     # the log agrees with the checkpoint

    def save(self):
        """Commit this epoch (``RunFolder.save``)."""
        self.folder.save(self)

    def selected_epoch(self, history=None):
        """The epoch ``settings.select`` picks among ``history`` (default: the run's); None before any."""
        return selected_epoch(self.history if history is None else history, self.settings.select,
                              self.selection_key())

    def reported_epoch(self):
        """The epoch whose model best.npz keeps: the selected one (none under rule
        last); for a refit, its last epoch once reached."""
        if self.refit_of is not None:
            return self.stop_at if self.epoch >= self.stop_at else None
        return None if self.settings.select == "last" else self.selected_epoch()

    def selection_key(self):
        """The record field the rule minimises: a validation EER, or the monitored test EER."""
        return f"{self.settings.monitor}/eer" if self.settings.select == "test" else self.val_key

    def patience_exhausted(self):
        """``patience`` epochs done since the best validation EER."""
        patience = self.settings.patience
        best = selected_epoch(self.history, "val", self.val_key) if patience else None
        return best is not None and self.epoch - best >= patience

    def meta(self):
        """The metadata every save of this run records beside the arrays."""
        meta = dict(train=self.settings.to_dict(), data=self.data_meta)
        if self.validation_record is not None:
            meta["validation"] = self.validation_record
        if self.epochs_changed:
            meta["epochs_changed"] = self.epochs_changed
        if self.refit_of is not None:
            meta["refit_of"] = self.refit_of
        return meta

    def run_epoch(self):
        """One pass over the shuffled training set; returns the epoch's log record."""
        settings, xp, epoch = self.settings, self.xp, self.epoch
        lr = cosine_lr(epoch, settings.lr, settings.epochs, eta_min=settings.eta_min)
        batches = xp.asarray(_epoch_batches(len(self.dataset.train), settings.batch_size,
                                            settings.seed, epoch))
        rng = default_rng([settings.seed, epoch, 1], xp) if self.cfg.dropout > 0 else None
        advance = rng.advance if isinstance(rng, CounterDropout) else None   # CuPy: the next step's numbers
        sums = {k: xp.zeros((), dtype=xp.float64) for k in ("loss", "align", "opl", "ce")}
        start = time.perf_counter()
        with np.errstate(all="ignore"):     # a diverging run is caught below, once per epoch
            if self.cuda_graphs:
                self.graph_steps(batches, lr, rng, sums)
            else:
                for idx in batches:
                    loss, terms, grads, self.buffers = loss_and_grads(
                        self.params, self.buffers, self.face[idx], self.voice[idx], self.labels[idx],
                        self.cfg, rng=rng)
                    self.opt.step(self.params, grads, lr=lr)
                    if advance is not None:
                        advance()
                    sums["loss"] += loss
                    for k, v in terms.items():
                        sums[k] += v
        record = {k: float(v) / len(batches) for k, v in sums.items()}   # one sync per epoch
        seconds = time.perf_counter() - start
        record.update(epoch=epoch + 1, lr=lr, seconds=seconds,
                      samples_per_s=len(batches) * settings.batch_size / seconds)
        untouched = (f"the last good checkpoint (epoch {epoch}) in {self.out_dir} is untouched"
                     .replace("{", "{{").replace("}", "}}"))      # the messages are templates
        if not math.isfinite(record["loss"]):
            raise TrainingDiverged(
                f"the loss became {record['loss']} in epoch {epoch + 1} (is {{lr}} too high, or "
                f"{{temperature}}, {{curvature}}, {{opl_gamma}} or {{loss_weights}} too extreme?); {untouched}",
                {"lr": settings.lr, **dict.fromkeys(("temperature", "curvature", "opl_gamma", "loss_weights"),
                                                    NO_VALUE)})
        state = [*self.params.values(), *self.buffers.values()]
        if not bool(xp.stack([xp.isfinite(a).all() for a in state]).all()):   # one sync
            bad = next(k for k, a in [*self.params.items(), *self.buffers.items()]
                       if not bool(xp.isfinite(a).all()))
            raise TrainingDiverged(
                f"{bad} became NaN or Inf in epoch {epoch + 1} although the loss is finite "
                f"(features too large for {settings.dtype}?); {untouched}")
        self.epoch = epoch + 1
        return record

    def graph_steps(self, batches, lr, rng, sums):
        """The epoch's steps of ``run_epoch`` as CUDA graphs (``GraphedStep``): the same
        bits. One recording per epoch (the dropout key is the epoch's)."""
        step = GraphedStep(self.xp, self.params, self.buffers, self.opt, self.cfg, self.face, self.voice,
                           self.labels, batches.shape[1], rng, sums)
        self.xp.cuda.Device().synchronize()   # the default stream's work (uploads, restore) is done
        for batch in batches:
            step(batch, lr)
        # the steps ran on the graphs' non-blocking stream, which the default stream does not
        # wait for: the epoch's record, validation and save read their results there
        step.graphs.release()                 # waits for that stream, then frees the recording

    def monitor_eer(self):
        """The exact EER of the test list ``settings.monitor`` (rule ``test`` only)."""
        test = self.dataset.tests[self.settings.monitor]
        emb_f, emb_v = embed_rows(self.params, self.buffers, test.face, test.voice, self.cfg)
        return verification(pair_distances(emb_f, emb_v), test.same, official=False)["eer"]

    def validate(self):
        """``{"val/<part>/eer": ..., "val/<part>/auc": ...}`` of the current model."""
        figures = {}
        for part, (face, voice, same) in self.validation.items():
            result = validation_figures(self.params, self.buffers, face, voice, same, self.cfg)
            figures.update({f"val/{part}/{k}": v for k, v in result.items()})
        return figures

    def train(self, stop_after=None):
        """Run the remaining epochs (at most ``stop_after`` of them, fewer when
        ``patience`` runs out), saving after each; returns the log records."""
        settings = self.settings
        records, started = [], time.perf_counter()
        first = self.epoch
        last = self.stop_at if stop_after is None else min(self.stop_at, first + stop_after)
        while self.epoch < last and not self.patience_exhausted():
            record = self.run_epoch()
            record.update(self.validate())
            if settings.select == "test" and self.refit_of is None:
                record[f"{settings.monitor}/eer"] = self.monitor_eer()
            self.history.append(record)
            self.save()
            records.append(record)
            elapsed = time.perf_counter() - started
            left = elapsed / (self.epoch - first) * (last - self.epoch)
            self.log(format_progress(record, settings.epochs, left, self.val_key,
                                     settings.monitor if settings.select == "test" else None,
                                     best=self.refit_of is None and settings.select != "last"
                                     and self.selected_epoch() == self.epoch,
                                     prefix="refit " if self.refit_of is not None else ""))
        if self.patience_exhausted() and self.epoch < settings.epochs and records:
            best = selected_epoch(self.history, "val", self.val_key)
            self.log(f"early stop: no better validation EER in the {self.epoch - best} epochs "
                     f"since epoch {best} (patience {settings.patience})")
        return records

    @property
    def finished(self):
        """All epochs done (a refit: its epoch reached), or stopped early by ``patience``."""
        return self.epoch >= self.stop_at or self.patience_exhausted()

    def selected_model(self):
        """``(epoch, params, buffers, file)`` of the model ``settings.select`` picks: the
        current one, or best.npz's (on the device)."""
        best = self.selected_epoch()
        if best is None or best == self.epoch:
            return self.epoch, self.params, self.buffers, ckpt.CHECKPOINT_NAME
        saved = ckpt.load(self.best_path)
        if saved.epoch != best:
            raise ckpt.CheckpointError(f"{self.best_path}: holds epoch {saved.epoch}, the run "
                                       f"selects epoch {best}")
        dev, dtype = self.settings.device, np.dtype(self.settings.dtype)
        params = {k: to_device(v.astype(dtype), dev) for k, v in saved.params.items()}
        buffers = {k: to_device(v, dev) for k, v in saved.buffers.items()}
        return best, params, buffers, BEST_NAME

    def selection_record(self):
        """What metrics.json says of the choice: rule, epoch, its validation figures
        (and, for ``test``, its test EER and the warning)."""
        settings = self.settings
        epoch = self.selected_epoch() or self.epoch
        record = self.history[epoch - 1] if epoch else {}
        part = self.val_key.split("/")[1] if self.val_key else None
        out = {"rule": settings.select, "epoch": epoch,
               "val_eer": record.get(f"val/{part}/eer"), "val_auc": record.get(f"val/{part}/auc"),
               "epochs_run": self.epoch}
        if part:
            out["val_part"] = part
        if settings.patience:
            out["stopped_early"] = self.epoch < settings.epochs
        if settings.select == "test":
            out.update(test_list=settings.monitor, test_eer=record.get(f"{settings.monitor}/eer"),
                       warning=OPTIMISM_WARNING)
        return out


REFIT_DIR = "refit"


def refit_settings(settings):
    """The refit's settings: the run's schedule, no split, rule last, no patience."""
    return replace(settings, **NO_SELECTION, patience=0, refit=False, val_dir="")


def refit_trainer(run, full, log=print):
    """The refit of the finished ``run`` (see the module doc): the same schedule on every
    training row of ``full`` (the dataset before the split), in ``run.out_dir/refit``,
    stopping at the epoch ``run`` reports. It continues the refit's own checkpoint when
    one exists; one made for another epoch, model or schedule is refused."""
    epoch = run.selected_epoch() or run.epoch
    refit_of = {"epoch": epoch, "rule": run.settings.select}
    settings = refit_settings(run.settings)
    cfg = Config.from_dict({**run.cfg.to_dict(), "n_classes": full.train.n_classes})
    out = os.path.join(run.out_dir, REFIT_DIR)
    trainer = Trainer(full, cfg, settings, out, run.data_meta, log=log, refit_of=refit_of,
                      best_dir=run.out_dir, cuda_graphs=run.cuda_graphs)
    if os.path.exists(os.path.join(out, ckpt.CHECKPOINT_NAME)):
        checkpoint = ckpt.load(out)
        same = (checkpoint.config.get("refit_of") == refit_of and checkpoint.cfg == cfg
                and checkpoint.config["train"] == settings.to_dict() and checkpoint.epoch <= epoch
                and (checkpoint.label_values is None
                     or list(checkpoint.label_values) == list(full.train.label_values)))
        if not same:
            raise ckpt.CheckpointError(
                f"{checkpoint.path}: not the refit of the run in {run.out_dir} (it records "
                f"{json.dumps(checkpoint.config.get('refit_of'))}, the run needs {json.dumps(refit_of)} "
                f"with its model and schedule)")
        trainer.restore(checkpoint)
    return trainer


def refit_cost(run, refit):
    """``(split run's training seconds, refit's)``, from their records."""
    seconds = lambda trainer: sum(r.get("seconds", 0.0) for r in trainer.history)
    return seconds(run), seconds(refit)


def checkpoint_settings(checkpoint):
    """The ``TrainSettings`` recorded in a loaded checkpoint; a damaged field raises
    ``CheckpointError`` naming the file and the field."""
    return ckpt.check_settings(checkpoint.path, checkpoint.config["train"])


def checkpoint_selection(checkpoint):
    """``(rule, epoch)``: the rule a loaded checkpoint's run selects by, and the epoch its
    records pick (None before the first epoch)."""
    settings = checkpoint_settings(checkpoint)
    rule = settings.select
    pairs = (checkpoint.config.get("validation") or {}).get("pairs", {})
    val_key = f"val/{'unseen' if 'unseen' in pairs else 'seen'}/eer" if pairs else None
    key = f"{settings.monitor}/eer" if rule == "test" else val_key
    history = checkpoint.history or [{"epoch": e + 1} for e in range(checkpoint.epoch)]
    return rule, selected_epoch(history, rule, key)


TIE = 1e-12   # EERs this close are equal (the same ROC crossing, rounded differently)


def selected_epoch(history, rule, key):
    """The epoch ``rule`` picks: the last for ``"last"``; else the first record whose
    ``key`` is within ``TIE`` of the lowest (None when no record has it)."""
    if rule == "last":
        return history[-1]["epoch"] if history else None
    scored = [(r[key], r["epoch"]) for r in history if key is not None and r.get(key) is not None]
    if not scored:
        return None
    lowest = min(value for value, _ in scored)
    return next(epoch for value, epoch in scored if value <= lowest + TIE)


def write_metrics_log(out_dir, history):
    """``metrics.jsonl``: one line per epoch, a copy of the checkpoint's records."""
    text = "".join(json.dumps(record) + "\n" for record in history)
    write_atomically(os.path.join(out_dir, METRICS_LOG), lambda f: f.write(text), mode="w")


def read_metrics_log(out_dir, epochs):
    """The first ``epochs`` records of ``metrics.jsonl`` (format-1 checkpoints keep none)."""
    path = os.path.join(out_dir, METRICS_LOG)
    if not os.path.exists(path):
        return []
    records = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in records if r.get("epoch", 0) <= epochs]


def format_progress(r, total, seconds_left, val_key=None, monitor=None, best=False, prefix=""):
    """One epoch's line: losses, speed, the validation EER (and the monitored test
    EER under rule ``test``); ``best`` marks the epoch selected so far."""
    eer_text = ""
    if val_key and val_key in r:
        eer_text += f"  val {val_key.split('/')[1]} EER {100 * r[val_key]:4.1f}%"
    if monitor and f"{monitor}/eer" in r:
        eer_text += f"  {list_name(monitor)} EER {100 * r[f'{monitor}/eer']:4.1f}%"
    if best:
        eer_text += " (best)"
    fixed = lambda x, places: f"{x:.{places}f}" if abs(x) < 1e6 else f"{x:.{places}e}"
    return (f"{prefix}epoch {r['epoch']:>3}/{total}  loss {fixed(r['loss'], 4)} (align {fixed(r['align'], 3)} "
            f"opl {fixed(r['opl'], 3)} ce {fixed(r['ce'], 3)})  lr {r['lr']:.2e}  "
            f"{r['samples_per_s']:,.0f} samples/s{eer_text}  {r['seconds']:.1f}s, "
            f"~{seconds_left:.0f}s left")
