"""A runnable walk-through of docs/math.md: it prints what it checks and draws the figures.

    python docs/walkthrough.py --out DIR       (prints, and draws the figures into DIR)
    python docs/walkthrough.py --print-only    (prints only; no matplotlib needed)

Every number it prints is computed here, from the library itself; every figure
it writes is one that docs/math.md shows (the committed copies live in
docs/figures/). It needs NumPy and SciPy (both dependencies of paeff_np) and,
for the figures, matplotlib. It runs in a few seconds on one CPU core.
"""
import argparse
import math
import os
import sys
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import paeff_np as pn  # noqa: E402
from paeff_np import hyperbolic, layers, losses  # noqa: E402
from paeff_np.gradcheck import TOLERANCE  # noqa: E402
from paeff_np.gradcheck.cases import OP_CASES, SMALL  # noqa: E402  (SMALL: the checks' sizes)
from paeff_np.model import euclidean_equivalent  # noqa: E402

C = 0.05            # the paper's curvature
TAU = 0.07          # the paper's temperature


def say(title):
    print(f"\n== {title} ==")


def riemannian_factor(c, p_norm):
    """(1 − c‖p‖²)²/4, the per-row factor of the Riemannian scaling."""
    return (1.0 - c * p_norm ** 2) ** 2 / 4.0


def small_batch(B=8, seed=0):
    rng = np.random.default_rng(seed)
    face = np.abs(rng.standard_normal((B, SMALL["face_dim"])))
    voice = rng.standard_normal((B, SMALL["voice_dim"]))
    return face, voice, np.array([0, 1, 2, 0, 1, 2, 0, 1])[:B]


def save_figure(plt, fig, out, name, tight=True, **savefig_args):
    """Lay out (``tight``), write ``out/name`` at 110 dpi, and close ``fig``."""
    if tight:
        fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110, **savefig_args)
    plt.close(fig)


# --- 1. check_layer on every op ------------------------------------------------

def check_every_op():
    """``check_layer`` on every op of the library: the op half of the registry
    that ``python -m paeff_np.gradcheck`` runs (paeff_np/gradcheck/cases.py),
    and one deliberately wrong backward as a control that must fail."""
    from paeff_np.gradcheck import check_layer
    say("check_layer on every op (float64, 4th-order stencil, h = 1e-5)")
    results = {}
    for case in OP_CASES:
        results[case.name] = max(case.check().errors.values())
        print(f"  {case.name:36s} worst relative error {results[case.name]:.1e}")
    x = np.random.default_rng(0).standard_normal((5, 6)) * 2.0
    wrong = check_layer(layers.tanh_forward, lambda dy, t: dy * (1.0 - t), [x], raises=False)
    control = max(wrong.errors.values())
    print(f"  control: tanh with dy·(1 − t) for its backward: worst relative error {control:.1e} (FAIL)")
    return results, control


def plot_check_every_op(plt, data, out):
    results, control = data
    names = list(results) + ["CONTROL: tanh, backward dy·(1 − t)"]
    values = [max(v, 1e-18) for v in results.values()] + [control]
    colors = ["tab:blue"] * len(results) + ["tab:red"]
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.2 * len(names)))
    ax.barh(names, values, color=colors)
    ax.axvline(TOLERANCE, color="k", ls="--", label=f"tolerance of the tests, {TOLERANCE:.0e}")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xscale("log")
    ax.set_xlim(1e-13, 10)
    ax.invert_yaxis()
    ax.set_xlabel("worst normwise relative error, analytic vs finite difference")
    ax.set_title("check_layer on every op (float64)\nred: a deliberately wrong backward, which must fail")
    ax.legend(loc="lower right", fontsize=8, framealpha=1)
    save_figure(plt, fig, out, "check_every_op.png")


# --- 2. finite-difference error against h --------------------------------------

def fd_error_against_h():
    say("finite-difference error against h, one weight of the whole loss")
    cfg = pn.Config(**SMALL, riemannian_grad=False, dropout=0.0)
    params, buffers = pn.init_params(cfg, seed=1, dtype=np.float64)
    face, voice, labels = small_batch()
    key, idx = "res_mix.weight", (2, 3)
    loss, terms, grads, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg)
    exact = float(grads[key][idx])
    x0 = float(params[key][idx])

    def f(x):
        params[key][idx] = x
        return float(pn.loss_and_grads(params, buffers, face, voice, labels, cfg)[0])

    hs = np.logspace(-12, -0.5, 47)
    err2, err4 = [], []
    for h in hs:
        g2 = (f(x0 + h) - f(x0 - h)) / (2 * h)
        g4 = (-f(x0 + 2 * h) + 8 * f(x0 + h) - 8 * f(x0 - h) + f(x0 - 2 * h)) / (12 * h)
        err2.append(abs(g2 - exact) / abs(exact))
        err4.append(abs(g4 - exact) / abs(exact))
    params[key][idx] = x0
    err2, err4 = np.array(err2), np.array(err4)
    print(f"  ∂L/∂{key}{list(idx)} = {exact:.6e}")
    print(f"  2nd order: best {err2.min():.1e} at h = {hs[err2.argmin()]:.0e};"
          f"  at h = 1e-6: {np.interp(-6, np.log10(hs), err2):.1e}")
    print(f"  4th order: best {err4.min():.1e} at h = {hs[err4.argmin()]:.0e};"
          f"  at h = 1e-5: {np.interp(-5, np.log10(hs), err4):.1e}")
    eps = np.finfo(np.float64).eps
    print(f"  the loss f = L = {float(loss):.2f} (L_A = {float(terms['align']):.2f}, L_OP = "
          f"{float(terms['opl']):.2f}, L_CE = {float(terms['ce']):.2f})")
    print(f"  rounding estimate at h = 1e-5: 1.5 ε_mach |f| / (h |∂L/∂w|) = "
          f"{1.5 * eps * abs(float(loss)) / (1e-5 * abs(exact)):.1e}")
    return hs, err2, err4, 1.5 * eps * abs(float(loss)) / abs(exact)


