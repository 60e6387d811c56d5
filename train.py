"""Train PAEFF (or an ablation of it) and print the results table.

    python train.py                         # the synthetic default, about 12 s on 2 cores
    python train.py --data-dir feats/ --preset paper
    python train.py --resume runs/20261125-101500 --epochs 30
    python train.py --ablation              # the paper's Tables 3 and 4 on one data set
    python train.py --select test           # the authors' protocol: optimistic figures

Model selection (README "Model selection"): by default 10% of the training
identities and 5% of the other identities' rows are held out as validation
lists and the epoch e* with the lowest validation EER is chosen; then (the
refit, default when the data has seen-heard lists) the same schedule is trained
again on every training row, in RUN/refit/, and its epoch-e* model is kept in
best.npz. The test lists are evaluated once, on it.
"""
import paeff_np  # noqa: F401  first: a Ctrl-C while the rest is imported is one line
import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import replace

from paeff_np.run import checkpoint as ckpt
from paeff_np.backend import array_module
from paeff_np.run.atomic import LOCK_NAME, folder_lock, write_atomically, write_json
from paeff_np.run.cli import (add_config_flags, check_widths, config_overrides, device_flag, load_data, make_config,
                              positive_int, remove_leftovers, run)
from paeff_np.usage import ArgumentParser, UsageError
from paeff_np.data import DataError, Dataset
from paeff_np.domains import FieldError
from paeff_np.data.csv import read_train
from paeff_np.data.split import VAL_FILE_NAMES, SplitError, split_validation, validation_from_rows
from paeff_np.run.evaluation import evaluate, format_results, list_name, protocol_notes
from paeff_np.optim import cosine_lr
from paeff_np.run.training import (BEST_NAME, OPTIMISM_WARNING, PAPER_RECIPE, REFIT_DIR, SELECTION_RULES, SaveFailed,
                                   Trainer, TrainingDiverged, TrainSettings, checkpoint_settings,
                                   refit_cost, refit_trainer)
from paeff_np.run.validate import AS_FLAGS, flag_name, validate_hyperparameters

PRESETS = {
    # tuned for the built-in synthetic world: a full run in about 12 s on 2 cores
    "quick": dict(epochs=15, lr=1e-3, batch_size=256, embed_dim=128),
    "paper": PAPER_RECIPE,           # docs/spec.md §4
}
SETTING_FLAGS = ("epochs", "lr", "batch_size", "seed", "device")
SELECTION_FLAGS = ("val_identities", "val_rows", "select", "patience", "refit", "val_dir")
# their defaults: TrainSettings' (refit's is decided from the data: see refit_default)
PAPER_COMPARISON = ("figures that compare with the paper's: --select test --val-identities 0 --val-rows 0 "
                    "is the authors' code (it selects on the unseen-unheard test list, optimistic); "
                    "--select last is the torch reference (its last epoch; with the refit, or with "
                    "--val-identities 0 --val-rows 0, the same model bit for bit); --select val (default) "
                    "is honest and compares with neither exactly")

# Paper Tables 3 and 4 (unseen-unheard EER / AUC, %; docs/spec.md §7), one list per table
ABLATION_TABLES = [
    [("gated baseline", "gated", dict(fusion="gated", alignment="none"), (27.6, 79.2)),
     ("+ EGFF", "egff", dict(fusion="egff", alignment="none"), (26.0, 80.7)),
     ("+ Euclidean alignment", "euclidean", dict(fusion="egff", alignment="euclidean"), (23.9, 83.6)),
     ("PAEFF (hyperbolic)", "paeff", dict(fusion="egff", alignment="hyperbolic"), (22.9, 84.4)),
     # not in the paper; c and τ: the lowest validation EER of c ∈ {0.05, 0.1} × τ ∈ {0.07, 0.1, 0.2}
     # on the synthetic world (seed 0; README "Poincaré distance alignment")
     ("Poincaré distance", "poincare",
      dict(fusion="egff", alignment="poincare", curvature=0.05, temperature=0.1), (None, None))],
    [("gate: sum", "gate-sum", dict(egff_gate="sum"), (24.4, None)),
     ("gate: concat", "gate-concat", dict(egff_gate="concat"), (24.0, None)),
     ("gate: product (PAEFF)", "gate-product", dict(egff_gate="product"), (22.9, 84.4))],
]


