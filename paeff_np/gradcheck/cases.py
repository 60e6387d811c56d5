"""The one list of gradient checks: every op of the library, then the whole
loss of each Config variant. ``python -m paeff_np.gradcheck`` runs it;
``docs/walkthrough.py`` draws its op half.

An ``OpCase`` is a forward/backward pair of the op protocol (``layers.py``),
its inputs (made from a fixed seed, small enough to check in milliseconds)
and its settings; it is checked with ``check_layer``. A ``LossCase`` is one
Config (the sizes of ``SMALL``, a batch of 8) whose total loss is checked
against ``loss_and_grads`` for every parameter with ``gradcheck``.

Two things are not derivatives and are checked differently:

- ``riemannian_scale``'s backward multiplies by ``(1 − c‖p‖²)²/4``; it is
  not the derivative of its forward (the identity), so it has no case here
  (``tests/test_hyperbolic.py`` checks its formula). With the scaling on, the
  whole-loss gradient is not ``dL/dθ`` either. On PAEFF's unit rows, though,
  every row of ``p`` has the same norm ``ρ = tanh(√c)/√c``, so the factor is
  one constant ``κ = (1 − cρ²)²/4`` and the scaled gradient is exactly the
  derivative of the loss with ``α₁`` replaced by ``α₁·κ`` (docs/math.md,
  "What the hyperbolic alignment really does"). A variant with the scaling on
  is checked against finite differences of that loss.
- A bias that feeds a train-mode BatchNorm has a gradient that is exactly
  zero in exact arithmetic: the checker judges it against the noise floor of
  its differences (``gradcheck/__init__.py``), not relative to zero.
"""
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .. import hyperbolic, layers, losses, poincare
from ..backend import default_rng, get_array_module
from ..fusion import egff_backward, egff_forward, gated_fusion_backward, gated_fusion_forward
from ..model import Config, init_params, loss_and_grads
from . import TOLERANCE, check_layer, check_op, gradcheck

C = 0.05                    # the paper's curvature
TAU = 0.07                  # the paper's temperature
SMALL = dict(face_dim=7, voice_dim=5, embed_dim=6, n_classes=3)
B, D = 5, 6                 # the ops' batch and width
LABELS = [0, 1, 2, 0, 1]


@dataclass(frozen=True)
class OpCase:
    """One forward/backward pair, checked by ``check_layer``.

    ``inputs(rng)``: the inputs in the forward's order, a dict name → float64
    NumPy array; ``settings(xp, dtype)``: the forward's other arguments;
    ``no_grads``: names of inputs not checked; ``options``: more options of
    ``check_layer`` (e.g. ``fast=True``, a ``tol``).
    """
    name: str
    forward: Callable
    backward: Callable
    inputs: Callable
    settings: Callable = lambda xp, dtype: {}
    no_grads: tuple = ()
    tolerance: float = TOLERANCE
    seed: int = 0
    options: dict = field(default_factory=dict)
    protocol: str = "layer"      # "op": check_op, forward(*inputs) -> out(s), no settings

    def check(self, xp=np, dtype=np.float64):
        """The ``GradientReport`` of ``check_layer``; in float32 the float32
        forward/backward against float64 numerics."""
        named = {k: xp.asarray(a, dtype=np.float64)
                 for k, a in self.inputs(np.random.default_rng(self.seed)).items()}
        tol = self.tolerance if dtype == np.float64 else None      # float32: derived
        options = dict(no_grads=self.no_grads, dtype=dtype, tol=tol, raises=False, **self.options)
        if self.protocol == "op":
            return check_op(self.forward, self.backward, named, **options)
        return check_layer(self.forward, self.backward, named,
                           settings=self.settings(xp, np.float64), **options)


