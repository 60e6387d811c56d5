"""AdamW with PyTorch's semantics and the cosine learning-rate schedule (docs/spec.md §4)."""
import math

import numpy as np

from .backend import elementwise_kernel, get_array_module, to_device, to_host
from .domains import FRACTION, NON_NEGATIVE, POSITIVE, Domain, check_fields, integer, numbers_of
from .flat import FlatViews, flat_like


ADAMW_KERNEL = dict(
    in_params="T g, T decay, T beta1, T c1, T beta2, T c2, T step_size, T sqrt_bias2, T eps",
    out_params="T p, T m, T v",
    body="""
    p = p * decay;
    m = m * beta1 + c1 * g;
    v = v * beta2 + c2 * g * g;
    p = p - (step_size * m) / (sqrt(v) / sqrt_bias2 + eps);
    """,
    name="paeff_adamw")
"""``adamw_update`` as one CuPy elementwise kernel: the same formula, in CUDA C."""


def _adamw_gather_kernel(layout):
    """``ADAMW_KERNEL`` on a whole flat buffer laid out by ``layout``, with ``g`` read
    from each key's own gradient array (``raw``, where the backward left it) by
    ``layout.gather_expression`` instead of from a flat gradient buffer: the copy
    of the gradients into one buffer and the update, one kernel. The formula is
    ADAMW_KERNEL's body itself."""
    names = [f"g{k}" for k in range(len(layout.keys))]
    scalars = ADAMW_KERNEL["in_params"].split(", ", 1)[1]            # all but "T g"
    return dict(in_params=", ".join(f"raw T {n}" for n in names) + ", " + scalars,
                out_params=ADAMW_KERNEL["out_params"],
                body=f"T g = {layout.gather_expression(names)};" + ADAMW_KERNEL["body"],
                name="paeff_adamw_gather")


ADAMW_SCALARS = ("decay", "beta1", "c1", "beta2", "c2", "step_size", "sqrt_bias2", "eps")
"""The numbers ``ADAMW_KERNEL`` takes after ``g``, in its order (``adamw_scalars``)."""


def adamw_scalars(lr, beta1, beta2, eps, weight_decay, bias1, sqrt_bias2):
    """The numbers ``ADAMW_KERNEL`` takes after ``g`` (``ADAMW_SCALARS``), in its order:
    ``(1 − lr·wd, β₁, 1 − β₁, β₂, 1 − β₂, lr/bias1, sqrt_bias2, ε)``.

    Derivation: docs/math.md §15.
    """
    return (1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr / bias1, sqrt_bias2, eps)


def _kernel_scalars(hyper, scalars):
    """The numbers the kernels take after the gradient: from the host (``hyper``), or,
    when ``scalars`` (a device array of ``adamw_scalars``) is given, read there."""
    return adamw_scalars(**hyper) if scalars is None else [scalars[i] for i in range(len(scalars))]


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bias1, sqrt_bias2, scalars=None):
    """One AdamW step on ``p``, ``m``, ``v`` in place (arrays of one shape)::

        p ← p·(1 − lr·wd)
        m ← β₁m + (1 − β₁)g
        v ← β₂v + (1 − β₂)g²
        p ← p − (lr/bias1)·m / (√v/sqrt_bias2 + ε)

    with ``bias1 = 1 − β₁ᵗ``, ``sqrt_bias2 = √(1 − β₂ᵗ)``. The one implementation
    of the formula, used per key and on a whole flat buffer alike. On CuPy it
    is one fused elementwise kernel (``ADAMW_KERNEL``, compiled once by
    ``backend.elementwise_kernel``), the same formula; ``scalars``, if given,
    is a device array holding ``adamw_scalars(...)`` of this step, which the
    kernel reads there instead of taking the numbers from the host (a replayed
    CUDA graph, ``paeff_np.graphs``, reads new numbers each step that way).

    Derivation: docs/math.md §15.
    """
    xp = get_array_module(p)
    if xp is not np:
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, bias1=bias1,
                     sqrt_bias2=sqrt_bias2)
        elementwise_kernel(**ADAMW_KERNEL)(g, *_kernel_scalars(hyper, scalars), p, m, v)
        return
    p *= 1.0 - lr * weight_decay
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * g * g
    p -= (lr / bias1) * m / (np.sqrt(v) / sqrt_bias2 + eps)


