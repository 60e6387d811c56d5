"""Every CuPy kernel of the library, compiled on the CPU (tests/c_kernels.py:
gcc, under ElementwiseKernel/ReductionKernel semantics) and compared with the
NumPy function it fuses, in float32 and float64, on random and edge inputs.

Tolerances. CUDA's documented maximum errors (CUDA C Programming Guide,
"Mathematical Functions", standard functions): x + y, x·y, x/y and sqrt(x) are
correctly rounded (0 ulp; x/y and sqrt with NVRTC's defaults -prec-div=true,
-prec-sqrt=true), so a kernel made only of these differs from NumPy only by
the order of its operations and by NVRTC's FMA contraction (--fmad=true), each
worth at most one rounding, eps·|term|, of an intermediate term. A formula of
k rounded operations is therefore allowed k·eps·(|result| + |terms|) (the
``ulps`` below). A sum of n terms, in whatever order a GPU's tree or NumPy's
pairwise loop adds them, is within n·eps·Σ|terms| of the exact one (Higham,
Accuracy and Stability of Numerical Algorithms, §4.2, γ_n): reductions are
allowed that. Where CuPy+NVRTC are installed, every kernel is also compiled
for sm_90; elsewhere that test skips and says why.
"""
import numpy as np
import pytest

import c_kernels
import strict_xp
from paeff_np import backend, layers, losses, optim
from paeff_np.flat import FlatLayout, flatten
from paeff_np.layers import (BatchNormState, batchnorm_backward, batchnorm_forward, l2_normalize_backward,
                             l2_normalize_forward, row_dot, row_norm)

REASON = c_kernels.compiler_missing()
needs_cc = pytest.mark.skipif(REASON is not None, reason=REASON or "")
DTYPES = (np.float32, np.float64)


def library_kernels():
    """``{name: spec}`` of every kernel the library defines (the ``*_KERNEL`` dicts)."""
    specs = {}
    for module in (layers, losses, optim):
        for attr, value in vars(module).items():
            if attr.endswith("_KERNEL") and isinstance(value, dict):
                specs[value["name"]] = value
    # generated per layout: AdamW reading each gradient where it lies (here: a small layout)
    specs["paeff_adamw_gather"] = optim._adamw_gather_kernel(FlatLayout(gather_arrays(np.float32)))
    return specs


def gather_arrays(dtype, seed=0):
    """Arrays of a few shapes (odd sizes: the flat buffer's padding between them)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(dtype)
            for k, shape in (("w", (3, 5)), ("b", (7,)), ("t", (2, 3, 4)), ("s", (1,)), ("z", (67, 3)))}


def source_of(spec, dtype):
    """The kernel's C source at T = ``dtype``, any other placeholder (the labels' ``I``) int64."""
    kinds = {p.split()[-2] for p in spec["in_params"].split(",")}
    placeholders = {k: np.int64 for k in kinds if k != "T" and k not in c_kernels._C_TYPES}
    if spec.get("kind") == "reduction":
        return c_kernels.reduction_source(spec["in_params"], spec["out_params"], spec["map_expr"],
                                          spec["reduce_expr"], spec["post_map_expr"], spec["identity"], dtype,
                                          placeholders)
    return c_kernels.elementwise_source(spec["in_params"], spec["out_params"], spec["body"], dtype, placeholders)


@pytest.fixture
def cupy(monkeypatch):
    return c_kernels.cpu_cupy(monkeypatch)


def close(actual, expected, dtype, ulps, scale=0.0):
    """|actual − expected| ≤ ulps·eps·(|expected| + scale), NaN where NaN, inf where inf."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert np.array_equal(np.isnan(actual), np.isnan(expected))
    finite = np.isfinite(expected)
    assert np.array_equal(actual[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)])
    bound = ulps * np.finfo(dtype).eps * (np.abs(expected) + scale)
    bound = np.broadcast_to(bound, expected.shape)
    err = np.abs(actual - expected)
    assert np.all(err[finite] <= bound[finite]), float(np.max((err - bound)[finite]))