def plot_fd(plt, data, out):
    hs, err2, err4, rounding = data
    fig, ax = plt.subplots(figsize=(7, 5.2))
    ax.loglog(hs, np.maximum(err2, 1e-17), "o-", ms=3, label="2nd order: (f(x+h) − f(x−h)) / 2h")
    ax.loglog(hs, np.maximum(err4, 1e-17), "s-", ms=3,
              label="4th order: (−f(x+2h) + 8f(x+h) − 8f(x−h) + f(x−2h)) / 12h")
    ax.loglog(hs, rounding / hs, ":", color="gray",
              label="rounding estimate of the 4th order: 1.5 ε|f| / (h |f′|)")
    ax.axvline(1e-5, color="tab:orange", lw=0.8, ls="--")
    ax.text(1.2e-5, 1e-15, "h = 1e-5\n(gradcheck)", fontsize=8, color="tab:orange")
    ax.set_ylim(1e-16, 1)
    ax.set_xlabel("step h")
    ax.set_ylabel("relative error of the derivative f′")
    ax.set_title("Finite-difference error against h: the V\n"
                 "(f = the whole PAEFF loss as a function of one weight, float64)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
    save_figure(plt, fig, out, "fd_error_vs_h.png")


# --- 3. the bias before a train-mode BatchNorm --------------------------------

def batchnorm_bias_gradient():
    say("the Linear bias before a train-mode BatchNorm: float64 vs float32")
    cfg = pn.Config(face_dim=512, voice_dim=192, embed_dim=128, n_classes=100, dropout=0.0)
    rng = np.random.default_rng(0)
    B = 256
    face = np.maximum(rng.standard_normal((B, cfg.face_dim)), 0.0)
    voice = rng.standard_normal((B, cfg.voice_dim))
    voice /= np.linalg.norm(voice, axis=1, keepdims=True)
    labels = rng.integers(0, cfg.n_classes, B)
    sizes = {}
    for dtype in (np.float64, np.float32):
        params, buffers = pn.init_params(cfg, seed=0, dtype=dtype)
        _, _, grads, _ = pn.loss_and_grads(params, buffers, face.astype(dtype), voice.astype(dtype),
                                           labels, cfg)
        sizes[np.dtype(dtype).name] = {k: float(np.abs(g).max()) for k, g in grads.items()}
    b0 = "face_branch.fc1.0.bias"
    for name, s in sizes.items():
        print(f"  {name}: max|d {b0}| = {s[b0]:.1e}   max|d face_branch.fc1.0.weight| = "
              f"{s['face_branch.fc1.0.weight']:.1e}")
    # what AdamW does with float32 rounding noise of that size (paper lr and wd)
    g32 = sizes["float32"][b0]
    lr, wd, steps = 2e-5, 0.01, 2000
    walk = {}
    for label, sigma in (("float64", sizes["float64"][b0]), ("float32", g32)):
        p = {"b": np.full(64, 0.01)}
        opt = pn.AdamW(lr=lr, weight_decay=wd)
        noise = np.random.default_rng(1)
        path = []
        for _ in range(steps):
            opt.step(p, {"b": sigma * noise.standard_normal(64)})
            path.append(np.abs(p["b"] - 0.01).mean())
        walk[label] = np.array(path)
    decay = 0.01 * (1 - (1 - lr * wd) ** np.arange(1, steps + 1))
    first = {k: v[0] / lr for k, v in walk.items()}
    print(f"  AdamW, lr = {lr}, wd = {wd}: first step of the bias (as a fraction of lr): "
          f"float64 {first['float64']:.1e}, float32 {first['float32']:.1e}")
    print(f"  after {steps} steps, mean |b − b₀|: weight decay alone {decay[-1]:.1e}, "
          f"float64 noise {walk['float64'][-1]:.1e}, float32 noise {walk['float32'][-1]:.1e}")
    return sizes, walk, decay


def plot_bn_bias(plt, data, out):
    sizes, walk, decay = data
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    keys = [k for k in sizes["float64"] if k.startswith("face_branch") or k.startswith("res_mix")]
    x = np.arange(len(keys))
    ax1.bar(x - 0.2, [max(sizes["float64"][k], 1e-20) for k in keys], 0.4, label="float64")
    ax1.bar(x + 0.2, [max(sizes["float32"][k], 1e-20) for k in keys], 0.4, label="float32")
    ax1.set_yscale("log")
    ax1.set_xticks(x)
    ax1.set_xticklabels([k.replace("face_branch.fc1.", "face ") for k in keys], rotation=40,
                        ha="right", fontsize=8)
    ax1.set_ylabel("max |gradient|")
    ax1.set_title("Gradients at initialisation: the bias\nbefore BatchNorm ('face 0.bias') is rounding noise")
    ax1.set_ylim(1e-19, 1e3)
    ax1.legend(fontsize=8, ncol=2, loc="upper center")
    steps = np.arange(1, len(decay) + 1)
    ax2.loglog(steps, decay, label="weight decay alone")
    ax2.loglog(steps, walk["float64"], "--", label="float64 rounding noise (on top of the decay)")
    ax2.loglog(steps, walk["float32"], label="float32 rounding noise")
    ax2.set_xlabel("AdamW step (lr 2e-5, wd 0.01)")
    ax2.set_ylabel("mean |b − b₀|")
    ax2.set_title("How far AdamW moves that bias")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "batchnorm_bias_float32.png"), dpi=110)
    plt.close(fig)


# --- 4. hyperbolic ≡ rescaled Euclidean ------------------------------------------

