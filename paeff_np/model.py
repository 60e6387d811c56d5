"""The PAEFF network: configuration, initialisation, forward, backward.

``forward`` runs the layers in the order of the paper's Figure 1 and keeps a
cache per layer; ``backward`` walks the same layers in exactly the reverse
order, so the two read side by side. Parameters and buffers are plain dicts
keyed by the official PyTorch ``state_dict`` names (docs/spec.md §2).

The network's pieces follow the op protocol of ``layers.py`` with dicts in
place of arrays: ``branch_forward`` and ``fusion_forward`` return
``(out, new_buffers, cache)``, ``forward`` returns
``(LossOutput(loss, terms), new_buffers, cache)``, and each ``x_backward(dout,
cache)`` returns a dict of gradients keyed like the parameters.
"""
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from .backend import COUNTER_UNIFORM, get_array_module, kernel, matmul
from .domains import (BOOLEAN, FRACTION, NON_NEGATIVE, ODD_INTEGER, POSITIVE, JointRule, check_fields,
                      check_known, integer, numbers_of, one_of)
from .fusion import (EGFF_GATES, EGFF_MIXES, egff_backward, egff_forward, gated_fusion_backward,
                     gated_fusion_forward)
from .hyperbolic import (MIN_NORM, TANH_ARG_MAX, TO_BALL_APPLY_KERNEL,
                         TO_BALL_BACKWARD_ROWS_KERNEL, TO_BALL_ROWS_KERNEL, Expmap0Cache, ProjectCache,
                         ToBallCache, ball_radius, to_ball_backward, to_ball_forward, unit_row_ball_norm,
                         unit_row_riemannian_factor)
from .layers import (BATCHNORM_EPS, BATCHNORM_MOMENTUM, BATCHNORM_STATS_KERNEL, BATCHNORM_VAR_KERNEL,
                     BatchNormCache, BatchNormState, L2NormalizeCache, LinearCache,
                     batchnorm_backward, batchnorm_forward, dropout_backward, dropout_forward,
                     l2_normalize_backward, l2_normalize_forward, linear_backward,
                     linear_forward, relu_backward, relu_forward, row_dot, row_norm, tanh_backward,
                     tanh_forward)
from .losses import (OrthogonalProjectionCache, SoftmaxCrossEntropyCache,
                     orthogonal_projection_backward,
                     orthogonal_projection_forward, softmax_cross_entropy_backward,
                     softmax_cross_entropy_forward, symmetric_cross_entropy_backward,
                     symmetric_cross_entropy_forward)
from .poincare import (CLIP_EPS, FEATURE_CLIP_BACKWARD_KERNEL, FEATURE_CLIP_ROWS_KERNEL, FeatureClipCache,
                       feature_clip_backward, feature_clip_forward, poincare_alignment_backward,
                       poincare_alignment_forward)

FUSIONS = ("egff", "gated")
ALIGNMENTS = ("hyperbolic", "euclidean", "none", "poincare")
GATED_HIDDEN = 128          # width of FOP's attention block


# --- configuration ---

@dataclass(frozen=True)
class Config:
    """Every choice of docs/spec.md §2–§3; the defaults are PAEFF as in the paper.

    See docs/math.md §14 (alignments), §17.8 (clip_radius).
    """
    face_dim: int = 4096
    voice_dim: int = 512
    embed_dim: int = 256
    n_classes: int = 901
    fusion: str = "egff"            # "egff" (PAEFF) | "gated" (FOP baseline)
    egff_kernel: int = 1            # odd; 1 = the design card, 5 = the authors' code
    egff_gate: str = "product"      # "product" | "sum" | "concat"
    egff_mix: str = "activated"     # "activated" (paper eq. 2) | "raw" (authors' code)
    alignment: str = "hyperbolic"   # "hyperbolic" | "euclidean" | "none" | "poincare"
    curvature: float = 0.05
    clip_radius: float = 2.3        # r of the feature clipping; "poincare" only
    riemannian_grad: bool = True
    temperature: float = 0.07
    dropout: float = 0.4
    opl_gamma: float = 0.7
    loss_weights: tuple = (0.3, 0.35, 0.35)   # (align, opl, ce)

    # each field's domain and the rules that join fields: the one home of these checks
    # (paeff_np/domains.py); the command lines and the checkpoint reader call the same
    DOMAINS = {
        **{k: integer(1) for k in ("face_dim", "voice_dim", "embed_dim", "n_classes")},
        "fusion": one_of(FUSIONS), "egff_gate": one_of(EGFF_GATES), "egff_mix": one_of(EGFF_MIXES),
        "alignment": one_of(ALIGNMENTS), "egff_kernel": ODD_INTEGER,
        "curvature": POSITIVE, "temperature": POSITIVE, "clip_radius": POSITIVE,
        "riemannian_grad": BOOLEAN, "dropout": FRACTION, "opl_gamma": NON_NEGATIVE,
        "loss_weights": numbers_of(3, NON_NEGATIVE),
    }
    JOINT_RULES = (
        JointRule(("loss_weights",), lambda v: any(w > 0 for w in v["loss_weights"]),
                  "{loss_weights}: at least one weight (align, opl, ce) must be > 0, or nothing is trained"),
        JointRule(("loss_weights", "alignment"),
                  lambda v: v["alignment"] != "none" or any(w > 0 for w in v["loss_weights"][1:]),
                  "{loss_weights} with {alignment}: the alignment term is off, so the OPL or the CE "
                  "weight must be > 0, or nothing is trained"),
        # same padding: a tap more than D − 1 places off centre never meets a feature (docs/math.md §7)
        JointRule(("egff_kernel", "embed_dim", "fusion"),
                  lambda v: v["fusion"] != "egff" or v["egff_kernel"] <= 2 * v["embed_dim"] - 1,
                  "{egff_kernel} with {embed_dim}: EGFF's convolution runs along the D embedding "
                  "features, so a kernel wider than 2·D − 1 has taps that never meet a feature "
                  "(the authors use 5)"),
    )

    def __post_init__(self):
        check_fields(self.__dict__, self.DOMAINS, self.JOINT_RULES, where="Config")
        object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        for k in ("face_dim", "voice_dim", "embed_dim", "n_classes", "egff_kernel"):
            object.__setattr__(self, k, int(getattr(self, k)))

    def to_dict(self):
        d = asdict(self)
        d["loss_weights"] = list(self.loss_weights)
        return d

    @classmethod
    def from_dict(cls, d, where="Config"):
        """A Config from its ``to_dict`` form (e.g. a checkpoint's ``model`` section):
        every field there, none unknown, each in its domain; else ``FieldError``."""
        check_known(d, cls.DOMAINS, where)
        return cls(**d)