def rows(dtype, seed=0, B=37, D=19):
    """Random rows, then edge rows: zeros, tiny, huge (x² overflows float32), NaN."""
    x = np.random.default_rng(seed).standard_normal((B, D))
    x[0] = 0.0
    x[1] = 1e-30
    x[2] *= 1e20
    x[3, 4] = np.nan
    x[4] *= 1e-6
    return x.astype(dtype)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_every_kernel_body_compiles(dtype):
    specs = library_kernels()
    assert {"paeff_adamw", "paeff_dot", "paeff_norm", "paeff_batchnorm_var", "paeff_batchnorm_stats",
            "paeff_batchnorm_apply", "paeff_batchnorm_backward", "paeff_l2_normalize_backward",
            "paeff_exp_sum", "paeff_scaled_sum", "paeff_label_log_softmax", "paeff_softmax_ce_backward",
            "paeff_symmetric_ce_loss", "paeff_symmetric_ce_backward", "paeff_same_label_count", "paeff_opl_loss",
            "paeff_opl_backward", "paeff_adamw_gather"} <= set(specs)
    for spec in specs.values():
        c_kernels._load(source_of(spec, dtype))


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_row_reductions_match_einsum(cupy, dtype):
    x, y = rows(dtype), rows(dtype, seed=1)
    with np.errstate(all="ignore"):
        ref_dot, ref_norm = row_dot(x, y), row_norm(x)
        dot, norm = row_dot(cupy.asarray(x), cupy.asarray(y)).get(), row_norm(cupy.asarray(x)).get()
    D = x.shape[1]
    with np.errstate(all="ignore"):
        close(dot, ref_dot, dtype, D, np.abs(x * y).sum(axis=1, keepdims=True))
        close(norm, ref_norm, dtype, D + 1)      # sqrt of a sum of positive terms: its relative error, halved, + 1


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_batchnorm_train_kernels_match_the_numpy_path(cupy, dtype):
    rng = np.random.default_rng(3)
    B, D = 64, 24
    x = (rng.standard_normal((B, D)) * 3 + 1).astype(dtype)
    x[:, 0] = 5.0                     # a constant column: σ² = 0, inv_std = 1/√eps (the eps clamp)
    x[:, 1] *= 1e4                    # large magnitudes
    gamma, beta = rng.standard_normal(D).astype(dtype), rng.standard_normal(D).astype(dtype)
    state = BatchNormState(rng.standard_normal(D).astype(dtype), rng.random(D).astype(dtype) + 0.5)
    dy = rng.standard_normal((B, D)).astype(dtype)
    y, new_state, cache = batchnorm_forward(x, gamma, beta, state, True)
    dx, dgamma, dbeta = batchnorm_backward(dy, cache)
    dev = lambda a: cupy.asarray(a)
    y_d, state_d, cache_d = batchnorm_forward(dev(x), dev(gamma), dev(beta),
                                              BatchNormState(dev(state.running_mean), dev(state.running_var)), True)
    dx_d, dgamma_d, dbeta_d = batchnorm_backward(dev(dy), cache_d)
    # the variance: a sum of B terms (x − μ)², μ itself a sum: (2B + 3)·eps of Σ(x − μ)²/B;
    # x̂ and y inherit it, halved through 1/√, over a few more roundings
    var = ((x.astype(np.float64) - x.mean(axis=0)) ** 2).mean(axis=0)
    close(cache_d.inv_std.get(), cache.inv_std, dtype, 2 * B + 8)
    close(state_d.running_mean.get(), new_state.running_mean, dtype, B + 4, np.abs(state.running_mean))
    close(state_d.running_var.get(), new_state.running_var, dtype, 2 * B + 8, np.abs(state.running_var) + var)
    close(cache_d.xhat.get(), cache.xhat, dtype, 2 * B + 8, np.abs(x - x.mean(axis=0)) * cache.inv_std)
    close(y_d.get(), y, dtype, 2 * B + 8, np.abs(gamma * cache.xhat) + np.abs(beta))
    close(dgamma_d.get(), dgamma, dtype, B, np.abs(dy * cache.xhat).sum(axis=0))
    close(dbeta_d.get(), dbeta, dtype, B, np.abs(dy).sum(axis=0))
    term = np.abs(dy) + np.abs(dbeta) / B + np.abs(cache.xhat * dgamma) / B
    close(dx_d.get(), dx, dtype, 2 * B + 8, np.abs(gamma * cache.inv_std) * term)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_l2_normalize_backward_kernel_matches_the_numpy_path(cupy, dtype):
    x = rows(dtype)
    x[2] /= 1e20                      # finite rows only: the clamp at eps (rows 0, 1) is the edge
    x[3, 4] = 0.0
    de = rows(dtype, seed=5)
    de[2] /= 1e20
    de[3, 4] = np.nan                 # NaN in dy stays NaN
    with np.errstate(all="ignore"):
        e, cache = l2_normalize_forward(x)
        dx = l2_normalize_backward(de, cache)
        e_d, cache_d = l2_normalize_forward(cupy.asarray(x))
        dx_d = l2_normalize_backward(cupy.asarray(de), cache_d)
    D = x.shape[1]
    close(e_d.get(), e, dtype, D + 2)
    with np.errstate(all="ignore"):
        radial = np.abs(e * de).sum(axis=1, keepdims=True)
        close(dx_d.get(), dx, dtype, 2 * D + 4, (np.abs(de) + np.abs(e) * radial) / cache.denom)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_adamw_kernel_matches_the_numpy_path(cupy, dtype):
    rng = np.random.default_rng(0)
    p, g, m = (rng.standard_normal(257).astype(dtype) for _ in range(3))
    v = np.abs(rng.standard_normal(257)).astype(dtype)
    g[:3], m[:3], v[:3] = 0.0, 0.0, 0.0          # the eps edge: m = v = 0
    g[3] = 1e30 if dtype == np.float64 else 1e18
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                 bias1=1 - 0.9 ** 3, sqrt_bias2=(1 - 0.999 ** 3) ** 0.5)
    host = [a.copy() for a in (p, g, m, v)]
    device = [cupy.asarray(a) for a in (p, g, m, v)]
    optim.adamw_update(*host, **hyper)
    optim.adamw_update(*device, **hyper)
    # p: about 12 roundings, the largest through √v and the division
    for name, h, d, scale in (("p", host[0], device[0], np.abs(p) + 1e-2), ("m", host[2], device[2], np.abs(m) + np.abs(g)),
                              ("v", host[3], device[3], np.abs(v) + g.astype(np.float64) ** 2)):
        close(d.get(), h, dtype, 16, scale)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_adamw_gather_kernel_matches_the_per_key_numpy_step(cupy, dtype):
    """AdamW on a flat buffer with plain per-key gradients: on CuPy one kernel reads each
    gradient where it lies (no flat gradient buffer); three steps, against NumPy's
    per-key step, with zero gradients (the eps edge) and a huge one; padding stays 0."""
    import paeff_np as pn
    start = gather_arrays(dtype)
    host = {k: v.copy() for k, v in start.items()}
    flat, device = flatten({k: cupy.asarray(v) for k, v in start.items()})
    opt_host, opt_device = pn.AdamW(lr=1e-2), pn.AdamW(lr=1e-2)
    rng = np.random.default_rng(1)
    for step in range(3):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in start.items()}
        grads["b"][:3] = 0.0
        grads["z"][0, 0] = 1e30 if dtype == np.float64 else 1e18
        grads_d = {k: cupy.asarray(g) for k, g in grads.items()}
        with strict_xp.counting() as count:
            opt_device.step(device, grads_d)
        assert step == 0 or count.by_kind() == {"elementwise": 1}      # the one kernel, no copies
        opt_host.step(host, grads)
    for k in start:
        # about 12 roundings, the largest through √v and the division (as the per-key kernel)
        close(device[k].get(), host[k], dtype, 16, np.abs(host[k]) + 1e-2)
        close(opt_device.m[k].get(), opt_host.m[k], dtype, 16, np.abs(opt_host.m[k]) + 1)
        close(opt_device.v[k].get(), opt_host.v[k], dtype, 16, np.abs(opt_host.v[k]) + 1)
    padding = np.ones(flat.shape[0], bool)
    for k, v in start.items():
        padding[device.layout.offsets[k]:device.layout.offsets[k] + v.size] = False
    assert padding.any() and not flat.get()[padding].any() and not opt_device.m.flat.get()[padding].any()


