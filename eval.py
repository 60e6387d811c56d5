"""Evaluate a trained checkpoint: verification (EER/AUC, exact and official
protocol) and cross-modal matching (n_c = 2…10, both directions).

Given a run folder, it evaluates the model the run reports: ``best.npz``
when the run keeps one (the refit's model, or the one selected on the split),
else ``checkpoint.npz``; it says which file it used. ``--checkpoint`` may name
either file. ``--curves PNG`` draws the run's training curves from its
``metrics.jsonl`` instead (no test list is read).

    python eval.py --checkpoint runs/20261125-101500
    python eval.py --checkpoint runs/x/checkpoint.npz --data-dir feats/ --json
    python eval.py --checkpoint runs/x --plot plots/
    python eval.py --checkpoint runs/x --scores scores.txt          # every trial's distance
    python eval.py --checkpoint fame/English --faces F.csv --voices V.csv --trials L.txt --scores S.txt
    python eval.py --checkpoint runs/x --curves curves.png
"""
import paeff_np  # noqa: F401  first: a Ctrl-C while the rest is imported is one line
import json
import os
import sys
import time

import numpy as np

from paeff_np.run import checkpoint as ckpt
from paeff_np.backend import array_module, to_device
from paeff_np.run.atomic import lock_holder, write_atomically
from paeff_np.run.cli import check_can_create_in, check_widths, device_flag, load_data, run
from paeff_np.usage import ArgumentParser, UsageError
from paeff_np.data import DataError
from paeff_np.fame.protocol import format_scores, read_test_features, read_trial_list
from paeff_np.run.evaluation import (DIRECTION_LABELS, evaluate, format_results, l2_scores, list_name,
                                     protocol_notes)
from paeff_np.run.training import BEST_NAME, METRICS_LOG, REFIT_DIR, checkpoint_selection, checkpoint_settings

PLOT_FILES = ("roc_seenheard.png", "roc_unseenunheard.png", "matching.png")   # what plot() writes
from paeff_np.run.validate import validate_hyperparameters


def parse_args(argv):
    p = ArgumentParser(prog="eval.py", description="Evaluate a PAEFF checkpoint on face–voice test lists.")
    p.add_argument("--checkpoint", required=True, help="run folder (its selected model: best.npz "
                   "when it has one), or a checkpoint.npz or best.npz")
    p.add_argument("--data-dir", help="folder with face_/voice_veriflist_test_*.csv; default: the "
                   "data folder or synthetic world the checkpoint was trained on")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="DIR", help="write ROC curves and the matching curve as PNGs")
    p.add_argument("--curves", metavar="PNG", help="draw the run's training curves (the loss terms, "
                   "the validation EERs, the selected epoch; from its metrics.jsonl) into PNG and stop: "
                   "no test list is evaluated")
    p.add_argument("--seed", type=int, default=0, help="seed of the matching galleries")
    p.add_argument("--scores", metavar="FILE", help="write the score of every trial, '<id> <L2 distance>' "
                   "per line (the FAME submission's format); ids '<split>/<kind>/<row>' for the test lists, "
                   "or those of --trials (a new file: never overwritten)")
    p.add_argument("--faces", metavar="CSV", help="with --voices: one unlabelled list of paired rows "
                   "(row i of both files is trial i), scored instead of the test lists; needs --scores")
    p.add_argument("--voices", metavar="CSV")
    p.add_argument("--trials", metavar="LIST", help="a FAME trial list ('<id> <voice path> <face path>' "
                   "per line, row i = trial i) naming the rows of --faces/--voices (default: 0, 1, ...)")
    device_flag(p)
    return p.parse_args(argv)


