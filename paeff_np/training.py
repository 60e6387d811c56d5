"""The training loop that ``train.py`` calls: epochs, progress, NaN guard,
checkpoints every epoch, resume.

Randomness is a pure function of ``(seed, epoch)``: the shuffle of epoch e
uses ``default_rng([seed, e, 0])`` and its dropout ``[seed, e, 1]``. A run
resumed from the checkpoint of epoch e therefore continues exactly as the
uninterrupted run would: bit for bit on the CPU.

Each epoch ends with one save (``checkpoint.save``): the ``.npz`` is the
commit point and carries the per-epoch records too, so ``metrics.jsonl`` is
rewritten from it and always agrees with the checkpoint after a resume.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import checkpoint as ckpt
from .atomic import write_atomically
from .backend import array_module, default_rng, to_device
from .evaluation import embed_rows
from .flat import flatten
from .metrics import pair_distances, verification
from .model import init_params, loss_and_grads
from .optim import AdamW, cosine_lr

METRICS_LOG = "metrics.jsonl"

# docs/spec.md §4, the paper's recipe: TrainSettings' defaults, train.py --preset paper, bench.py --e2e
PAPER_RECIPE = dict(epochs=50, lr=2e-5, batch_size=1024, embed_dim=256)


class TrainingDiverged(Exception):
    """The loss, a parameter or a BatchNorm statistic became NaN or Inf; the last
    good checkpoint is left as it was."""


@dataclass
class TrainSettings:
    epochs: int = PAPER_RECIPE["epochs"]
    lr: float = PAPER_RECIPE["lr"]
    batch_size: int = PAPER_RECIPE["batch_size"]
    seed: int = 0
    weight_decay: float = 0.01
    eta_min: float = 1e-8
    device: str = "cpu"
    dtype: str = "float32"
    monitor: str = "unseenunheard/random"   # the test list whose EER is printed each epoch

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Settings read back from a checkpoint; a ValueError names the first bad field."""
        choices = {"device": ("cpu", "cuda"), "dtype": ("float32", "float64")}
        at_least_one = ("epochs", "batch_size")
        for key in d:
            if key not in cls.__dataclass_fields__:
                raise ValueError(f"train.{key}: unknown field")
        for field in fields(cls):
            if field.name not in d:
                raise ValueError(f"train.{field.name}: missing")
            value = d[field.name]
            if isinstance(field.default, str):
                ok = isinstance(value, str) and value in choices.get(field.name, (value,))
                want = " or ".join(choices.get(field.name, ("a string",)))
            elif isinstance(field.default, int):
                ok = (isinstance(value, int) and not isinstance(value, bool)
                      and value >= (1 if field.name in at_least_one else 0))
                want = f"an integer >= {1 if field.name in at_least_one else 0}"
            else:
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                      and math.isfinite(value) and (value > 0 if field.name == "lr" else value >= 0))
                want = "a finite number " + ("> 0" if field.name == "lr" else ">= 0")
            if not ok:
                raise ValueError(f"train.{field.name}: expected {want}, got {json.dumps(value)[:40]}")
        return cls(**d)


def _epoch_batches(n, batch_size, seed, epoch):
    """The shuffled full batches of one epoch (the last partial batch is dropped)."""
    order = np.random.default_rng([seed, epoch, 0]).permutation(n)
    n_full = n // batch_size
    return order[: n_full * batch_size].reshape(n_full, batch_size)