def test_every_kernel_compiles_for_sm_90_with_nvrtc():
    """CuPy's NVRTC compiles every kernel's body, in a __global__ wrapper like
    ElementwiseKernel's, for sm_90 (H100). Needs CuPy and NVRTC, no GPU."""
    try:
        import cupy
        from cupy_backends.cuda.libs import nvrtc
        if getattr(cupy, "__version__", "").endswith("strict-test-double"):
            raise ImportError("the strict test double is installed")
        nvrtc.getVersion()
    except Exception as exc:                   # ImportError, or a CuPy without NVRTC
        pytest.skip(f"CuPy with NVRTC is not installed here ({type(exc).__name__}: {exc}); "
                    f"on a CUDA machine: pip install \"cupy-cuda12x[ctk]\"")
    for spec in library_kernels().values():
        for dtype in DTYPES:
            cpu = source_of(spec, dtype)
            cuda = (cpu.replace("#include <cmath>\nusing namespace std;\n", "")
                    .replace('extern "C" void run(', 'extern "C" __global__ void run('))
            prog = nvrtc.createProgram(cuda, spec["name"] + ".cu", [], [])
            try:
                nvrtc.compileProgram(prog, ["--gpu-architecture=sm_90", "-std=c++17"])
            except Exception as exc:
                raise AssertionError(f"{spec['name']} ({np.dtype(dtype)}): {nvrtc.getProgramLog(prog)}") from exc
            finally:
                nvrtc.destroyProgram(prog)