def check_scores_flags(args):
    """--faces and --voices go together and need --scores; --trials needs them; FILE is new."""
    if (args.faces is None) != (args.voices is None):
        raise UsageError("--faces and --voices go together: give both CSV files of the list")
    if args.trials is not None and args.faces is None:
        raise UsageError("--trials names the rows of --faces/--voices: give those too")
    if args.faces is not None and args.scores is None:
        raise UsageError("--faces/--voices give a list without labels, which has no EER: give "
                         "--scores FILE to write its scores")
    if args.faces is not None and (args.data_dir is not None or args.plot or args.json):
        raise UsageError("--faces/--voices score one unlabelled list: drop --data-dir, --plot and --json")
    if args.scores is not None:
        if os.path.exists(args.scores):
            raise UsageError(f"--scores {args.scores}: already exists: choose another file")
        check_can_create_in(os.path.dirname(os.path.abspath(args.scores)), f"--scores {args.scores}")


def score_unlabelled_list(args, params, buffers, cfg):
    """Score the rows of --faces/--voices (named by --trials) into --scores; no EER: no labels."""
    face, voice = read_test_features(args.faces, args.voices, cfg.face_dim, cfg.voice_dim,
                                     f"the checkpoint {args.checkpoint}")
    ids = read_trial_list(args.trials) if args.trials else [str(i) for i in range(len(face))]
    if len(ids) != len(face):
        raise DataError(f"{args.trials} has {len(ids)} trials but {args.faces} has {len(face)} rows: "
                        f"row i of the list is row i of its CSVs")
    text = format_scores(ids, l2_scores(params, buffers, face, voice, cfg))
    write_atomically(args.scores, lambda f: f.write(text), mode="w")
    return len(ids)


def write_list_scores(path, params, buffers, cfg, tests, keys):
    """Every trial of the test lists ``keys``, ``<split>/<kind>/<row> <L2 distance>``, in that order."""
    text = "".join(format_scores([f"{key}/{row}" for row in range(len(tests[key]))],
                                 l2_scores(params, buffers, tests[key].face, tests[key].voice, cfg))
                   for key in keys)
    write_atomically(path, lambda f: f.write(text), mode="w")


def open_checkpoint(path):
    """``(checkpoint, note)``: the model to evaluate and a line saying which file it is.

    A folder gives the model its run selected: best.npz when it holds the selected
    epoch; checkpoint.npz when that is the epoch selected (a kill between the two
    commits of a save leaves best.npz one selection behind) or the rule is last."""
    if not os.path.isdir(path):
        checkpoint = ckpt.load(path)
        checkpoint_settings(checkpoint)           # its damaged train section is named, as for a folder
        return checkpoint, f"evaluating {checkpoint.path} (epoch {checkpoint.epoch}), the file named"
    run_state = ckpt.load(path)
    rule, epoch = checkpoint_selection(run_state)
    best_path = os.path.join(path, BEST_NAME)
    best = ckpt.load(best_path) if os.path.exists(best_path) else None
    refit = refit_state(path, epoch)
    model = refit_model(refit, best, epoch) if refit is not None else None
    if model is not None:
        model.config = {**model.config, "data": run_state.config["data"]}   # the run's record decides
        return model, (f"evaluating {model.path}: epoch {epoch}, selected by rule {rule} on the split "
                       f"and trained again on every training row (the refit in "
                       f"{os.path.join(path, REFIT_DIR)})")
    if best is not None and best.config.get("refit_of") is not None and refit is None:
        raise ckpt.CheckpointError(f"{best_path} holds a refit's model, but {os.path.join(path, REFIT_DIR)} "
                                   f"holds no refit of epoch {epoch} (was it deleted?)")
    unfinished = ""
    if checkpoint_settings(run_state).refit:
        unfinished = (f"; the refit on all training rows is not finished: this model did not train on "
                      f"the validation rows (python train.py --resume {path} finishes it)")
    if rule != "last" and best is not None:
        ckpt.check_same_run(best, run_state)
        if best.epoch == epoch:
            best.config = {**best.config, "data": run_state.config["data"]}   # the run's record decides
            return best, (f"evaluating {best.path}: epoch {epoch}, selected by rule {rule} "
                          f"({ckpt.CHECKPOINT_NAME} holds epoch {run_state.epoch}){unfinished}")
    if rule != "last" and epoch is not None and epoch != run_state.epoch:
        if not os.path.exists(best_path):
            raise ckpt.CheckpointError(f"{best_path} is missing, but the run selects epoch {epoch} "
                                       f"(rule {rule}), whose model is in neither file "
                                       f"(was {BEST_NAME} deleted?)")
        raise ckpt.CheckpointError(f"{best_path}: the run selects epoch {epoch} (rule {rule}), "
                                   f"which this file does not hold")
    why = "the last epoch" if rule == "last" or epoch is None else f"selected by rule {rule}"
    return run_state, f"evaluating {run_state.path}: epoch {run_state.epoch}, {why}{unfinished}"