# --- parameters and buffers ---

def euclidean_equivalent(cfg):
    """The Euclidean Config whose loss terms and gradients equal those of the
    hyperbolic ``cfg``: temperature ``τ/ρ²`` and, with the Riemannian scaling,
    alignment weight ``α₁·κ`` (ρ, κ: ``unit_row_ball_norm``,
    ``unit_row_riemannian_factor``). Every row of e has norm 1, so the ball
    only rescales the dot products.

    Derivation: docs/math.md §16.
    """
    if cfg.alignment != "hyperbolic":
        raise ValueError(f"euclidean_equivalent: alignment is {cfg.alignment!r}, not 'hyperbolic'")
    rho = unit_row_ball_norm(cfg.curvature)
    kappa = unit_row_riemannian_factor(cfg.curvature) if cfg.riemannian_grad else 1.0
    a1, a2, a3 = cfg.loss_weights
    return replace(cfg, alignment="euclidean", temperature=cfg.temperature / rho ** 2,
                   loss_weights=(a1 * kappa, a2, a3))


BRANCHES = ("face_branch.fc1.", "voice_branch.fc1.")
GATED = "fusion_layer.attention."


def _bn_buffer_keys(prefix):
    return prefix + "running_mean", prefix + "running_var", prefix + "num_batches_tracked"


def _bn_state(buffers, prefix):
    """The running statistics of the BatchNorm1d at ``prefix``, as a ``BatchNormState``."""
    mean_key, var_key, _ = _bn_buffer_keys(prefix)
    return BatchNormState(buffers[mean_key], buffers[var_key])


def _bn_buffers(buffers, prefix, new_state, train):
    """The buffers of the BatchNorm1d at ``prefix`` after one forward: the new
    running statistics, and the batch counter one higher in train mode."""
    mean_key, var_key, count_key = _bn_buffer_keys(prefix)
    return {mean_key: new_state.running_mean, var_key: new_state.running_var,
            count_key: buffers[count_key] + (1 if train else 0)}


def parameter_count(cfg):
    """How many numbers ``init_params(cfg)`` makes, from the shapes alone (nothing allocated).

    See docs/math.md §0.3 (the parameters at initialisation).
    """
    D, widths = cfg.embed_dim, (cfg.face_dim, cfg.voice_dim)
    count = sum(D * w + D + 2 * D + D * D + D for w in widths)        # the branches: linear, BN, linear
    if cfg.fusion == "egff":
        count += (2 if cfg.egff_gate == "concat" else 1) * cfg.egff_kernel + 1
    else:
        count += GATED_HIDDEN * 2 * D + GATED_HIDDEN + 2 * GATED_HIDDEN + D * GATED_HIDDEN + D
    return count + D * D + D + cfg.n_classes * D + cfg.n_classes     # res_mix, logits


def batchnorm_prefixes(cfg):
    """Key prefixes of every BatchNorm1d in the model.

    See docs/math.md §2.
    """
    out = [branch + "1." for branch in BRANCHES]
    if cfg.fusion == "gated":
        out.append(GATED + "0.block.1.")
    return out


def init_params(cfg, seed=0, dtype=np.float32):
    """Fresh parameters and buffers (docs/spec.md §4), as NumPy arrays of ``dtype``.

    Linear: Xavier-uniform weights U(±√(6/(fan_in + fan_out))), biases 0.01.
    BatchNorm: weight 1, bias 0, running mean 0, running var 1, counter 0.
    Conv: U(±1/√(C_in·k)) for weight and bias.

    See docs/math.md §0.3 (the values at initialisation).
    """
    rng = np.random.default_rng(seed)
    D = cfg.embed_dim
    params = {}

    def linear(prefix, fan_out, fan_in):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        params[prefix + "weight"] = rng.uniform(-bound, bound, (fan_out, fan_in))
        params[prefix + "bias"] = np.full(fan_out, 0.01)

    def batchnorm(prefix, width):
        params[prefix + "weight"] = np.ones(width)
        params[prefix + "bias"] = np.zeros(width)

    for branch, in_dim in zip(BRANCHES, (cfg.face_dim, cfg.voice_dim)):
        linear(branch + "0.", D, in_dim)
        batchnorm(branch + "1.", D)
        linear(branch + "4.", D, D)
    if cfg.fusion == "egff":
        c_in = 2 if cfg.egff_gate == "concat" else 1
        bound = 1.0 / math.sqrt(c_in * cfg.egff_kernel)
        params["fusion_layer.conv.weight"] = rng.uniform(-bound, bound, (1, c_in, cfg.egff_kernel))
        params["fusion_layer.conv.bias"] = rng.uniform(-bound, bound, (1,))
    else:
        linear(GATED + "0.block.0.", GATED_HIDDEN, 2 * D)
        batchnorm(GATED + "0.block.1.", GATED_HIDDEN)
        linear(GATED + "1.", D, GATED_HIDDEN)
    linear("res_mix.", D, D)
    linear("logits_layer.", cfg.n_classes, D)
    params = {k: v.astype(dtype) for k, v in params.items()}

    buffers = {}
    for prefix in batchnorm_prefixes(cfg):
        width = params[prefix + "weight"].shape[0]
        mean_key, var_key, count_key = _bn_buffer_keys(prefix)
        buffers[mean_key] = np.zeros(width, dtype)
        buffers[var_key] = np.ones(width, dtype)
        buffers[count_key] = np.array(0, dtype=np.int64)
    return params, buffers


# --- the branch: Linear → BatchNorm → ReLU → Dropout → Linear ---

class BranchCache(NamedTuple):
    prefix: str                 # "face_branch.fc1." or "voice_branch.fc1."
    lin0: LinearCache
    bn: BatchNormCache
    relu: Any                   # B × D, the ReLU's mask
    drop: Any                   # B × D, the dropout mask (None when off)
    lin4: LinearCache