def hyperbolic_equals_euclidean():
    s = hyperbolic.unit_row_ball_norm(C)
    k = hyperbolic.unit_row_riemannian_factor(C)
    say("the hyperbolic alignment is the Euclidean one with τ/ρ² and α₁·κ")
    print(f"  c = {C}: ρ = tanh(√c)/√c = {s:.5f};  τ/ρ² = {TAU / s ** 2:.5f};"
          f"  κ = (1 − cρ²)²/4 = {k:.5f}")
    cfg_h = pn.Config(**SMALL, dropout=0.4)
    cfg_e = euclidean_equivalent(cfg_h)                 # τ/ρ², α₁·κ
    params, buffers = pn.init_params(cfg_h, seed=1, dtype=np.float64)
    face, voice, labels = small_batch()
    _, t_h, g_h, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg_h,
                                       rng=np.random.default_rng(3))
    _, t_e, g_e, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg_e,
                                       rng=np.random.default_rng(3))
    scale = max(np.abs(g).max() for g in g_h.values())
    diffs = {n: float(np.abs(g_h[n] - g_e[n]).max() / scale) for n in g_h}
    print(f"  L_A hyperbolic {float(t_h['align']):.15f}  Euclidean(τ/ρ²) {float(t_e['align']):.15f}")
    print(f"  worst gradient difference over all {len(diffs)} parameters: {max(diffs.values()):.1e}"
          " (relative to the largest gradient)")
    # the same comparison with the plain temperature τ, to show that the rescaling matters
    cfg_plain = replace(cfg_e, temperature=TAU)
    _, _, g_p, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg_plain,
                                     rng=np.random.default_rng(3))
    plain = {n: float(np.abs(g_h[n] - g_p[n]).max() / scale) for n in g_h}
    print(f"  with τ instead of τ/ρ²: worst difference {max(plain.values()):.1e}")
    return diffs, plain


def plot_equivalence(plt, data, out):
    diffs, plain = data
    names = list(diffs)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    y = np.arange(len(names))
    ax.barh(y - 0.2, [max(diffs[n], 1e-18) for n in names], 0.4, label="Euclidean with τ/ρ², α₁·κ")
    ax.barh(y + 0.2, [max(plain[n], 1e-18) for n in names], 0.4, label="Euclidean with τ, α₁·κ")
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("max |grad_hyperbolic − grad_Euclidean| / largest gradient  (0 drawn at 1e-18)")
    ax.set_title("Hyperbolic alignment (c = 0.05, τ = 0.07, Riemannian scaling on)\n"
                 "vs Euclidean alignment: every gradient, float64")
    ax.legend(fontsize=8, loc="upper right")
    save_figure(plt, fig, out, "hyperbolic_equals_euclidean.png")


# --- 5. GELU and sigmoid in the tails -------------------------------------------

def tails():
    from scipy.special import erfc, expit, ndtr
    say("GELU and sigmoid in the tails (float64; references from scipy.special)")
    x_gelu = np.linspace(-38, 0, 400)
    ref = x_gelu * ndtr(x_gelu)
    assert np.array_equal(layers.gelu_forward(x_gelu)[0], ref)     # the code calls ndtr itself
    erfc_form = x_gelu * 0.5 * erfc(-x_gelu / math.sqrt(2))
    naive = x_gelu * 0.5 * (1.0 + np.vectorize(math.erf)(x_gelu / math.sqrt(2)))
    rel = lambda a, b: np.abs(a - b) / np.maximum(np.abs(b), 1e-300)
    gelu_err, naive_err = rel(erfc_form, ref), rel(naive, ref)
    print(f"  GELU(x) for x ∈ [−38, 0]: the code is x·ndtr(x), the reference; worst relative "
          f"difference of ½ erfc(−x/√2) {gelu_err.max():.1e}, of the 1 + erf form {naive_err.max():.1e}")
    x_sig = np.linspace(0, 40, 401)
    s = layers.sigmoid_forward(x_sig)[0]
    dsig = layers.sigmoid_backward(np.ones_like(x_sig), layers.sigmoid_forward(x_sig)[1])
    dref = expit(x_sig) * expit(-x_sig)
    sig_err = rel(dsig, dref)
    s_left = layers.sigmoid_forward(-x_sig)[0]
    left_err = rel(s_left, expit(-x_sig))
    print(f"  sigmoid(−x) for x ∈ [0, 40]: worst relative error {left_err.max():.1e}; sigmoid(−40) = {s_left[-1]:.3e}")
    for x in (10, 20, 30, 36, 37, 38):
        i = int(np.argmin(abs(x_sig - x)))
        print(f"  sigmoid′({x:2d}) = y(1 − y): relative error {sig_err[i]:.1e}   "
              f"(bound (ε/4)·eˣ = {np.finfo(float).eps / 4 * math.exp(x):.1e})")
    del s
    return x_gelu, gelu_err, naive_err, x_sig, sig_err, left_err


def plot_tails(plt, data, out):
    x_gelu, gelu_err, naive_err, x_sig, sig_err, left_err = data
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))

    def curve(ax, x, err, style, label, color):
        """``err`` on a log axis; entries exactly 0 (no error at all) as ticks along the bottom."""
        nonzero = err > 0
        ax.semilogy(np.where(nonzero, x, np.nan), np.where(nonzero, err, np.nan), style,
                    color=color, label=label)
        ax.plot(x[~nonzero], np.full((~nonzero).sum(), 3e-18), "|", color=color, ms=6)

    curve(ax1, x_gelu, naive_err, "-", "x·½(1 + erf(x/√2))", "tab:blue")
    curve(ax1, x_gelu, gelu_err, "-", "x·½ erfc(−x/√2)", "tab:orange")
    ax1.axvspan(-38, -37.5, color="0.85", zorder=0)
    ax1.text(-37.3, 1e-4, "Φ(x) subnormal\n(< 2.2e-308)", fontsize=7, color="0.3")
    ax1.set_ylim(1e-18, 10)
    ax1.set_xlim(-38, 0)
    ax1.set_xlabel("x")
    ax1.set_ylabel("relative error against x·ndtr(x), what the code computes")
    ax1.set_title("GELU, left tail (ticks at the bottom: exactly equal)", fontsize=10)
    ax1.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    curve(ax2, x_sig, sig_err, "-", "sigmoid′ = y(1 − y), y = sigmoid(x): the code", "tab:blue")
    ax2.semilogy(x_sig, np.finfo(float).eps / 4 * np.exp(x_sig), "--", color="k", lw=1.2,
                 label="(ε/4)·eˣ", zorder=5)
    curve(ax2, -x_sig, left_err, "-", "sigmoid(x) for x < 0: the code", "tab:green")
    ax2.set_ylim(1e-18, 10)
    ax2.set_xlabel("x")
    ax2.set_ylabel("relative error against scipy.special.expit")
    ax2.set_title("Sigmoid: the derivative's error grows like (ε/4)·eˣ", fontsize=10)
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    save_figure(plt, fig, out, "gelu_sigmoid_tails.png")


