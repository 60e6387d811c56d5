"""The training loop that ``train.py`` calls: epochs, progress, NaN guard,
checkpoints every epoch, resume.

Randomness is a pure function of ``(seed, epoch)``: the shuffle of epoch e
uses ``default_rng([seed, e, 0])`` and its dropout ``[seed, e, 1]``. A run
resumed from the checkpoint of epoch e therefore continues exactly as the
uninterrupted run would: bit for bit on the CPU.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import checkpoint as ckpt
from .backend import cupy_module, default_rng, to_device
from .evaluation import embed_rows
from .flat import flatten
from .metrics import pair_distances, verification
from .model import init_params, loss_and_grads
from .optim import AdamW, cosine_lr

METRICS_LOG = "metrics.jsonl"


class UsageError(Exception):
    """Settings the run cannot take (e.g. a batch larger than the training set)."""


class TrainingDiverged(Exception):
    """The loss became NaN or Inf; the last good checkpoint is left as it was."""


@dataclass
class TrainSettings:
    epochs: int = 50
    lr: float = 2e-5
    batch_size: int = 1024
    seed: int = 0
    weight_decay: float = 0.01
    eta_min: float = 1e-8
    device: str = "cpu"
    dtype: str = "float32"
    monitor: str = "unseenunheard/random"   # the test list whose EER is printed each epoch

    def to_dict(self):
        return asdict(self)


def array_module(device):
    return np if device == "cpu" else cupy_module()


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
            raise UsageError(f"the training set has {len(train)} pairs, fewer than one batch "
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

    def restore(self, checkpoint):
        """Continue from a loaded checkpoint (its params, buffers, optimizer, epoch)."""
        dev = self.settings.device
        dtype = np.dtype(self.settings.dtype)
        _, self.params = flatten({k: to_device(v.astype(dtype), dev) for k, v in checkpoint.params.items()})
        self.buffers = {k: to_device(v, dev) for k, v in checkpoint.buffers.items()}
        if checkpoint.optimizer is not None:
            self.opt.load_state_dict(*checkpoint.optimizer, device=dev)
        self.epoch = checkpoint.epoch

    def save(self):
        meta = dict(train=self.settings.to_dict(), data=self.data_meta,
                    face_dim=self.cfg.face_dim, voice_dim=self.cfg.voice_dim)
        ckpt.save(self.out_dir, self.params, self.buffers, self.cfg, epoch=self.epoch,
                  optimizer=self.opt, label_values=self.dataset.train.label_values, meta=meta)

    def run_epoch(self):
        """One pass over the shuffled training set; returns the epoch's log record."""
        s, xp, e = self.settings, self.xp, self.epoch
        lr = cosine_lr(e, s.lr, s.epochs, eta_min=s.eta_min)
        batches = xp.asarray(_epoch_batches(len(self.dataset.train), s.batch_size, s.seed, e))
        rng = default_rng([s.seed, e, 1], xp) if self.cfg.dropout > 0 else None
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
        record.update(epoch=e + 1, lr=lr, seconds=seconds,
                      samples_per_s=len(batches) * s.batch_size / seconds)
        if not math.isfinite(record["loss"]):
            raise TrainingDiverged(
                f"the loss became {record['loss']} in epoch {e + 1} (is --lr {s.lr:g} too high?); "
                f"the last good checkpoint (epoch {e}) in {self.out_dir} is untouched")
        self.epoch = e + 1
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
        s = self.settings
        records, started = [], time.perf_counter()
        first = self.epoch
        last = s.epochs if stop_after is None else min(s.epochs, first + stop_after)
        while self.epoch < last:
            record = self.run_epoch()
            eer = self.monitor_eer()
            if eer is not None:
                record[f"{s.monitor}/eer"] = eer
            self.save()
            append_jsonl(os.path.join(self.out_dir, METRICS_LOG), record)
            records.append(record)
            elapsed = time.perf_counter() - started
            left = elapsed / (self.epoch - first) * (last - self.epoch)
            self.log(format_progress(record, s.epochs, left, s.monitor))
        return records


def append_jsonl(path, record):
    """Append one line; the file is rewritten atomically so a crash never leaves half a line."""
    old = open(path).read() if os.path.exists(path) else ""
    ckpt.write_atomically(path, lambda f: f.write(old + json.dumps(record) + "\n"), mode="w")


def truncate_jsonl(path, epochs):
    """Keep the first ``epochs`` records (a resumed run rewrites what follows)."""
    if os.path.exists(path):
        lines = [l for l in open(path).read().splitlines() if l.strip()]
        kept = [l for l in lines if json.loads(l).get("epoch", 0) <= epochs]
        ckpt.write_atomically(path, lambda f: f.write("".join(l + "\n" for l in kept)), mode="w")


def format_progress(r, total, seconds_left, monitor):
    eer = r.get(f"{monitor}/eer")
    eer_text = f"  {monitor} EER {100 * eer:4.1f}%" if eer is not None else ""
    return (f"epoch {r['epoch']:>3}/{total}  loss {r['loss']:.4f} (align {r['align']:.3f} "
            f"opl {r['opl']:.3f} ce {r['ce']:.3f})  lr {r['lr']:.2e}  "
            f"{r['samples_per_s']:,.0f} samples/s{eer_text}  {r['seconds']:.1f}s, "
            f"~{seconds_left:.0f}s left")
