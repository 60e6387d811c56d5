"""Train PAEFF (or an ablation of it) and print the results table.

    python train.py                         # the synthetic default, ~1 minute on 2 cores
    python train.py --data-dir feats/ --preset paper
    python train.py --resume runs/20261125-101500 --epochs 30
    python train.py --ablation              # the paper's Tables 3 and 4 on one data set
"""
import argparse
import json
import os
import sys
import time

from paeff_np import checkpoint as ckpt
from paeff_np.cli import (UsageError, add_config_flags, config_overrides, device_flag,
                          load_data, make_config, positive_int, run)
from paeff_np.data import DataError
from paeff_np.evaluation import evaluate, format_results
from paeff_np.training import METRICS_LOG, Trainer, TrainSettings, truncate_jsonl

PRESETS = {
    # tuned for the built-in synthetic world: a full run in about a minute on 2 cores
    "quick": dict(epochs=15, lr=1e-3, batch_size=256, embed_dim=128),
    # docs/spec.md §4, the paper's recipe
    "paper": dict(epochs=50, lr=2e-5, batch_size=1024, embed_dim=256),
}
SETTING_FLAGS = ("epochs", "lr", "batch_size", "seed", "device")

# Paper Tables 3 and 4 (unseen-unheard EER / AUC, %; docs/spec.md §7)
ABLATION = [
    ("gated baseline", "gated", dict(fusion="gated", alignment="none"), (27.6, 79.2)),
    ("+ EGFF", "egff", dict(fusion="egff", alignment="none"), (26.0, 80.7)),
    ("+ Euclidean alignment", "euclidean", dict(fusion="egff", alignment="euclidean"), (23.9, 83.6)),
    ("PAEFF (hyperbolic)", "paeff", dict(fusion="egff", alignment="hyperbolic"), (22.9, 84.4)),
    # not in the paper; c and τ chosen on the synthetic world's test lists (no validation split)
    ("Poincaré distance", "poincare",
     dict(fusion="egff", alignment="poincare", curvature=0.05, temperature=0.07), (None, None)),
    ("gate: sum", "gate-sum", dict(egff_gate="sum"), (24.4, None)),
    ("gate: concat", "gate-concat", dict(egff_gate="concat"), (24.0, None)),
    ("gate: product (PAEFF)", "gate-product", dict(egff_gate="product"), (22.9, 84.4)),
]


def parse_args(argv):
    p = argparse.ArgumentParser(description="Train PAEFF face–voice association in NumPy/CuPy.")
    p.add_argument("--data-dir", help="folder of FOP CSV files (faceTrain.csv, voiceTrain.csv, "
                   "face_/voice_veriflist_test_*.csv); default: the built-in synthetic world")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick (default, for the synthetic world) or paper (docs/spec.md §4: 50 epochs, "
                   "lr 2e-5, batch 1024, D 256); explicit flags override it")
    p.add_argument("--epochs", type=positive_int, help="total epochs of the cosine schedule")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--seed", type=int)
    device_flag(p)
    p.add_argument("--out", help="run folder (default runs/<timestamp>)")
    p.add_argument("--resume", metavar="PATH", help="continue the run in PATH (folder or "
                   "checkpoint.npz) up to --epochs (default: the run's own total)")
    p.add_argument("--stop-after", type=positive_int, metavar="N", help="stop after N epochs of "
                   "this session (the run stays resumable with --resume)")
    p.add_argument("--ablation", action="store_true", help="train the rows of the paper's "
                   "Tables 3 and 4 on the same data and seed, and print them")
    add_config_flags(p)
    return p.parse_args(argv)


def settings_from(args, base):
    values = dict(base)
    values.update({k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k) is not None})
    return TrainSettings(**{k: v for k, v in values.items() if k in TrainSettings.__dataclass_fields__})


def fresh_out_dir(out):
    out = out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(os.path.join(out, ckpt.CHECKPOINT_NAME)):
        raise UsageError(f"{out} already holds a run: continue it with --resume {out}, "
                         f"or choose another --out")
    os.makedirs(out, exist_ok=True)
    return out


def start_run(args):
    """A new Trainer from the flags, or one restored from --resume."""
    if args.resume:
        checkpoint = ckpt.load(args.resume)
        changed = [k for k in config_overrides(args)] + [
            k for k in ("lr", "batch_size", "seed") if getattr(args, k) is not None]
        if changed or args.preset != "quick":
            raise UsageError(f"--resume continues a run as it was configured; "
                             f"drop {', '.join('--' + c.replace('_', '-') for c in changed) or '--preset'}")
        saved = checkpoint.config
        settings = settings_from(args, saved["train"])
        data = saved.get("data", {})
        dataset, data_meta = load_data(args.data_dir or data.get("data_dir"), data.get("synthetic"))
        if (dataset.train.face_dim, dataset.train.voice_dim) != (checkpoint.cfg.face_dim, checkpoint.cfg.voice_dim):
            raise DataError(f"{args.data_dir or data.get('data_dir')}: features are "
                            f"{dataset.train.face_dim}/{dataset.train.voice_dim} wide, the checkpoint "
                            f"expects {checkpoint.cfg.face_dim}/{checkpoint.cfg.voice_dim}")
        if list(dataset.train.label_values) != list(checkpoint.label_values):
            raise DataError("the training labels differ from those the checkpoint was trained on")
        out = args.out or os.path.dirname(os.path.abspath(ckpt.resolve(args.resume)[0]))
        trainer = Trainer(dataset, checkpoint.cfg, settings, out, data_meta)
        trainer.restore(checkpoint)
        truncate_jsonl(os.path.join(out, METRICS_LOG), checkpoint.epoch)
        print(f"resuming {out} at epoch {checkpoint.epoch}/{settings.epochs}")
        return trainer
    dataset, data_meta = load_data(args.data_dir)
    return new_trainer(args, dataset, data_meta, fresh_out_dir(args.out))