def make_parser():
    p = ArgumentParser(prog="train.py", description="Train PAEFF face–voice association in NumPy/CuPy.")
    p.add_argument("--data-dir", help="folder of FOP CSV files (faceTrain.csv, voiceTrain.csv, "
                   "face_/voice_veriflist_test_*.csv); default: the built-in synthetic world")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick (default, for the synthetic world) or paper (docs/spec.md §4: 50 epochs, "
                   "lr 2e-5, batch 1024, D 256); explicit flags override it")
    p.add_argument("--epochs", type=int, help="total epochs of the cosine schedule")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    device_flag(p)
    p.add_argument("--cuda-graphs", action="store_true", help="with --device cuda: replay each step as "
                   "CUDA graphs of the segments between matrix products (the same bits, fewer host calls; "
                   "prepared, not yet measured on a GPU: README \"GPU\")")
    p.add_argument("--out", help="folder of a new run (default runs/<timestamp>); a resumed "
                   "run stays in its own folder")
    p.add_argument("--resume", metavar="PATH", help="continue the run in PATH (folder or "
                   "checkpoint.npz) up to --epochs (default: the run's own total)")
    p.add_argument("--stop-after", type=positive_int, metavar="N", help="stop after N epochs of "
                   "this session (the run stays resumable with --resume)")
    p.add_argument("--ablation", action="store_true", help="train the rows of the paper's "
                   "Tables 3 and 4 on the same data and seed, and print them")
    g = p.add_argument_group("model selection (README \"Model selection\")")
    g.add_argument("--val-identities", type=float, metavar="FRAC", help="fraction of the training "
                   "identities held out whole as the unseen validation part (0.1; 0: off)")
    g.add_argument("--val-rows", type=float, metavar="FRAC", help="fraction of the other identities' "
                   "rows held out as the seen validation part (0.05; 0: off)")
    g.add_argument("--select", choices=SELECTION_RULES, help="val (default): the epoch of the lowest "
                   "validation EER; last: the last epoch; test: the lowest EER on the unseen-unheard "
                   "random test list (optimistic). " + PAPER_COMPARISON)
    g.add_argument("--patience", type=int, metavar="N", help="stop when the validation EER "
                   "has not improved for N epochs (0, the default: never)")
    g.add_argument("--refit", action=argparse.BooleanOptionalAction, help="after the run, train the "
                   "same schedule again on every training row (in RUN/refit/) and report its model of "
                   "the selected epoch as best.npz: no training identity is missing from the seen-heard "
                   "figures; it costs up to one more run (default: on when the split holds rows out and "
                   "the data has seen-heard lists)")
    g.add_argument("--val-dir", metavar="DIR", help="select on DIR's faceVal.csv and voiceVal.csv "
                   "(the training files' layout) instead of a split: nothing is carved from training")
    add_config_flags(p)
    return p


def parse_args(argv):
    return make_parser().parse_args(argv)


def resume_command(out_dir):
    """``python train.py --resume DIR``, ready to paste: quoted for the shell, and a
    folder name that begins with "-" written as ./-name, which no flag parser misreads."""
    return f"python train.py --resume {shlex.quote(('./' if out_dir.startswith('-') else '') + out_dir)}"


@contextlib.contextmanager
def said_for_the_command_line(run_dir):
    """A failed save gets the command that continues the run (in ``run_dir``, the run's
    own folder, also for its refit); a diverged run's fields are said as flags."""
    try:
        yield
    except SaveFailed as exc:
        hint = (f": free space, then continue with {resume_command(run_dir)}"
                if exc.intact_epoch is not None else "")
        raise ckpt.CheckpointError(f"{exc}{hint}") from None
    except TrainingDiverged as exc:
        raise TrainingDiverged(exc.describe(AS_FLAGS)) from None


def settings_from(args, base):
    values = dict(base)
    values.update({k: getattr(args, k) for k in SETTING_FLAGS + SELECTION_FLAGS
                   if getattr(args, k, None) is not None})
    return TrainSettings(**{k: v for k, v in values.items() if k in TrainSettings.__dataclass_fields__})


