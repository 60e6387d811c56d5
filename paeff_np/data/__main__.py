"""Command line of the data package.

    python -m paeff_np.data synth --out DIR [--seed S] [--identities N] [--test-rows N]

writes the synthetic world (`paeff_np.data.synth`) as FOP CSV files in DIR, one line
per file written. Errors are one line on stderr and exit status 2. Existing files
are never overwritten: if DIR holds any of them, nothing is written.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ..usage import ArgumentParser
from .dataset import test_file_names, train_file_names
from .synth import csv_bytes, make_world, save_dir


def _file_names(dataset):
    """The names ``save_dir`` writes for ``dataset``."""
    names = list(train_file_names())
    for key in dataset.tests:
        names += test_file_names(*key.split("/"))
    return names


PROG = "python -m paeff_np.data synth"


def build_parser():
    parser = ArgumentParser(prog="python -m paeff_np.data", description="Face-voice data tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    synth = commands.add_parser(
        "synth",
        help="write the synthetic face-voice world as FOP CSV files",
        description="Write the synthetic face-voice world (paeff_np.data.synth) as FOP CSV files: "
        "faceTrain.csv, voiceTrain.csv and the face_/voice_veriflist_test_{kind}_{split}.csv lists.",
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing; never overwritten)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--identities", type=int, default=300, metavar="N",
                       help="identities in all, a third of them unseen (default 300)")
    synth.add_argument("--test-rows", type=int, default=1000, metavar="N",
                       help="rows of every test list, an even number (default 1000)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.out:
        print(f"{PROG}: error: --out is empty: give the folder to write", file=sys.stderr)
        return 2
    try:
        world = make_world(args.identities, seed=args.seed, test_rows=args.test_rows)
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted before any file was written", file=sys.stderr)
        return 130
    dataset = world.dataset
    for name in _file_names(dataset):       # never overwrite: refused before writing anything
        if (Path(args.out) / name).exists():
            print(f"{PROG}: error: {Path(args.out) / name} already exists: choose another --out", file=sys.stderr)
            return 2

    def report(path):
        print(f"wrote {path}", flush=True)

    folder = Path(args.out)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    needed, free = csv_bytes(dataset), shutil.disk_usage(folder).free if folder.is_dir() else None
    if free is not None and needed > free:
        print(f"{PROG}: error: the files need about {needed / 2**30:,.1f} GiB, more than the "
              f"{free / 2**30:,.1f} GiB free in {folder}: choose fewer identities or test rows", file=sys.stderr)
        return 2
    try:
        paths = save_dir(dataset, args.out, report=report)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; the files it had written are removed, so the same "
              f"command can run again", file=sys.stderr)
        return 130
    except FileExistsError as error:
        print(f"{PROG}: error: {error.filename} already exists; choose another --out (nothing was written)",
              file=sys.stderr)
        return 2
    except OSError as error:
        reason = error.strerror or str(error)
        where = error.filename if error.filename is not None else args.out
        print(f"{PROG}: error: cannot write {where}: {reason}", file=sys.stderr)
        return 2
    train = dataset.train
    print(f"{len(paths)} files in {args.out}: {len(train)} training pairs of {train.n_classes} identities, "
          f"{len(dataset.tests)} test lists of {len(next(iter(dataset.tests.values())))} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
