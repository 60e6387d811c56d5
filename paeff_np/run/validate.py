"""Check the command line's hyperparameters against their domains, before any data is read.

``validate_hyperparameters(args)`` looks at the flags the user gave (``None`` means
"not given": presets and defaults are valid by construction) and raises ``UsageError``
with one line naming the flag, its value and its domain.

The domains themselves have one home: the tables of ``model.Config`` and
``training.TrainSettings`` (``DOMAINS``, ``JOINT_RULES``; ``paeff_np/domains.py``). Here
each given flag is checked by its field's domain, and the joint rules on the defaults
overlaid with the given flags; the message names fields as flags (``--lr 0: must be a
finite number > 0``). What is left here is what no setting knows: whether the model's
D×D weights fit in this machine's memory (``--embed-dim``). Three D×D matrices (two
branch layers and res_mix), each held four times (parameters, gradients, AdamW's two
moments) in float32, need at least 48·D² bytes. A split the data cannot give (fewer
than two training identities left, too few validation pairs) is refused once the data
is read (``data.split``), still before training.
"""
import os

from ..backend import physical_memory_bytes
from ..domains import FieldError, check_fields, named
from ..model import Config
from ..usage import UsageError
from .training import TrainSettings

BYTES_PER_SQUARED_WIDTH = 3 * 4 * 4   # three D×D matrices × (param, grad, m, v) × float32


def flag_name(field):
    """The command-line flag of a setting: ``batch_size`` → ``--batch-size``."""
    return "--" + field.replace("_", "-")


AS_FLAGS = named(flag_name, sep=" ")   # a FieldError's fields as flags: "--lr 0"


def check_settings(given, defaults=None):
    """Check ``given`` (setting → value, the flags the user set) against the tables of
    Config and TrainSettings: each field by its domain, then each joint rule on the
    defaults (the dataclasses', overlaid with ``defaults``: a preset's) overlaid with
    ``given``. Raise UsageError naming flags."""
    for cls in (Config, TrainSettings):
        mine = {k: v for k, v in given.items() if k in cls.DOMAINS}
        base = {k: f.default for k, f in cls.__dataclass_fields__.items()}
        base.update({k: v for k, v in (defaults or {}).items() if k in cls.DOMAINS})
        try:
            check_fields(mine, cls.DOMAINS)
            check_fields({**base, **mine}, {}, [r for r in cls.JOINT_RULES if set(r.fields) & set(mine)])
        except FieldError as exc:
            raise UsageError(exc.describe(AS_FLAGS)) from None


def validate_hyperparameters(args, memory_bytes=None, defaults=None):
    """Raise UsageError on the first flag of ``args`` outside its domain (see the module doc).

    memory_bytes: the memory an embedding width must fit in (default: physical memory);
    defaults: the settings a flag not given takes (a preset's), where they are not the
    dataclasses' own.
    """
    given = {k: v for k, v in vars(args).items() if v is not None}
    check_settings(given, defaults)
    width = given.get("embed_dim")
    if width is not None:
        memory = physical_memory_bytes() if memory_bytes is None else memory_bytes
        needed = BYTES_PER_SQUARED_WIDTH * width ** 2
        if memory is not None and needed > memory:
            raise UsageError(f"--embed-dim {width}: its D×D weights alone need {needed / 2**30:,.0f} GiB "
                             f"(parameters, gradients, two AdamW moments), more than this machine's "
                             f"{memory / 2**30:,.0f} GiB: choose a smaller width")