def fresh_out_dir(out):
    """The folder of a new run: new, or empty. It is created by the first save, so a
    start refused before it leaves nothing behind. Checked here, before any data is
    read, and again (``check_fresh``) once its lock is held."""
    if out is not None and not out:
        raise UsageError("--out is empty: give a folder name, or leave --out out for runs/<timestamp>")
    out = out or default_out_dir()
    check_fresh(out)
    return out


def default_out_dir():
    """``runs/<date>-<time>-<pid>``: the process id keeps runs started in one second apart."""
    return os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def check_fresh(out):
    """Refuse an ``out`` that holds a run or anything else (its own lock aside).

    Called again with the folder's lock held: a run that another train.py started
    into the same folder meanwhile (and may have finished) is then seen, and this
    one stops before its first save instead of replacing it."""
    if os.path.exists(os.path.join(out, ckpt.CHECKPOINT_NAME)):
        raise UsageError(f"{out} already holds a run: continue it with {resume_command(out)}, "
                         f"or choose another --out")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"{out} is a file, not a folder: choose another --out")
        remove_leftovers(out)
        if set(os.listdir(out)) - {LOCK_NAME}:      # a live lock is refused by folder_lock
            raise UsageError(f"{out} is not empty: a new run needs a new or empty folder; "
                             f"choose another --out")


def make_trainer(dataset, cfg, settings, out, data_meta, validation=None, cuda_graphs=False):
    try:
        return Trainer(dataset, cfg, settings, out, data_meta, validation=validation, cuda_graphs=cuda_graphs)
    except FieldError as exc:            # settings the data cannot take
        raise UsageError(exc.describe(AS_FLAGS)) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def base_settings(args, preset):
    """The settings of a fresh run: the preset, the flags given, TrainSettings' defaults;
    --val-dir (absolute, recorded) turns the split off."""
    base = dict(preset)
    if args.val_dir is not None:
        given = [f for f in ("val_identities", "val_rows") if getattr(args, f) is not None]
        if given:
            raise UsageError(f"--val-dir replaces the split: drop "
                             f"{', '.join(flag_name(f) for f in given)}")
        if not args.val_dir:
            raise UsageError("--val-dir is empty: give the folder of faceVal.csv and voiceVal.csv")
        base.update(val_identities=0.0, val_rows=0.0)
    settings = settings_from(args, base)
    return replace(settings, val_dir=os.path.abspath(args.val_dir)) if args.val_dir else settings


def read_val_dir(val_dir, dataset, seed):
    """The ValidationSplit of ``val_dir``'s faceVal.csv/voiceVal.csv: read and checked as
    the training files are (``csv.read_train``), as wide as the training features."""
    if not os.path.exists(val_dir):
        raise DataError(f"--val-dir {val_dir}: no such folder (missing)")
    if not os.path.isdir(val_dir):
        raise DataError(f"--val-dir {val_dir}: not a directory")
    val = read_train(*(os.path.join(val_dir, name) for name in VAL_FILE_NAMES))
    source = {"dir": os.path.abspath(val_dir), "sha256": val.fingerprint()}
    try:
        return validation_from_rows(dataset.train, val, seed, source)
    except SplitError as exc:
        raise DataError(str(exc)) from None


def carve_validation(dataset, settings):
    """``(dataset to train on, ValidationSplit or None)``: the lists of ``settings.val_dir``
    (the whole training set kept), else the split of ``settings``' fractions."""
    if settings.val_dir:
        return dataset, read_val_dir(settings.val_dir, dataset, settings.seed)
    if settings.val_identities == 0 and settings.val_rows == 0:
        return dataset, None
    try:
        split = split_validation(dataset.train, settings.val_identities, settings.val_rows, settings.seed)
    except SplitError as exc:
        raise UsageError(str(exc)) from None
    return Dataset(train=split.train, tests=dataset.tests), split


def refit_default(args, dataset, split):
    """--refit unless said: on when the split holds training rows out and the data has
    seen-heard lists; refused (given) when nothing is held out of training."""
    carved = split is not None and split.record.get("training_rows", len(dataset.train)) < len(dataset.train)
    if args.refit and not carved:
        why = "--val-dir keeps every training row" if args.val_dir is not None else \
            "--val-identities and --val-rows are both 0"
        raise UsageError(f"--refit trains again on the rows the split held out, but {why}: "
                         f"the run already trains on all of them; drop --refit")
    if args.refit is not None:
        return args.refit
    return carved and any(key.startswith("seenheard/") for key in dataset.tests)


