"""Parameters (and gradients) as views into one flat buffer.

``flatten(params)`` copies a dict of arrays into one contiguous 1-D buffer and
returns ``(flat, views)``: ``views`` is a :class:`FlatViews`, a plain dict with
the same keys (and order) whose values are reshaped views into ``flat``, so a
write through ``views[key]`` lands in ``flat`` and vice versa. Everything that
takes a params dict keeps working on ``views`` unchanged, and a whole-model
elementwise update (AdamW) becomes a handful of operations on ``flat``:
``AdamW.step`` recognises ``FlatViews`` and takes that path by itself.

The layout (:class:`FlatLayout`) is keys, shapes and offsets; every segment
starts on a 256-byte boundary (the zero padding in between never changes), so a
view handed to a matrix product is as well aligned as a separate array would be
(cuBLAS picks slower kernels for misaligned pointers).

Gradients: the backward pass keeps returning separate arrays; ``gather_into``
copies them into a flat buffer of the same layout (one copy per step), e.g.
``flat_like(flat)`` allocated once. NumPy and CuPy alike (the module of the
inputs, ``backend.get_array_module``). A CuPy kernel can instead read each
array where it lies: ``FlatLayout.gather_expression`` is the C expression of
element ``i`` of the flat buffer in terms of the separate arrays (AdamW's
fused step, optim.py).
"""
import math

from .backend import get_array_module

ALIGN_BYTES = 256


class FlatLayout:
    """Where each key lives in a flat buffer: ``offsets[key]``, ``shapes[key]``,
    ``size`` (the buffer's length, padding included) and ``dtype``."""

    def __init__(self, arrays, align_bytes=ALIGN_BYTES):
        dtypes = {a.dtype for a in arrays.values()}
        if len(dtypes) != 1:
            raise ValueError(f"flatten: all arrays must share one dtype, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        align = max(1, align_bytes // self.dtype.itemsize)
        self.keys = tuple(arrays)
        self.shapes, self.offsets = {}, {}
        offset = 0
        for key, a in arrays.items():
            self.shapes[key], self.offsets[key] = tuple(a.shape), offset
            offset += -(-max(a.size, 1) // align) * align    # round up to the alignment
        self.size = offset

    def __eq__(self, other):
        return (isinstance(other, FlatLayout) and self.keys == other.keys
                and self.shapes == other.shapes and self.offsets == other.offsets
                and self.dtype == other.dtype)

    def gather_expression(self, names):
        """Element ``i`` of the flat buffer as a CUDA C expression of the separate
        arrays ``names`` (one per key, in key order, ``raw`` parameters of an
        ElementwiseKernel, read by a flat C-order index): a chain
        ``(i >= o) & (i < o + n) ? g[i - o] : … : 0`` over the segments, 0 on the
        padding. The copy ``gather_into`` makes, as an expression of a kernel."""
        parts = [f"(i >= {self.offsets[k]}) & (i < {self.offsets[k] + math.prod(self.shapes[k])}) ? "
                 f"{name}[i - {self.offsets[k]}]" for k, name in zip(self.keys, names)]
        return " : ".join(parts + ["0"])

    def view(self, flat, key):
        """The view of ``key`` into ``flat`` (writes through)."""
        shape, start = self.shapes[key], self.offsets[key]
        return flat[start:start + math.prod(shape)].reshape(shape)

    def views(self, flat):
        """A :class:`FlatViews` of every key into ``flat``."""
        if flat.ndim != 1 or flat.shape[0] != self.size or flat.dtype != self.dtype:
            raise ValueError(f"buffer of shape {flat.shape} / {flat.dtype} does not match the "
                             f"layout ({self.size},) / {self.dtype}")
        return FlatViews({k: self.view(flat, k) for k in self.keys}, flat, self)


class FlatViews(dict):
    """A dict of views into ``self.flat`` laid out by ``self.layout``.

    It behaves as the plain dict it is; ``flat`` and ``layout`` let an
    optimizer update the whole buffer at once. Replacing a value (``d[k] = a``)
    breaks the link for that key, so don't: write into it (``d[k][...] = a``).
    """

    def __init__(self, views, flat, layout):
        super().__init__(views)
        self.flat, self.layout = flat, layout

    def is_intact(self):
        """True when every value is still the view into ``flat`` (nothing replaced)."""
        return (tuple(self) == self.layout.keys
                and all(_shares(v, self.flat) for v in self.values()))


def _shares(view, flat):
    base = view.base
    while base is not None and base is not flat:
        base = base.base
    return base is flat


def flatten(arrays, align_bytes=ALIGN_BYTES):
    """Copy ``arrays`` (a dict of same-dtype arrays) into one new flat buffer.

    Returns ``(flat, views)``: ``flat`` is 1-D and contiguous, same dtype and
    array module as the inputs; ``views`` a :class:`FlatViews` (same keys and
    order, same shapes) whose values are views into ``flat``.
    """
    layout = FlatLayout(arrays, align_bytes)
    xp = get_array_module(*arrays.values())
    flat = xp.zeros(layout.size, dtype=layout.dtype)
    views = layout.views(flat)
    for key, a in arrays.items():
        views[key][...] = a
    return flat, views


def flat_like(flat):
    """A zeroed buffer like ``flat`` (same length, dtype, module): e.g. for gradients."""
    return get_array_module(flat).zeros_like(flat)


def gather_into(flat, arrays, layout):
    """Copy each ``arrays[key]`` into its place in ``flat`` (laid out by
    ``layout``; padding is left as it is). Returns ``flat``."""
    for key in layout.keys:
        layout.view(flat, key)[...] = arrays[key]
    return flat