def open_consistent(path, pause_s=0.5):
    """``open_checkpoint(path)``; when a folder's files do not agree while a live process
    holds its lock (a run still training: it may commit checkpoint.npz and best.npz
    between two reads), read them once more after ``pause_s``; still at odds, say that
    the run is being written, in one line."""
    try:
        return open_checkpoint(path)
    except ckpt.CheckpointError as first:
        holder = lock_holder(path) if os.path.isdir(path) else None
        if holder is None:
            raise                             # nobody writes the folder: the files are at odds
        time.sleep(pause_s)
        try:
            return open_checkpoint(path)
        except ckpt.CheckpointError:
            raise ckpt.CheckpointError(
                f"{path}: the run is still being written ({holder} holds its lock) and its files "
                f"changed while read ({first}); evaluate it when the run has ended, or name a file "
                f"(--checkpoint {os.path.join(path, ckpt.CHECKPOINT_NAME)})") from None


def refit_state(run_dir, epoch):
    """The loaded checkpoint of ``run_dir``'s refit when it is the refit of ``epoch``
    (the epoch the run selects), else None."""
    path = os.path.join(run_dir, REFIT_DIR, ckpt.CHECKPOINT_NAME)
    if epoch is None or not os.path.exists(path):
        return None
    refit = ckpt.load(path)
    of = refit.config.get("refit_of")
    if not (isinstance(of, dict) and of.get("epoch") == epoch):
        raise ckpt.CheckpointError(f"{path}: not the refit of epoch {epoch}, the epoch the run in "
                                   f"{run_dir} selects (it records refit_of {json.dumps(of)[:60]})")
    return refit


def refit_model(refit, best, epoch):
    """The refit's reported model: best.npz once committed; before that, when the refit's
    checkpoint has reached ``epoch``, that checkpoint (its best.npz commit cut short); a
    refit still short of it is reported on by the split run's model (None here)."""
    if best is not None and best.config.get("refit_of") is not None:
        ckpt.check_same_run(best, refit)
        if best.epoch != epoch:
            raise ckpt.CheckpointError(f"{best.path}: holds the refit's epoch {best.epoch}, the run "
                                       f"selects epoch {epoch}")
        return best
    if refit.epoch == epoch:
        return refit
    return None


def load_tests(args, checkpoint):
    """The test lists of --data-dir, else of the data the checkpoint was trained on."""
    cfg, data = checkpoint.cfg, checkpoint.config["data"]
    data_dir = args.data_dir
    fame = data.get("fame")
    if data_dir is None and isinstance(fame, dict):    # neither its folder nor its world is train.py's
        raise UsageError(f"{checkpoint.path}: the {fame.get('language')} model of a FAME run "
                         f"({fame.get('version')}), whose lists have no labels: score a list with "
                         f"--faces F.csv --voices V.csv [--trials LIST] --scores FILE (the FAME command "
                         f"writes all four), or give --data-dir of a folder in the FOP layout")
    if data_dir is None and data.get("source") == "dir":
        data_dir = data["data_dir"]
        if not os.path.exists(data_dir):
            raise DataError(f"{data_dir}, the data folder recorded in {checkpoint.path}, is missing "
                            f"(moved or deleted?): give its new place with --data-dir")
        print(f"note: evaluating on the test lists of {data_dir}, the data folder recorded in "
              f"the checkpoint (--data-dir chooses another)", file=sys.stderr)
    if data_dir:
        dataset, _ = load_data(data_dir, face_dim=cfg.face_dim, voice_dim=cfg.voice_dim,
                               need_train=False)
    else:
        dataset, _ = load_data(None, data.get("synthetic"))
        check_widths(dataset.train, cfg, "the synthetic world (give --data-dir)")
    if not dataset.tests:
        raise UsageError(f"{data_dir}: no test lists (face_/voice_veriflist_test_<kind>_<split>.csv)")
    return dataset.tests


