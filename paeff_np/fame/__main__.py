"""The FAME challenge protocol as one command (README "FAME 2026").

    python -m paeff_np.fame --features FEATS --lists LISTS --version v3 --out OUT [--labels DIR]
    python -m paeff_np.fame --synthetic --out OUT

Trains one model per language, each in its own run folder ``OUT/<language>`` (the run
machinery of ``train.py``: ``run.training.Trainer``, a checkpoint per epoch, the folder
lock, model selection on the training data's own validation split), scores the four
conditions with the L2 distance of the evaluation embeddings, and writes the four
score files and ``OUT/submission.zip``, each atomically. With labels it also writes
``OUT/fame.json`` and prints the EER table beside the baseline's published figures.

Every file is read and checked before the first epoch; a bad one is one line naming it,
exit 2. A command stopped midway (Ctrl-C, kill -9, a full disk) continues when it is run
again with the same flags: finished runs are reused, an unfinished one resumes from its
last checkpoint.
"""
import argparse
import contextlib
import os
import sys
import time

from ..backend import array_module
from ..data import DataError, Dataset
from ..data.split import SplitError, split_validation
from ..model import ALIGNMENTS, FUSIONS
from ..run import checkpoint as ckpt
from ..run.atomic import LOCK_NAME, TEMPORARY_SUFFIX, folder_lock, write_atomically, write_json
from ..run.cli import device_flag, make_config, remove_leftovers, run
from ..run.evaluation import l2_scores
from ..run.training import SaveFailed, TrainingDiverged, Trainer, TrainSettings, checkpoint_settings
from ..run.validate import AS_FLAGS, validate_hyperparameters
from ..usage import ArgumentParser, UsageError
from . import protocol as fame
from .world import make_fame_world

PROG = "python -m paeff_np.fame"
# the training recipe unless flags say otherwise: train.py's quick preset, which the synthetic
# world here also trains well with
DEFAULTS = dict(epochs=15, lr=1e-3, batch_size=256, embed_dim=128, seed=0)
# model selection: the test lists have no labels, so the epoch is chosen on the training data's
# own split (data.split), as train.py does by default
SELECTION = dict(val_identities=0.1, val_rows=0.05, select="val", patience=0)
TAKEN = ("epochs", "lr", "batch_size", "embed_dim", "seed", "alignment", "fusion", "device")
# train.py's other flags, as it spells them (tests/test_fame.py holds this list to train.py's
# parser): a FAME run fixes the data, the selection and the rest of the model
REFUSED = ("--data-dir", "--preset", "--resume", "--stop-after", "--ablation", "--val-identities",
           "--val-rows", "--select", "--patience", "--refit", "--no-refit", "--val-dir",
           "--egff-kernel", "--egff-gate", "--egff-mix", "--curvature", "--no-riemannian-grad",
           "--temperature", "--clip-radius", "--dropout", "--opl-gamma", "--loss-weights", "--cuda-graphs")
