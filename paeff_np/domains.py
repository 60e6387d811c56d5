"""The domain of every setting, in one home: the table a dataclass reads.

``model.Config`` and ``run.training.TrainSettings`` each hold ``DOMAINS`` (field →
``Domain``) and ``JOINT_RULES`` (rules that join fields, e.g. "select val needs a
validation split"), and check themselves with ``check_fields`` on construction. Every
reader of a setting goes through that one check:

* the library: ``Config(curvature=-1)`` raises ``FieldError`` ("curvature = -1: must be
  a finite number > 0");
* the command lines (``run.validate``): the same error, its fields named as flags
  ("--curvature -1: must be a finite number > 0"), before any data is read;
* a checkpoint (``run.checkpoint``): the same error, its fields named as the metadata's
  ("model.curvature = -1: must be ...").

A message is a template whose ``{field}`` places each caller fills with its own name for
the field (``FieldError.describe``). NaN is outside every numeric domain (each test is a
comparison that NaN fails); booleans are not numbers.
"""
import json
import math
import numbers
from typing import Callable, NamedTuple


class Domain(NamedTuple):
    """The values one field takes: ``test(value) -> bool`` and its text, which completes
    "must be ..." (e.g. ``"an integer >= 1"``)."""
    test: Callable[[object], bool]
    text: str


class JointRule(NamedTuple):
    """A rule over several fields: ``holds(values) -> bool`` on the dict of all fields,
    and the message when it does not, a template over ``fields`` (``"{lr}: must be ..."``)."""
    fields: tuple
    holds: Callable[[dict], bool]
    message: str


class FieldError(ValueError):
    """A setting outside its domain. ``message``: a template whose ``{name}`` places are
    the fields in ``values`` (name → value); ``describe(namer)`` fills them with the
    caller's names for the fields (``str()`` uses ``field = value``)."""

    def __init__(self, message, values, where=""):
        self.message, self.values, self.where = message, dict(values), where
        super().__init__(self.describe())

    def describe(self, namer=None):
        namer = namer or named(str)
        text = self.message.format(**{f: namer(f, v) for f, v in self.values.items()})
        return f"{self.where}: {text}" if self.where else text


NO_VALUE = object()     # a field named without a value (a missing or an unknown field)


def named(name_of, sep=" = "):
    """A namer for ``FieldError.describe``: the field's name by ``name_of(field)``, then
    ``sep`` and its value (none for ``NO_VALUE``)."""
    def fill(field, value):
        return name_of(field) if value is NO_VALUE else f"{name_of(field)}{sep}{shown(value)}"
    return fill


def shown(value):
    """A value as a message shows it: numbers with ``%g``, lists space-separated, a
    string as it is, anything else as JSON (cut to 40 characters)."""
    if isinstance(value, (list, tuple)):
        return " ".join(shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value[:40]
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return repr(value)[:40]


# --- the domains the tables are made of ---------------------------------------------

def is_integer(value):
    """A whole number that is not a bool (Python's or NumPy's integer types)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    """A finite real number that is not a bool."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def integer(at_least):
    return Domain(lambda v: is_integer(v) and v >= at_least, f"an integer >= {at_least}")


ODD_INTEGER = Domain(lambda v: is_integer(v) and v >= 1 and v % 2 == 1, "a positive odd integer")
POSITIVE = Domain(lambda v: is_number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = Domain(lambda v: is_number(v) and v >= 0, "a finite number >= 0")
FRACTION = Domain(lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
BOOLEAN = Domain(lambda v: isinstance(v, bool), "true or false")
STRING = Domain(lambda v: isinstance(v, str) and v != "", "a non-empty string")


def one_of(choices):
    return Domain(lambda v: isinstance(v, str) and v in choices, " or ".join(choices))


def numbers_of(count, element):
    """A list (or tuple) of ``count`` values, each in ``element``."""
    return Domain(lambda v: isinstance(v, (list, tuple)) and len(v) == count
                  and all(element.test(x) for x in v), f"{count} numbers, each {element.text}")


# --- the one check -------------------------------------------------------------------

def check_fields(values, domains, joint_rules=(), where=""):
    """Raise ``FieldError`` on the first field of ``values`` outside its domain, then on
    the first joint rule that does not hold (``values`` must then hold every field the
    rule names). Fields ``domains`` does not name are not checked here."""
    for field, domain in domains.items():
        if field in values and not domain.test(values[field]):
            raise FieldError(f"{{{field}}}: must be {domain.text}", {field: values[field]}, where)
    for rule in joint_rules:
        if all(f in values for f in rule.fields) and not rule.holds(values):
            raise FieldError(rule.message, {f: values[f] for f in rule.fields}, where)


def check_known(values, domains, where=""):
    """Refuse (``FieldError``) a field ``domains`` does not name, and a missing one: for
    settings read back from a file, where every field must be there."""
    for field in values:
        if field not in domains:
            raise FieldError(f"{{{field}}}: unknown field", {field: NO_VALUE}, where)
    for field in domains:
        if field not in values:
            raise FieldError(f"{{{field}}}: missing", {field: NO_VALUE}, where)