# --- 6. the Poincaré ball: where PAEFF operates ------------------------------------

def poincare_operating_point():
    say("the Poincaré ball at c = 0.05: PAEFF's operating point and the clamps")
    s = hyperbolic.unit_row_ball_norm(C)
    radius = 1 / math.sqrt(C)
    proj_r = hyperbolic.ball_radius(C)
    u_proj = math.atanh(1 - hyperbolic.BALL_EPS) / math.sqrt(C)
    u_tanh = hyperbolic.TANH_ARG_MAX / math.sqrt(C)
    print(f"  ball radius 1/√c = {radius:.4f}; projection radius (1 − 1e-3)/√c = {proj_r:.4f}")
    print(f"  ‖e‖ = 1 → ‖p‖ = ρ = {s:.5f} ({s / radius:.1%} of the radius)")
    print(f"  n = ‖v‖ at which each guard acts: MIN_NORM {hyperbolic.MIN_NORM:.0e}; operating 1;"
          f" projection {u_proj:.2f}; tanh clamp {u_tanh:.2f}")
    d0 = 2 / math.sqrt(C) * math.atanh(math.sqrt(C) * s)
    print(f"  hyperbolic distance d(0, p) = (2/√c)·artanh(√c‖p‖) = {d0:.5f} (= 2‖e‖: exactly twice the norm fed to expmap0, at every radius)")
    k = riemannian_factor(C, s)
    print(f"  Riemannian factor (1 − c‖p‖²)²/4 at PAEFF's point: {k:.5f}")
    return dict(s=s, radius=radius, proj_r=proj_r, u_proj=u_proj, u_tanh=u_tanh, k=k)


def plot_poincare(plt, info, out):
    fig = plt.figure(figsize=(12, 5.6))
    ax = fig.add_axes([0.02, 0.2, 0.42, 0.72])
    R = info["radius"]
    th = np.linspace(0, 2 * np.pi, 400)
    ax.fill(R * np.cos(th), R * np.sin(th), color="#eef3fb", zorder=0)
    # geodesics: diameters, and circles orthogonal to the boundary (centre at distance √(R² + r²))
    for angle in np.deg2rad([20, 70, 125]):
        ax.plot([-R * np.cos(angle), R * np.cos(angle)], [-R * np.sin(angle), R * np.sin(angle)],
                color="0.55", lw=0.8, zorder=1)
    for centre_angle, r in ((np.deg2rad(-40), 2.2), (np.deg2rad(200), 5.0), (np.deg2rad(95), 1.2)):
        dist = math.hypot(R, r)
        cx, cy = dist * math.cos(centre_angle), dist * math.sin(centre_angle)
        arc = np.linspace(0, 2 * np.pi, 2000)
        gx, gy = cx + r * np.cos(arc), cy + r * np.sin(arc)
        inside = gx ** 2 + gy ** 2 < R ** 2
        ax.plot(np.where(inside, gx, np.nan), np.where(inside, gy, np.nan), color="0.55", lw=0.8,
                zorder=1)
    # level sets of the distance from the origin, d = 4, 6, ..., 20 (d = 2 is the green circle)
    for d in range(4, 21, 2):
        rr = math.tanh(math.sqrt(C) * d / 2) / math.sqrt(C)
        ax.plot(rr * np.cos(th), rr * np.sin(th), color="tab:blue", lw=0.6, ls=(0, (2, 2)), zorder=2)
    for d in (4, 8, 12, 20):
        rr = math.tanh(math.sqrt(C) * d / 2) / math.sqrt(C)
        ax.text(rr * math.cos(np.deg2rad(-62)), rr * math.sin(np.deg2rad(-62)), str(d), fontsize=7,
                color="tab:blue", ha="center", va="center",
                bbox=dict(boxstyle="round,pad=0.1", fc="#eef3fb", ec="none"), zorder=4)
    ax.plot(R * np.cos(th), R * np.sin(th), "k", lw=1.2, zorder=3)
    ax.plot(info["s"] * np.cos(th), info["s"] * np.sin(th), color="tab:green", lw=2.2, zorder=3)
    rng = np.random.default_rng(0)
    ang = rng.uniform(0, 2 * np.pi, 12)
    ax.plot(info["s"] * np.cos(ang), info["s"] * np.sin(ang), "o", color="tab:green", ms=4, zorder=4)
    ax.set_aspect("equal")
    ax.set_xlim(-R * 1.03, R * 1.03)
    ax.set_ylim(-R * 1.03, R * 1.03)
    ax.axis("off")
    ax.set_title("Poincaré ball, c = 0.05 (a 2-D slice)")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color="k", lw=1.2, label=f"boundary, radius 1/√c = {R:.3f}"),
               Line2D([], [], color="tab:green", lw=2.2,
                      label=f"every PAEFF point p = ρe: ‖p‖ = {info['s']:.4f}, the level set d(0, p) = 2"),
               Line2D([], [], color="tab:blue", lw=0.6, ls=(0, (2, 2)),
                      label="level sets d(0, x) = 4, 6, …, 20 (labelled 4, 8, 12, 20)"),
               Line2D([], [], color="0.55", lw=0.8, label="geodesics: diameters and arcs meeting "
                                                          "the boundary at right angles")]
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.02, 0.0), fontsize=8, frameon=False)
    ax2 = fig.add_axes([0.5, 0.38, 0.47, 0.4])
    marks = [(hyperbolic.MIN_NORM, "MIN_NORM\n1e-5", "tab:gray"),
             (1.0, "PAEFF\nn = ‖e‖ = 1", "tab:green"),
             (info["u_proj"], f"projection acts\nn > {info['u_proj']:.1f}", "tab:red"),
             (info["u_tanh"], f"tanh clamp\nn ≥ {info['u_tanh']:.1f}", "tab:purple")]
    ax2.set_xscale("log")
    ax2.set_xlim(1e-6, 1e3)
    ax2.set_ylim(-1, 1)
    ax2.axhline(0, color="k", lw=1)
    for i, (x, label, color) in enumerate(marks):
        ax2.plot([x], [0], "o", color=color, ms=9)
        ax2.text(x, 0.25 if i % 2 == 0 else -0.75, label, ha="center", fontsize=9, color=color)
    ax2.set_yticks([])
    ax2.set_xlabel("n = ‖v‖, the norm of the row fed to expmap0 (log scale)")
    ax2.set_title("Where each guard acts, on one number line")
    for side in ("left", "right", "top"):
        ax2.spines[side].set_visible(False)
    save_figure(plt, fig, out, "poincare_operating_point.png", tight=False)


