"""Evaluate a trained checkpoint: verification (EER/AUC, exact and official
protocol) and cross-modal matching (n_c = 2…10, both directions).

Given a run folder, it evaluates the model the run selected: ``best.npz``
when the run keeps one (``--select val`` or ``test``), else ``checkpoint.npz``;
it says which file it used. ``--checkpoint`` may name either file.

    python eval.py --checkpoint runs/20261125-101500
    python eval.py --checkpoint runs/x/checkpoint.npz --data-dir feats/ --json
    python eval.py --checkpoint runs/x --plot plots/
    python eval.py --checkpoint runs/x --scores scores.txt          # every trial's distance
    python eval.py --checkpoint fame/English --faces F.csv --voices V.csv --trials L.txt --scores S.txt
"""
import json
import os
import sys

import numpy as np

from paeff_np.run import checkpoint as ckpt
from paeff_np.backend import array_module, to_device
from paeff_np.run.atomic import write_atomically
from paeff_np.run.cli import check_can_create_in, check_widths, device_flag, load_data, run
from paeff_np.usage import ArgumentParser, UsageError
from paeff_np.data import DataError
from paeff_np.fame.protocol import format_scores, read_test_features, read_trial_list
from paeff_np.run.evaluation import DIRECTION_LABELS, evaluate, format_results, l2_scores, protocol_notes
from paeff_np.run.training import BEST_NAME, checkpoint_selection, checkpoint_settings

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
    if rule != "last" and os.path.exists(best_path):
        best = ckpt.load(best_path)
        ckpt.check_same_run(best, run_state)
        if best.epoch == epoch:
            best.config = {**best.config, "data": run_state.config["data"]}   # the run's record decides
            return best, (f"evaluating {best.path}: epoch {epoch}, selected by rule {rule} "
                          f"({ckpt.CHECKPOINT_NAME} holds epoch {run_state.epoch})")
    if rule != "last" and epoch is not None and epoch != run_state.epoch:
        if not os.path.exists(best_path):
            raise ckpt.CheckpointError(f"{best_path} is missing, but the run selects epoch {epoch} "
                                       f"(rule {rule}), whose model is in neither file "
                                       f"(was {BEST_NAME} deleted?)")
        raise ckpt.CheckpointError(f"{best_path}: the run selects epoch {epoch} (rule {rule}), "
                                   f"which this file does not hold")
    why = "the last epoch" if rule == "last" or epoch is None else f"selected by rule {rule}"
    return run_state, f"evaluating {run_state.path}: epoch {run_state.epoch}, {why}"


def load_tests(args, checkpoint):
    """The test lists of --data-dir, else of the data the checkpoint was trained on."""
    cfg, data = checkpoint.cfg, checkpoint.config["data"]
    data_dir = args.data_dir
    if data_dir is None and data.get("source") == "dir":
        data_dir = data["data_dir"]
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


def check_plot_folder(out_dir):
    """--plot is refused before evaluating: without matplotlib, or where a plot exists."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
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
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {split}")
        ax.legend(loc="lower right")
        written.append(_save(fig, os.path.join(out_dir, f"roc_{split}.png")))
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, r in results.items():
        if k.endswith("/random") and "matching" in r:
            for direction, style in (("voice_to_face", "-o"), ("face_to_voice", "--s")):
                n = sorted(r["matching"][direction])
                ax.plot(n, [100 * r["matching"][direction][i] for i in n], style,
                        label=f"{k.split('/')[0]} {DIRECTION_LABELS[direction]}")
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
    validate_hyperparameters(args)
    device = args.device or "cpu"
    array_module(device)                   # the GPU probe, before the checkpoint and data are read
    if args.plot:
        check_plot_folder(args.plot)
    check_scores_flags(args)
    checkpoint, which_file = open_checkpoint(args.checkpoint)
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