def resumed_settings(args, checkpoint):
    """The run's own settings, with a new --epochs if given (refused below the epochs done)."""
    settings = settings_from(args, checkpoint_settings(checkpoint).to_dict())
    if settings.epochs < checkpoint.epoch:
        raise UsageError(f"--epochs {settings.epochs} is fewer than the {checkpoint.epoch} epochs "
                         f"already done in {checkpoint.path}")
    return settings


def change_epochs(trainer, old_epochs):
    """Say what a new --epochs does to the cosine schedule and record it in the checkpoint;
    the results of a finished run, now out of date, move to metrics.epoch<N>.json."""
    settings, done = trainer.settings, trainer.epoch
    lr_at = lambda total: cosine_lr(done, settings.lr, total, eta_min=settings.eta_min)
    if settings.epochs > done:
        old_lr = f"{lr_at(old_epochs):.2e}" if done < old_epochs else "none: the run had finished"
        effect = (f"the cosine schedule is recomputed for {settings.epochs} epochs; the learning "
                  f"rate of epoch {done + 1} is {lr_at(settings.epochs):.2e} (was {old_lr})")
    else:
        effect = f"the run ends here, at epoch {done}, and is evaluated"
    print(f"note: --epochs {settings.epochs} (the run was set to {old_epochs}): {effect}. "
          f"Recorded as epochs_changed in the checkpoint.")
    trainer.epochs_changed.append({"at_epoch": done, "from": old_epochs, "to": settings.epochs})
    trainer.save()                            # the same epoch, with the new schedule recorded
    results = os.path.join(trainer.out_dir, "metrics.json")
    kept = os.path.join(trainer.out_dir, f"metrics.epoch{done}.json")
    if os.path.exists(results) and not os.path.exists(kept):
        os.replace(results, kept)
        print(f"note: the results of the {old_epochs}-epoch run are kept in {kept}")


