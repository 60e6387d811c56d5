"""The table of ``python -m paeff_np.gradcheck``: run cases, print one row per
checked input, exit 0 only if every row is ok.

    python -m paeff_np.gradcheck                   every op, then the whole loss of each variant
    python -m paeff_np.gradcheck --op gelu         one op (or a family: --op egff, --op loss)
    python -m paeff_np.gradcheck --list            the names
    python -m paeff_np.gradcheck --dtype float32   the float32 backward passes against float64 numerics
    python -m paeff_np.gradcheck --module my.py    your own cases (GRADCHECK_CASES, user.py)
    python -m paeff_np.gradcheck --device cuda     on the GPU, through CuPy
"""
import sys
import time
from typing import NamedTuple

import numpy as np

from ..backend import GPUUnavailable, cupy_module
from ..usage import ArgumentParser
from .cases import CASES, LossCase, select
from .user import UserCaseError, load_cases

PROG = "python -m paeff_np.gradcheck"
HEADER = f"{'op / Config variant':<42} {'input':<52} {'worst error':>11} {'tolerance':>9}  status"


class Row(NamedTuple):
    case: str           # the case's name
    input: str          # the input (op) or parameter (whole loss) the row reports
    error: float        # the checker's worst error (InputCheck.error)
    tolerance: float
    ok: bool


def format_row(row):
    status = "ok" if row.ok else "FAIL"
    return f"{row.case:<42} {row.input:<52} {row.error:>11.1e} {row.tolerance:>9.0e}  {status}"


def check_case(case, xp=np, dtype=np.float64):
    """``(rows, message)`` of one case: one row per checked input, and the
    checker's message when the case failed ("" when it passed). A case whose
    check raises gives one FAIL row that names the exception; a side effect,
    one FAIL row that names it."""
    try:
        report = case.check(xp, dtype)
    except Exception as exc:   # a broken backward must show in the table, not end it
        text = f"raised {type(exc).__name__}: {exc}".splitlines()[0]
        return [Row(case.name, text, float("nan"), case.tolerance, False)], ""
    rows = []
    for key, check in report.inputs.items():
        label = str(key) + (f" ({check.kinks} at kinks)" if check.kinks else "")
        rows.append(Row(case.name, label, check.error, check.tolerance, check.ok))
    for effect in report.side_effects:
        rows.append(Row(case.name, f"side effect: {effect}"[:52], float("nan"), case.tolerance,
                        not report.fail_on_side_effects))
    return rows, ("" if report.ok else f"{case.name}: {report}")


def summarise(rows):
    """One row for a whole-loss case: the parameter with the largest error/tolerance."""
    worst = max(rows, key=lambda r: r.error / r.tolerance if r.error == r.error else np.inf)
    label = f"{worst.input} (worst of {len(rows)})"
    return worst._replace(input=label, ok=all(r.ok for r in rows))


def run(cases, xp=np, dtype=np.float64, out=None, detail=False):
    """Check ``cases`` and print the table to ``out`` as it goes, then the
    checker's message for every failed case. An op prints one row per input;
    a whole-loss case one row (its worst parameter) unless ``detail``;
    ``out`` defaults to ``sys.stdout``. Returns the list of all rows; all
    passed iff every ``row.ok``."""
    out = sys.stdout if out is None else out
    print(HEADER, file=out)
    print("-" * len(HEADER), file=out)
    rows, messages = [], []
    for case in cases:
        case_rows, message = check_case(case, xp, dtype)
        rows.extend(case_rows)
        if message:
            messages.append(message)
        if isinstance(case, LossCase) and not detail and len(case_rows) > 1:
            case_rows = [summarise(case_rows)]
        for row in case_rows:
            print(format_row(row), file=out, flush=True)
    for message in messages:
        print("\n" + message, file=out)
    return rows


def main(argv=None):
    parser = ArgumentParser(prog=PROG, description="Gradient check of every op of paeff_np and of the "
                     "whole loss of each Config variant (or of your own cases, --module): float64 "
                     "finite differences (4th-order stencil, h = 1e-5) against the hand-written "
                     "backward passes.")
    parser.add_argument("--op", metavar="NAME",
                        help="one case (e.g. gelu, loss[default]) or a family (egff, loss)")
    parser.add_argument("--module", metavar="FILE",
                        help="run the cases declared in FILE (GRADCHECK_CASES, see "
                             "paeff_np/gradcheck/user.py) instead of the built-in ones")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="float32: the float32 forward/backward against float64 numerics, with "
                             "a tolerance derived from float32's epsilon")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: run every case on the GPU through CuPy")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args(argv)
    registry = CASES
    if args.module is not None:
        try:
            registry = {case.name: case for case in load_cases(args.module)}
        except UserCaseError as exc:
            print(f"{PROG}: error: --module {exc}", file=sys.stderr)
            return 2
    if args.list:
        print("\n".join(registry))
        return 0
    cases = list(registry.values())
    if args.op is not None:
        cases = select(args.op, registry)
        if not cases:
            families = sorted({n.split('[')[0] for n in registry if '[' in n})
            print(f"{PROG}: error: unknown --op {args.op!r}; valid: {', '.join(registry)}"
                  + (f", or a family: {', '.join(families)}" if families else ""), file=sys.stderr)
            return 2
    xp = np
    if args.device == "cuda":
        try:
            xp = cupy_module()
        except GPUUnavailable as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
    dtype = np.dtype(args.dtype).type
    start = time.perf_counter()
    with np.errstate(all="ignore"):   # a float32 run may overflow in the tails; the table shows it
        rows = run(cases, xp, dtype, detail=len(cases) == 1)
    failed = list(dict.fromkeys(r.case for r in rows if not r.ok))   # in table order
    seconds = time.perf_counter() - start
    named = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    print(f"\n{len(cases)} cases, {len(rows)} inputs checked in {seconds:.1f} s on "
          f"{args.device} in {args.dtype}: "
          + (f"{len(failed)} of {len(cases)} cases FAIL: {named}" if failed else "all ok"))
    if dtype is np.float32:
        print("float32: each float32 forward/backward against float64 differences at the same values, "
              "tolerance 64·ε₃₂·κ (κ: the cancellation measured); the whole loss without dropout "
              "(its mask depends on the dtype)")
    return 1 if failed else 0