@dataclass(frozen=True)
class LossCase:
    """The total loss of one Config (``variant`` changes the defaults), checked
    for every parameter by ``gradcheck``; dropout draws the same mask at every
    evaluation (a fixed seed). A bias in front of a train-mode BatchNorm has
    a gradient that is exactly zero: the checker judges it against its noise
    floor."""
    name: str
    variant: dict = field(default_factory=dict)
    tolerance: float = TOLERANCE

    def check(self, xp=np, dtype=np.float64):
        """The ``GradientReport`` of ``gradcheck`` over every parameter; in
        float32 the gradients of the float32 model at the float64 values of its
        float32 parameters, without dropout (it draws its mask in the compute
        dtype: float32 and float64 would see different masks)."""
        cfg = Config(**SMALL, **self.variant)
        if dtype != np.float64:
            cfg = replace(cfg, dropout=0.0)
        params, buffers = init_params(cfg, seed=1, dtype=dtype)
        low = {k: xp.asarray(v) for k, v in params.items()}
        params = {k: v.astype(np.float64) for k, v in low.items()}
        buffers = {k: xp.asarray(v) for k, v in buffers.items()}
        rng = np.random.default_rng(0)
        face = xp.asarray(np.abs(rng.standard_normal((8, cfg.face_dim))), dtype=dtype)
        voice = xp.asarray(rng.standard_normal((8, cfg.voice_dim)), dtype=dtype)
        y = xp.asarray(np.array([0, 1, 2, 0, 1, 2, 0, 1]))
        dropout_rng = lambda: default_rng(3, xp) if cfg.dropout else None
        _, _, grads, _ = loss_and_grads(low, buffers, face, voice, y, cfg, dropout_rng())
        # the Riemannian scaling: the derivative of the loss with α₁·κ (module docstring)
        reference = cfg
        if cfg.alignment == "hyperbolic" and cfg.riemannian_grad:
            a1, a2, a3 = cfg.loss_weights
            reference = replace(cfg, riemannian_grad=False,
                                loss_weights=(a1 * hyperbolic.unit_row_riemannian_factor(cfg.curvature), a2, a3))
        buffers64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in buffers.items()}
        face64, voice64 = face.astype(np.float64), voice.astype(np.float64)

        def loss():
            return loss_and_grads(params, buffers64, face64, voice64, y, reference,
                                  dropout_rng())[0]
        tol = self.tolerance if dtype == np.float64 else None
        return gradcheck(loss, params, grads, tol=tol, raises=False)


# --- input makers ---------------------------------------------------------------

def normal(*shape, scale=1.0, shift=0.0):
    """Standard normals (times ``scale``, plus ``shift``) of ``shape``, from the case's rng."""
    return lambda rng: rng.standard_normal(shape) * scale + shift


def rows_with_norms(norms, width=D):
    """Random directions with the given row norms."""
    def make(rng):
        x = rng.standard_normal((len(norms), width))
        return x / np.linalg.norm(x, axis=1, keepdims=True) * np.asarray(norms)[:, None]
    return make


def in_ball(c, low, high, n=B, width=D):
    """Points of the ball of curvature −c with √c‖x‖ uniform in [low, high]."""
    def make(rng):
        x = rng.standard_normal((n, width))
        return x * rng.uniform(low, high, (n, 1)) / (math.sqrt(c) * np.linalg.norm(x, axis=1, keepdims=True))
    return make


def inputs(**makers):
    """``rng → {name: array}``, each array drawn in turn from the one rng."""
    return lambda rng: {name: make(rng) for name, make in makers.items()}


def batchnorm_state(width, train):
    """Settings of an op with a BatchNorm of ``width`` features: a fixed
    running state (used in eval mode) and the mode."""
    def settings(xp, dtype):
        rng = np.random.default_rng(99)
        mean = xp.asarray(rng.standard_normal(width) * 0.1, dtype=dtype)
        var = xp.asarray(np.abs(rng.standard_normal(width)) + 0.5, dtype=dtype)
        return dict(state=layers.BatchNormState(mean, var), train=train)
    return settings


def dropout_same_mask_forward(x, p, mask_seed):
    """Dropout drawing the same mask at every call and in every precision: the
    seed is fixed and the mask is drawn in float64 (``dropout_forward`` draws in
    the dtype of its input, and float32 draws another mask)."""
    xp = get_array_module(x)
    _, mask = layers.dropout_forward(xp.ones(x.shape), p, default_rng(mask_seed, xp))
    mask = mask.astype(x.dtype)
    return x * mask, mask