# The branch in train mode on CuPy (beside branch_forward/branch_backward, the reference):
# b₀ is not added to x W₀ᵀ (BatchNorm cancels it; the running mean gets it through the
# stats kernel's shift), and BatchNorm's apply, the ReLU and the dropout are one kernel
# forward, their backward one kernel after BatchNorm's two column sums. Compiled and
# compared on the CPU by tests/test_kernels.py.
_BRANCH_APPLY = """
    xhat = (x - mean) * inv_std;
    T bn = gamma * xhat + beta;
    relu = bn > 0;
    """
BRANCH_APPLY_KERNEL = dict(
    kind="elementwise", in_params="T x, T mean, T inv_std, T gamma, T beta, uint64 key, uint64 step, uint64 draw, T p, T keep",
    out_params="T xhat, bool relu, T drop, T y",
    body=_BRANCH_APPLY + COUNTER_UNIFORM + "drop = (u >= p) / keep; y = bn * relu * drop;", name="paeff_branch_apply")
"""``x̂ = (x − μ)·inv_std``, ``BN = γx̂ + β``, the ReLU's mask ``[BN > 0]``, the dropout's
``[u ≥ p]/(1 − p)`` (u from ``backend.COUNTER_UNIFORM``) and ``y = BN ⊙ relu ⊙ drop``: batchnorm_forward's apply, relu_forward, dropout_forward."""
BRANCH_APPLY_NO_DROPOUT_KERNEL = dict(
    kind="elementwise", in_params="T x, T mean, T inv_std, T gamma, T beta",
    out_params="T xhat, bool relu, T y",
    body=_BRANCH_APPLY + "y = bn * relu;", name="paeff_branch_apply_no_dropout")
"""``BRANCH_APPLY_KERNEL`` without the dropout (p = 0)."""
BRANCH_MASKED_DOT_KERNEL = dict(
    kind="reduction", in_params="T dy, T drop, bool relu, T x", out_params="T z",
    map_expr="dy * drop * relu * x", reduce_expr="a + b", post_map_expr="z = a", identity="0",
    name="paeff_branch_masked_dot")
"""``Σ_rows (dy ⊙ drop ⊙ relu) ⊙ x``: BatchNorm's dγ (x = x̂) and dβ (x = 1) of the masked gradient."""
BRANCH_BN_BACKWARD_KERNEL = dict(
    kind="elementwise",
    in_params="T dy, T drop, bool relu, T xhat, T gamma, T inv_std, T dgamma, T dbeta, T inv_n",
    out_params="T dx",
    body="T g = dy * drop * relu; dx = gamma * inv_std * (g - dbeta * inv_n - xhat * (dgamma * inv_n));",
    name="paeff_branch_bn_backward")
"""dropout_backward, relu_backward and batchnorm_backward (train mode) in one pass."""


def _branch_train_forward_cupy(params, buffers, prefix, x, dropout, rng):
    """``branch_forward`` in train mode on CuPy: the same outputs and cache."""
    P = lambda name: params[prefix + name]
    h0 = matmul(x, P("0.weight").T)                       # + b₀: cancelled by the BatchNorm
    n = h0.shape[0]
    state = _bn_state(buffers, prefix + "1.")
    mean = h0.mean(axis=0)
    var = kernel(BATCHNORM_VAR_KERNEL)(h0, mean, 1.0 / n, axis=0)
    inv_std, new_mean, new_var = kernel(BATCHNORM_STATS_KERNEL)(
        mean, P("0.bias"), var, state.running_mean, state.running_var, BATCHNORM_MOMENTUM, n / (n - 1),
        BATCHNORM_EPS)
    gamma = P("1.weight")
    if dropout > 0:
        xhat, relu, drop, h3 = kernel(BRANCH_APPLY_KERNEL)(
            h0, mean, inv_std, gamma, P("1.bias"), *rng.args(), dropout, 1.0 - dropout)
    else:
        xhat, relu, h3 = kernel(BRANCH_APPLY_NO_DROPOUT_KERNEL)(h0, mean, inv_std, gamma, P("1.bias"))
        drop = None
    h4, cache_lin4 = linear_forward(h3, P("4.weight"), P("4.bias"))
    cache = BranchCache(prefix, LinearCache(x, P("0.weight")), BatchNormCache(xhat, inv_std, gamma, True),
                        relu, drop, cache_lin4)
    return h4, _bn_buffers(buffers, prefix + "1.", BatchNormState(new_mean, new_var), True), cache


def _branch_backward_cupy(dh4, cache):
    """``branch_backward`` (train mode) on CuPy: the same grads."""
    dh3, dW4, db4 = linear_backward(dh4, cache.lin4)
    drop = 1.0 if cache.drop is None else cache.drop
    bn = cache.bn
    dgamma = kernel(BRANCH_MASKED_DOT_KERNEL)(dh3, drop, cache.relu, bn.xhat, axis=0)
    dbeta = kernel(BRANCH_MASKED_DOT_KERNEL)(dh3, drop, cache.relu, 1.0, axis=0)
    dh0 = kernel(BRANCH_BN_BACKWARD_KERNEL)(dh3, drop, cache.relu, bn.xhat, bn.gamma, bn.inv_std, dgamma, dbeta,
                                            1.0 / dh3.shape[0])
    _, dW0, db0 = linear_backward(dh0, cache.lin0, need_dx=False)
    grads = {"0.weight": dW0, "0.bias": db0, "1.weight": dgamma, "1.bias": dbeta,
             "4.weight": dW4, "4.bias": db4}
    return {cache.prefix + k: v for k, v in grads.items()}


def branch_forward(params, buffers, prefix, x, train, dropout, rng):
    """``h = drop(ReLU(BN(x W₀ᵀ + b₀))) W₄ᵀ + b₄``; ``x``: B × in, ``h``: B × D.

    Returns ``h``, the branch's new buffers, and the cache. The model
    L2-normalises ``h`` (e = normalize(h)); the Poincaré alignment reads ``h`` itself.

    Derivation: docs/math.md §14.
    """
    if train and get_array_module(x) is not np:            # CuPy: the kernels above
        return _branch_train_forward_cupy(params, buffers, prefix, x, dropout, rng)
    P = lambda name: params[prefix + name]
    h0, cache_lin0 = linear_forward(x, P("0.weight"), P("0.bias"))
    h1, new_state, cache_bn = batchnorm_forward(h0, P("1.weight"), P("1.bias"),
                                                _bn_state(buffers, prefix + "1."), train)
    h2, cache_relu = relu_forward(h1)
    h3, cache_drop = dropout_forward(h2, dropout if train else 0.0, rng)
    h4, cache_lin4 = linear_forward(h3, P("4.weight"), P("4.bias"))
    cache = BranchCache(prefix, cache_lin0, cache_bn, cache_relu, cache_drop, cache_lin4)
    return h4, _bn_buffers(buffers, prefix + "1.", new_state, train), cache