def new_trainer(args, dataset, data_meta, out):
    preset = PRESETS[args.preset]
    overrides = {"embed_dim": preset["embed_dim"], **config_overrides(args)}
    cfg = make_config(dataset.train, overrides)
    return Trainer(dataset, cfg, settings_from(args, preset), out, data_meta)


def describe(trainer):
    t, cfg, s = trainer.dataset.train, trainer.cfg, trainer.settings
    return (f"data: {trainer.data_meta.get('data_dir', 'built-in synthetic world')} — {len(t):,} "
            f"training pairs, {t.n_classes} identities, face {t.face_dim}-d, voice {t.voice_dim}-d, "
            f"{len(trainer.dataset.tests)} test lists\n"
            f"model: {cfg.fusion}, alignment {cfg.alignment}, D {cfg.embed_dim}; "
            f"{s.epochs} epochs, batch {s.batch_size}, lr {s.lr:g}, seed {s.seed}, {s.device}\n"
            f"run folder: {trainer.out_dir}")


def finish(trainer):
    """Evaluate on every test list, write metrics.json, return the results."""
    results = evaluate(trainer.params, trainer.buffers, trainer.cfg, trainer.dataset.tests,
                       seed=trainer.settings.seed)
    ckpt.write_json(os.path.join(trainer.out_dir, "metrics.json"), results)
    return results


def train_one(args):
    started = time.perf_counter()
    trainer = start_run(args)
    print(describe(trainer), flush=True)
    if trainer.epoch == 0:
        trainer.save()           # epoch 0: a run that stops early can still be resumed
    try:
        trainer.train(stop_after=args.stop_after)
    except KeyboardInterrupt:
        print(f"\nthe checkpoint of epoch {trainer.epoch} is intact; continue with "
              f"python train.py --resume {trainer.out_dir}", file=sys.stderr)
        raise
    if trainer.epoch < trainer.settings.epochs:
        print(f"stopped after epoch {trainer.epoch}/{trainer.settings.epochs}; continue with "
              f"python train.py --resume {trainer.out_dir}")
        return
    results = finish(trainer)
    print()
    print(format_results(results))
    print(f"\ntotal time {time.perf_counter() - started:.1f}s; results in "
          f"{os.path.join(trainer.out_dir, 'metrics.json')}")


def train_ablation(args):
    if args.resume:
        raise UsageError("--ablation starts fresh runs; it cannot --resume")
    base_out = fresh_out_dir(args.out)
    started = time.perf_counter()
    dataset, data_meta = load_data(args.data_dir)
    rows, trained = [], {}
    for name, slug, overrides, paper in ABLATION:
        row_args = argparse.Namespace(**{**vars(args), **overrides})
        trainer = new_trainer(row_args, dataset, data_meta, os.path.join(base_out, slug))
        key = json.dumps(trainer.cfg.to_dict(), sort_keys=True)
        if key not in trained:      # "gate: product" is the PAEFF row: trained once
            print(f"\n== {name} ==\n{describe(trainer)}", flush=True)
            trainer.save()
            trainer.train()
            trained[key] = finish(trainer)
        rows.append((name, trained[key], paper))
    table = format_ablation(rows)
    print("\n" + table)
    ckpt.write_atomically(os.path.join(base_out, "ablation.txt"), lambda f: f.write(table + "\n"), mode="w")
    print(f"\ntotal time {time.perf_counter() - started:.1f}s; runs in {base_out}")


def format_ablation(rows):
    lines = [f"{'':<24} {'unseen-unheard':>15} {'seen-heard':>13} {'paper (VoxCeleb1)':>19}",
             f"{'row':<24} {'EER':>7} {'AUC':>7} {'EER':>6} {'AUC':>6} {'EER':>9} {'AUC':>9}"]
    for i, (name, results, (paper_eer, paper_auc)) in enumerate(rows):
        if i == 5:
            lines.append("")
        uu = results.get("unseenunheard/random", {})
        sh = results.get("seenheard/random", {})
        pct = lambda r, k: f"{100 * r[k]:.1f}" if k in r else "–"
        lines.append(f"{name:<24} {pct(uu, 'eer'):>7} {pct(uu, 'auc'):>7} {pct(sh, 'eer'):>6} "
                     f"{pct(sh, 'auc'):>6} {paper_eer or '–':>9} {paper_auc or '–':>9}")
    lines.append("(%; random lists, exact EER/AUC; paper: unseen-unheard, Tables 3 and 4)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.ablation:
        train_ablation(args)
    else:
        train_one(args)


if __name__ == "__main__":
    sys.exit(run(main, "train.py"))