_flag = lambda name: "--" + name.replace("_", "-")
_refused_dest = lambda flag: "refused" + flag.replace("-", "_")


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description="The FAME 2026 challenge protocol: one model per language, "
                       "four scored lists, a submission zip.")
    p.add_argument("--features", metavar="FEATS", help="folder of FEATS/<ver>/<Lang>/ feature CSVs")
    p.add_argument("--lists", metavar="LISTS", help="folder of LISTS/<ver>/<Lang>_test.txt trial lists")
    p.add_argument("--version", help="MAV-Celeb version: v1 (English/Urdu) or v3 (English/German); "
                   "another needs --languages")
    p.add_argument("--languages", nargs=2, metavar=("A", "B"), help="the version's two languages")
    p.add_argument("--labels", metavar="DIR", help="folder of <Lang>_test_labels.txt (<id> <label>, "
                   "1 = same person): EERs, fame.json and the table")
    p.add_argument("--synthetic", action="store_true", help="the built-in MAV-Celeb-shaped world "
                   "(two languages, hidden labels) instead of --features/--lists")
    p.add_argument("--out", required=True, help="folder of the run: new or empty, or this run's own "
                   "folder to continue it")
    g = p.add_argument_group("training (train.py's flags of these names)")
    g.add_argument("--epochs", type=int, help=f"({DEFAULTS['epochs']})")
    g.add_argument("--lr", type=float, help=f"({DEFAULTS['lr']:g})")
    g.add_argument("--batch-size", type=int, help=f"({DEFAULTS['batch_size']})")
    g.add_argument("--embed-dim", type=int, help=f"({DEFAULTS['embed_dim']})")
    g.add_argument("--seed", type=int, help=f"({DEFAULTS['seed']})")
    g.add_argument("--alignment", choices=ALIGNMENTS, help="(hyperbolic)")
    g.add_argument("--fusion", choices=FUSIONS, help="(egff)")
    device_flag(g)
    for flag in REFUSED:             # parsed so that the refusal names them all, in one line
        p.add_argument(flag, dest=_refused_dest(flag), nargs="*", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_flags(args):
    """The refused train.py flags, the sources and the languages: one UsageError each."""
    refused = [flag for flag in REFUSED if getattr(args, _refused_dest(flag)) is not None]
    if refused:
        raise UsageError(f"{', '.join(refused)}: train.py flag(s) that a FAME run does not take; it takes "
                         f"{', '.join(_flag(n) for n in TAKEN)} (a stopped run continues when the same "
                         f"command is run again)")
    given = [f for f in ("features", "lists", "version") if getattr(args, f) is not None]
    if args.synthetic:
        extra = given + [f for f in ("languages", "labels") if getattr(args, f) is not None]
        if extra:
            raise UsageError(f"--synthetic runs the built-in world: drop "
                             f"{', '.join(_flag(f) for f in extra)}")
    elif len(given) < 3:
        missing = [_flag(f) for f in ("features", "lists", "version") if f not in given]
        raise UsageError(f"{', '.join(missing)} missing: give --features, --lists and --version, "
                         f"or --synthetic")
    if args.out == "":
        raise UsageError("--out is empty: give a folder name")
    validate_hyperparameters(args, defaults=DEFAULTS)


def languages_of(args):
    if args.synthetic:
        from .world import LANGUAGES
        return LANGUAGES
    if args.languages is not None:
        fame.check_language_names(args.languages)
        return tuple(args.languages)
    if args.version not in fame.VERSION_LANGUAGES:
        known = ", ".join(f"{v} ({'/'.join(l)})" for v, l in fame.VERSION_LANGUAGES.items())
        raise UsageError(f"--version {args.version}: its languages are not known ({known}); "
                         f"give them with --languages A B")
    return fame.VERSION_LANGUAGES[args.version]


def run_files(languages):
    """The names a FAME run writes at the top of OUT."""
    return {LOCK_NAME, fame.SUBMISSION_NAME, fame.RESULTS_NAME, *languages,
            *(c.score_file for c in fame.conditions(languages))}


def check_out(out, languages):
    """OUT is new, empty, or a FAME run of these languages (continued); else refused."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise UsageError(f"--out {out}: is a file, not a folder")
    allowed = run_files(languages)
    for name in sorted(os.listdir(out)):
        if name not in allowed and not name.endswith(TEMPORARY_SUFFIX):
            raise UsageError(f"--out {out}: holds {name!r}, which is not part of a FAME run of "
                             f"{'/'.join(languages)}: give a new or empty folder (or this run's own, to continue it)")
    for language in languages:
        folder = os.path.join(out, language)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"{folder}: is a file, not a run folder")
        if os.path.isdir(folder) and not os.path.exists(os.path.join(folder, ckpt.CHECKPOINT_NAME)):
            stray = [n for n in os.listdir(folder) if n != LOCK_NAME and not n.endswith(TEMPORARY_SUFFIX)]
            if stray:
                raise UsageError(f"{folder}: holds {stray[0]!r} but no {ckpt.CHECKPOINT_NAME}: not a run "
                                 f"folder; give a new or empty --out")


def settings_of(args):
    values = {**DEFAULTS, **{k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}}
    return TrainSettings(epochs=values["epochs"], lr=values["lr"], batch_size=values["batch_size"],
                         seed=values["seed"], device=args.device or "cpu", **SELECTION)


def config_of(args, train_set):
    overrides = {"embed_dim": DEFAULTS["embed_dim"],
                 **{k: getattr(args, k) for k in ("embed_dim", "alignment", "fusion") if getattr(args, k) is not None}}
    return make_config(train_set, overrides)


def validation_split(train_set, settings, language):
    try:
        return split_validation(train_set, settings.val_identities, settings.val_rows, settings.seed)
    except SplitError as exc:
        raise UsageError(f"{language}'s training data: {exc}") from None


def again_command(argv):
    return f"run the same command again ({PROG} {' '.join(argv)})"


def plan_trainer(protocol, language, args, run_dir):
    """A fresh Trainer of ``language``'s run: its split, model and settings checked; no file yet."""
    train_set, meta = protocol.train[language], protocol.train_meta[language]
    settings = settings_of(args)
    split = validation_split(train_set, settings, language)
    cfg = config_of(args, split.train)
    return make_trainer(Dataset(train=split.train, tests={}), cfg, settings, run_dir, meta, split)


def open_run(trainer, language, hold):
    """Lock ``trainer``'s run folder; then restore the run it holds, when its settings, model and
    data are these, or save epoch 0 of a new one (a run stopped in its first epoch continues)."""
    run_dir = trainer.out_dir
    existing = os.path.join(run_dir, ckpt.CHECKPOINT_NAME)
    hold(folder_lock(run_dir))
    remove_leftovers(run_dir)
    if not os.path.exists(existing):
        trainer.save()
        return
    checkpoint = ckpt.load(existing)
    check_same_run(checkpoint, trainer, run_dir)
    trainer.restore(checkpoint)
    state = ("finished" if trainer.finished else
             f"continuing after epoch {trainer.epoch}/{trainer.settings.epochs}" if trainer.epoch else
             "saved before its first epoch: starting it")
    print(f"{language}: {run_dir} holds this run, {state}", flush=True)


def make_trainer(dataset, cfg, settings, run_dir, meta, split):
    try:
        return Trainer(dataset, cfg, settings, run_dir, meta, validation=split)
    except ValueError as exc:            # settings the data cannot take (a batch larger than the data)
        raise UsageError(str(exc)) from None


def check_same_run(checkpoint, trainer, run_dir):
    """A run folder continues only with the settings, model and training data it began with."""
    settings, cfg, split_record, meta = (trainer.settings, trainer.cfg, trainer.validation_record,
                                         trainer.data_meta)
    recorded = checkpoint_settings(checkpoint).to_dict()
    changed = [k for k, v in settings.to_dict().items() if recorded.get(k) != v]
    changed += [f"model.{k}" for k, v in cfg.to_dict().items() if checkpoint.cfg.to_dict().get(k) != v]
    if changed:
        k = changed[0]
        old, new = ((recorded.get(k), settings.to_dict()[k]) if not k.startswith("model.") else
                    (checkpoint.cfg.to_dict().get(k[6:]), cfg.to_dict()[k[6:]]))
        raise UsageError(f"{run_dir} holds a run with other settings ({k} {old}, not {new}); give the "
                         f"flags it was started with to continue it, or choose another --out")
    if checkpoint.config.get("data", {}).get("train_sha256") != meta["train_sha256"] or \
            checkpoint.config.get("validation") != split_record:
        raise DataError(f"{run_dir}: the training pairs differ from those its run was trained on "
                        f"(their fingerprint changed): choose another --out")


def train_all(trainers, argv):
    """Train every unfinished run to its end; an error or Ctrl-C says how to continue."""
    for language, trainer in trainers.items():
        if trainer.finished:
            continue
        print(f"\n== {language} model: {len(trainer.dataset.train):,} training pairs, "
              f"{trainer.dataset.train.n_classes} identities; run folder {trainer.out_dir} ==", flush=True)
        try:
            trainer.train()
        except KeyboardInterrupt:
            epoch = trainer.folder.epoch_on_disk()     # a Ctrl-C just after the rename: the new one
            print(f"\nthe checkpoint of epoch {epoch} in {trainer.out_dir} is intact; to "
                  f"continue, {again_command(argv)}", file=sys.stderr)
            raise
        except SaveFailed as exc:          # a FAME run continues with its own command
            hint = f": free space, then {again_command(argv)}" if exc.intact_epoch is not None else ""
            raise ckpt.CheckpointError(f"{exc}{hint}") from None
        except TrainingDiverged as exc:
            raise TrainingDiverged(exc.describe(AS_FLAGS)) from None


def score_all(protocol, trainers):
    """``{condition name: L2 distances}``: each condition's list embedded by its model's selected
    epoch (the evaluation embeddings, ``model.embed``), d = ||f - v||."""
    scores, chosen = {}, {}
    for language, trainer in trainers.items():
        epoch, params, buffers, name = trainer.selected_model()
        chosen[language] = (epoch, name)
        for condition in protocol.conditions():
            if condition.model == language:
                face, voice = protocol.features[condition.name]
                scores[condition.name] = l2_scores(params, buffers, face, voice, trainer.cfg)
    return scores, chosen


def write_outputs(out, protocol, scores, eers):
    """The four score files, the zip of exactly those four, fame.json when EERs are known:
    each written to a temporary file and renamed into place."""
    texts = {c.score_file: fame.format_scores(protocol.lists[c.test].ids, scores[c.name])
             for c in protocol.conditions()}
    for name, text in texts.items():
        write_atomically(os.path.join(out, name), lambda f, text=text: f.write(text), mode="w")
    archive = fame.submission_bytes(texts)
    zip_path = os.path.join(out, fame.SUBMISSION_NAME)
    write_atomically(zip_path, lambda f: f.write(archive))
    written = [*texts, fame.SUBMISSION_NAME]
    results_path = os.path.join(out, fame.RESULTS_NAME)
    if any(v is not None for v in eers.values()):
        record = fame.results_record(protocol.version, protocol.languages, eers, protocol.lists,
                                     protocol.conditions())
        write_json(results_path, record)
        written.append(fame.RESULTS_NAME)
    elif os.path.exists(results_path):    # an earlier run's EERs, of scores these files replaced
        os.remove(results_path)
        print(f"removed {results_path}: its EERs were of an earlier run with --labels", flush=True)
    return written


def baseline_for(protocol, version):
    """The published figures to print beside ours, and their column's label."""
    if protocol.version == "synthetic":
        return fame.BASELINE_EER["v3"], "FOP on MAV-Celeb v3 (published; not this data)"
    if set(fame.VERSION_LANGUAGES.get(version, ())) == set(protocol.languages):
        return fame.BASELINE_EER.get(version), f"FOP baseline, MAV-Celeb {version} (published)"
    return None, "FOP baseline (none published for these languages)"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    check_flags(args)
    languages = languages_of(args)
    out = args.out
    check_out(out, languages)             # before any data is read
    array_module(args.device or "cpu")    # the GPU probe, likewise
    started = time.perf_counter()
    if args.synthetic:
        world = make_fame_world(seed=args.seed or 0)
        protocol = world.protocol
        for language, same in world.hidden_labels.items():
            protocol.lists[language].same = same        # the hidden labels, for the table only
        version = "synthetic"
    else:
        note = lambda line: print(line, file=sys.stderr, flush=True)
        protocol = fame.load_protocol(args.features, args.lists, args.version, languages, args.labels, note)
        version = args.version
    print(f"FAME {version}: languages {' and '.join(languages)}; "
          + ", ".join(f"{l} {len(protocol.train[l]):,} training pairs, {len(protocol.lists[l].ids):,} trials"
                      for l in languages), flush=True)
    trainers = {l: plan_trainer(protocol, l, args, os.path.join(out, l)) for l in languages}
    with contextlib.ExitStack() as locks:
        locks.enter_context(folder_lock(out))
        check_out(out, languages)         # again, now that no other process can write it
        remove_leftovers(out)
        for language, trainer in trainers.items():
            open_run(trainer, language, locks.enter_context)
        train_all(trainers, argv)
        scores, chosen = score_all(protocol, trainers)
        eers = fame.condition_eers(scores, protocol.lists, protocol.conditions())
        written = write_outputs(out, protocol, scores, eers)
        for language, trainer in trainers.items():
            selection = trainer.selection_record()
            write_json(os.path.join(trainer.out_dir, "metrics.json"),
                       {"selection": selection,
                        "fame": {c.name: {"eer": eers[c.name], "score_file": c.score_file}
                                 for c in protocol.conditions() if c.model == language}})
    print()
    for language, (epoch, name) in chosen.items():
        print(f"{language} model: epoch {epoch} of {trainers[language].epoch}, selected on its validation "
              f"split ({os.path.join(out, language, name)})")
    baseline, label = baseline_for(protocol, version)
    print()
    print(fame.format_table(protocol.conditions(), eers, baseline, label))
    if all(v is None for v in eers.values()):
        print("(no labels: EERs are not computed; --labels DIR gives them)")
    else:
        print("(EER %, exact from the ROC of the L2 distances; lower distance = same person)")
    print(f"\nwrote {', '.join(os.path.join(out, n) for n in written)}")
    print(f"total time {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    sys.exit(run(main, PROG))