def start_run(args, hold):
    """A new Trainer from the flags, or one restored from --resume; ``hold`` keeps a
    resumed run's folder lock (``atomic.folder_lock``) until the command ends (a new
    run takes it at its first save: a start refused or killed before leaves no folder)."""
    if args.resume is not None:
        if not args.resume:
            raise UsageError("--resume: the path is empty; give the run folder")
        npz = os.path.realpath(ckpt.resolve(args.resume)[0])     # a link resumes where it points
        if os.path.basename(npz) == BEST_NAME:
            raise UsageError(f"--resume {args.resume}: a run continues from its checkpoint.npz; "
                             f"{BEST_NAME} keeps the selected model only (give the run folder)")
        if os.path.basename(npz) != ckpt.CHECKPOINT_NAME:
            raise UsageError(f"--resume {args.resume}: a run continues from the {ckpt.CHECKPOINT_NAME} "
                             f"of its folder; give the run folder (a copy of a checkpoint would "
                             f"write over the epochs its folder saved since)")
        run_dir = os.path.dirname(npz)
        if args.out is not None and os.path.realpath(args.out) != run_dir:
            raise UsageError(f"--resume continues the run in its own folder ({run_dir}); drop --out "
                             f"(to branch the run, copy its folder and resume the copy)")
        if os.path.isfile(npz):              # (a missing one is named by load, nothing made)
            hold(folder_lock(run_dir))       # before its leftovers are looked at
        remove_leftovers(run_dir)
        checkpoint = ckpt.load(npz)
        if checkpoint.config.get("refit_of") is not None:
            parent = os.path.dirname(run_dir)
            raise UsageError(f"{run_dir} is the refit of the run in {parent}: continue that run, "
                             f"{resume_command(parent)}")
        changed = [k for k in config_overrides(args)] + [
            k for k in ("lr", "batch_size", "seed", "val_dir", *SELECTION_FLAGS) if getattr(args, k) is not None]
        if changed or args.preset != "quick":
            raise UsageError(f"--resume continues a run as it was configured; "
                             f"drop {', '.join('--' + c.replace('_', '-') for c in changed) or '--preset'}")
        settings = resumed_settings(args, checkpoint)
        array_module(settings.device)          # a run saved on the GPU: probe it before the data
        data = checkpoint.config["data"]
        dataset, data_meta = load_data(args.data_dir or data.get("data_dir"), data.get("synthetic"))
        check_widths(dataset.train, checkpoint.cfg, args.data_dir or data.get("data_dir") or "the synthetic world")
        full = dataset
        dataset, split = carve_validation(dataset, settings)
        if (split.record if split else None) != checkpoint.config.get("validation"):
            raise DataError(f"the validation split of the data differs from the one recorded in "
                            f"{checkpoint.path} (the training data changed?)")
        if checkpoint.label_values is not None and \
                list(dataset.train.label_values) != list(checkpoint.label_values):
            raise DataError("the training labels differ from those the checkpoint was trained on")
        recorded = data.get("train_sha256")
        if recorded is not None and data_meta.get("train_sha256") != recorded:
            raise DataError(f"{data_meta.get('data_dir', 'the data')}: the training pairs differ from "
                            f"those {checkpoint.path} was trained on (their fingerprint changed): "
                            f"a resumed run must see the same data")
        out = run_dir
        trainer = make_trainer(dataset, checkpoint.cfg, settings, out, data_meta, split, args.cuda_graphs)
        trainer.restore(checkpoint)
        old_epochs = checkpoint.config["train"]["epochs"]
        if settings.epochs != old_epochs and os.path.exists(os.path.join(out, REFIT_DIR, ckpt.CHECKPOINT_NAME)):
            raise UsageError(f"--epochs {settings.epochs}: the run's refit on all rows ({os.path.join(out, REFIT_DIR)}) "
                             f"has started on the {old_epochs}-epoch schedule; start a new run to "
                             f"train longer")
        if settings.epochs != old_epochs and settings.epochs > checkpoint.epoch and trainer.patience_exhausted():
            raise UsageError(f"--epochs {settings.epochs}: the run stopped early at epoch "
                             f"{checkpoint.epoch} (--patience {settings.patience}: no better "
                             f"validation EER since); it would stop again at once: start a new run "
                             f"to train longer")
        print(f"resuming {out} at epoch {checkpoint.epoch}/{settings.epochs}")
        if settings.epochs != old_epochs:
            with said_for_the_command_line(out):
                change_epochs(trainer, old_epochs)
        return trainer, full
    out = fresh_out_dir(args.out)            # refused before reading any data
    dataset, data_meta = load_data(args.data_dir)
    return new_trainer(args, dataset, data_meta, out), dataset


def new_trainer(args, dataset, data_meta, out, split=None):
    """A Trainer for a fresh run; ``split``: the validation split of ``dataset``, when
    already carved (the ablation carves it once for all rows)."""
    preset = PRESETS[args.preset]
    settings = base_settings(args, preset)
    full = dataset
    if split is None:
        dataset, split = carve_validation(dataset, settings)
    elif split.train is not full.train:
        dataset = Dataset(train=split.train, tests=dataset.tests)
    settings = replace(settings, refit=refit_default(args, full, split))
    overrides = {"embed_dim": preset["embed_dim"], **config_overrides(args)}
    cfg = make_config(dataset.train, overrides)
    return make_trainer(dataset, cfg, settings, out, data_meta, split, args.cuda_graphs)