def plot_riemannian_factor(plt, info, out):
    R = info["radius"]
    p = np.linspace(0, R * 0.999, 400)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(p, riemannian_factor(C, p), label="(1 − c‖p‖²)²/4 = 1/λ_c(p)²")
    ax.plot([info["s"]], [info["k"]], "o", color="tab:green", ms=8)
    ax.annotate(f"PAEFF: ‖p‖ = {info['s']:.4f}, factor {info['k']:.4f}\n(every row, every step)",
                (info["s"], info["k"]), (1.4, 0.21), fontsize=9, arrowprops=dict(arrowstyle="->"))
    ax.axvline(R, color="k", lw=0.8, ls="--")
    ax.text(R * 0.98, 0.2, "boundary\n1/√c", ha="right", fontsize=8)
    ax.set_xlabel("‖p‖")
    ax.set_ylabel("factor applied to dL/dp")
    ax.set_title("The Riemannian scaling against ‖p‖ (c = 0.05)")
    ax.legend(fontsize=8)
    save_figure(plt, fig, out, "riemannian_factor.png")


# --- 7. the computational graph -------------------------------------------------

def plot_graph(plt, out):
    fig, ax = plt.subplots(figsize=(12, 5.6))
    ax.set_xlim(0, 12)
    ax.set_ylim(-0.9, 6.2)
    ax.axis("off")
    nodes = {
        "face": (0.6, 4.8, "face x_f\nB×4096"), "voice": (0.6, 1.2, "voice x_v\nB×512"),
        "bf": (2.2, 4.8, "branch\nLin→BN→ReLU\n→Drop→Lin → h_f"),
        "bv": (2.2, 1.2, "branch\nLin→BN→ReLU\n→Drop→Lin → h_v"),
        "ef": (4.0, 4.8, "e_f = h_f/‖h_f‖"), "ev": (4.0, 1.2, "e_v = h_v/‖h_v‖"),
        "pf": (6.0, 5.8, "p_f = P(expmap0(e_f))"), "pv": (6.0, 0.2, "p_v = P(expmap0(e_v))"),
        "la": (9.2, 0.2, "L_A: symmetric CE\nS = p_f p_vᵀ/τ"),
        "fus": (5.6, 3.0, "fusion\nEGFF (or gated)"), "m": (6.9, 3.0, "m"),
        "z": (8.0, 4.6, "z = tanh(m W_rᵀ + b_r)"),
        "s": (10.3, 4.6, "s = z W_lᵀ + b_l"),
        "lop": (8.0, 1.9, "L_OP (OPL on z)"), "lce": (10.3, 3.3, "L_CE"),
        "L": (11.3, 1.6, "L = α₁L_A\n+ α₂L_OP\n+ α₃L_CE"),
    }
    fan = {"ef", "ev", "z"}
    boxes = {}
    for key, (x, y, text) in nodes.items():
        color = "#ffe2b8" if key in fan else ("#dcefdc" if key in ("la", "lop", "lce", "L") else "#e6eefa")
        boxes[key] = ax.text(x, y, text, ha="center", va="center", fontsize=8.5,
                             bbox=dict(boxstyle="round,pad=0.35", fc=color, ec="gray"), zorder=3)
    edges = [("face", "bf"), ("voice", "bv"), ("bf", "ef"), ("bv", "ev"), ("ef", "pf"), ("ev", "pv"),
             ("pv", "la"), ("ef", "fus"), ("ev", "fus"), ("fus", "m"), ("m", "z"),
             ("z", "s"), ("z", "lop"), ("s", "lce"), ("la", "L"), ("lop", "L"), ("lce", "L")]
    fig.canvas.draw()                      # the boxes' sizes, for arrows from edge to edge
    for a, b in edges:
        (x0, y0, _), (x1, y1, _) = nodes[a], nodes[b]
        if abs(x1 - x0) >= abs(y1 - y0):   # leave by the side, arrive at the side
            start, end = ((1, 0.5), (0, 0.5)) if x1 > x0 else ((0, 0.5), (1, 0.5))
        else:                              # leave by the top or bottom
            start, end = ((0.5, 0), (0.5, 1)) if y1 < y0 else ((0.5, 1), (0.5, 0))
        ax.annotate("", xy=end, xycoords=boxes[b], xytext=start, textcoords=boxes[a],
                    arrowprops=dict(arrowstyle="-|>", color="tab:orange" if a in fan else "gray",
                                    lw=1.8 if a in fan else 1, shrinkA=4, shrinkB=4), zorder=1)
    # p_f reaches L_A along the right, above the head and clear of L_OP
    ax.annotate("", xy=(0.5, 1), xycoords=boxes["la"], xytext=(1, 0.5), textcoords=boxes["pf"],
                arrowprops=dict(arrowstyle="-|>", color="gray", lw=1, shrinkA=4, shrinkB=4,
                                connectionstyle="angle,angleA=0,angleB=90,rad=0"), zorder=1)
    ax.text(0.1, -0.75, "orange: fan-outs. In the backward their gradients add:  "
            "de_f = (from fusion) + α₁·(from L_A),  dz = α₂·(from L_OP) + (from the logits)",
            fontsize=9, color="tab:orange")
    ax.set_title("The PAEFF loss as a computational graph")
    save_figure(plt, fig, out, "computational_graph.png", tight=False, bbox_inches="tight")


# --- 8. a worked example and the values at initialisation ------------------------