def branch_backward(dh4, cache):
    """The mirror of ``branch_forward``; ``dh4``: B × D. Returns the branch's
    grads (the data needs no gradient, so ``dx`` is not computed).

    Derivation: docs/math.md §14.
    """
    if cache.bn.train and get_array_module(dh4) is not np:  # CuPy: the kernels above
        return _branch_backward_cupy(dh4, cache)
    dh3, dW4, db4 = linear_backward(dh4, cache.lin4)
    dh2 = dropout_backward(dh3, cache.drop)
    dh1 = relu_backward(dh2, cache.relu)
    dh0, dgamma, dbeta = batchnorm_backward(dh1, cache.bn)
    _, dW0, db0 = linear_backward(dh0, cache.lin0, need_dx=False)
    grads = {"0.weight": dW0, "0.bias": db0, "1.weight": dgamma, "1.bias": dbeta,
             "4.weight": dW4, "4.bias": db4}
    return {cache.prefix + k: v for k, v in grads.items()}


# --- fusion: EGFF or FOP's gated fusion ---

GATED_KEYS = ("0.block.0.weight", "0.block.0.bias", "0.block.1.weight", "0.block.1.bias",
              "1.weight", "1.bias")     # W1, b1, bn_weight, bn_bias, W2, b2 under GATED


class FusionCache(NamedTuple):
    fusion: str                 # cfg.fusion: which backward to run
    op: Any                     # the EGFFCache or GatedFusionCache


def fusion_forward(params, buffers, e_f, e_v, cfg, train):
    """``e_f``, ``e_v``: B × D. Returns ``FusionOutput(m, emb_f, emb_v)``, the
    fusion's new buffers, and the cache.

    Derivation: docs/math.md §12, §13.
    """
    if cfg.fusion == "egff":
        out, cache = egff_forward(
            e_f, e_v, params["fusion_layer.conv.weight"], params["fusion_layer.conv.bias"],
            cfg.egff_gate, cfg.egff_mix)
        return out, {}, FusionCache(cfg.fusion, cache)
    bn_prefix = GATED + "0.block.1."
    out, new_state, cache = gated_fusion_forward(
        e_f, e_v, *(params[GATED + key] for key in GATED_KEYS), _bn_state(buffers, bn_prefix), train)
    return out, _bn_buffers(buffers, bn_prefix, new_state, train), FusionCache(cfg.fusion, cache)


def fusion_backward(dm, cache):
    """The mirror of ``fusion_forward``; ``dm``: B × D. Returns ``de_f, de_v``
    and the fusion's grads.

    Derivation: docs/math.md §12, §13.
    """
    if cache.fusion == "egff":
        de_f, de_v, dw, db = egff_backward(dm, cache.op)
        return de_f, de_v, {"fusion_layer.conv.weight": dw, "fusion_layer.conv.bias": db}
    de_f, de_v, *dparams = gated_fusion_backward(dm, cache.op)
    return de_f, de_v, {GATED + key: g for key, g in zip(GATED_KEYS, dparams)}


# --- alignment of the two modalities: L_A ---

class AlignmentCache(NamedTuple):
    alignment: str              # cfg.alignment: which backward to run
    clip_f: FeatureClipCache    # h̃ = clip(h); None unless the alignment is poincare
    clip_v: FeatureClipCache
    ball_f: ToBallCache         # p = P(expmap0(·)); None unless hyperbolic or poincare
    ball_v: ToBallCache
    loss: Any                   # SymmetricCrossEntropyCache or PoincareAlignmentCache; None for none
    h_f: Any                    # B × D: every gradient has its shape and dtype


# The Poincaré alignment's way into the ball on CuPy, P(expmap0(clip(h))): the clip's and
# the map's per-row kernels are one (‖clip(h)‖ = f‖h‖ needs no second row norm), their
# B × D passes one, and so backward (⟨clip(h), dp⟩ = f⟨h, dp⟩ and ⟨h, dg⟩ follow from one
# row dot ⟨h, dp⟩). The bodies are those of poincare.py's and hyperbolic.py's kernels.
def _concat_kernels(name, parts, extra_in="", extra_out="", computed=()):
    """One elementwise kernel whose body runs ``parts`` in order: kernel specs (their
    bodies) and plain statements. Parameters: ``extra_in``, then each spec's inputs that
    no part computes (``computed``, the outputs); outputs: each spec's, then ``extra_out``."""
    split = lambda text: [p.strip() for p in text.split(",") if p.strip()]
    specs = [part for part in parts if isinstance(part, dict)]
    outs = [p for spec in specs for p in split(spec["out_params"])] + split(extra_out)
    ins = split(extra_in)
    for p in (p for spec in specs for p in split(spec["in_params"])):
        if p.split()[-1] not in computed and p not in ins and p not in outs:
            ins.append(p)
    body = "\n".join((part["body"] if isinstance(part, dict) else part).strip() for part in parts)
    return dict(kind="elementwise", in_params=", ".join(ins), out_params=", ".join(outs), body=body, name=name)


def _call(spec, **args):
    """``kernel(spec)`` called with its inputs by name."""
    return kernel(spec)(*(args[p.split()[-1]] for p in spec["in_params"].split(",")))


CLIP_TO_BALL_ROWS_KERNEL = _concat_kernels(
    "paeff_clip_to_ball_rows", [FEATURE_CLIP_ROWS_KERNEL, "T norm = hnorm * clip_factor;", TO_BALL_ROWS_KERNEL],
    computed=("norm",))
"""``FEATURE_CLIP_ROWS_KERNEL``, then ``TO_BALL_ROWS_KERNEL`` on ‖clip(h)‖ = f‖h‖."""
CLIP_TO_BALL_APPLY_KERNEL = _concat_kernels(
    "paeff_clip_to_ball_apply", ["g = h * clip_factor; T u = g;", TO_BALL_APPLY_KERNEL],
    extra_in="T h, T clip_factor", extra_out="T g", computed=("u",))
