"""Your own cases in the table: ``python -m paeff_np.gradcheck --module my_layers.py``.

The file is a Python module that defines ``GRADCHECK_CASES``, a list of
dicts, one per forward/backward pair::

    import numpy as np

    def scale_forward(x, k):            # the op protocol: (out, cache)
        return x * k, k

    def scale_backward(dout, k):        # one gradient per input
        return dout * k

    GRADCHECK_CASES = [
        dict(name="scale", forward=scale_forward, backward=scale_backward,
             inputs={"x": np.random.default_rng(0).standard_normal((4, 5))},
             settings={"k": 3.0}),
    ]

Keys: ``name``, ``forward``, ``backward``, ``inputs`` (a dict name → float64
array, or a function rng → such a dict) are required; ``settings`` (the
layer's own arguments), ``no_grads`` (names not checked), ``protocol``
(``"layer"``, the default: ``check_layer``; ``"op"``: ``check_op``, where
``forward(*inputs)`` returns only its output(s) and ``backward(dout)``) and
``options`` (``check_layer``'s options, e.g. ``{"fast": True}`` or a
``tol``) are optional. The cases run in the same table, with the same exit
code, as the built-in ones.
"""
import importlib.util
import os
import sys

from .cases import OpCase
from . import TOLERANCE

REQUIRED = ("name", "forward", "backward", "inputs")
OPTIONAL = ("settings", "no_grads", "protocol", "options")
PROTOCOLS = ("layer", "op")


class UserCaseError(ValueError):
    """A --module file that cannot be used; the message is one line naming the file."""


def load_cases(path):
    """The ``OpCase`` of every entry of ``GRADCHECK_CASES`` in the file ``path``."""
    if not os.path.isfile(path):
        raise UserCaseError(f"{path}: no such file")
    name = "gradcheck_user_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserCaseError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))   # its own imports beside it
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserCaseError(f"{path}: importing it raised {type(exc).__name__}: {first}") from None
    finally:
        sys.path.pop(0)
    declared = getattr(module, "GRADCHECK_CASES", None)
    if not isinstance(declared, (list, tuple)) or not declared:
        raise UserCaseError(f"{path}: defines no GRADCHECK_CASES (a non-empty list of dicts with "
                            f"{', '.join(REQUIRED)}; see python -m paeff_np.gradcheck --help)")
    return [_case(path, i, entry) for i, entry in enumerate(declared)]


def _case(path, i, entry):
    where = f"{path}: GRADCHECK_CASES[{i}]"
    if not isinstance(entry, dict):
        raise UserCaseError(f"{where} is a {type(entry).__name__}, not a dict")
    missing = [k for k in REQUIRED if k not in entry]
    unknown = [k for k in entry if k not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise UserCaseError(f"{where}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else [])
            + ([f"unknown key {', '.join(map(repr, unknown))} (known: {', '.join(REQUIRED + OPTIONAL)})"]
               if unknown else [])))
    for key in ("forward", "backward"):
        if not callable(entry[key]):
            raise UserCaseError(f"{where}: {key} is not a function")
    protocol = entry.get("protocol", "layer")
    if protocol not in PROTOCOLS:
        raise UserCaseError(f"{where}: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    inputs = entry["inputs"]
    if not (callable(inputs) or isinstance(inputs, dict)):
        raise UserCaseError(f"{where}: inputs must be a dict name -> array, or a function rng -> dict")
    settings = dict(entry.get("settings") or {})
    options = dict(entry.get("options") or {})
    tol = options.pop("tol", TOLERANCE)
    return OpCase(str(entry["name"]), entry["forward"], entry["backward"],
                  inputs if callable(inputs) else (lambda rng, named=inputs: dict(named)),
                  lambda xp, dtype, named=settings: dict(named), tuple(entry.get("no_grads", ())),
                  tol, options=options, protocol=protocol)