def worked_example():
    say("worked example: B = 3, D = 2, symmetric CE (τ = 1) and OPL (γ = 0.7)")
    a = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    b = np.array([[0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    loss, cache = losses.symmetric_cross_entropy_forward(a, b, 1.0)
    da, db = losses.symmetric_cross_entropy_backward(1.0, cache)
    np.set_printoptions(precision=4, suppress=True)
    S = a @ b.T
    rows = np.exp(S) / np.exp(S).sum(axis=1, keepdims=True)
    cols = np.exp(S) / np.exp(S).sum(axis=0, keepdims=True)
    print("  S = a bᵀ =\n", S)
    print("  softmax over rows =\n", rows, "\n  softmax over columns =\n", cols)
    print("  dS = (rows + cols − 2I)/2B =\n", (rows + cols - 2 * np.eye(3)) / 6)
    print(f"  L_A = {float(loss):.4f};  da =\n", da, "\n  db =\n", db)
    z = np.array([[3.0, 4.0], [4.0, -3.0], [-5.0, 0.0]])
    y = np.array([0, 0, 1])
    lop, cache = losses.orthogonal_projection_forward(z, y, 0.7)
    print(f"  OPL: z = {z.tolist()}, y = {y.tolist()}: L_OP = {float(lop):.6f}")
    zhat = z / 5.0
    same = (y[:, None] == y[None, :]) & ~np.eye(3, dtype=bool)
    dgram = -0.5 * same + 0.7 * 0.25 * (y[:, None] != y[None, :]) * np.sign(zhat @ zhat.T)
    dzhat = 2 * dgram @ zhat
    print("  dΓ = −w_pos M⁺ + γ w_neg M⁻ ⊙ sign(Γ) =\n", dgram, "\n  dẑ = 2 dΓ ẑ =\n", dzhat)
    print(f"  ⟨ẑ₁, dẑ₁⟩ = {float(zhat[0] @ dzhat[0]):.2f}")
    print("  dz =\n", losses.orthogonal_projection_backward(1.0, cache))


def values_at_initialisation():
    say("values at initialisation (paper sizes, B = 256, synthetic features)")
    cfg = pn.Config(dropout=0.0)
    rng = np.random.default_rng(0)
    B = 256
    face = np.maximum(rng.standard_normal((B, cfg.face_dim)), 0.0)
    voice = rng.standard_normal((B, cfg.voice_dim))
    voice /= np.linalg.norm(voice, axis=1, keepdims=True)
    labels = rng.integers(0, cfg.n_classes, B)
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float64)
    loss, terms, grads, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg)
    print(f"  L_CE = {float(terms['ce']):.4f}   (ln K = ln {cfg.n_classes} = {math.log(cfg.n_classes):.4f})")
    print(f"  L_A  = {float(terms['align']):.4f}   (ln B = {math.log(B):.4f})")
    from paeff_np.model import BRANCHES, branch_forward
    e_f, e_v = (h / np.linalg.norm(h, axis=1, keepdims=True)
                for h in (branch_forward(params, buffers, prefix, x, True, 0.0, None)[0]
                          for prefix, x in zip(BRANCHES, (face, voice))))
    rho = hyperbolic.unit_row_ball_norm(cfg.curvature)
    S = rho ** 2 * (e_f @ e_v.T) / cfg.temperature
    sd = float(S.std())
    print(f"  S = p_f p_vᵀ/τ: entries std {sd:.3f} (predicted ρ²/(τ√D) = "
          f"{rho ** 2 / (cfg.temperature * math.sqrt(cfg.embed_dim)):.3f});"
          f"  ln B + std²/2 = {math.log(B) + sd ** 2 / 2:.4f}")
    print(f"  L_OP = {float(terms['opl']):.4f};  L = {float(loss):.4f}")
    f_hat, v_hat = pn.embed(params, buffers, face, voice, cfg)     # eval mode: BN at init ≈ identity
    gate_in = f_hat * v_hat
    w, b = float(params["fusion_layer.conv.weight"].ravel()[0]), float(params["fusion_layer.conv.bias"][0])
    rms = lambda x: float(np.sqrt((x * x).mean()))
    print(f"  e: unit rows, entries rms 1/√D = {1 / math.sqrt(cfg.embed_dim):.4f};  f̂ = GELU(e_f) rms {rms(f_hat):.4f}")
    print(f"  EGFF gate input a = f̂ ⊙ v̂: rms {rms(gate_in):.1e};  u = w·a + b with w = {w:.3f}, b = {b:.3f}:"
          f" |w·a| rms {abs(w) * rms(gate_in):.1e}, so g ≈ sigmoid(b) = {1 / (1 + math.exp(-b)):.4f} everywhere")
    for name in sorted(grads):
        g = grads[name]
        print(f"  |d {name:34s}| rms {np.sqrt((g * g).mean()):.1e}  max {np.abs(g).max():.1e}")


# --- 9. one tiny example per operation ---------------------------------------------

def op_examples():
    """The small examples that end the sections of docs/math.md, one per operation."""
    from paeff_np import fusion, poincare
    np.set_printoptions(precision=4, suppress=True)

    say("§2 BatchNorm, one feature, B = 3 (train mode, γ = 1, β = 0)")
    x = np.array([[1.0], [2.0], [6.0]])
    dy = np.array([[1.0], [0.0], [0.0]])
    state = layers.BatchNormState(np.zeros(1), np.ones(1))
    y, _, cache = layers.batchnorm_forward(x, np.ones(1), np.zeros(1), state, True)
    dx, dgamma, dbeta = layers.batchnorm_backward(dy, cache)
    print(f"  x = {x.ravel()}: μ = {x.mean():.4f}, σ² = {x.var():.4f}, inv_std = {float(cache.inv_std[0]):.5f}")
    print(f"  x̂ = {cache.xhat.ravel()}  (Σ x̂ = {cache.xhat.sum():.1e}, mean x̂² = {(cache.xhat ** 2).mean():.7f})")
    print(f"  dy = {dy.ravel()}: dβ = {float(dbeta[0]):.4f}, dγ = {float(dgamma[0]):.4f}")
    print(f"  dx = {dx.ravel()}  (Σ dx = {dx.sum():.1e}, ⟨dx, x̂⟩ = {float(dx.ravel() @ cache.xhat.ravel()):.1e})")

    say("§8.1 expmap0 on one 2-D row (c = 0.05)")
    v = np.array([[3.0, 4.0]])
    p, cache = hyperbolic.expmap0_forward(v, C)
    dv = hyperbolic.expmap0_backward(np.array([[1.0, 0.0]]), cache)
    n = 5.0
    print(f"  v = {v.ravel()}, n = ‖v‖ = {n}: √c n = {math.sqrt(C) * n:.5f}, tanhc(√c n) = "
          f"{math.tanh(math.sqrt(C) * n) / (math.sqrt(C) * n):.5f}")
    print(f"  expmap0(v) = {p.ravel()}, ‖expmap0(v)‖ = {np.linalg.norm(p):.5f} "
          f"(radius 1/√c = {1 / math.sqrt(C):.5f})")
    d0 = 2 / math.sqrt(C) * math.atanh(math.sqrt(C) * np.linalg.norm(p))
    print(f"  d(0, expmap0(v)) = {d0:.5f} = 2‖v‖")
    print(f"  dy = [1, 0]: dv = {dv.ravel()}")

    say("§12 EGFF with D = 3, q = 1 (product gate, activated mix)")
    e_f = np.array([[0.6, 0.8, 0.0]])
    e_v = np.array([[0.0, 0.6, -0.8]])
    w, b = np.array([[[2.0]]]), np.array([0.5])
    out, cache = fusion.egff_forward(e_f, e_v, w, b)
    de_f, de_v, dw, db = fusion.egff_backward(np.ones((1, 3)), cache)
    f_hat, v_hat = out.emb_f, out.emb_v
    gate_in = f_hat * v_hat
    g = 1 / (1 + np.exp(-(2.0 * gate_in + 0.5)))
    print(f"  e_f = {e_f.ravel()}, e_v = {e_v.ravel()}, w = 2, b = 0.5")
    print(f"  f̂ = GELU(e_f) = {f_hat.ravel()}, v̂ = {v_hat.ravel()}")
    print(f"  a = f̂ ⊙ v̂ = {gate_in.ravel()}, u = w·a + b = {(2.0 * gate_in + 0.5).ravel()}, g = {g.ravel()}")
    print(f"  m = g ⊙ f̂ + (1 − g) ⊙ v̂ = {out.m.ravel()}")
    print(f"  dm = 1: de_f = {de_f.ravel()}, de_v = {de_v.ravel()}, dw = {float(dw.ravel()[0]):.4f},"
          f" db = {float(db[0]):.4f}")

    say("§17 one distance pair (c = 0.05)")
    xs, ys = np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])
    dist, cache = poincare.distance_matrix_forward(xs, ys, C)
    dx, dyy = poincare.distance_matrix_backward(np.ones((1, 1)), cache)
    X, Y, G = 1.0, 4.0, 0.0
    A, Cb = 1 - 2 * C * G + C * Y, 1 - C * X
    N = A * A * X - 2 * A * Cb * G + Cb * Cb * Y
    den = 1 - 2 * C * G + C * C * X * Y + 1e-5
    classical = math.acosh(1 + 2 * C * 5.0 / ((1 - C * X) * (1 - C * Y))) / math.sqrt(C)
    print(f"  x = {xs.ravel()}, y = {ys.ravel()}: G = {G}, X = {X}, Y = {Y}")
    print(f"  A = {A:.4f}, C = {Cb:.4f}, N = {N:.4f}, den = {den:.5f}, ν = √N/den = {math.sqrt(N) / den:.5f}")
    print(f"  Δ = (2/√c) artanh(√c ν) = {float(dist[0, 0]):.5f};  classical arcosh form {classical:.5f}")
    print(f"  dΔ = 1: dx = {dx.ravel()}, dy = {dyy.ravel()}")

    say("§8.3 the Riemannian factor on one row (c = 0.05)")
    e = np.array([[0.6, 0.8]])
    p, cache = hyperbolic.to_ball_forward(e, C, True)
    _, cache_off = hyperbolic.to_ball_forward(e, C, False)
    dp = np.array([[1.0, 1.0]])
    on = hyperbolic.to_ball_backward(dp, cache)
    off = hyperbolic.to_ball_backward(dp, cache_off)
    lam = 2 / (1 - C * float(np.sum(p * p)))
    print(f"  e = {e.ravel()}: p = {p.ravel()}, ‖p‖ = {np.linalg.norm(p):.5f}, λ_c(p) = {lam:.5f},"
          f" κ = λ⁻² = {lam ** -2:.5f}")
    print(f"  dp = {dp.ravel()}: de off = {off.ravel()}, de on = {on.ravel()} (ratio {float(on[0, 0] / off[0, 0]):.5f})")
    print(f"  κ = ¼ × {4 * lam ** -2:.5f}: the ¼ is λ_c(0)⁻², the rest the curvature")

    say("§17.6 the guard's bound on den⁰ after clipping (c = 0.05, R = 2.3)")
    R = 2.3
    bound = (1 - math.tanh(math.sqrt(C) * R) ** 2) ** 2
    rng = np.random.default_rng(0)
    hf, hv = 5 * rng.standard_normal((256, 16)), 5 * rng.standard_normal((256, 16))
    pf = hyperbolic.to_ball_forward(poincare.feature_clip_forward(hf, R)[0], C, False)[0]
    pv = hyperbolic.to_ball_forward(poincare.feature_clip_forward(hv, R)[0], C, False)[0]
    X, Y, G = (pf * pf).sum(1)[:, None], (pv * pv).sum(1)[None, :], pf @ pv.T
    den0 = 1 - 2 * C * G + C * C * X * Y
    print(f"  den⁰ ≥ (1 − tanh²(√c R))² = sech⁴(√c R) = {bound:.4f};  measured minimum over "
          f"256 × 256 clipped pairs {den0.min():.4f}")


