"""Check the command line's hyperparameters against their domains, before any data is read.

``validate_hyperparameters(args)`` looks at the flags the user gave (``None`` means
"not given": presets and Config defaults are valid by construction) and raises
``UsageError`` with one line naming the flag, its value and its domain. NaN fails
every domain: each check is written so that a comparison with NaN is False.

The domains (docs/spec.md §2–§4):

* ``--lr`` > η_min = 1e-8 (the cosine schedule's floor), ``--temperature`` τ > 0, ``--curvature`` c > 0, ``--clip-radius`` r > 0,
  all finite;
* ``--opl-gamma`` γ ≥ 0 and finite (OPL = 1 − s_pos + γ·|s_neg|);
* ``--dropout`` p in [0, 1);
* ``--loss-weights`` α₁ α₂ α₃ ≥ 0, finite, not all zero;
* ``--batch-size`` ≥ 2: train-mode BatchNorm divides by the batch's variance over
  its rows (a batch of one has none); ≤ the training rows is checked once the data
  is read (``Trainer``);
* ``--seed`` ≥ 0 (NumPy's generators take no negative seeds);
* ``--embed-dim`` D ≥ 1, and the model's D×D weights must fit in this machine's memory:
  three D×D matrices (two branch layers and res_mix), each held four times (parameters,
  gradients, AdamW's two moments) in float32, need at least 48·D² bytes;
* ``--egff-kernel`` a positive odd integer;
* ``--val-identities``, ``--val-rows`` fractions in [0, 1) (0 turns a validation part
  off); ``--select val`` and ``--patience`` need a part on. A split the data cannot
  give (fewer than two training identities left, too few validation pairs) is
  refused once the data is read (``data.split``), still before training.
"""
import math
import os

from ..usage import UsageError
from .training import TrainSettings

COSINE_ETA_MIN = TrainSettings.eta_min  # the cosine schedule's floor
BYTES_PER_SQUARED_WIDTH = 3 * 4 * 4   # three D×D matrices × (param, grad, m, v) × float32


def _flag(name):
    return "--" + name.replace("_", "-")


def _refuse(name, value, domain):
    values = value if isinstance(value, (list, tuple)) else [value]
    shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    raise UsageError(f"{_flag(name)} {shown}: {domain}")


def physical_memory_bytes():
    """This machine's RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def validate_hyperparameters(args, memory_bytes=None):
    """Raise UsageError on the first flag of ``args`` outside its domain (see the module doc).

    memory_bytes: the memory an embedding width must fit in (default: physical memory).
    """
    given = lambda name: getattr(args, name, None)

    for name, what in (("lr", "the learning rate"), ("temperature", "τ"), ("curvature", "c"),
                       ("clip_radius", "the clipping radius r")):
        value = given(name)
        if value is not None and not (math.isfinite(value) and value > 0):
            _refuse(name, value, f"{what} must be a finite number > 0")
    lr = given("lr")
    if lr is not None and lr <= COSINE_ETA_MIN:
        _refuse("lr", lr, f"the learning rate must be above the cosine schedule's floor "
                          f"η_min = {COSINE_ETA_MIN:g}, or it would rise instead of decay")
    gamma = given("opl_gamma")
    if gamma is not None and not (math.isfinite(gamma) and gamma >= 0):
        _refuse("opl_gamma", gamma, "γ must be a finite number >= 0")
    dropout = given("dropout")
    if dropout is not None and not 0 <= dropout < 1:
        _refuse("dropout", dropout, "the dropout probability must be in [0, 1)")
    weights = given("loss_weights")
    if weights is not None:
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            _refuse("loss_weights", weights, "the weights (align, opl, ce) must be finite numbers >= 0")
        if not any(w > 0 for w in weights):
            _refuse("loss_weights", weights, "at least one weight must be > 0, or nothing is trained")
    batch_size = given("batch_size")
    if batch_size is not None and batch_size < 2:
        _refuse("batch_size", batch_size, "must be >= 2 (train-mode BatchNorm needs two rows per batch)")
    seed = given("seed")
    if seed is not None and seed < 0:
        _refuse("seed", seed, "must be >= 0")
    kernel = given("egff_kernel")
    if kernel is not None and not (kernel >= 1 and kernel % 2 == 1):
        _refuse("egff_kernel", kernel, "egff_kernel, the EGFF conv kernel, must be a positive odd integer")
    fractions = {name: given(name) for name in ("val_identities", "val_rows")}
    for name, value in fractions.items():
        if value is not None and not 0 <= value < 1:
            _refuse(name, value, "the fraction must be in [0, 1) (0 turns the validation part off)")
    if fractions["val_identities"] == 0 and fractions["val_rows"] == 0:
        if hasattr(args, "select") and given("select") in (None, "val"):
            raise UsageError("--select val needs a validation split, but --val-identities and "
                             "--val-rows are both 0: turn one on, or choose --select last")
        if given("patience"):
            raise UsageError(f"--patience {given('patience')} watches the validation EER, but "
                             f"--val-identities and --val-rows are both 0: turn one on")
    width = given("embed_dim")
    if width is not None:
        if width < 1:
            _refuse("embed_dim", width, "must be >= 1")
        memory = physical_memory_bytes() if memory_bytes is None else memory_bytes
        needed = BYTES_PER_SQUARED_WIDTH * width ** 2
        if memory is not None and needed > memory:
            _refuse("embed_dim", width, f"its D×D weights alone need {needed / 2**30:,.0f} GiB "
                    f"(parameters, gradients, two AdamW moments), more than this machine's "
                    f"{memory / 2**30:,.0f} GiB: choose a smaller width")