def egff_case(gate, mix, k):
    c_in = 2 if gate == "concat" else 1
    return OpCase(f"egff[{gate},{mix},k={k}]", egff_forward, egff_backward,
                  inputs(e_f=normal(B, D), e_v=normal(B, D), conv_w=normal(1, c_in, k),
                         conv_b=normal(1)),
                  lambda xp, dtype: dict(gate=gate, mix=mix))


H = 7   # the gated fusion's hidden width in its op case (the model's is 128)
GATED_INPUTS = inputs(e_f=normal(B, D), e_v=normal(B, D), W1=normal(H, 2 * D), b1=normal(H),
                      bn_weight=normal(H), bn_bias=normal(H), W2=normal(D, H), b2=normal(D))

OP_CASES = [
    # layers.py
    OpCase("linear", layers.linear_forward, layers.linear_backward,
           inputs(x=normal(B, 4), W=normal(D, 4), b=normal(D))),
    OpCase("batchnorm[train]", layers.batchnorm_forward, layers.batchnorm_backward,
           inputs(x=normal(B, D, scale=3.0, shift=1.0), gamma=normal(D), beta=normal(D)),
           batchnorm_state(D, train=True)),
    OpCase("batchnorm[eval]", layers.batchnorm_forward, layers.batchnorm_backward,
           inputs(x=normal(B, D, scale=3.0, shift=1.0), gamma=normal(D), beta=normal(D)),
           batchnorm_state(D, train=False)),
    OpCase("relu", layers.relu_forward, layers.relu_backward, inputs(x=normal(B, D))),
    OpCase("dropout", dropout_same_mask_forward, layers.dropout_backward, inputs(x=normal(B, D)),
           lambda xp, dtype: dict(p=0.4, mask_seed=7)),
    OpCase("l2_normalize", layers.l2_normalize_forward, layers.l2_normalize_backward,
           inputs(x=normal(B, D))),
    OpCase("gelu", layers.gelu_forward, layers.gelu_backward, inputs(x=normal(B, D, scale=2.0))),
    OpCase("sigmoid", layers.sigmoid_forward, layers.sigmoid_backward,
           inputs(x=normal(B, D, scale=2.0))),
    OpCase("tanh", layers.tanh_forward, layers.tanh_backward, inputs(x=normal(B, D, scale=2.0))),
    OpCase("conv1d[k=5,C=2]", layers.conv1d_forward, layers.conv1d_backward,
           inputs(x=normal(B, 2, D), w=normal(1, 2, 5), b=normal(1))),
    # hyperbolic.py
    OpCase("expmap0", hyperbolic.expmap0_forward, hyperbolic.expmap0_backward,
           inputs(u=normal(B, D)), lambda xp, dtype: dict(c=C)),
    OpCase("expmap0[tanh clamp]", hyperbolic.expmap0_forward, hyperbolic.expmap0_backward,
           inputs(u=rows_with_norms([1.5 * hyperbolic.TANH_ARG_MAX / math.sqrt(C)] * B)),
           lambda xp, dtype: dict(c=C)),
    OpCase("project[inside]", hyperbolic.project_forward, hyperbolic.project_backward,
           inputs(x=rows_with_norms(np.linspace(0.3, 0.9, B) * hyperbolic.ball_radius(C))),
           lambda xp, dtype: dict(c=C)),
    OpCase("project[outside]", hyperbolic.project_forward, hyperbolic.project_backward,
           inputs(x=rows_with_norms(np.linspace(1.5, 3.0, B) * hyperbolic.ball_radius(C))),
           lambda xp, dtype: dict(c=C)),
    OpCase("to_ball", hyperbolic.to_ball_forward, hyperbolic.to_ball_backward,
           inputs(e=rows_with_norms([1.0] * B)), lambda xp, dtype: dict(c=C, riemannian_grad=False)),
    # fusion.py
    *(egff_case(gate, mix, 3) for gate in ("product", "sum", "concat")
      for mix in ("activated", "raw")),
    egff_case("product", "activated", 1),           # PAEFF as in the design card
    egff_case("product", "raw", 5),                 # the authors' code
    OpCase("gated_fusion[train]", gated_fusion_forward, gated_fusion_backward, GATED_INPUTS,
           batchnorm_state(H, train=True)),        # b1 feeds a train-mode BN: exactly 0
    OpCase("gated_fusion[eval]", gated_fusion_forward, gated_fusion_backward, GATED_INPUTS,
           batchnorm_state(H, train=False)),
    # losses.py
    OpCase("softmax_cross_entropy", losses.softmax_cross_entropy_forward,
           losses.softmax_cross_entropy_backward, inputs(s=normal(B, 3)),
           lambda xp, dtype: dict(y=xp.asarray(np.array(LABELS)))),
    OpCase("symmetric_cross_entropy", losses.symmetric_cross_entropy_forward,
           losses.symmetric_cross_entropy_backward, inputs(a=normal(B, D), b=normal(B, D)),
           lambda xp, dtype: dict(temperature=TAU)),
    OpCase("symmetric_cross_entropy_from_logits", losses.symmetric_cross_entropy_from_logits_forward,
           losses.symmetric_cross_entropy_from_logits_backward, inputs(S=normal(B, B, scale=2.0))),
    OpCase("orthogonal_projection", losses.orthogonal_projection_forward,
           losses.orthogonal_projection_backward, inputs(z=normal(B, D)),
           lambda xp, dtype: dict(y=xp.asarray(np.array(LABELS)), gamma=0.7)),
    # poincare.py
    OpCase("feature_clip", poincare.feature_clip_forward, poincare.feature_clip_backward,
           inputs(h=rows_with_norms([0.4, 3.0, 1.5, 9.0, 2.0])),      # rows 1, 3 are shrunk
           lambda xp, dtype: dict(radius=2.3)),
    OpCase("distance_matrix", poincare.distance_matrix_forward, poincare.distance_matrix_backward,
           inputs(x=in_ball(C, 0.05, 0.95), y=in_ball(C, 0.05, 0.95, n=4)),
           lambda xp, dtype: dict(c=C)),
    OpCase("distance_logits", poincare.distance_logits_forward, poincare.distance_logits_backward,
           inputs(x=in_ball(C, 0.1, 0.9), y=in_ball(C, 0.1, 0.9)),
           lambda xp, dtype: dict(c=C, temperature=0.2)),
    OpCase("poincare_alignment", poincare.poincare_alignment_forward,
           poincare.poincare_alignment_backward,
           inputs(p_f=in_ball(C, 0.1, 0.95), p_v=in_ball(C, 0.1, 0.95)),
           lambda xp, dtype: dict(c=C, temperature=0.2)),
]