# --- 10. the constants the text derives, and the exercises' answers --------------------

def derived_constants():
    """Every number docs/math.md derives from the defaults, so that the page quotes none by hand."""
    from scipy.special import ndtr
    from paeff_np import losses
    say("constants the text derives from the defaults (c = 0.05, τ = 0.07, R = 2.3)")
    rho = hyperbolic.unit_row_ball_norm(C)
    kappa = hyperbolic.unit_row_riemannian_factor(C)
    print(f"  √c = {math.sqrt(C):.4f};  ρ² = {rho ** 2:.5f};  ρ²/τ = {rho ** 2 / TAU:.1f};  "
          f"α₁κ = 0.3 × κ = {0.3 * kappa:.3f};  1/sech⁴(√c) = {1 / (4 * kappa):.2f}")
    print(f"  1 − tanh²(15) = {1 - math.tanh(15) ** 2:.1e};  2 artanh(1 − 1e-5) = {2 * math.atanh(1 - 1e-5):.2f};"
          f"  tanh(2√c R) = {math.tanh(2 * math.sqrt(C) * 2.3):.2f}")
    for dtype in (np.float32, np.float64):
        print(f"  shared_shift_spread({np.dtype(dtype).name}) = {losses.shared_shift_spread(dtype):.1f}")
    print(f"  exp(−27) = {math.exp(-27):.1e};  1/√(2π) = {1 / math.sqrt(2 * math.pi):.3f};"
          f"  Φ(−1) = {float(ndtr(-1.0)):.3f};  53 ln 2 = {53 * math.log(2):.4f}")
    lr, wd, T, steps = 2e-5, 0.01, 50, 150000 // 1024
    etas = [1e-8 + (lr - 1e-8) * (1 + math.cos(math.pi * e / T)) / 2 for e in range(T)]
    print(f"  paper recipe: {steps} steps per epoch, Σ η_E = {sum(etas):.1e} = {sum(etas) / lr:.1f} η₀,"
          f" total decay exp(−{steps}·λ·Σ η) = {math.exp(-steps * wd * sum(etas)):.5f}")
    naive_zero = next(x for x in np.arange(-8.0, -9.0, -0.01) if 1 + math.erf(x / math.sqrt(2)) == 0.0)
    print(f"  1 + erf(x/√2) is exactly 0 from x = {naive_zero:.1f}")