"""``g = h·f`` (feature_clip_forward), then ``TO_BALL_APPLY_KERNEL`` on it."""
CLIP_TO_BALL_BACKWARD_ROWS_KERNEL = _concat_kernels(
    "paeff_clip_to_ball_backward_rows",
    ["T ud = clip_factor * hdp;", TO_BALL_BACKWARD_ROWS_KERNEL,
     "hd = alpha * hdp + beta * clip_factor * (hnorm * hnorm);"],
    extra_in="T hdp, T clip_factor, T hnorm", extra_out="T hd", computed=("ud",))
"""From ``hdp = ⟨h, dp⟩``: ``ud = ⟨g, dp⟩ = f·hdp``, ``TO_BALL_BACKWARD_ROWS_KERNEL``'s α, β
(``dg = α·dp + β·g``), and ``hd = ⟨h, dg⟩ = α·hdp + β·f‖h‖²`` for the clip's backward."""
CLIP_TO_BALL_BACKWARD_KERNEL = _concat_kernels(
    "paeff_clip_to_ball_backward", ["T dout = alpha * dp + beta * g;", FEATURE_CLIP_BACKWARD_KERNEL],
    extra_in="T dp, T g, T alpha, T beta", computed=("dout",))
"""``dg = α·dp + β·g`` (``AXPBY_KERNEL``'s pass), then ``FEATURE_CLIP_BACKWARD_KERNEL`` on it."""


def _clip_to_ball_forward_cupy(h, cfg):
    """``feature_clip_forward`` then ``to_ball_forward`` on CuPy: three calls; their caches."""
    c, riemannian = cfg.curvature, cfg.riemannian_grad
    hnorm = row_norm(h)
    clip_factor, clip_active, n, a, t, s, norm_active, tanh_active, pn, outside, factor, scale = _call(
        CLIP_TO_BALL_ROWS_KERNEL, hnorm=hnorm, radius=cfg.clip_radius, clip_eps=CLIP_EPS, sqrt_c=c ** 0.5, c=c,
        r=ball_radius(c), min_norm=MIN_NORM, tanh_max=TANH_ARG_MAX, riemannian=bool(riemannian))
    q, p, g = _call(CLIP_TO_BALL_APPLY_KERNEL, h=h, clip_factor=clip_factor, s=s, factor=factor)
    ball = ToBallCache(Expmap0Cache(g, n, a, t, s, norm_active, tanh_active, c ** 0.5),
                       ProjectCache(q, pn, outside, ball_radius(c)), scale if riemannian else None)
    return p, FeatureClipCache(h, hnorm, clip_factor, clip_active), ball


def _clip_to_ball_backward_cupy(dp, clip, ball):
    """``to_ball_backward`` then ``feature_clip_backward`` on CuPy: one row dot, two kernels."""
    ex, proj = ball.expmap0, ball.project
    alpha, beta, hd = _call(
        CLIP_TO_BALL_BACKWARD_ROWS_KERNEL, hdp=row_dot(clip.h, dp), clip_factor=clip.factor, hnorm=clip.norm,
        n=ex.n, a=ex.a, t=ex.t, s=ex.s, norm_active=ex.norm_active, tanh_active=ex.tanh_active, pn=proj.n,
        outside=proj.outside, r=proj.r, scale=1.0 if ball.scale is None else ball.scale, sqrt_c=ex.sqrt_c)
    return _call(CLIP_TO_BALL_BACKWARD_KERNEL, dp=dp, g=ex.u, alpha=alpha, beta=beta, h=clip.h, hd=hd,
                 hnorm=clip.norm, clip_factor=clip.factor, clip_active=clip.active, clip_eps=CLIP_EPS)


def alignment_forward(h_f, h_v, e_f, e_v, cfg):
    """The alignment loss L_A, 0-d; ``h_f``, ``h_v``: B × D, the branches'
    outputs, ``e_f``, ``e_v``: B × D, their normalised rows. By ``cfg.alignment``:

    - hyperbolic (PAEFF): symmetric CE of ``p_f p_vᵀ/τ``, ``p = P(expmap0(e))``;
    - euclidean: symmetric CE of ``e_f e_vᵀ/τ``;
    - poincare: symmetric CE of ``−d_c(p_f, p_v)/τ``, ``p = P(expmap0(clip(h)))``;
    - none: 0.

    Returns ``(L_A, cache)``.

    Derivation: docs/math.md §14 (the table), §10, §8, §17.8.
    """
    clip_f = clip_v = ball_f = ball_v = cache_loss = None
    if cfg.alignment == "none":
        loss = get_array_module(h_f).zeros((), dtype=h_f.dtype)
    elif cfg.alignment == "poincare" and get_array_module(h_f) is not np:   # CuPy: the kernels above
        p_f, clip_f, ball_f = _clip_to_ball_forward_cupy(h_f, cfg)
        p_v, clip_v, ball_v = _clip_to_ball_forward_cupy(h_v, cfg)
        loss, cache_loss = poincare_alignment_forward(p_f, p_v, cfg.curvature, cfg.temperature)
    elif cfg.alignment == "poincare":   # from h, not e: S_ij = −d_c(p_f,i, p_v,j)/τ
        g_f, clip_f = feature_clip_forward(h_f, cfg.clip_radius)
        g_v, clip_v = feature_clip_forward(h_v, cfg.clip_radius)
        p_f, ball_f = to_ball_forward(g_f, cfg.curvature, cfg.riemannian_grad)
        p_v, ball_v = to_ball_forward(g_v, cfg.curvature, cfg.riemannian_grad)
        loss, cache_loss = poincare_alignment_forward(p_f, p_v, cfg.curvature, cfg.temperature)
    else:                               # dot products of e, in the ball (hyperbolic) or not
        p_f, p_v = e_f, e_v
        if cfg.alignment == "hyperbolic":
            p_f, ball_f = to_ball_forward(e_f, cfg.curvature, cfg.riemannian_grad)
            p_v, ball_v = to_ball_forward(e_v, cfg.curvature, cfg.riemannian_grad)
        loss, cache_loss = symmetric_cross_entropy_forward(p_f, p_v, cfg.temperature)
    return loss, AlignmentCache(cfg.alignment, clip_f, clip_v, ball_f, ball_v, cache_loss, h_f)