class AdamW:
    """Decoupled weight decay Adam (``torch.optim.AdamW``), on every parameter.

    For each step t = 1, 2, …::

        p ← p·(1 − lr·wd)
        m ← β₁m + (1 − β₁)g
        v ← β₂v + (1 − β₂)g²
        p ← p − lr · (m/(1 − β₁ᵗ)) / (√v/√(1 − β₂ᵗ) + ε)

    ``step(params, grads)`` updates ``params`` in place. When ``params`` is a
    :class:`~paeff_np.flat.FlatViews` (from ``paeff_np.flat.flatten``), ``m``
    and ``v`` live in flat buffers of the same layout (``self.m``/``self.v`` are
    ``FlatViews`` into them) and, when ``grads`` is a ``FlatViews`` of that
    layout too (``paeff_np.flat.gather_into``), the step is one update of the
    whole buffers: a single fused kernel on CuPy. Plain ``grads`` are, on
    CuPy, read where they lie by that one kernel (``_adamw_gather_kernel``: no
    copy into a flat gradient buffer); on NumPy each key is updated through
    the views, with no copy. Every path gives the same bits as the per-key step; checkpoints keep per-key ``m/``, ``v/``
    arrays, and a loaded state is copied into flat buffers on the next flat
    step.

    Derivation: docs/math.md §15.
    """

    # the domain of each number of the state (paeff_np/domains.py): checked here, and by
    # the checkpoint reader on a saved state (state_dict)
    STATE_DOMAINS = {"t": integer(0), "lr": POSITIVE,
                     "betas": Domain(lambda b: numbers_of(2, FRACTION).test(b), "two numbers in [0, 1)"),
                     "eps": POSITIVE, "weight_decay": NON_NEGATIVE}

    def __init__(self, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        check_fields(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), self.STATE_DOMAINS,
                     where="AdamW")
        self.lr = lr
        self.betas = tuple(betas)
        self.eps = eps
        self.weight_decay = weight_decay
        self.t = 0
        self.m = {}
        self.v = {}
        self._gather = None         # (layout, _adamw_gather_kernel(layout)) of the last CuPy flat step

    def step(self, params, grads, lr=None):
        """Update ``params`` in place from ``grads`` (dicts with the same keys).

        Derivation: docs/math.md §15.
        """
        self.apply(params, grads, self.advance(lr))

    def advance(self, lr=None):
        """``t ← t + 1``; the numbers of that step: ``lr``, the betas, ε, the weight
        decay and the bias corrections (``bias1``, ``sqrt_bias2``), for ``apply``."""
        lr = self.lr if lr is None else lr
        beta1, beta2 = self.betas
        self.t += 1
        return dict(lr=lr, beta1=beta1, beta2=beta2, eps=self.eps, weight_decay=self.weight_decay,
                    bias1=1.0 - beta1 ** self.t, sqrt_bias2=math.sqrt(1.0 - beta2 ** self.t))

    def apply(self, params, grads, hyper, scalars=None):
        """The update of one step whose numbers are ``hyper`` (from ``advance``);
        ``scalars``: see ``adamw_update`` (flat parameters on CuPy only)."""
        if isinstance(params, FlatViews) and params.is_intact():
            self._step_flat(params, grads, hyper, scalars)
            return
        if scalars is not None:
            raise ValueError("AdamW.apply: device scalars need flat parameters (paeff_np.flat.flatten)")
        for key, p in params.items():
            if key not in self.m:
                xp = get_array_module(p)
                self.m[key] = xp.zeros_like(p)
                self.v[key] = xp.zeros_like(p)
            adamw_update(p, grads[key], self.m[key], self.v[key], **hyper)

    def _step_flat(self, params, grads, hyper, scalars=None):
        layout = params.layout
        self.m, self.v = (self._flat_state(s, params) for s in (self.m, self.v))
        if not _is_flat_views_of(grads, layout):
            if get_array_module(params.flat) is np:
                # NumPy: key by key through the views, the same bits without copying
                # the gradients into one buffer (faster: docs/perf.md); the buffer
                # is for a GPU, where it makes the step one kernel
                for key, p in params.items():
                    adamw_update(p, grads[key], self.m[key], self.v[key], **hyper)
                return
            # CuPy: one kernel reads each gradient where it lies and updates the buffers
            if self._gather is None or self._gather[0] is not layout:
                self._gather = (layout, _adamw_gather_kernel(layout))
            elementwise_kernel(**self._gather[1])(*(grads[k] for k in layout.keys), *_kernel_scalars(hyper, scalars),
                                                  params.flat, self.m.flat, self.v.flat)
            return
        adamw_update(params.flat, grads.flat, self.m.flat, self.v.flat, **hyper, scalars=scalars)

    @staticmethod
    def _flat_state(state, params):
        """``state`` (m or v) as a FlatViews laid out like ``params``: kept when it
        already is one, else copied into a new zeroed buffer (keys it lacks start at 0)."""
        if _is_flat_views_of(state, params.layout):
            return state
        views = params.layout.views(flat_like(params.flat))
        for key, a in state.items():
            if key in views:
                views[key][...] = a
        return views

    def state_dict(self):
        """Host arrays and numbers, ready for a checkpoint (no pickle needed)."""
        arrays = {f"m/{k}": to_host(v) for k, v in self.m.items()}
        arrays.update({f"v/{k}": to_host(v) for k, v in self.v.items()})
        meta = dict(t=self.t, lr=self.lr, betas=list(self.betas), eps=self.eps,
                    weight_decay=self.weight_decay)
        return meta, arrays

    def load_state_dict(self, meta, arrays, device="cpu"):
        self.t = int(meta["t"])
        self.lr, self.betas = meta["lr"], tuple(meta["betas"])
        self.eps, self.weight_decay = meta["eps"], meta["weight_decay"]
        own = lambda a: to_device(a, device).copy()     # never share memory with the source
        self.m = {k[2:]: own(a) for k, a in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: own(a) for k, a in arrays.items() if k.startswith("v/")}


def _is_flat_views_of(d, layout):
    """True when ``d`` is an intact FlatViews with exactly ``layout``."""
    return isinstance(d, FlatViews) and (d.layout is layout or d.layout == layout) and d.is_intact()


def cosine_lr(epoch, base_lr, total_epochs, eta_min=1e-8):
    """``η_e = η_min + (η₀ − η_min)(1 + cos(π e/T))/2`` (``CosineAnnealingLR``,
    stepped once per epoch; epoch 0 gives ``η₀``).

    Derivation: docs/math.md §15.
    """
    return eta_min + (base_lr - eta_min) * (1.0 + math.cos(math.pi * epoch / total_epochs)) / 2.0