def describe(trainer):
    t, cfg, s = trainer.dataset.train, trainer.cfg, trainer.settings
    record = trainer.validation_record
    if record is None:
        val = "no validation split"
    elif "source" in record:
        val = (f"validation: {record['source']['dir']} (--val-dir), "
               + ", ".join(f"{part} {n:,} pairs" for part, n in record["pairs"].items()))
    else:
        parts = [f"unseen {record['pairs']['unseen']:,} pairs of {len(record['held_out_identities'])} "
                 f"held-out identities" if "unseen" in record["pairs"] else None,
                 f"seen {record['pairs']['seen']:,} pairs of held-out rows" if "seen" in record["pairs"] else None]
        val = "validation: " + ", ".join(p for p in parts if p)
    rule = {"val": "the lowest validation EER", "last": "the last epoch",
            "test": f"the lowest {list_name(s.monitor)} EER"}[s.select]
    patience = f", patience {s.patience}" if s.patience else ""
    refit = "; then refit on all training rows (--no-refit: off)" if s.refit else ""
    return (f"data: {trainer.data_meta.get('data_dir', 'built-in synthetic world')} — {len(t):,} "
            f"training pairs, {t.n_classes} identities, face {t.face_dim}-d, voice {t.voice_dim}-d, "
            f"{len(trainer.dataset.tests)} test lists\n"
            f"{val}; selection: {s.select} ({rule}{patience}){refit}\n"
            f"model: {cfg.fusion}, alignment {cfg.alignment}, D {cfg.embed_dim}; "
            f"{s.epochs} epochs, batch {s.batch_size}, lr {s.lr:g}, seed {s.seed}, {s.device}\n"
            f"run folder: {trainer.out_dir}")


def run_to_end(trainer, full, hold, stop_after=None):
    """Train the run's remaining epochs, then its refit (``settings.refit``) on every
    training row of ``full``; returns the refit's Trainer (None without a refit), or
    False when ``stop_after`` stopped the session first. ``hold`` takes the refit
    folder's lock (the run's own is already held)."""
    with said_for_the_command_line(trainer.out_dir):
        done = len(trainer.train(stop_after=stop_after))
        if not trainer.finished:
            return False
        if not trainer.settings.refit:
            return None
        refit = refit_trainer(trainer, full)
        if refit.finished:
            return refit
        if refit.epoch == 0:
            epoch, rows = refit.stop_at, len(full.train)
            split_s, _ = refit_cost(trainer, refit)
            per_epoch = split_s / max(1, trainer.epoch) * rows / len(trainer.dataset.train)
            print(f"\nrefit: epoch {epoch} selected; training the same schedule again on all {rows:,} "
                  f"training rows up to epoch {epoch} (about {per_epoch * epoch:.0f} s more, the split "
                  f"run took {split_s:.0f} s); its model is the one reported (--no-refit: off)", flush=True)
        else:
            print(f"\nrefit: resuming {refit.out_dir} at epoch {refit.epoch}/{refit.stop_at}", flush=True)
        hold(folder_lock(refit.out_dir))       # the refit folder too: one writer
        if refit.saved_epoch is None:
            first_save(refit)
        session_left = None if stop_after is None else stop_after - done
        if session_left is not None and session_left <= 0:
            return False
        refit.train(stop_after=session_left)
        return refit if refit.finished else False


def finish(trainer, refit=None):
    """Evaluate the reported model on every test list, once (the refit's when there is
    one); write metrics.json (``{"selection": ..., "<split>/<kind>": ...}``) and return it."""
    selection = trainer.selection_record()
    if refit is not None:
        params, buffers, cfg = refit.params, refit.buffers, refit.cfg
        split_s, refit_s = refit_cost(trainer, refit)
        selection["refit"] = {"epoch": refit.epoch, "training_rows": len(refit.dataset.train),
                              "seconds": refit_s, "split_run_seconds": split_s}
    else:
        _, params, buffers, _ = trainer.selected_model()
        cfg = trainer.cfg
    results = evaluate(params, buffers, cfg, trainer.dataset.tests, seed=trainer.settings.seed)
    metrics = {"selection": selection, **results}
    write_json(os.path.join(trainer.out_dir, "metrics.json"), metrics)
    return metrics


def format_selection(selection, epochs_run, out_dir):
    """Which epoch the rule chose, its validation figures, the refit and its cost, and
    the file that holds the reported model."""
    val = (f"; validation ({selection['val_part']}) EER {100 * selection['val_eer']:.1f}%, "
           f"AUC {100 * selection['val_auc']:.1f}%" if selection.get("val_eer") is not None else "")
    test = (f"; {list_name(selection['test_list'])} EER {100 * selection['test_eer']:.1f}%"
            if selection["rule"] == "test" else "")
    refit = selection.get("refit")
    where = "checkpoint.npz" if selection["rule"] == "last" and not refit else "best.npz"
    line = (f"selected: epoch {selection['epoch']} of {epochs_run} by rule {selection['rule']}{val}{test} "
            f"({os.path.join(out_dir, where)})")
    if refit:
        total = refit["split_run_seconds"] + refit["seconds"]
        line += (f"\nrefit: reported model trained again on all {refit['training_rows']:,} training rows "
                 f"to epoch {refit['epoch']}; cost {refit['seconds']:.1f} s of training on top of the split "
                 f"run's {refit['split_run_seconds']:.1f} s "
                 f"({total / max(refit['split_run_seconds'], 1e-9):.2f}× in all)")
    return line