def alignment_backward(dloss, cache):
    """The mirror of ``alignment_forward``: ``dh_f, dh_v, de_f, de_v`` (B × D
    each) of ``dloss · L_A``, ``dloss`` the alignment's weight; zeros for the
    inputs the alignment does not read.

    Derivation: docs/math.md §14, §10, §8.3, §17.8.
    """
    zeros = lambda: get_array_module(cache.h_f).zeros_like(cache.h_f)
    return tuple(zeros() if g is None else g for g in _alignment_grads(dloss, cache))


def _alignment_grads(dloss, cache):
    """``alignment_backward`` with None in place of its zeros (``backward`` adds no zeros)."""
    if cache.alignment == "none":
        return None, None, None, None
    if cache.alignment == "poincare" and get_array_module(cache.h_f) is not np:   # CuPy: the kernels above
        dp_f, dp_v = poincare_alignment_backward(dloss, cache.loss)
        return (_clip_to_ball_backward_cupy(dp_f, cache.clip_f, cache.ball_f),
                _clip_to_ball_backward_cupy(dp_v, cache.clip_v, cache.ball_v), None, None)
    if cache.alignment == "poincare":
        dp_f, dp_v = poincare_alignment_backward(dloss, cache.loss)
        dg_f = to_ball_backward(dp_f, cache.ball_f)
        dg_v = to_ball_backward(dp_v, cache.ball_v)
        dh_f = feature_clip_backward(dg_f, cache.clip_f)
        dh_v = feature_clip_backward(dg_v, cache.clip_v)
        return dh_f, dh_v, None, None
    dp_f, dp_v = symmetric_cross_entropy_backward(dloss, cache.loss)
    if cache.alignment == "hyperbolic":
        dp_f = to_ball_backward(dp_f, cache.ball_f)
        dp_v = to_ball_backward(dp_v, cache.ball_v)
    return None, None, dp_f, dp_v


# --- the whole network and its loss ---

# The glue of forward/backward on CuPy: each of these kernels joins what the NumPy
# line beside it does in two or more passes (tests/test_kernels.py compares them).
HEAD_TANH_KERNEL = dict(kind="elementwise", in_params="T r, T b", out_params="T z",
                        body="z = tanh(r + b);", name="paeff_head_tanh")
"""``z = tanh(r + b)``: the res_mix bias (``linear_forward``) and ``tanh_forward``."""
HEAD_TANH_BACKWARD_KERNEL = dict(kind="elementwise", in_params="T dz1, T dz2, T z", out_params="T dr",
                                 body="dr = (dz1 + dz2) * (1 - z * z);", name="paeff_head_tanh_backward")
"""``dr = (dz_OPL + dz_logits) ⊙ (1 − z²)``: the sum of z's two gradients and ``tanh_backward``."""
LOSS_SUM_KERNEL = dict(kind="elementwise", in_params="T l1, T l2, T l3, T a1, T a2, T a3", out_params="T loss",
                       body="loss = a1 * l1 + a2 * l2 + a3 * l3;", name="paeff_loss_sum")
"""``L = α₁L_A + α₂L_OP + α₃L_CE`` on the three 0-d terms."""
NORMALIZE_BACKWARD_SUM_KERNEL = dict(
    kind="elementwise", in_params="T de1, T de2, T e, T radial, bool active, T denom, T dh",
    out_params="T dx", body="dx = ((de1 + de2) - e * (radial * active)) / denom + dh;",
    name="paeff_normalize_backward_sum")
"""``l2_normalize_backward(de₁ + de₂) + dh`` after its row dot ``radial = ⟨e, de₁ + de₂⟩``
(``SUM_DOT_KERNEL``): e's gradients from the fusion and the alignment, h's from the alignment."""
SUM_DOT_KERNEL = dict(kind="reduction", in_params="T e, T x, T y", out_params="T z", map_expr="e * (x + y)",
                      reduce_expr="a + b", post_map_expr="z = a", identity="0", name="paeff_sum_dot")
"""``⟨e, x + y⟩`` along the reduced axis."""


def _head_forward(m, W, b):
    """``z = tanh(m Wᵀ + b)``: ``linear_forward`` then ``tanh_forward`` (CuPy: the product
    and one kernel). Returns ``z``, the linear's cache and the tanh's."""
    if get_array_module(m) is not np:
        z = kernel(HEAD_TANH_KERNEL)(matmul(m, W.T), b)
        return z, LinearCache(m, W), z
    r, cache_res = linear_forward(m, W, b)
    z, cache_tanh = tanh_forward(r)
    return z, cache_res, cache_tanh


def _head_tanh_backward(dz1, dz2, z):
    """``tanh_backward(dz1 + dz2, z)`` (CuPy: one kernel)."""
    if get_array_module(z) is not np:
        return kernel(HEAD_TANH_BACKWARD_KERNEL)(dz1, dz2, z)
    return tanh_backward(dz1 + dz2, z)


def _weighted_loss(weights, terms):
    """``α₁L_A + α₂L_OP + α₃L_CE`` (CuPy: one kernel)."""
    (a1, a2, a3), (l1, l2, l3) = weights, terms
    if get_array_module(l1) is not np:
        return kernel(LOSS_SUM_KERNEL)(l1, l2, l3, a1, a2, a3)
    return a1 * l1 + a2 * l2 + a3 * l3


def _normalize_backward(de, de_align, dh_align, cache):
    """``l2_normalize_backward(de + de_align, cache) + dh_align``, None meaning a zero
    gradient (CuPy: one row dot and one kernel, ``NORMALIZE_BACKWARD_SUM_KERNEL``)."""
    if get_array_module(de) is not np:
        de2 = 0.0 if de_align is None else de_align
        radial = kernel(SUM_DOT_KERNEL)(cache.e, de, de2, axis=1)[:, None]
        return kernel(NORMALIZE_BACKWARD_SUM_KERNEL)(de, de2, cache.e, radial, cache.active, cache.denom,
                                                     0.0 if dh_align is None else dh_align)
    dx = l2_normalize_backward(de if de_align is None else de + de_align, cache)
    return dx if dh_align is None else dx + dh_align

class LossOutput(NamedTuple):
    loss: Any                   # 0-d, the total loss (the differentiable output)
    terms: dict                 # {"align", "opl", "ce"}: the three 0-d loss terms


