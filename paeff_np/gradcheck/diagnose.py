"""What a failed gradient check says about the entries: where the worst one
is, how many are off, and a hint when the pattern is clear (a constant
ratio, a sign flip, the transposed gradient, only the diagonal, a missing
term)."""
import numpy as np

AGREE = 1e-3        # two figures "agree" for a hint when within this relative distance


def _close(a, b):
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)), 1e-300)
    return float(np.abs(a - b).max(initial=0.0)) <= AGREE * scale


def hints(analytic, numeric, judged, off, shape=None):
    """Patterns of the off entries, as short sentences. ``analytic``,
    ``numeric``, ``judged``, ``off``: flat arrays over the entries checked;
    ``shape``: the input's shape when every entry was checked (the
    transpose and diagonal hints need the whole array)."""
    found = []
    a, n = analytic[judged], numeric[judged]
    big = np.abs(n) > 0.1 * np.abs(n).max(initial=0.0)
    if big.sum() >= 2:
        ratio = a[big] / n[big]
        c = float(np.median(ratio))
        if np.abs(ratio - c).max() <= AGREE * abs(c) and abs(c - 1.0) > AGREE:
            if abs(c + 1.0) <= AGREE:
                found.append("sign flip: analytic = −numeric on every entry")
            elif abs(c) > AGREE:
                found.append(f"constant ratio: analytic ≈ {c:.4g} × numeric on every entry "
                             f"(a missing or extra factor of {c:.4g}?)")
    if not found and _close(analytic[off], -numeric[off]) and np.abs(numeric[off]).max() > 0:
        found.append(f"sign flip on the {int(off.sum())} off entries: analytic = −numeric there")
    if shape is not None and len(shape) == 2 and shape[0] == shape[1] and shape[0] > 1:
        A, N = analytic.reshape(shape), numeric.reshape(shape)
        J = judged.reshape(shape)
        if J.all() and _close(A, N.T):
            found.append("agrees with the transposed gradient: return the transpose (.T)")
        diagonal = np.eye(shape[0], dtype=bool)
        if off.reshape(shape)[~diagonal].sum() == 0 and off.reshape(shape)[diagonal].any():
            found.append("wrong only on the diagonal (i == j): a term of the i == j case "
                         "(a Kronecker δ) missing or extra?")
    zero = off & (analytic == 0) & (numeric != 0)
    if zero.any() and zero.sum() == off.sum():
        found.append(f"analytic is exactly 0 on all {int(off.sum())} off entries where numeric is "
                     f"not: a missing term, or a mask that drops them?")
    if shape is not None and len(shape) >= 2 and 0 < off.sum() < off.size:
        where = np.argwhere(off.reshape(shape))
        for axis, label in ((0, "row"), (len(shape) - 1, "column")):
            if len(where) > 1 and (where[:, axis] == where[0, axis]).all():
                found.append(f"off only in {label} {int(where[0, axis])} (index {axis} = "
                             f"{int(where[0, axis])})")
    return found


def describe_input(check):
    """The lines of one input in the report's message."""
    name = f"input {check.key!r}, shape {tuple(check.shape)}"
    if check.ok:
        extra = f", {check.kinks} entries at kinks not judged" if check.kinks else ""
        if check.resolution > check.tolerance:
            extra += (f"; resolved to {check.resolution:.0e} of the gradient's scale (the outputs' "
                      f"rounding), not to the tolerance")
        line = f"  {name}: ok, error {check.error:.1e} <= {check.tolerance:.1e}{extra}"
        return line + (f"\n    {check.note}" if check.note.startswith("zero to rounding") else "")
    if check.error > check.tolerance:
        lines = [f"  {name}: FAIL, error {check.error:.1e} > tolerance {check.tolerance:.1e}"]
    else:
        lines = [f"  {name}: FAIL, not judged (error {check.error:.1e} where it could be judged)"]
    if check.checked:
        lines.append(f"    {check.off} of {check.checked} entries checked are off"
                     + (f"; {check.kinks} at kinks, not judged" if check.kinks else ""))
    if check.worst is not None and check.off:
        idx, a, n = check.worst
        lines.append(f"    worst entry {list(idx)}: analytic {a:.6g}, numeric {n:.6g}")
    if check.directions:
        lines.append(f"    directional errors (|⟨a,v⟩ − d| / ‖a‖₂, random v): "
                     + ", ".join(f"{e:.1e}" for e in check.directions))
    if check.directions and check.checked and not check.off and max(check.directions) > check.tolerance:
        lines.append("    the directions fail while the sampled entries pass: the error sits on a few "
                     "entries (or is small everywhere); check without fast=True to locate it")
    if check.inconclusive_directions:
        lines.append(f"    {check.inconclusive_directions} directions crossed kinks everywhere: not judged")
    lines += [f"    hint: {h}" for h in check.hints]
    if check.note:
        lines.append(f"    {check.note}")
    return "\n".join(lines)