@needs_cc
@pytest.mark.parametrize("riemannian", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_to_ball_kernels_match_the_numpy_path(cupy, dtype, riemannian):
    """P(expmap0(u)) and its backward, with rows at every clamp: ‖u‖ = 0 and below MIN_NORM
    (the norm clamp), rows pulled back by the projection (‖u‖ = 20 at c = 0.05: tanh(√c‖u‖)
    > 1 − BALL_EPS), rows past the tanh clamp (√c‖u‖ > 15), and ordinary ones."""
    from paeff_np.hyperbolic import to_ball_backward, to_ball_forward
    c = 0.05
    rng = np.random.default_rng(7)
    B, D = 40, 16
    u = rng.standard_normal((B, D))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    radii = np.concatenate([[0.0, 1e-7, 5e-6, 20.0, 25.0, 100.0, 1e4], rng.uniform(0.1, 5.0, B - 7)])
    u = (u * radii[:, None]).astype(dtype)
    dp = rng.standard_normal((B, D)).astype(dtype)
    p, cache = to_ball_forward(u, c, riemannian)
    du = to_ball_backward(dp, cache)
    p_d, cache_d = to_ball_forward(cupy.asarray(u), c, riemannian)
    du_d = to_ball_backward(cupy.asarray(dp), cache_d)
    assert np.array_equal(cache_d.project.outside.get(), cache.project.outside)
    assert cache.project.outside is not None and cache.project.outside.any()
    # forward: the row norm (D terms) and about 10 roundings, tanh within CUDA's 2 ulp
    close(p_d.get(), p, dtype, D + 16, np.abs(p))
    # backward: du = α dp + β u, α and β from ⟨u, dp⟩ (D terms) through about 20 roundings;
    # the terms are s|dp| and |⟨u, dp⟩ s'(n)/n|·|u| (expmap0) and the projection's radial part
    ex = cache.expmap0
    ud = np.abs(u * dp).sum(axis=1, keepdims=True)
    ds_dn = np.abs(ex.sqrt_c * (1 - ex.t * ex.t) / ex.a) + np.abs(ex.t / (ex.a * ex.n))
    terms = ex.s * np.abs(dp) + (ud * ds_dn / ex.n + ex.s * ex.s / cache.project.n ** 2 * ud) * np.abs(u)
    close(du_d.get(), du, dtype, 2 * D + 40, terms)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_dropout_tanh_and_gelu_kernels_match_the_numpy_path(cupy, dtype):
    """Dropout (a comparison, one division, one product: correctly rounded on CUDA, so
    the same bits, from the same draws), tanh's and GELU's backward at 0, at large
    |x| (φ underflows, tanh saturates), and NaN."""
    from paeff_np.layers import dropout_forward, gelu_backward, gelu_forward, tanh_backward
    x = rows(dtype, seed=8)
    y, mask = dropout_forward(x, 0.4, np.random.default_rng(5))
    y_d, mask_d = dropout_forward(cupy.asarray(x), 0.4, cupy.random.default_rng(5))
    np.testing.assert_array_equal(mask_d.get(), mask)
    np.testing.assert_array_equal(y_d.get(), y)
    t = np.tanh(rows(dtype, seed=9))
    dy = rows(dtype, seed=10)
    dy[2] /= 1e20
    with np.errstate(all="ignore"):
        close(tanh_backward(cupy.asarray(dy), cupy.asarray(t)).get(), tanh_backward(dy, t), dtype, 4,
              np.abs(dy) * (np.abs(1 - t * t) + t * t))
        g = rows(dtype, seed=11)
        g[2] = np.linspace(-40, 40, g.shape[1])            # φ(x) underflows at the ends
        _, cache = gelu_forward(g)
        dx = gelu_backward(dy, cache)
        _, cache_d = gelu_forward(cupy.asarray(g))
        dx_d = gelu_backward(cupy.asarray(dy), cache_d)
        phi = np.exp(-0.5 * g.astype(np.float64) ** 2) / np.sqrt(2 * np.pi)
        # exp within CUDA's 2 ulp, about 6 roundings; Φ from CUDA's normcdf within 5 ulp
        close(dx_d.get(), dx, dtype, 16, np.abs(dy) * (np.abs(phi * g) + np.abs(cache.cdf)))


# --- losses.py ----------------------------------------------------------------------

@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_softmax_cross_entropy_kernels_match_the_numpy_path(cupy, dtype):
    """The loss and ds through the four forward calls and the one backward kernel: rows
    of ordinary logits, of large magnitude (|s| ~ 1e4: the shift at work), constant,
    with a −inf logit off the label (its probability 0), and with a NaN (NaN stays NaN)."""
    from paeff_np.losses import softmax_cross_entropy_backward, softmax_cross_entropy_forward
    rng = np.random.default_rng(12)
    B, K = 33, 29
    s = rng.standard_normal((B, K)) * 3
    y = rng.integers(0, K, B)
    s[1] *= 4e3
    s[2] = 7.0
    s[3, (y[3] + 1) % K] = -np.inf
    s = s.astype(dtype)
    dloss = 0.7
    with np.errstate(all="ignore"):
        loss, cache = softmax_cross_entropy_forward(s, y)
        ds = softmax_cross_entropy_backward(dloss, cache)
        s_nan = s.copy()
        s_nan[4, 5] = np.nan
        loss_nan, _ = softmax_cross_entropy_forward(cupy.asarray(s_nan), cupy.asarray(y))
        ds_nan = softmax_cross_entropy_backward(dloss, softmax_cross_entropy_forward(cupy.asarray(s_nan),
                                                                                   cupy.asarray(y))[1]).get()
    loss_d, cache_d = softmax_cross_entropy_forward(cupy.asarray(s), cupy.asarray(y))
    ds_d = softmax_cross_entropy_backward(dloss, cache_d)
    # logp_i = (s_iy − m_i) − log Z_i: Z a sum of K exponentials (exp within CUDA's 2 ulp:
    # (K + 2)·eps relative), log within 1 ulp, two subtractions; the mean adds B roundings
    m = s.astype(np.float64).max(axis=1)
    terms = np.abs(s[np.arange(B), y] - m) + np.abs(np.log(np.exp(s - m[:, None]).sum(axis=1)))
    close(loss_d.get(), loss, dtype, K + B + 8, terms.mean() + 1)
    # ds = (e^{s − m}/Z)·w − [k = y]·w: the exponent's rounding, eps·(|s| + |m|) absolute,
    # is a relative error of the exponential, then Z's (K + 2)·eps and two more roundings
    w = dloss / B
    probs = cache.probs.astype(np.float64)
    exponent = np.where(np.isfinite(s), np.abs(s), 0.0) + np.abs(m[:, None])     # e^{−inf} = 0: no error
    with np.errstate(all="ignore"):
        close(ds_d.get(), ds, dtype, K + 8, probs * w * (1 + exponent) + w)
    assert np.isnan(loss_nan.get())
    assert np.isnan(ds_nan[4]).all() and np.isfinite(np.delete(ds_nan, 4, axis=0)).all()


@needs_cc
@pytest.mark.parametrize("spread", [1.0, 200.0], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_symmetric_cross_entropy_kernels_match_the_numpy_path(cupy, dtype, spread):
    """The CuPy form always shifts each row and column by its own max; the NumPy one
    shares S's overall max when the spread allows it (narrow) and not otherwise (wide,
    past float32's 60.3): the two agree to rounding, and a NaN entry makes its row and
    column of dS NaN in both."""
    from paeff_np.losses import (symmetric_cross_entropy_from_logits_backward,
                                 symmetric_cross_entropy_from_logits_forward)
    rng = np.random.default_rng(13)
    B = 31
    S = (rng.standard_normal((B, B)) * spread).astype(dtype)
    S[np.arange(B), np.arange(B)] += dtype(2 * spread)
    dloss = 0.3
    loss, cache = symmetric_cross_entropy_from_logits_forward(S)
    dS = symmetric_cross_entropy_from_logits_backward(dloss, cache)
    loss_d, cache_d = symmetric_cross_entropy_from_logits_forward(cupy.asarray(S))
    dS_d = symmetric_cross_entropy_from_logits_backward(dloss, cache_d)
    S64 = S.astype(np.float64)
    r, c = S64.max(axis=1), S64.max(axis=0)
    with np.errstate(under="ignore"):
        p_row = np.exp(S64 - r[:, None])
        p_row /= p_row.sum(axis=1, keepdims=True)
        p_col = np.exp(S64 - c)
        p_col /= p_col.sum(axis=0)
    # each exponent's rounding, eps·(|S| + |shift|), as a relative error of its exponential;
    # the sums of B terms; a few more roundings
    exponent = np.abs(S64) + np.abs(S64).max()
    w = dloss / (2 * B)
    close(dS_d.get(), dS, dtype, 2 * B + 16, (p_row + p_col) * w * (1 + exponent) + 2 * w)
    diag = np.arange(B)
    terms = (np.abs(S64[diag, diag] - r) + np.abs(S64[diag, diag] - c) + np.abs(np.log(p_row[diag, diag]))
             + np.abs(np.log(p_col[diag, diag])) + exponent[diag, diag])
    close(loss_d.get(), loss, dtype, 2 * B + 16, terms.mean())
    S[3, 5] = np.nan
    with np.errstate(all="ignore"):
        loss_n, cache_n = symmetric_cross_entropy_from_logits_forward(S)
        dS_n = symmetric_cross_entropy_from_logits_backward(dloss, cache_n)
        loss_dn, cache_dn = symmetric_cross_entropy_from_logits_forward(cupy.asarray(S))
        dS_dn = symmetric_cross_entropy_from_logits_backward(dloss, cache_dn).get()
    assert np.isnan(loss_n) and np.isnan(loss_dn.get())
    np.testing.assert_array_equal(np.isnan(dS_dn), np.isnan(dS_n))


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_orthogonal_projection_kernels_match_the_numpy_path(cupy, dtype):
    """OPL through its kernels: labels in groups (M⁺ nonempty) and singletons, a zero row
    (ẑ = 0: G's row 0, sign 0), two equal rows (G = 1 off the diagonal); ΣM⁺ exact;
    dG against the mask of same_label_mask; a NaN row makes dG NaN on M⁻ only."""
    from paeff_np.losses import (OPL_BACKWARD_KERNEL, OPL_EPS, orthogonal_projection_backward,
                                 orthogonal_projection_forward, same_label_mask)
    rng = np.random.default_rng(14)
    B, D, gamma, dloss = 40, 12, 0.5, 0.9
    z = rng.standard_normal((B, D))
    z[0] = 0.0
    z[5] = z[6]
    z = z.astype(dtype)
    y = rng.integers(0, 15, B)
    with np.errstate(all="ignore"):
        loss, cache = orthogonal_projection_forward(z, y, gamma)
        dz = orthogonal_projection_backward(dloss, cache)
        loss_d, cache_d = orthogonal_projection_forward(cupy.asarray(z), cupy.asarray(y), gamma)
        dz_d = orthogonal_projection_backward(dloss, cache_d)
    n_pos = len(cache.pairs[0])
    assert cache_d.n_pos.get() == n_pos > 0
    # G: the normalisation (D + 2 roundings) and D-term dot products; the loss sums B² terms
    # of |G|·w (Higham's n·eps·Σ|terms|)
    G = cache.G.astype(np.float64)
    w_pos, w_neg = 1 / (n_pos + OPL_EPS), 1 / (B * B - B - n_pos + OPL_EPS)
    close(cache_d.G.get(), cache.G, dtype, 2 * D + 8, 1)
    close(loss_d.get(), loss, dtype, B * B + 2 * D + 8, np.abs(G).sum() * max(w_pos, gamma * w_neg) + 1)
    # dG against the mask form: −w_pos on M⁺, γ w_neg sign(G) on M⁻, 0 on the diagonal
    mask = same_label_mask(y)
    ref = np.where(mask, -w_pos, gamma * w_neg * np.sign(cache.G))
    np.fill_diagonal(ref, 0.0)
    scale = 2 * dloss
    with np.errstate(all="ignore"):
        G_nan = cache.G.copy()
        G_nan[7, 9] = G_nan[9, 7] = np.nan
        ref_nan = np.where(mask, -w_pos, gamma * w_neg * np.sign(G_nan))
        np.fill_diagonal(ref_nan, 0.0)
        dG_d = backend.kernel(OPL_BACKWARD_KERNEL)(cupy.asarray(G_nan), cupy.asarray(y[:, None]),
                                                   cupy.asarray(y[None, :]), cupy.asarray(np.asarray(n_pos, dtype)),
                                                   B * B - B, gamma, OPL_EPS, scale, B + 1).get()
    close(dG_d, scale * ref_nan, dtype, 8)
    assert np.isnan(dG_d[7, 9]) == (not mask[7, 9])
    # dz: dG ẑ (B terms), 2·dloss on dG instead of on dz, then the normalisation's backward
    dzhat = np.abs(ref) @ np.abs(cache.zhat) * scale
    close(dz_d.get(), dz, dtype, 2 * B + 2 * D + 16, (dzhat + np.abs(cache.zhat) * dzhat.max()) / cache.normalize.denom)
