"""Finite differences against hand-written backward passes, for any
forward/backward pair or the whole loss: a wrong gradient fails loudly.

Three entry points, one engine::

    check_layer(forward, backward, inputs, settings={...})   a pair of the op protocol (layers.py)
    check_op(forward, backward, inputs)                      any pair: forward(*inputs) -> array(s)
    gradcheck(fun, inputs, analytic)                         any scalar fun() against given gradients

Each raises ``GradientCheckError`` (an ``AssertionError``) with a message
naming every failing input, its worst entry, how many entries are off and a
hint when the pattern is clear; ``raises=False`` returns the
``GradientReport`` instead (``report.ok``, ``report.errors``). Options:

- ``tol``: the accepted error, ``TOLERANCE`` (1e-7) in float64;
- ``fast=True``: random directional derivatives plus a random sample of
  entries, for inputs of millions of entries;
- ``dtype=np.float32``: the float32 forward/backward that trains, against
  float64 numerics, with a tolerance derived from float32's ε;
- ``h``: the step (1e-5), ``seed``: the random weights and samples.

How the numbers are made (docs/math.md Appendix A has the analysis):

- The derivative is the fourth-order central stencil
  ``(−o(x+2h) + 8o(x+h) − 8o(x−h) + o(x−2h)) / 12h``, taken on every
  **output entry first** and only then contracted with the random weights
  ``R`` (``L = Σ R ⊙ out``), so that rounding is that of the outputs that
  move, not of a large sum.
- The **noise floor** of an entry is ``NOISE_SAFETY · ε · ‖R ⊙ |o|‖₂ / h``
  over the outputs that moved (over all outputs when none moved), plus the
  rounding of the step itself: below
  it nothing can be judged, so an entry's error is measured against
  ``max(scale, noise / tol)``, with ``scale`` the largest gradient entry.
  A gradient that is exactly zero is judged against that floor.
- A **kink** (ReLU at 0, |x| at 0, a clamp) between ``x − 2h`` and
  ``x + 2h`` shows as one-sided differences that disagree: the left and
  right second-order slopes have the same h² error on a smooth function, so
  their difference is rounding plus O(h³); beyond the allowance the entry is
  reported as at a kink and not judged.
- Side effects are checked: the forward must leave its inputs alone and give
  the same output twice; the backward gets a copy of ``dout``, must leave it
  alone and give the same gradients twice.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..backend import get_array_module, to_host
from .diagnose import describe_input, hints

STENCIL = ((2, -1.0), (1, 8.0), (-1, -8.0), (-2, 1.0))   # (offset in h, weight / 12h)
STEP = 1e-5                 # the default h
TOLERANCE = 1e-7            # the error accepted in float64
NOISE_SAFETY = 32.0         # the forward's rounding, as a multiple of ε|out| per moved output
FLOAT32_SAFETY = 64.0       # float32 rounding steps allowed in series in a forward + backward
DIRECTIONS = 4              # fast mode: random directional derivatives per input
SAMPLES = 32                # fast mode: entries checked one by one per input
MIN_JUDGED = 0.5            # an input fails when kinks leave fewer than this share of entries judged
RESOLUTION_LIMIT = 1e-4     # an input fails when its noise floor exceeds this share of the check's gradient scale
ZERO_NOISE_RATIO = 2.0      # numerics are rounding noise when the kink test's disagreement is >= 1/2 of them
EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
SIDE_EFFECTS = ("fail", "report")


class GradientCheckError(AssertionError):
    """A gradient check failed; ``.report`` is the ``GradientReport``."""

    def __init__(self, report):
        super().__init__(str(report))
        self.report = report


@dataclass
class InputCheck:
    """The verdict on one input.

    ``error``: the worst error found, ``|analytic − numeric|`` measured
    against ``max(scale, noise / tolerance)`` (entries) or ``max(‖a‖₂,
    noise / tolerance)`` (directions); ``ok`` iff ``error ≤ tolerance`` and
    enough entries were judged. ``worst``: ``(index, analytic, numeric)`` of
    the worst entry; ``off``: entries above the tolerance; ``kinks``:
    entries not judged because the stencil crosses a kink; ``directions``:
    the directional errors (fast mode); ``hints``: patterns in the off
    entries."""
    key: Any
    shape: tuple
    error: float
    tolerance: float
    ok: bool
    checked: int                      # entries checked one by one
    off: int = 0
    kinks: int = 0
    worst: Optional[tuple] = None
    directions: list = field(default_factory=list)
    inconclusive_directions: int = 0
    hints: list = field(default_factory=list)
    note: str = ""                    # why a check failed without an error figure, or how its tolerance came about
    scale: float = 0.0                # the largest |analytic| or |numeric| entry checked
    noise: float = 0.0                # the largest noise floor of a judged entry
    resolution: float = 0.0           # noise / the check's largest scale: the smallest relative error it can see


@dataclass
class GradientReport:
    """Everything a check found. ``ok``: every input passed and no side effect
    was found (or ``side_effects="report"``); ``errors``: ``{input: error}``;
    ``str(report)`` is the message ``GradientCheckError`` carries."""
    inputs: dict
    side_effects: list
    method: str
    fail_on_side_effects: bool = True

    @property
    def ok(self):
        return all(c.ok for c in self.inputs.values()) and bool(self.inputs) and not (
            self.side_effects and self.fail_on_side_effects)

    @property
    def errors(self):
        return {k: c.error for k, c in self.inputs.items()}

    def __str__(self):
        lines = [f"gradient check {'ok' if self.ok else 'FAILED'} ({self.method})"]
        lines += [describe_input(c) for c in self.inputs.values()]
        lines += [f"  side effect: {s}" for s in self.side_effects]
        return "\n".join(lines)


# --- the numerics ---------------------------------------------------------------------

def _differences(evaluate, base, move, h):
    """Per output: the 4th-order central difference, the one-sided slope
    disagreement ``right − left`` and the size ``max|o|`` of the entries that
    moved (0 elsewhere), from ``o(t)`` at t = ±h, ±2h; ``move(t)`` sets the
    inputs to ``x₀ + t·v``; ``move(0)`` restores them exactly."""
    outs = {}
    for offset, _ in STENCIL:
        move(offset * h)
        outs[offset] = evaluate()
    move(0.0)
    result = []
    for m, o0 in enumerate(base):
        o2, o1, m1, m2 = (outs[k][m] for k in (2, 1, -1, -2))
        xp = get_array_module(o0)
        d4 = (8.0 * (o1 - m1) - (o2 - m2)) / (12.0 * h)       # outputs differenced first
        right = (4.0 * (o1 - o0) - (o2 - o0)) / (2.0 * h)     # (−3o₀ + 4o₁ − o₂)/2h
        left = (4.0 * (o0 - m1) - (o0 - m2)) / (2.0 * h)      # (3o₀ − 4o₋₁ + o₋₂)/2h
        moved = (o1 != o0) | (m1 != o0) | (o2 != o0) | (m2 != o0)
        size = xp.maximum(xp.maximum(xp.abs(o0), xp.maximum(xp.abs(o1), xp.abs(m1))),
                          xp.maximum(xp.abs(o2), xp.abs(m2)))
        result.append((d4, right - left, xp.where(moved, size, 0.0), right, left, o0))
    return result


def _contract(weights, diffs, h):
    """``(numeric, jump, |J|ᵀ|R| share, noise, reach)`` of one perturbation:
    the differences contracted with ``R``; ``reach``: ``‖R‖₂`` over the
    outputs that moved."""
    numeric = jump = absolute = noise_sq = reach_sq = 0.0
    for w, (d4, step_jump, size, _, _, _) in zip(weights, diffs):
        numeric += float((w * d4).sum())
        jump += float((w * step_jump).sum())
        absolute += float((abs(w) * abs(d4)).sum())
        noise_sq += float(((w * size) ** 2).sum())
        reach_sq += float((w * w * (size != 0)).sum())
    if noise_sq == 0.0:     # no output moved at all: resolved only to the rounding of every output
        noise_sq = sum(float(((w * o0) ** 2).sum()) for w, (*_, o0) in zip(weights, diffs))
        reach_sq = sum(float((w * w).sum()) for w in weights)
    return numeric, jump, absolute, NOISE_SAFETY * EPS64 * math.sqrt(noise_sq) / h, math.sqrt(reach_sq)


def _entry_move(x, idx):
    old = x[idx].item()

    def move(t):
        x[idx] = old + t if t else old
    return move, old


def _check_entries(evaluate, base, weights, x, indices, h):
    """Numeric derivative, one-sided jump, |J|ᵀ|R|, noise and reach of each
    entry in ``indices``, as host float64 arrays."""
    rows = []
    for idx in indices:
        move, old = _entry_move(x, idx)
        numeric, jump, absolute, noise, reach = _contract(weights, _differences(evaluate, base, move, h), h)
        step_noise = EPS64 * abs(old) * abs(numeric) / h          # x + h rounds to ε|x|
        rows.append((numeric, jump, absolute, noise + step_noise, reach))
    return np.array(rows, dtype=np.float64).reshape(len(indices), 5).T


def _check_direction(evaluate, base, weights, x, v, analytic, vjp, key, h, tol):
    """One random directional derivative ``Σ R ⊙ (o(x + t·v))′`` against
    ``⟨a, v⟩``. Outputs whose one-sided slopes disagree (kinks crossed) are
    left out on both sides: the numeric contraction drops them, and the
    analytic side is ``backward`` again with their weights zeroed. Returns
    the error, or None when nothing is left to judge."""
    xp = get_array_module(x)
    x0 = x.copy()
    v_dev = xp.asarray(v)

    def move(t):
        x[...] = x0 + t * v_dev if t else x0
    diffs = _differences(evaluate, base, move, h)
    kinked = [abs(right - left) > NOISE_SAFETY * EPS64 * size / h + tol * (abs(right) + abs(left))
              for _, _, size, right, left, _ in diffs]
    a = analytic
    if any(bool(k.any()) for k in kinked):
        if vjp is None:
            return None
        weights = [xp.where(k, 0.0, w) for w, k in zip(weights, kinked)]
        if not any(bool((w != 0).any()) for w in weights):
            return None
        a = vjp(weights)[key]
    numeric, _, _, noise, _ = _contract(weights, diffs, h)
    noise += EPS64 * float(np.abs(to_host(x0).astype(np.float64) * v * a).sum()) / h
    scale = max(float(np.linalg.norm(a)), noise / tol, 1e-300)
    return abs(float((a * v).sum()) - numeric) / scale


def _zero_within_rounding(analytic, numeric, jump, reach, values, h):
    """Whether a gradient that is zero in exact arithmetic (an output that
    its inputs cancel out of: a sum of centred values) is zero to rounding on
    both sides: every analytic entry, numeric entry and one-sided
    disagreement below the rounding of values of size ``values`` (the
    largest input entry of the check) carried to the moved outputs,
    ``NOISE_SAFETY·ε·values·‖R‖₂/h``, and the disagreement at least
    1/``ZERO_NOISE_RATIO`` of the numeric gradient, as rounding makes it (a
    true gradient, however small, is smooth: its one-sided slopes agree to
    far better than its size). Returns ``(errors / tol, floor)`` or None."""
    floor = NOISE_SAFETY * EPS64 * values * reach / h
    size = float(np.abs(numeric).max(initial=0.0))
    if size == 0.0 or not ((np.abs(analytic) <= floor) & (np.abs(numeric) <= floor)
                           & (np.abs(jump) <= floor)).all() \
            or float(np.abs(jump).max(initial=0.0)) * ZERO_NOISE_RATIO < size:
        return None
    return np.abs(analytic - numeric) / np.maximum(floor, 1e-300), float(floor.max(initial=0.0))


def _judge(key, x, a, evaluate, base, weights, vjp, h, tol, float32, fast, samples, directions, rng,
           floor, values):
    """The ``InputCheck`` of one input; ``floor``: an absolute error always
    allowed (float32: the rounding of the largest gradient of the check);
    ``values``: the largest input entry of the check."""
    n = a.size
    all_entries = not fast or n <= samples
    flat = np.arange(n) if all_entries else np.sort(rng.choice(n, size=samples, replace=False))
    indices = [tuple(int(i) for i in np.unravel_index(f, a.shape)) for f in flat]
    numeric, jump, absolute, noise, reach = _check_entries(evaluate, base, weights, x, indices, h)
    analytic = a.reshape(-1)[flat]
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(numeric).max(initial=0.0)), 1e-300)
    note = ""
    if float32:
        condition = max(1.0, float(absolute.max(initial=0.0)) / scale)
        if tol is None:
            tol = FLOAT32_SAFETY * EPS32 * condition
            note = (f"float32 tolerance {FLOAT32_SAFETY:g}·ε₃₂·κ = {tol:.1e}, κ = "
                    f"max(|J|ᵀ|R|)/max|JᵀR| = {condition:.3g}")
    tol = TOLERANCE if tol is None else tol
    allowance = np.maximum(np.maximum(tol * scale, noise), floor)
    kink = np.abs(jump) > allowance
    judged = ~kink
    if not (np.isfinite(analytic).all() and np.isfinite(numeric).all()):
        errors = np.where(np.isfinite(analytic) & np.isfinite(numeric),
                          np.abs(analytic - numeric) * tol / allowance, np.inf)
    else:
        errors = np.abs(analytic - numeric) * tol / allowance
    errors = np.where(judged, errors, 0.0)
    off = judged & ~(errors <= tol)
    zero = None
    if len(indices) and float(np.abs(a).max(initial=0.0)) <= NOISE_SAFETY * EPS64 * values * \
            float(reach.max(initial=0.0)) / h:
        zero = _zero_within_rounding(analytic, numeric, jump, reach, values, h)
    if zero is not None:    # zero in exact arithmetic: both sides are rounding noise
        errors, zero_floor = zero[0] * tol, zero[1]
        kink, judged = np.zeros_like(kink), np.ones_like(judged)
        off = judged & ~(errors <= tol)
        note = (f"zero to rounding: analytic and numeric gradients at most {zero_floor:.1e}, the "
                f"rounding of values of size {values:.2g} at h = {h:g}; the numeric one is noise")
    check = InputCheck(key, a.shape, float(errors.max(initial=0.0)), tol, True, len(indices),
                       int(off.sum()), int(kink.sum()), note=note, scale=scale,
                       noise=0.0 if zero is not None else float(np.where(judged, noise, 0.0).max(initial=0.0)))
    if len(indices):
        w = int(np.argmax(errors))
        check.worst = (indices[w], float(analytic[w]), float(numeric[w]))
    if fast:
        for _ in range(directions):
            v = rng.standard_normal(a.shape)
            e = _check_direction(evaluate, base, weights, x, v, a, vjp, key, h, tol)
            if e is None:
                check.inconclusive_directions += 1
            else:
                check.directions.append(e)
        check.error = max([check.error] + check.directions)
    judged_share = judged.mean() if len(indices) else 0.0
    check.ok = bool(check.error <= tol) and judged_share >= MIN_JUDGED
    if judged_share < MIN_JUDGED:
        check.note = (f"only {int(judged.sum())} of {len(indices)} entries judged, the others sit at "
                      f"kinks: move the inputs away from them or use a smaller h")
    if off.any():
        check.hints = hints(analytic, numeric, judged, off, a.shape if all_entries else None)
    return check


def relative_error(analytic, numeric, tiny=1e-30):
    """``max|a − n| / max(max|a|, max|n|, tiny)``, the normwise distance of two
    arrays (NumPy or CuPy); ``inf`` when either holds a NaN or an infinity.
    The tests compare arrays with it; the checker's own figure adds the noise
    floor (module docstring; docs/math.md Appendix A)."""
    a = np.asarray(to_host(analytic), dtype=np.float64)
    n = np.asarray(to_host(numeric), dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"gradient shape {a.shape} != expected {n.shape}")
    if not (np.isfinite(a).all() and np.isfinite(n).all()):
        return math.inf
    scale = max(np.abs(a).max(initial=0.0), np.abs(n).max(initial=0.0), tiny)
    return float(np.abs(a - n).max(initial=0.0) / scale)


# --- input checks -----------------------------------------------------------------------

def _check_array(key, x):
    """``x`` must be an array (NumPy or CuPy) of at least one axis."""
    if not hasattr(x, "dtype"):
        raise TypeError(f"gradcheck: input {key!r} is a {type(x).__name__}, not an array "
                        f"(give np.asarray(..., dtype=np.float64))")
    if x.ndim == 0:
        raise TypeError(f"gradcheck: input {key!r} has no axis (a scalar); give an array of at "
                        f"least one axis, e.g. np.array([value])")


def _check_perturbable(key, x):
    """``x`` must be a writeable float64 array with finite entries."""
    _check_array(key, x)
    if x.dtype.kind != "f":
        raise TypeError(f"gradcheck: input {key!r} has dtype {x.dtype}; finite differences need floats")
    if x.dtype != np.float64:
        raise TypeError(f"gradcheck needs float64 inputs; input {key!r} is {x.dtype} (to check a "
                        f"float32 backward against float64 numerics, give float64 inputs and "
                        f"dtype=np.float32)")
    if not getattr(x.flags, "writeable", True):      # (CuPy's arrays are always writeable)
        raise ValueError(f"gradcheck: input {key!r} is read-only; the check perturbs it in place "
                         f"(pass a copy)")
    if not bool(get_array_module(x).isfinite(x).all()):
        raise ValueError(f"gradcheck: input {key!r} holds a NaN or an infinity")


def _check_options(h, tol, side_effects, samples, directions):
    if not (isinstance(h, (int, float)) and h > 0 and math.isfinite(h)):
        raise ValueError(f"gradcheck: the step h must be a positive number, got {h!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"gradcheck: tol must be a positive number, got {tol!r}")
    if side_effects not in SIDE_EFFECTS:
        raise ValueError(f"gradcheck: side_effects must be one of {SIDE_EFFECTS}, got {side_effects!r}")
    for name, value in (("samples", samples), ("directions", directions)):
        if not (isinstance(value, int) and value >= 0):
            raise ValueError(f"gradcheck: {name} must be a whole number >= 0, got {value!r}")


def _host(x):
    return np.array(to_host(x), dtype=np.float64, copy=True)


def _check_gradient(key, g, x):
    """A gradient must be an array of its input's shape: said at once, before
    any difference is taken."""
    if not hasattr(g, "shape"):
        raise TypeError(f"gradcheck: the gradient of input {key!r} is a {type(g).__name__}, not an array")
    if tuple(g.shape) != tuple(x.shape):
        hint = " (its transpose has the right shape: return .T?)" if tuple(g.shape)[::-1] == tuple(x.shape) \
            and len(x.shape) == 2 else ""
        raise ValueError(f"gradcheck: the gradient of input {key!r} has shape {tuple(g.shape)}, the "
                         f"input {tuple(x.shape)}{hint}")


def _run(evaluate, base, weights, inputs, analytic, vjp, side_effects, h, tol, float32, fast,
         samples, directions, seed, method, fail_on_side_effects):
    rng = np.random.default_rng([seed, 0x5A3])
    # float32 rounds an exactly cancelling sum (a bias before a BatchNorm) to ε₃₂ of the sizes
    # summed, which the largest gradient of the check stands for
    floor = FLOAT32_SAFETY * EPS32 * max(float(np.abs(a).max(initial=0.0)) for a in analytic.values()) \
        if float32 else 0.0
    values = max(float(get_array_module(x).abs(x).max()) for x in inputs.values())
    checks = {key: _judge(key, inputs[key], a, evaluate, base, weights, vjp, h, tol, float32, fast,
                          samples, directions, rng, floor, values) for key, a in analytic.items()}
    _resolve(checks, h)
    return GradientReport(checks, side_effects, method, fail_on_side_effects)


def _resolve(checks, h):
    """The resolution of each input: its largest noise floor over the
    largest gradient entry of the whole check. Above ``RESOLUTION_LIMIT``
    the differences cannot see an error of that relative size, and the
    input fails as not resolved instead of passing unseen errors (outputs
    of size 10⁶ whose gradient is 10⁻⁴, say)."""
    scale = max([c.scale for c in checks.values()] + [0.0])
    if scale <= 1e-300:
        return
    for c in checks.values():
        c.resolution = c.noise / scale
        if c.ok and c.resolution > RESOLUTION_LIMIT:
            c.ok = False
            c.note = (f"not resolved: the rounding of the outputs at h = {h:g} hides errors below "
                      f"{c.resolution:.1e} of the gradient's scale {scale:.2g} (limit "
                      f"{RESOLUTION_LIMIT:g}); a larger h (h= option; the truncation error falls "
                      f"as h⁴) or outputs without their large offset would resolve it")


def _method(h, fast, samples, directions, float32):
    parts = ["float32 forward/backward against float64 numerics" if float32 else "float64",
             f"4th-order differences, h = {h:g}"]
    if fast:
        parts.append(f"fast: {directions} directions and {samples} sampled entries per input")
    return ", ".join(parts)


def _finish(report, raises):
    if raises and not report.ok:
        raise GradientCheckError(report)
    return report


# --- the entry points --------------------------------------------------------------------

def gradcheck(fun, inputs, analytic, *, h=STEP, tol=None, fast=False, samples=SAMPLES,
              directions=DIRECTIONS, seed=0, raises=True):
    """Compare given gradients of a scalar with finite differences.

    ``fun()``: a scalar computed from the float64 arrays in the dict
    ``inputs`` (perturbed in place one entry at a time, restored exactly);
    ``analytic``: ``{key: gradient}`` for some or all of those keys. A
    float32 ``analytic`` (the gradient computed in float32 at the float64
    values of ``inputs``) is judged with the float32 tolerance.

    Raises ``GradientCheckError`` naming every failing input; with
    ``raises=False`` returns the ``GradientReport``. ``tol``, ``fast``,
    ``samples``, ``directions``, ``h``, ``seed``: as in ``check_op``.

    Derivation: docs/math.md Appendix A.
    """
    _check_options(h, tol, "fail", samples, directions)
    if not analytic:
        raise ValueError("gradcheck: no gradient to check (from check_op or check_layer: the "
                         "backward returned None for every input, or no_grads skips them all)")
    for key, g in analytic.items():
        if key not in inputs:
            raise ValueError(f"gradcheck: a gradient for {key!r}, which is not one of the inputs "
                             f"{list(inputs)}")
        _check_perturbable(key, inputs[key])
        _check_gradient(key, g, inputs[key])
    float32 = any(np.dtype(g.dtype).itemsize < 8 for g in analytic.values())

    def evaluate():
        return [np.asarray(float(fun()), dtype=np.float64)]
    base = evaluate()
    host = {k: _host(g) for k, g in analytic.items()}
    report = _run(evaluate, base, [np.asarray(1.0)], inputs, host, None, [], h, tol, float32,
                  fast, samples, directions, seed, _method(h, fast, samples, directions, float32), True)
    return _finish(report, raises)


def _names(inputs):
    if hasattr(inputs, "dtype"):
        raise TypeError("gradcheck: inputs is one array; give a list of arrays, e.g. [x]")
    if isinstance(inputs, dict):
        return list(inputs), list(inputs.values())
    inputs = list(inputs)
    return list(range(len(inputs))), inputs


def _as_outputs(outs):
    return list(outs) if isinstance(outs, tuple) else [outs]


def _same(a, b):
    """Bitwise the same values (NaN equal to NaN)."""
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def _changed(before, after):
    """Indices of the arrays that differ."""
    return [i for i, (b, a) in enumerate(zip(before, after)) if not _same(b, a)]


def check_op(forward, backward, inputs, *, no_grads=(), tol=None, fast=False, samples=SAMPLES,
             directions=DIRECTIONS, dtype=np.float64, h=STEP, seed=0, side_effects="fail",
             raises=True):
    """Gradient check of one forward/backward pair.

    ``forward(*inputs)`` returns an array or a tuple of arrays;
    ``backward(douts)`` returns one gradient per input (None where an input
    is not differentiable), ``douts`` matching the forward's outputs (one
    array, or a tuple). ``inputs``: a list of float64 arrays, or a dict
    ``{name: array}`` (passed in order; the names appear in the messages).
    The scalar checked is ``L = Σ_k ⟨R_k, out_k⟩`` with fixed random
    ``R_k``, whose gradient with respect to ``out_k`` is ``R_k``: the
    backward, called with ``dout = R``, must return ``JᵀR``.

    - ``no_grads``: indices (or names) of inputs not to check.
    - ``tol``: the accepted error (default ``TOLERANCE``, 1e-7; in float32
      ``FLOAT32_SAFETY·ε₃₂·κ``, κ the cancellation ``max(|J|ᵀ|R|)/max|JᵀR|``
      measured by the differences).
    - ``fast=True``: per input, ``directions`` random directional
      derivatives (error ``|⟨a,v⟩ − d| / ‖a‖₂``, which estimates
      ``‖a − g‖₂/‖a‖₂`` whatever the size) and ``samples`` random entries
      checked one by one (they name the worst entry).
    - ``dtype=np.float32``: the forward and backward run in float32 on the
      inputs rounded to float32; the numerics run in float64 on the same
      values.
    - ``side_effects="fail"``: a forward that writes into its inputs or is
      not deterministic, a backward that writes into ``dout`` or is not
      deterministic, fails the check (``"report"``: named, not failed).
    - ``raises=False``: return the ``GradientReport`` instead of raising.

    Derivation: docs/math.md Appendix A.
    """
    _check_options(h, tol, side_effects, samples, directions)
    names, arrays = _names(inputs)
    for key, x in zip(names, arrays):      # before the forward meets them
        _check_perturbable(key, x)
    float32 = np.dtype(dtype) != np.float64
    if np.dtype(dtype) not in (np.float64, np.float32):
        raise ValueError(f"gradcheck: dtype must be float64 or float32, got {np.dtype(dtype)}")
    xp = get_array_module(*arrays)
    low = [x.astype(dtype) for x in arrays]            # what the checked forward/backward see
    high = [x.astype(np.float64) for x in low]         # the same values, for the numerics
    originals = [_host(x) for x in low]
    found = []

    outs = _as_outputs(forward(*low))
    moved = _changed(originals, [_host(x) for x in low])
    if moved:
        found.append(f"forward wrote into input {', '.join(repr(names[i]) for i in moved)} "
                     f"(it must leave its inputs alone)")
        return _finish(GradientReport({}, found, "side effects"), raises)
    first = [_host(o) for o in outs]
    outs = _as_outputs(forward(*low))
    second = [_host(o) for o in outs]
    if len(first) != len(second) or _changed(first, second):
        where = _changed(first, second)
        found.append(f"forward is not deterministic: two calls at the same inputs differ "
                     f"(output {where[0] if where else '?'}); fix any randomness (e.g. reseed dropout)")
        return _finish(GradientReport({}, found, "side effects"), raises)
    for o in outs:
        if not hasattr(o, "dtype") or o.dtype.kind != "f":
            raise TypeError(f"gradcheck: the forward returned a {type(o).__name__}"
                            f"{' of ' + str(o.dtype) if hasattr(o, 'dtype') else ''}, not a float array")
        if float32 and o.dtype != np.dtype(dtype):
            found.append(f"the float32 forward returned {o.dtype} (a float64 constant or array upcasts it)")

    rng = np.random.default_rng([seed, 0x5EED])   # not the stream a test drew its inputs from
    weights_low = [xp.asarray(rng.standard_normal(o.shape), dtype=dtype) for o in outs]
    weights = [w.astype(np.float64) for w in weights_low]
    single = not isinstance(forward(*low), tuple)

    def call_backward(ws):
        """The backward, right after a forward at the unperturbed inputs (its cache)."""
        douts = [w.astype(dtype) for w in ws]
        forward(*low)
        grads = backward(douts[0] if single else tuple(douts))
        grads = grads if isinstance(grads, tuple) else (grads,)
        if len(grads) != len(arrays):
            raise ValueError(f"gradcheck: backward returned {len(grads)} gradients for "
                             f"{len(arrays)} inputs")
        return douts, grads

    douts, grads = call_backward(weights_low)
    if _changed([_host(w) for w in weights_low], [_host(d) for d in douts]):
        found.append("backward wrote into dout (the checker gave it a copy; a caller reusing "
                     "dout would see it changed)")
    host_grads = [None if g is None else _host(g) for g in grads]
    _, again = call_backward(weights_low)
    again = [None if g is None else _host(g) for g in again]
    if any((g is None) != (a is None) or (g is not None and not _same(g, a))
           for g, a in zip(host_grads, again)):
        found.append("backward is not deterministic: two calls with the same dout differ")
    skip = set(no_grads)
    analytic = {}
    for i, (key, g) in enumerate(zip(names, grads)):
        if g is None or i in skip or key in skip:
            continue
        _check_gradient(key, g, arrays[i])
        if float32 and hasattr(g, "dtype") and g.dtype != np.dtype(dtype):
            found.append(f"the float32 backward returned {g.dtype} for input {key!r}")
        analytic[key] = host_grads[i]
    if not analytic:
        raise ValueError("gradcheck: no gradient to check (from check_op or check_layer: the "
                         "backward returned None for every input, or no_grads skips them all)")
    named = dict(zip(names, high))

    def evaluate():
        return [o.astype(np.float64) for o in _as_outputs(forward(*high))]

    def vjp(ws):
        _, gs = call_backward([w.astype(dtype) for w in ws])
        return {k: _host(g) for k, g in zip(names, gs) if k in analytic}
    base = [o.copy() for o in evaluate()]
    if float32:
        for m, (lo, hi) in enumerate(zip(first, base)):
            hi = _host(hi)
            gap = float(np.abs(lo - hi).max(initial=0.0)) / max(float(np.abs(hi).max(initial=0.0)), 1e-300)
            if not gap <= FLOAT32_SAFETY * EPS32:
                found.append(f"the float32 and float64 forwards differ (output {m}: relative "
                             f"{gap:.1e}): not the same function (a random draw that depends on "
                             f"the dtype?)")
    report = _run(evaluate, base, weights, named, analytic, vjp, found, h, tol, float32, fast,
                  samples, directions, seed, _method(h, fast, samples, directions, float32),
                  side_effects == "fail")
    return _finish(report, raises)


def _settings_in(dtype, settings):
    """The float arrays of ``settings`` (and of NamedTuples in it, e.g. a
    BatchNorm state) in ``dtype``; everything else as it is."""
    def cast(v):
        if hasattr(v, "dtype") and getattr(v.dtype, "kind", "") == "f":
            return v.astype(dtype)
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            return type(v)(*(cast(f) for f in v))
        return v
    return {k: cast(v) for k, v in settings.items()}


def check_layer(forward, backward, inputs, *, settings=None, **options):
    """``check_op`` for a pair of the op protocol of ``layers.py``:
    ``forward(*inputs, **settings)`` returns ``(out, cache)``, or
    ``(out, new_state, cache)`` for an op with state (the state is passed in
    ``settings`` and is not checked); ``backward(dout, cache)`` returns the
    gradient of each input: one array or a tuple. ``out`` is an array, a
    plain tuple of arrays (every one is checked, ``dout`` is then a tuple),
    or a ``NamedTuple`` whose first field is the differentiable output (the
    others are reported values and are not checked).

    ``settings``: the layer's own arguments, kept apart from the checker's
    options (``h``, ``tol``, ``seed``, ... of ``check_op``), so that a layer
    setting called ``h`` cannot change the step.

    Example: ``check_layer(gelu_forward, gelu_backward, [x])``;
    ``check_layer(batchnorm_forward, batchnorm_backward, {"x": x, "gamma": g,
    "beta": b}, settings=dict(state=BatchNormState(mean, var), train=True))``.

    Derivation: docs/math.md Appendix A.
    """
    unknown = set(options) - set(CHECK_OP_OPTIONS)
    if unknown:
        raise TypeError(f"check_layer: unknown option {', '.join(sorted(map(repr, unknown)))}; the "
                        f"layer's own arguments go in settings={{...}}, the checker's options are "
                        f"{', '.join(CHECK_OP_OPTIONS)}")
    settings = dict(settings or {})
    caches = [None]

    def forward_out(*xs):
        try:
            result = forward(*xs, **_settings_in(xs[0].dtype, settings))
        except TypeError as exc:    # h=0.7 meant for the layer went to the checker
            clash = [k for k in options if k not in settings and f"'{k}'" in str(exc)]
            if clash:
                raise TypeError(f"check_layer: the forward raised TypeError: {exc}; "
                                f"{', '.join(f'{k}=' for k in clash)} set the checker's option, not "
                                f"the layer's argument: give it as settings={{{clash[0]!r}: ...}}") from None
            raise
        if not isinstance(result, tuple) or len(result) not in (2, 3):
            raise TypeError(f"check_layer: the forward must return (out, cache) or (out, new_state, "
                            f"cache), got {type(result).__name__}"
                            f"{' of ' + str(len(result)) if isinstance(result, tuple) else ''}; "
                            f"for a forward that returns only its output use check_op")
        out, caches[0] = result[0], result[-1]
        if isinstance(out, tuple) and hasattr(out, "_fields"):     # NamedTuple: first field
            return out[0]
        return tuple(out) if isinstance(out, tuple) else out

    def backward_grads(dout):   # check_op calls it right after a forward at the unperturbed inputs
        return backward(dout, caches[0])
    return check_op(forward_out, backward_grads, inputs, **options)


CHECK_OP_OPTIONS = ("no_grads", "tol", "fast", "samples", "directions", "dtype", "h", "seed",
                    "side_effects", "raises")


def assert_gradients_ok(forward, backward, inputs, **options):
    """``check_layer`` for a test: passes silently, or fails with the
    checker's message and no traceback into the checker (pytest hides this
    frame). Returns the ``GradientReport``. Method: docs/math.md Appendix A."""
    __tracebackhide__ = True
    report = check_layer(forward, backward, inputs, raises=False, **options)
    if not report.ok:
        raise AssertionError(str(report))
    return report