class ModelCache(NamedTuple):
    cfg: Config
    face: BranchCache
    voice: BranchCache
    norm_f: L2NormalizeCache    # e = normalize(h)
    norm_v: L2NormalizeCache
    align: AlignmentCache
    fusion: FusionCache
    res: LinearCache
    tanh: Any                   # B × D, z
    logits: LinearCache
    opl: OrthogonalProjectionCache
    ce: SoftmaxCrossEntropyCache


def forward(params, buffers, face, voice, labels, cfg, train=True, rng=None):
    """Loss of one batch; ``face``: B × face_dim, ``voice``: B × voice_dim,
    ``labels``: (B,) in 0..n_classes−1. Returns
    ``(LossOutput(loss, terms), new_buffers, cache)``.

    branches h → e = normalize(h) → alignment L_A (of e; poincare: of h) →
    fusion of e → head ``z = tanh(m W_rᵀ + b_r)``, ``s = z W_lᵀ + b_l`` →
    ``L = α₁L_A + α₂L_OP + α₃L_CE``.

    Derivation: docs/math.md §14 (quoted there), §0.1.
    """
    # branches
    h_f, buf_f, cache_face = branch_forward(params, buffers, BRANCHES[0], face,
                                            train, cfg.dropout, rng)
    h_v, buf_v, cache_voice = branch_forward(params, buffers, BRANCHES[1], voice,
                                             train, cfg.dropout, rng)
    # normalisation: e = h/‖h‖
    e_f, cache_norm_f = l2_normalize_forward(h_f)
    e_v, cache_norm_v = l2_normalize_forward(h_v)
    # alignment of the two modalities
    loss_align, cache_align = alignment_forward(h_f, h_v, e_f, e_v, cfg)
    # fusion
    fused, buf_fusion, cache_fusion = fusion_forward(params, buffers, e_f, e_v, cfg, train)
    # head
    z, cache_res, cache_tanh = _head_forward(fused.m, params["res_mix.weight"], params["res_mix.bias"])
    s, cache_logits = linear_forward(z, params["logits_layer.weight"], params["logits_layer.bias"])
    # losses
    loss_opl, cache_opl = orthogonal_projection_forward(z, labels, cfg.opl_gamma)
    loss_ce, cache_ce = softmax_cross_entropy_forward(s, labels)
    loss = _weighted_loss(cfg.loss_weights, (loss_align, loss_opl, loss_ce))
    terms = {"align": loss_align, "opl": loss_opl, "ce": loss_ce}
    new_buffers = {**buffers, **buf_f, **buf_v, **buf_fusion}
    cache = ModelCache(cfg=cfg, face=cache_face, voice=cache_voice,
                       norm_f=cache_norm_f, norm_v=cache_norm_v, align=cache_align,
                       fusion=cache_fusion, res=cache_res, tanh=cache_tanh,
                       logits=cache_logits, opl=cache_opl, ce=cache_ce)
    return LossOutput(loss, terms), new_buffers, cache


def backward(dloss, cache):
    """Gradients of ``dloss ·`` the total loss (``dloss`` a scalar; 1.0 for the
    loss itself), keyed like the parameters: ``forward`` read from the bottom up.

    Derivation: docs/math.md §14 (quoted there).
    """
    a1, a2, a3 = cache.cfg.loss_weights
    grads = {}
    # losses
    ds = softmax_cross_entropy_backward(dloss * a3, cache.ce)
    dz = orthogonal_projection_backward(dloss * a2, cache.opl)
    # head
    dz_logits, grads["logits_layer.weight"], grads["logits_layer.bias"] = linear_backward(ds, cache.logits)
    dr = _head_tanh_backward(dz, dz_logits, cache.tanh)
    dm, grads["res_mix.weight"], grads["res_mix.bias"] = linear_backward(dr, cache.res)
    # fusion
    de_f, de_v, grads_fusion = fusion_backward(dm, cache.fusion)
    grads.update(grads_fusion)
    # alignment of the two modalities
    dh_align_f, dh_align_v, de_align_f, de_align_v = _alignment_grads(dloss * a1, cache.align)
    # normalisation: h reaches the loss through e (fusion, alignment) and, for poincare, directly
    dh_f = _normalize_backward(de_f, de_align_f, dh_align_f, cache.norm_f)
    dh_v = _normalize_backward(de_v, de_align_v, dh_align_v, cache.norm_v)
    # branches
    grads.update(branch_backward(dh_v, cache.voice))
    grads.update(branch_backward(dh_f, cache.face))
    return grads


def step_matmuls(cfg, B):
    """The matrix products of one ``loss_and_grads`` at batch ``B``, as the code
    performs them: ``[(name, a_shape, b_shape, transpose_a, transpose_b)]``, one
    product ``op(a) @ op(b)`` each, ``op`` a transpose where flagged. All the
    rest of the step is elementwise, so these products timed alone are the
    floor the step is compared with (bench.py).

    See docs/math.md §14.
    """
    D, rows = cfg.embed_dim, []

    def linear(name, n_in, n_out, need_dx=True):       # linear_forward / linear_backward
        rows.append((f"{name} x·Wᵀ", (B, n_in), (n_out, n_in), False, True))
        rows.append((f"{name} dW = dyᵀ·x", (B, n_out), (B, n_in), True, False))
        if need_dx:
            rows.append((f"{name} dx = dy·W", (B, n_out), (n_out, n_in), False, False))

    for prefix, n_in in zip(BRANCHES, (cfg.face_dim, cfg.voice_dim)):
        linear(prefix + "0", n_in, D, need_dx=False)
        linear(prefix + "4", D, D)
    if cfg.alignment == "poincare":                     # the Gram matrix of the distances
        rows += [("align G = x·yᵀ", (B, D), (B, D), False, True),
                 ("align dx = dG·y", (B, B), (B, D), False, False),
                 ("align dy = dGᵀ·x", (B, B), (B, D), True, False)]
    elif cfg.alignment != "none":                       # dot-product logits
        rows += [("align S = a·bᵀ", (B, D), (B, D), False, True),
                 ("align da = dS·b", (B, B), (B, D), False, False),
                 ("align db = dSᵀ·a", (B, B), (B, D), True, False)]
    if cfg.fusion == "gated":
        linear(GATED + "0.block.0", 2 * D, GATED_HIDDEN)
        linear(GATED + "1", GATED_HIDDEN, D)
    linear("res_mix", D, D)
    linear("logits_layer", D, cfg.n_classes)
    rows += [("opl G = ẑ·ẑᵀ", (B, D), (B, D), False, True),       # orthogonal projection
             ("opl dẑ = dG·ẑ", (B, B), (B, D), False, False)]
    return rows