def train_one(args, hold):
    started = time.perf_counter()
    trainer, full = start_run(args, hold)
    print(describe(trainer), flush=True)
    for note in protocol_notes(trainer.dataset.tests):
        print(note, file=sys.stderr, flush=True)
    if not trainer.dataset.tests:
        print(f"note: the data has no test lists: the run is trained and saved, not tested "
              f"(later: python eval.py --checkpoint {trainer.out_dir} --data-dir DIR)",
              file=sys.stderr, flush=True)
    if trainer.settings.select == "test":
        print(f"warning: --select test: {OPTIMISM_WARNING}", file=sys.stderr, flush=True)
    if args.resume is None:
        hold(folder_lock(trainer.out_dir))   # one writer from the first save on
        check_fresh(trainer.out_dir)         # as it is now, with the lock held
        with said_for_the_command_line(trainer.out_dir):
            first_save(trainer)      # epoch 0: a run that stops early can still be resumed
    try:
        refit = run_to_end(trainer, full, hold, stop_after=args.stop_after)
    except KeyboardInterrupt:
        print(f"\nthe checkpoints written are intact; continue with "
              f"{resume_command(trainer.out_dir)}", file=sys.stderr)
        raise
    if refit is False:
        at = f"epoch {trainer.epoch}/{trainer.settings.epochs}"
        if trainer.finished:
            state = refit_trainer(trainer, full, log=lambda line: None)
            at = f"the refit's epoch {state.epoch}/{state.stop_at}"
        print(f"stopped after {at}; continue with {resume_command(trainer.out_dir)}")
        return
    results = finish(trainer, refit)
    print()
    print(format_selection(results["selection"], trainer.epoch, trainer.out_dir))
    if trainer.settings.select == "test":
        print(f"warning: --select test: {OPTIMISM_WARNING}")
    tested = {k: r for k, r in results.items() if k != "selection"}
    print(format_results(tested) if tested else "no test lists: nothing was tested")
    print(f"\ntotal time {time.perf_counter() - started:.1f}s; results in "
          f"{os.path.join(trainer.out_dir, 'metrics.json')}")


def first_save(trainer):
    """Save epoch 0; if that fails, remove the run folder this start created (when empty).
    (A single run's folder is made by its ``folder_lock``, which removes it the same way.)"""
    created = not os.path.exists(trainer.out_dir)
    try:
        trainer.save()
    except BaseException:
        if created:
            remove_leftovers(trainer.out_dir)
            try:
                os.rmdir(trainer.out_dir)
            except OSError:       # not empty (a committed checkpoint): it stays
                pass
        raise