def exercise_answers():
    """The numbers the solutions of docs/math.md's exercises quote, computed as the exercises say."""
    from paeff_np import losses, poincare
    from paeff_np.gradcheck import check_op
    from paeff_np.model import Config
    say("exercises: the answers the solutions quote")
    x = np.random.default_rng(0).standard_normal((4, 3))
    wrong = check_op(lambda x: (x * x).sum(axis=1, keepdims=True), lambda dy: (dy * x,), [x],
                     raises=False).errors[0]
    print(f"  1. the squared norm's backward without its 2: worst relative error {wrong:.4f}")
    k5, k005 = (hyperbolic.unit_row_riemannian_factor(c) for c in (0.5, 0.005))
    print(f"  5. 4κ at c = 0.5: {4 * k5:.3f} (factor {1 / (4 * k5):.1f}); at c = 0.005: {4 * k005:.3f}")
    c, y0 = 0.05, 3.0
    d0 = 2 / math.sqrt(c) * math.atanh(math.sqrt(c) * y0)
    near, far = (math.tanh(math.sqrt(c) * (d0 + s) / 2) / math.sqrt(c) for s in (-1, 1))
    angle = np.linspace(0, 2 * np.pi, 9)[:-1]
    circle = np.stack([(near + far) / 2 + (far - near) / 2 * np.cos(angle),
                       (far - near) / 2 * np.sin(angle)], 1)
    on = poincare.distance_matrix_forward(circle, np.array([[y0, 0.0]]), c)[0]
    print(f"  7. d(0, y₀) = {d0:.4f}; the level set d = 1 meets the axis at {near:.4f} and {far:.4f}:"
          f" centre {(near + far) / 2:.4f}, radius {(far - near) / 2:.4f}; the library's distance on it"
          f" {float(on.min()):.5f}")
    grid = np.linspace(36.0, 37.5, 150001)
    dsig = layers.sigmoid_backward(np.ones_like(grid), layers.sigmoid_forward(grid)[1])
    print(f"  8. the sigmoid's derivative is 0 from x = {grid[np.argmax(dsig == 0)]:.5f}")
    twin = euclidean_equivalent(Config(curvature=0.5, temperature=0.2))
    print(f"  9. c = 0.5: ρ = {hyperbolic.unit_row_ball_norm(0.5):.5f}, twin τ = {twin.temperature:.5f},"
          f" α₁κ = {twin.loss_weights[0]:.4f} (κ = {k5:.5f})")
    z = np.array([[3.0, 4.0], [4.0, -3.0], [-5.0, 0.0]])
    print(f"  10. OPL with one identity: pos = {2 * (0 - 0.6 - 0.8) / 6:.4f},"
          f" L_OP = {float(losses.orthogonal_projection_forward(z, np.array([0, 0, 0]), 0.7)[0]):.8f}")


# --- main -----------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="folder for the PNG figures")
    group.add_argument("--print-only", action="store_true",
                       help="print every number, draw no figure (no matplotlib needed)")
    args = parser.parse_args(argv)
    plt = None
    if not args.print_only:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("walkthrough: the figures need matplotlib (pip install matplotlib),"
                  " or run with --print-only", file=sys.stderr)
            return 2
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            print(f"walkthrough: cannot create {args.out}: {exc.strerror}", file=sys.stderr)
            return 2
    np.seterr(all="ignore")

    def draw(plot, data):
        if plt is not None:
            plot(plt, data, args.out)

    if plt is not None:
        plot_graph(plt, args.out)
    draw(plot_check_every_op, check_every_op())
    draw(plot_equivalence, hyperbolic_equals_euclidean())
    draw(plot_bn_bias, batchnorm_bias_gradient())
    draw(plot_fd, fd_error_against_h())
    draw(plot_tails, tails())
    info = poincare_operating_point()
    draw(plot_poincare, info)
    draw(plot_riemannian_factor, info)
    worked_example()
    op_examples()
    derived_constants()
    values_at_initialisation()
    exercise_answers()
    if plt is not None:
        print(f"\nfigures written to {args.out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