def step_flops(cfg, B):
    """``(total, rows)``: the FLOPs of ``step_matmuls(cfg, B)``, with
    ``rows = [(name, m, n, k, 2·m·n·k)]`` for each product of an m × k by a
    k × n matrix. Elementwise work (activations, normalisations, softmax,
    EGFF's 1-D conv, AdamW) is not counted.

    See docs/math.md §14.
    """
    rows = []
    for name, a_shape, b_shape, transpose_a, transpose_b in step_matmuls(cfg, B):
        m, k = a_shape[::-1] if transpose_a else a_shape
        n = b_shape[0] if transpose_b else b_shape[1]
        rows.append((name, m, n, k, 2 * m * n * k))
    return sum(row[-1] for row in rows), rows


# --- the entry points: one shape check, then forward and backward ---

def check_inputs(params, face, voice, labels, cfg):
    """Chainer's ``check_type_forward``, once, where arrays enter the model.

    ``face``: B × cfg.face_dim and ``voice``: B × cfg.voice_dim, both of the
    parameters' float dtype, B ≥ 1; ``labels`` (None for ``embed``): (B,)
    integers in 0..n_classes−1, and then B ≥ 2 (a train-mode BatchNorm divides
    by B − 1, docs/math.md §2); the parameters' widths match ``cfg``. Raises
    ``ValueError`` naming the array, its shape and the expected one. Reads
    shapes and dtypes, and on NumPy the labels' range (``check_labels``); CuPy
    labels are not read back (a host sync per step): whoever uploads them
    checks them once, on the host (the trainer does, for the whole training set).

    See docs/math.md §14.
    """
    D = cfg.embed_dim
    widths = [(BRANCHES[0] + "0.weight", (D, cfg.face_dim), "(embed_dim, face_dim)"),
              (BRANCHES[1] + "0.weight", (D, cfg.voice_dim), "(embed_dim, voice_dim)"),
              ("res_mix.weight", (D, D), "(embed_dim, embed_dim)"),
              ("logits_layer.weight", (cfg.n_classes, D), "(n_classes, embed_dim)")]
    for key, shape, meaning in widths:
        if key not in params:
            raise ValueError(f"params: no {key!r} (a {cfg.fusion} model needs it)")
        if tuple(params[key].shape) != shape:
            raise ValueError(f"params[{key!r}] has shape {tuple(params[key].shape)}; "
                             f"expected {shape} = {meaning} of the Config")
    dtype = params["res_mix.weight"].dtype
    given = [("face", face), ("voice", voice)] + ([("labels", labels)] if labels is not None else [])
    for name, x in given:
        if not hasattr(x, "shape"):
            raise ValueError(f"{name} is a {type(x).__name__}, not an array (give np.asarray(...))")
    B = face.shape[0] if face.ndim == 2 else None
    for name, x, width, meaning in [("face", face, cfg.face_dim, "(batch, face_dim)"),
                                    ("voice", voice, cfg.voice_dim, "(batch, voice_dim)")]:
        if x.ndim != 2 or tuple(x.shape) != (B, width):
            expected = f"({'batch' if B is None else B}, {width})"
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {expected} = {meaning}")
        if x.dtype != dtype:
            raise ValueError(f"{name} has dtype {x.dtype}; expected {dtype}, the parameters' dtype")
    if B < 1:
        raise ValueError("face and voice have no rows; a batch needs at least one")
    if labels is not None:
        if tuple(labels.shape) != (B,):
            raise ValueError(f"labels has shape {tuple(labels.shape)}; expected {(B,)} = (batch,)")
        if labels.dtype.kind not in "iu":
            raise ValueError(f"labels has dtype {labels.dtype}; expected integers")
        if B < 2:
            raise ValueError("a training batch needs at least 2 rows: BatchNorm's running variance "
                             "divides by B − 1 (PyTorch refuses B = 1 too)")
        if get_array_module(labels) is np:
            check_labels(labels, cfg.n_classes)


def check_labels(labels, n_classes):
    """``labels`` (host integers) all in 0..n_classes−1, else ``ValueError`` naming the first bad one.

    See docs/math.md §14.
    """
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        bad = labels[(labels < 0) | (labels >= n_classes)]
        raise ValueError(f"labels holds {bad[0]}; expected class indices 0..{n_classes - 1} "
                         f"(n_classes = {n_classes})")


def loss_and_grads(params, buffers, face, voice, labels, cfg, rng=None):
    """One training step's maths: ``(loss, terms, grads, new_buffers)`` in train mode;
    ``face``: B × face_dim, ``voice``: B × voice_dim, ``labels``: (B,).

    Derivation: docs/math.md §14.
    """
    if labels is None:
        raise ValueError("labels is None; a training step needs (B,) integer labels")
    check_inputs(params, face, voice, labels, cfg)
    (loss, terms), new_buffers, cache = forward(params, buffers, face, voice, labels, cfg,
                                                train=True, rng=rng)
    return loss, terms, backward(1.0, cache), new_buffers


def embed(params, buffers, face, voice, cfg):
    """Evaluation embeddings (eval mode, docs/spec.md §5): ``f̂, v̂`` for EGFF, ``f̃, ṽ`` for gated;
    ``face``: B × face_dim, ``voice``: B × voice_dim; each embedding B × embed_dim.

    See docs/math.md §12 (the evaluation embeddings).
    """
    check_inputs(params, face, voice, None, cfg)
    h_f, _, _ = branch_forward(params, buffers, BRANCHES[0], face, False, 0.0, None)
    h_v, _, _ = branch_forward(params, buffers, BRANCHES[1], voice, False, 0.0, None)
    e_f, _ = l2_normalize_forward(h_f)
    e_v, _ = l2_normalize_forward(h_v)
    (_, emb_f, emb_v), _, _ = fusion_forward(params, buffers, e_f, e_v, cfg, train=False)
    return emb_f, emb_v