LOSS_VARIANTS = [
    dict(),                                                     # PAEFF: dropout 0.4, Riemannian on
    dict(riemannian_grad=False),
    dict(dropout=0.0),
    dict(egff_kernel=5, egff_mix="raw"),                        # the authors' code
    dict(egff_kernel=3, egff_gate="sum"),
    dict(egff_kernel=3, egff_gate="concat"),
    dict(egff_gate="concat", egff_mix="raw"),
    dict(alignment="euclidean"),
    dict(alignment="none"),
    dict(alignment="poincare", riemannian_grad=False),         # with it, the gradient is no derivative
    dict(fusion="gated"),
    dict(fusion="gated", alignment="euclidean"),
]


def loss_case_name(variant):
    return "loss[" + (",".join(f"{k}={v}" for k, v in variant.items()) or "default") + "]"


LOSS_CASES = [LossCase(loss_case_name(v), v) for v in LOSS_VARIANTS]

CASES = {case.name: case for case in OP_CASES + LOSS_CASES}


def select(name, registry=None):
    """The cases of ``registry`` (default ``CASES``) called ``name``, or of the
    family ``name`` (``egff`` → every ``egff[...]``, ``loss`` → every Config
    variant); [] if none."""
    registry = CASES if registry is None else registry
    if name in registry:
        return [registry[name]]
    return [case for case in registry.values() if case.name.split("[")[0] == name]