def train_ablation(args, hold):
    if args.resume is not None:
        raise UsageError("--ablation starts fresh runs; it cannot --resume")
    refused = [flag for flag in ("fusion", "alignment", "egff_gate", "stop_after")
               if getattr(args, flag) is not None]
    if refused:                           # the rows set the first three; every row runs to its end
        raise UsageError(f"--ablation sets fusion, alignment and gate row by row and trains every row "
                         f"to the end; drop {', '.join('--' + f.replace('_', '-') for f in refused)}")
    base_out = fresh_out_dir(args.out)
    started = time.perf_counter()
    dataset, data_meta = load_data(args.data_dir)
    for note in protocol_notes(dataset.tests):
        print(note, file=sys.stderr, flush=True)
    settings = base_settings(args, PRESETS[args.preset])
    if settings.select == "test":
        print(f"warning: --select test: {OPTIMISM_WARNING}", file=sys.stderr, flush=True)
    _, split = carve_validation(dataset, settings)     # one split for every row
    row_args = {slug: argparse.Namespace(**{**vars(args), **overrides})
                for table in ABLATION_TABLES for _, slug, overrides, _ in table}
    for one in row_args.values():         # every row's flags checked before the first trains
        make_config(dataset.train, {"embed_dim": PRESETS[one.preset]["embed_dim"], **config_overrides(one)})
    hold(folder_lock(base_out))          # one writer from the first row on
    check_fresh(base_out)                # as it is now, with the lock held
    tables, trained, finished_rows = [], {}, []
    for table in ABLATION_TABLES:
        rows = []
        for name, slug, _, paper in table:
            trainer = new_trainer(row_args[slug], dataset, data_meta, os.path.join(base_out, slug), split)
            key = json.dumps(trainer.cfg.to_dict(), sort_keys=True)
            if key not in trained:      # "gate: product" is the PAEFF row: trained once
                print(f"\n== {name} ==\n{describe(trainer)}", flush=True)
                try:
                    with said_for_the_command_line(trainer.out_dir):
                        first_save(trainer)
                    refit = run_to_end(trainer, dataset, hold)
                except BaseException:   # Ctrl-C, NaN, a full disk: say what is kept
                    done = ", ".join(sorted({os.path.basename(t) for t in finished_rows})) or "none"
                    print(f"\nthe ablation stopped in row {name!r}; finished rows kept in {base_out}: "
                          f"{done}. It cannot be resumed: run it again with a new --out (each row's "
                          f"folder can be resumed alone: {resume_command(trainer.out_dir)})",
                          file=sys.stderr, flush=True)
                    raise
                trained[key] = finish(trainer, refit)
                finished_rows.append(trainer.out_dir)
            rows.append((name, trained[key], paper))
        tables.append(rows)
    refit = trainer.settings.refit
    table = format_ablation(tables, settings.select, refit)
    print("\n" + table)
    write_atomically(os.path.join(base_out, "ablation.txt"), lambda f: f.write(table + "\n"), mode="w")
    print(f"\ntotal time {time.perf_counter() - started:.1f}s; runs in {base_out}")


def format_ablation(tables, rule="val", refit=False):
    """The rows of each table (a list of ``(name, metrics, paper)``), a blank line between
    tables; each row's selected epoch and its validation EER beside its test figures."""
    lines = [f"{'':<24} {'unseen-unheard':>15} {'seen-heard':>13} {'selected':>15} {'paper (VoxCeleb1)':>19}",
             f"{'row':<24} {'EER':>7} {'AUC':>7} {'EER':>6} {'AUC':>6} {'epoch':>6} {'val EER':>8} "
             f"{'EER':>9} {'AUC':>9}"]
    for t, rows in enumerate(tables):
        if t > 0:
            lines.append("")
        for name, results, (paper_eer, paper_auc) in rows:
            uu = results.get("unseenunheard/random", {})
            sh = results.get("seenheard/random", {})
            sel = results.get("selection", {})
            pct = lambda r, k: f"{100 * r[k]:.1f}" if r.get(k) is not None else "–"
            lines.append(f"{name:<24} {pct(uu, 'eer'):>7} {pct(uu, 'auc'):>7} {pct(sh, 'eer'):>6} "
                         f"{pct(sh, 'auc'):>6} {sel.get('epoch', '–'):>6} {pct(sel, 'val_eer'):>8} "
                         f"{paper_eer or '–':>9} {paper_auc or '–':>9}")
    lines.append(f"(%; random lists, exact EER/AUC; each row's epoch selected by rule {rule}"
                 + (", on the test list: optimistic" if rule == "test" else "")
                 + (", its model trained again on all training rows (refit)" if refit else "")
                 + "; paper: unseen-unheard, Tables 3 and 4)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    validate_hyperparameters(args, defaults=PRESETS[args.preset])
    if args.cuda_graphs and args.resume is None and args.device != "cuda":
        raise UsageError("--cuda-graphs runs the step as CUDA graphs: it needs --device cuda")
    array_module(args.device or "cpu")     # the GPU probe, before any data is parsed or folder made
    with contextlib.ExitStack() as locks:    # the run folder's lock, held to the end
        (train_ablation if args.ablation else train_one)(args, locks.enter_context)


if __name__ == "__main__":
    sys.exit(run(main, "train.py"))