class Trainer:
    """Holds the model, optimizer and data of one run and writes its folder."""

    def __init__(self, dataset, cfg, settings, out_dir, data_meta=None, log=print):
        self.dataset, self.cfg, self.settings = dataset, cfg, settings
        self.out_dir, self.log = out_dir, log
        self.data_meta = data_meta or {}
        self.xp = array_module(settings.device)
        train = dataset.train
        if len(train) < settings.batch_size:
            raise ValueError(f"the training set has {len(train)} pairs, fewer than one batch "
                             f"of {settings.batch_size}: lower --batch-size")
        dtype = np.dtype(settings.dtype)
        # the whole training set lives on the device; batches are gathered there
        self.face = self.xp.asarray(train.face, dtype=dtype)
        self.voice = self.xp.asarray(train.voice, dtype=dtype)
        self.labels = self.xp.asarray(train.labels)
        params, buffers = init_params(cfg, seed=settings.seed, dtype=dtype)
        # parameters are views into one flat buffer: AdamW updates it in one pass
        _, self.params = flatten({k: to_device(v, settings.device) for k, v in params.items()})
        self.buffers = {k: to_device(v, settings.device) for k, v in buffers.items()}
        self.opt = AdamW(lr=settings.lr, weight_decay=settings.weight_decay)
        self.epoch = 0           # epochs completed
        self.saved_epoch = None  # the epoch of the checkpoint on disk (None: none yet)
        self.history = []        # one log record per completed epoch
        self.epochs_changed = []  # --resume with another --epochs: {"at_epoch", "from", "to"}

    def restore(self, checkpoint):
        """Continue from a loaded checkpoint (its params, buffers, optimizer, epoch)."""
        dev = self.settings.device
        dtype = np.dtype(self.settings.dtype)
        _, self.params = flatten({k: to_device(v.astype(dtype), dev) for k, v in checkpoint.params.items()})
        self.buffers = {k: to_device(v, dev) for k, v in checkpoint.buffers.items()}
        if checkpoint.optimizer is not None:
            self.opt.load_state_dict(*checkpoint.optimizer, device=dev)
        self.epoch = self.saved_epoch = checkpoint.epoch
        self.history = list(checkpoint.history if checkpoint.history is not None
                            else read_metrics_log(self.out_dir, checkpoint.epoch))
        self.epochs_changed = list(checkpoint.config.get("epochs_changed", []))

    def save(self):
        """Commit the checkpoint of ``self.epoch``, then rewrite metrics.jsonl from it.

        An OSError (a full disk) becomes one line naming the file, the epoch
        whose checkpoint is intact, and how to resume."""
        meta = dict(train=self.settings.to_dict(), data=self.data_meta)
        if self.epochs_changed:
            meta["epochs_changed"] = self.epochs_changed
        try:
            ckpt.save(self.out_dir, self.params, self.buffers, self.cfg, epoch=self.epoch,
                      optimizer=self.opt, label_values=self.dataset.train.label_values, meta=meta,
                      history=self.history)
            self.saved_epoch = self.epoch
            write_metrics_log(self.out_dir, self.history)
        except OSError as exc:
            raise ckpt.CheckpointError(f"cannot write {exc.filename}: {exc.strerror or exc}; "
                                       f"{self._intact_checkpoint()}") from None

    def _intact_checkpoint(self):
        """What a failed save left: the checkpoint on disk and how to continue."""
        try:
            epoch = ckpt.load(self.out_dir).epoch
        except ckpt.CheckpointError:
            return f"no checkpoint was written in {self.out_dir}"
        return (f"the checkpoint of epoch {epoch} in {self.out_dir} is intact: free space, then "
                f"continue with python train.py --resume {self.out_dir}")

    def run_epoch(self):
        """One pass over the shuffled training set; returns the epoch's log record."""
        settings, xp, epoch = self.settings, self.xp, self.epoch
        lr = cosine_lr(epoch, settings.lr, settings.epochs, eta_min=settings.eta_min)
        batches = xp.asarray(_epoch_batches(len(self.dataset.train), settings.batch_size,
                                            settings.seed, epoch))
        rng = default_rng([settings.seed, epoch, 1], xp) if self.cfg.dropout > 0 else None
        sums = {k: xp.zeros((), dtype=xp.float64) for k in ("loss", "align", "opl", "ce")}
        start = time.perf_counter()
        with np.errstate(all="ignore"):     # a diverging run is caught below, once per epoch
            for idx in batches:
                loss, terms, grads, self.buffers = loss_and_grads(
                    self.params, self.buffers, self.face[idx], self.voice[idx], self.labels[idx],
                    self.cfg, rng=rng)
                self.opt.step(self.params, grads, lr=lr)
                sums["loss"] += loss
                for k, v in terms.items():
                    sums[k] += v
        record = {k: float(v) / len(batches) for k, v in sums.items()}   # one sync per epoch
        seconds = time.perf_counter() - start
        record.update(epoch=epoch + 1, lr=lr, seconds=seconds,
                      samples_per_s=len(batches) * settings.batch_size / seconds)
        untouched = f"the last good checkpoint (epoch {epoch}) in {self.out_dir} is untouched"
        if not math.isfinite(record["loss"]):
            raise TrainingDiverged(
                f"the loss became {record['loss']} in epoch {epoch + 1} (is --lr {settings.lr:g} "
                f"too high?); {untouched}")
        state = [*self.params.values(), *self.buffers.values()]
        if not bool(xp.stack([xp.isfinite(a).all() for a in state]).all()):   # one sync
            bad = next(k for k, a in [*self.params.items(), *self.buffers.items()]
                       if not bool(xp.isfinite(a).all()))
            raise TrainingDiverged(
                f"{bad} became NaN or Inf in epoch {epoch + 1} although the loss is finite "
                f"(features too large for {settings.dtype}?); {untouched}")
        self.epoch = epoch + 1
        return record

    def monitor_eer(self):
        test = self.dataset.tests.get(self.settings.monitor)
        if test is None:
            return None
        emb_f, emb_v = embed_rows(self.params, self.buffers, test.face, test.voice, self.cfg)
        return verification(pair_distances(emb_f, emb_v), test.same, official=False)["eer"]

    def train(self, stop_after=None):
        """Run the remaining epochs (at most ``stop_after`` of them), saving after
        each; returns the log records."""
        settings = self.settings
        records, started = [], time.perf_counter()
        first = self.epoch
        last = settings.epochs if stop_after is None else min(settings.epochs, first + stop_after)
        while self.epoch < last:
            record = self.run_epoch()
            eer = self.monitor_eer()
            if eer is not None:
                record[f"{settings.monitor}/eer"] = eer
            self.history.append(record)
            self.save()
            records.append(record)
            elapsed = time.perf_counter() - started
            left = elapsed / (self.epoch - first) * (last - self.epoch)
            self.log(format_progress(record, settings.epochs, left, settings.monitor))
        return records


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


def format_progress(r, total, seconds_left, monitor):
    eer = r.get(f"{monitor}/eer")
    eer_text = f"  {monitor} EER {100 * eer:4.1f}%" if eer is not None else ""
    return (f"epoch {r['epoch']:>3}/{total}  loss {r['loss']:.4f} (align {r['align']:.3f} "
            f"opl {r['opl']:.3f} ce {r['ce']:.3f})  lr {r['lr']:.2e}  "
            f"{r['samples_per_s']:,.0f} samples/s{eer_text}  {r['seconds']:.1f}s, "
            f"~{seconds_left:.0f}s left")