def check_matplotlib(flag):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"{flag} needs matplotlib: pip install matplotlib") from None


def check_curves_file(png):
    """--curves is refused before any work: without matplotlib, an existing file, or a
    place where no file can be made."""
    check_matplotlib("--curves")
    if not png:
        raise UsageError("--curves is empty: give the name of the PNG to write")
    if os.path.exists(png):
        raise UsageError(f"--curves {png}: already exists: choose another name")
    check_can_create_in(os.path.dirname(os.path.abspath(png)), f"--curves {png}")


def read_log(folder):
    """The records of ``folder``'s metrics.jsonl (a list; empty when there is none)."""
    path = os.path.join(folder, METRICS_LOG)
    try:
        return [json.loads(line) for line in open(path) if line.strip()]
    except FileNotFoundError:
        return []
    except (ValueError, UnicodeDecodeError) as exc:
        raise ckpt.CheckpointError(f"{path}: not a metrics log ({exc})") from None


LOSS_TERMS = (("loss", "total (weighted)", "k-"), ("align", "alignment", "-"), ("opl", "OPL", "-"),
              ("ce", "cross-entropy", "-"))


def draw_curves(path, png):
    """The training curves of the run in ``path`` from its metrics.jsonl: left, the three
    loss terms (unweighted) and the weighted total per epoch, the refit's total dashed;
    right, the validation EER of both parts (and the monitored test EER under rule
    test); the selected epoch marked on both. Returns the PNG's path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    run_state = ckpt.load(folder)
    rule, selected = checkpoint_selection(run_state)
    records = read_log(folder)
    if not records:
        raise UsageError(f"{folder}: no {METRICS_LOG} records: nothing to draw (no epoch has finished)")
    refit = read_log(os.path.join(folder, REFIT_DIR))
    epochs = [r["epoch"] for r in records]
    fig, (loss_ax, eer_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in LOSS_TERMS:
        loss_ax.plot(epochs, [r[key] for r in records], style, marker=".", label=label)
    if refit:
        loss_ax.plot([r["epoch"] for r in refit], [r["loss"] for r in refit], "k--",
                     label="total, refit on all rows")
    loss_ax.set(xlabel="epoch", ylabel="loss (epoch mean)", title="training loss")
    curves = [(f"val/{part}/eer", f"validation, {part} part") for part in ("unseen", "seen")]
    settings = checkpoint_settings(run_state)
    curves.append((f"{settings.monitor}/eer", f"test list {list_name(settings.monitor)}"))
    drawn = 0
    for key, label in curves:
        points = [(r["epoch"], 100 * r[key]) for r in records if r.get(key) is not None]
        if points:
            eer_ax.plot(*zip(*points), marker=".", label=label)
            drawn += 1
    eer_ax.set(xlabel="epoch", ylabel="EER (%)", title="validation EER")
    if not drawn:
        eer_ax.text(0.5, 0.5, "no validation lists in this run", ha="center", va="center",
                    transform=eer_ax.transAxes)
    if selected is not None:
        for ax in (loss_ax, eer_ax):
            ax.axvline(selected, color="tab:red", ls=":", lw=1.2)
        where = "the refit's model reported" if refit else "its model reported"
        loss_ax.plot([], [], color="tab:red", ls=":", label=f"selected: epoch {selected} (rule {rule}; {where})")
        key = {"test": f"{settings.monitor}/eer"}.get(rule, next((k for k, _ in curves[:2]
                                                                 if records[0].get(k) is not None), None))
        if key is not None and records[selected - 1].get(key) is not None:
            eer_ax.plot([selected], [100 * records[selected - 1][key]], "o", color="tab:red", ms=8,
                        mfc="none", mew=2)
    below = dict(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)   # off the data
    loss_ax.legend(**below)
    if drawn:
        eer_ax.legend(**below)
    for ax in (loss_ax, eer_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(f"training curves of {folder}", fontsize=9)
    return _save(fig, png)


def check_plot_folder(out_dir):
    """--plot is refused before evaluating: without matplotlib, or where a plot exists."""
    check_matplotlib("--plot")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--plot {out_dir}: is a file, not a folder: choose a folder for the plots")
    for name in PLOT_FILES:
        if os.path.exists(os.path.join(out_dir, name)):
            raise UsageError(f"{os.path.join(out_dir, name)} already exists: choose another --plot folder")
    check_can_create_in(out_dir, f"--plot {out_dir}")


def plot(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for split in ("seenheard", "unseenunheard"):
        keys = [k for k in results if k.startswith(split + "/")]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(5, 5))
        for k in keys:
            c = results[k]["curves"]
            ax.plot(c["fpr"], c["tpr"], label=f"{k.split('/')[1]} (EER {100 * results[k]['eer']:.1f}%)")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {list_name(split)}")
        ax.legend(loc="lower right")
        written.append(_save(fig, os.path.join(out_dir, f"roc_{split}.png")))
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, r in results.items():
        if k.endswith("/random") and "matching" in r:
            for direction, style in (("voice_to_face", "-o"), ("face_to_voice", "--s")):
                n = sorted(r["matching"][direction])
                ax.plot(n, [100 * r["matching"][direction][i] for i in n], style,
                        label=f"{list_name(k.split('/')[0])} {DIRECTION_LABELS[direction]}")
    n = np.arange(2, 11)
    ax.plot(n, 100 / n, "k:", label="chance")
    ax.set(xlabel="gallery size $n_c$", ylabel="matching accuracy (%)", title="1-of-$n_c$ matching")
    ax.legend()
    written.append(_save(fig, os.path.join(out_dir, "matching.png")))
    return written


def _save(fig, path):
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.curves is not None:
        check_curves_file(args.curves)       # before any work
        print(f"wrote {draw_curves(args.checkpoint, args.curves)}", file=sys.stderr)
        return
    validate_hyperparameters(args)
    device = args.device or "cpu"
    array_module(device)                   # the GPU probe, before the checkpoint and data are read
    if args.plot:
        check_plot_folder(args.plot)
    check_scores_flags(args)
    checkpoint, which_file = open_consistent(args.checkpoint)
    params = {k: to_device(v, device) for k, v in checkpoint.params.items()}
    buffers = {k: to_device(v, device) for k, v in checkpoint.buffers.items()}
    if args.faces is not None:
        n = score_unlabelled_list(args, params, buffers, checkpoint.cfg)
        print(f"note: {which_file}", file=sys.stderr, flush=True)
        print(f"wrote {n} scores to {args.scores} (a list without labels: no EER)")
        return
    tests = load_tests(args, checkpoint)
    for protocol_note in protocol_notes(tests):
        print(protocol_note, file=sys.stderr, flush=True)
    results = evaluate(params, buffers, checkpoint.cfg, tests, seed=args.seed, curves=bool(args.plot))
    written = plot(results, args.plot) if args.plot else []
    for r in results.values():
        r.pop("curves", None)
    print(f"note: {which_file}", file=sys.stderr, flush=True)     # said once it has worked
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"checkpoint {checkpoint.path} (epoch {checkpoint.epoch}, {checkpoint.cfg.fusion}, "
              f"alignment {checkpoint.cfg.alignment})\n")
        print(format_results(results, n_cs_shown=range(2, 11)))
    if args.scores:
        write_list_scores(args.scores, params, buffers, checkpoint.cfg, tests, list(results))
        written.append(args.scores)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run(main, "eval.py"))
