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
from paeff_np import backend, fusion, hyperbolic, layers, losses, model, optim, poincare
from paeff_np.flat import FlatLayout, flatten
from paeff_np.layers import (BatchNormState, batchnorm_backward, batchnorm_forward, l2_normalize_backward,
                             l2_normalize_forward, row_dot, row_norm)

REASON = c_kernels.compiler_missing()
needs_cc = pytest.mark.skipif(REASON is not None, reason=REASON or "")
DTYPES = (np.float32, np.float64)


def library_kernels():
    """``{name: spec}`` of every kernel the library defines (the ``*_KERNEL`` dicts)."""
    specs = {}
    for module in (layers, losses, optim, hyperbolic, fusion, model, poincare):
        for attr, value in vars(module).items():
            if attr.endswith("_KERNEL") and isinstance(value, dict):
                specs[value["name"]] = value
            elif attr.endswith("_KERNELS") and isinstance(value, dict):     # {variant: (spec, ...)}
                for group in value.values():
                    for spec in (group if isinstance(group, tuple) else (group,)):
                        specs[spec["name"]] = spec
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
            "paeff_opl_backward", "paeff_adamw_gather", "paeff_to_ball_rows", "paeff_relu", "paeff_sigmoid",
            "paeff_gelu_forward", "paeff_mix", "paeff_egff_product_activated", "paeff_egff_concat_raw_backward",
            "paeff_branch_apply", "paeff_normalize_backward_sum", "paeff_loss_sum", "paeff_distance",
            "paeff_distance_backward", "paeff_feature_clip_rows", "paeff_clip_to_ball_rows"} <= set(specs)
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
            cuda = (cpu.replace(c_kernels.CPU_PRELUDE, "")
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
    # a NaN coordinate: the row's clamps keep the NaN (as np.maximum/np.clip), its p and du NaN
    u_nan = u.copy()
    u_nan[9, 2] = np.nan
    with np.errstate(all="ignore"):
        p_n, cache_n = to_ball_forward(u_nan, c, riemannian)
        p_nd, cache_nd = to_ball_forward(cupy.asarray(u_nan), c, riemannian)
        for a, b in ((p_nd.get(), p_n), (to_ball_backward(cupy.asarray(dp), cache_nd).get(),
                                         to_ball_backward(dp, cache_n))):
            assert np.array_equal(np.isnan(a), np.isnan(b)) and np.isnan(b[9]).all()
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
    the same bits, from the same uniforms: the kernel's hash, the reference's on NumPy), tanh's and GELU's backward at 0, at large
    |x| (φ underflows, tanh saturates), and NaN."""
    from paeff_np.layers import dropout_forward, gelu_backward, gelu_forward, tanh_backward
    x = rows(dtype, seed=8)
    y, mask = dropout_forward(x, 0.4, ReferenceDraws(5))
    y_d, mask_d = dropout_forward(cupy.asarray(x), 0.4, backend.default_rng(5, cupy))
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


# --- the CuPy dropout's counter-based uniforms (backend.COUNTER_UNIFORM) ---------------

GAMMA = 0x9E3779B97F4A7C15


def splitmix64(x):
    """splitmix64's finaliser on uint64 ``x`` (Steele, Lea, Flood 2014), mod 2⁶⁴ in NumPy."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniform(key, step, draw, n):
    """The reference of COUNTER_UNIFORM in uint64 arithmetic: element i of draw
    ``draw`` in step ``step`` is splitmix64(key + ((16·step + draw)·2³² + i)·γ) >> 40, · 2⁻²⁴."""
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        counter = (np.uint64(step) * np.uint64(16) + np.uint64(draw)) * np.uint64(1 << 32) + i
        z = splitmix64(np.uint64(key) + counter * np.uint64(GAMMA))
    return (z >> np.uint64(40)).astype(np.float64) * 2.0 ** -24


class ReferenceDraws:
    """A NumPy Generator's ``random`` that returns what ``backend.default_rng(seed, cupy)``'s
    draws 0, 1, ... of step ``step`` hash to, for the NumPy reference functions."""

    def __init__(self, seed, step=0):
        self.key = int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])
        self.step, self.draw = step, 0

    def random(self, shape, dtype=np.float64):
        u = counter_uniform(self.key, self.step, self.draw, int(np.prod(shape))).reshape(shape)
        self.draw += 1
        return u.astype(dtype)


def test_splitmix64_reference_gives_the_published_sequence():
    """splitmix64 seeded 0 (Vigna's splitmix64.c: x += γ, then the finaliser) begins
    0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4: counter n = 1, 2 of the Weyl sequence, key 0."""
    with np.errstate(over="ignore"):
        z = splitmix64(np.arange(1, 3, dtype=np.uint64) * np.uint64(GAMMA))
    assert [int(v) for v in z] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


UNIFORM_PROBE = dict(kind="elementwise", in_params="T x, uint64 key, uint64 step, uint64 draw", out_params="T y",
                     body=backend.COUNTER_UNIFORM + "y = u;", name="paeff_uniform_probe")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("compiled", [True, False], ids=["gcc", "double"])
def test_counter_uniform_c_body_is_the_reference_bit_for_bit(monkeypatch, dtype, compiled):
    """COUNTER_UNIFORM compiled by gcc (c_kernels) and interpreted by the test double, against
    the uint64 NumPy reference: the same numbers exactly (integer hash, then an exact scaling),
    for large keys, steps and every draw index."""
    if compiled and REASON is not None:
        pytest.skip(REASON)
    cp = c_kernels.cpu_cupy(monkeypatch) if compiled else strict_xp.install(monkeypatch)
    x = cp.asarray(np.zeros((37, 29), dtype))
    for key, step, draw in ((0, 0, 0), (2 ** 64 - 1, 1, 15), (0x0123456789ABCDEF, 123456, 7)):
        got = backend.kernel(UNIFORM_PROBE)(x, np.uint64(key), cp.asarray(np.uint64(step)), np.uint64(draw))
        np.testing.assert_array_equal(got.get(), counter_uniform(key, step, draw, x.size).reshape(x.shape)
                                      .astype(dtype))


def test_counter_uniform_statistics():
    """The reference's numbers: in [0, 1), mean 1/2 and variance 1/12 within 5 standard errors,
    no correlation between neighbouring elements, steps or draws (|r| < 5/√n), and a χ² of 64
    bins within its 5σ band; a different key, step or draw gives other numbers."""
    n, key = 1 << 18, 0x5DEECE66D
    u = counter_uniform(key, 3, 1, n)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
    bound = 5 / np.sqrt(n)
    corr = lambda a, b: abs(np.corrcoef(a, b)[0, 1])
    assert corr(u[:-1], u[1:]) < bound
    for other in (counter_uniform(key, 4, 1, n), counter_uniform(key, 3, 0, n), counter_uniform(key + 1, 3, 1, n)):
        assert corr(u, other) < bound and not np.array_equal(u, other)
    counts = np.bincount((u * 64).astype(int), minlength=64)
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
    assert abs(chi2 - 63) < 5 * np.sqrt(2 * 63)


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


# --- the second round: the ops' remaining chains, EGFF, the branch and the model's glue ---
#
# Tolerances as above; besides the correctly rounded + − × / √, CUDA's documented
# maximum errors: expf 2 ulp, exp 1 ulp, tanhf 2 ulp, tanh 1 ulp, normcdff 5 ulp,
# normcdf 5 ulp. A result is allowed (its roundings + those ulps)·eps·(|result| +
# the magnitudes its terms and their own errors reach it with).

def cdf_tail(x):
    """SciPy's ndtr (Cephes) forms exp(−z²), z = x/√2, from a rounded z² in its left tail:
    a relative error up to z²·eps = x²/2 ulp of its own there (float64; float32 rounds it
    away), on top of CUDA normcdf's 5 ulp. The ulps it adds, elementwise."""
    return np.where(x < 0, np.nan_to_num(x.astype(np.float64) ** 2 / 2, posinf=0.0), 0.0)


def edges(dtype, seed=0, B=37, D=19):
    """``rows`` and the edges of the elementwise ops: ±0, ±1, large and tiny magnitudes,
    ±inf-making ones, NaN."""
    x = rows(dtype, seed, B, D)
    x[5, :8] = [0.0, -0.0, 1.0, -1.0, 40.0, -40.0, 1e-8, -1e-8]
    x[6] *= -1e20
    return x


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_relu_sigmoid_and_gelu_kernels_match_the_numpy_path(cupy, dtype):
    from paeff_np.layers import (gelu_forward, relu_forward, sigmoid_backward, sigmoid_forward)
    x, dy = edges(dtype), edges(dtype, seed=3)
    with np.errstate(all="ignore"):
        y, mask = relu_forward(x)
        y_d, mask_d = relu_forward(cupy.asarray(x))
        s = sigmoid_forward(x)[0]
        s_d = sigmoid_forward(cupy.asarray(x))[0]
        ds, ds_d = sigmoid_backward(dy, s), sigmoid_backward(cupy.asarray(dy), cupy.asarray(s))
        g, gc = gelu_forward(x)
        g_d, gc_d = gelu_forward(cupy.asarray(x))
    assert np.array_equal(mask_d.get(), mask) and mask_d.dtype == np.bool_
    np.testing.assert_array_equal(y_d.get(), y)                   # exact: x·1 or x·0
    close(s_d.get(), s, dtype, 4)                                 # exp (≤ 2 ulp), +, /
    close(ds_d.get(), ds, dtype, 3)                               # three products
    with np.errstate(all="ignore"):
        tail = cdf_tail(x) * np.abs(gc.cdf)
    close(gc_d.cdf.get(), gc.cdf, dtype, 6, tail)                 # normcdf (≤ 5 ulp) against SciPy's
    close(g_d.get(), g, dtype, 7, np.abs(x) * tail)              # and one product


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_l2_normalize_rows_kernel_matches_the_numpy_path(cupy, dtype):
    """max(‖x‖, eps) and its flag at the clamp's edges: ‖x‖ = 0, < eps, = eps, > eps, NaN, inf."""
    from paeff_np.layers import NORMALIZE_EPS, l2_normalize_forward
    x = edges(dtype)
    x[7], x[8] = 0.0, 0.0
    x[7, 0] = np.asarray(NORMALIZE_EPS, dtype)                   # ‖x‖ = eps exactly: the clamp holds
    x[8, 0] = np.nextafter(np.asarray(NORMALIZE_EPS, dtype), dtype(1))   # just above it
    with np.errstate(all="ignore"):
        e, cache = l2_normalize_forward(x)
        e_d, cache_d = l2_normalize_forward(cupy.asarray(x))
    assert np.array_equal(cache_d.active.get(), cache.active)
    assert cache.active[8, 0] and not cache.active[7, 0] and not cache.active[3, 0]
    D = x.shape[1]
    close(cache_d.denom.get(), cache.denom, dtype, D + 1)        # the row norm (test above); the clamp exact
    close(e_d.get(), e, dtype, D + 2)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_mix_kernels_match_the_numpy_path(cupy, dtype):
    from paeff_np.fusion import _mix_backward, _mix_forward
    rng = np.random.default_rng(4)
    g = rng.random((37, 19)).astype(dtype)
    g[0, :3] = [0.0, 1.0, np.nan]
    a, b, dm = edges(dtype, 1), edges(dtype, 2), edges(dtype, 3)
    dev = cupy.asarray
    with np.errstate(all="ignore"):
        m, m_d = _mix_forward(g, a, b), _mix_forward(dev(g), dev(a), dev(b))
        grads, grads_d = _mix_backward(dm, g, a, b), _mix_backward(dev(dm), dev(g), dev(a), dev(b))
        close(m_d.get(), m, dtype, 4, np.abs(g * a) + np.abs((1 - g) * b))
        for d, h, scale in zip(grads_d, grads, (np.abs(dm) * (np.abs(a) + np.abs(b)), 0, np.abs(dm))):
            close(d.get(), h, dtype, 2, scale)


@needs_cc
@pytest.mark.parametrize("gate", fusion.EGFF_GATES)
@pytest.mark.parametrize("mix", fusion.EGFF_MIXES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_egff_width1_kernels_match_the_numpy_path(cupy, dtype, gate, mix):
    """EGFF at k = 1, forward and backward: one kernel against GELU, gate, conv, sigmoid and
    mix (and their backward) one by one; unit rows (the model's), then the edges."""
    from paeff_np.fusion import egff_backward, egff_forward
    rng = np.random.default_rng(11)
    B, D = 37, 19
    e_f, e_v = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    e_f /= np.linalg.norm(e_f, axis=1, keepdims=True)
    e_v /= np.linalg.norm(e_v, axis=1, keepdims=True)
    e_f[:8], e_v[:8] = edges(np.float64)[:8] * 4, edges(np.float64, 5)[:8] * 4     # large, tiny, NaN
    e_f, e_v = e_f.astype(dtype), e_v.astype(dtype)
    c = 2 if gate == "concat" else 1
    w = rng.uniform(-1, 1, (1, c, 1)).astype(dtype)
    b = rng.uniform(-1, 1, (1,)).astype(dtype)
    dm = rng.standard_normal((B, D)).astype(dtype)
    dev = cupy.asarray
    with np.errstate(all="ignore"):
        out, cache = egff_forward(e_f, e_v, w, b, gate, mix)
        grads = egff_backward(dm, cache)
        out_d, cache_d = egff_forward(dev(e_f), dev(e_v), dev(w), dev(b), gate, mix)
        grads_d = egff_backward(dev(dm), cache_d)
        fh, vh, g = cache.f_hat, cache.v_hat, cache.g
        # 0·∞ in a magnitude below is a saturated factor (σ' = 0, Φ' = 0) times an overflowed
        # term, which then does not reach the result: it counts 0
        mag = lambda a: np.nan_to_num(a, nan=0.0, posinf=np.inf)
        close(out_d.emb_f.get(), fh, dtype, 7, cdf_tail(e_f) * np.abs(fh))    # GELU: normcdf and a product
        close(out_d.emb_v.get(), vh, dtype, 7, cdf_tail(e_v) * np.abs(vh))
        # g = σ(u), u = w·a + b: u within 9 ulp of |w a| + |b| (f̂, v̂ at 7, a product, a sum),
        # σ' ≤ 1/4 takes that to g, and σ's own 4 ulp
        u_terms = np.abs(cache.conv.xpad * w).sum(axis=1) + np.abs(b)
        close(cache_d.g.get(), g, dtype, 13, mag(g * (1 - g) * u_terms))
        mf, mv = cache.mix_f, cache.mix_v
        close(out_d.m.get(), out.m, dtype, 20, mag(np.abs(g * mf) + np.abs((1 - g) * mv)
                                                   + g * (1 - g) * u_terms * np.abs(mf - mv)))
        # backward: every term carries the forward's errors (≤ 20 ulp) through a few products
        # and the GELU's derivative (exp ≤ 2 ulp); the terms' magnitudes
        gelu_d = lambda x, cdf: np.abs(np.exp(-0.5 * x * x) * layers.INV_SQRT_2PI * x) + np.abs(cdf)
        du = np.abs(dm * (mf - mv)) * g * (1 - g)
        wa = np.abs(w).sum()
        term_f = gelu_d(e_f, cache.gelu_f.cdf) * (wa * du * (np.abs(vh) + 1) + np.abs(dm)) + np.abs(dm)
        term_v = gelu_d(e_v, cache.gelu_v.cdf) * (wa * du * (np.abs(fh) + 1) + np.abs(dm)) + np.abs(dm)
        scale_du = np.abs(dm) * (np.abs(mf) + np.abs(mv)) * (1 + u_terms)
        close(grads_d[0].get(), grads[0], dtype, 40, mag(term_f * (1 + u_terms) + wa * scale_du))
        close(grads_d[1].get(), grads[1], dtype, 40, mag(term_v * (1 + u_terms) + wa * scale_du))
        n = B * D
        finite = np.isfinite(du).all()
        assert grads_d[2].shape == w.shape and grads_d[3].shape == (1,)
        if finite:                                                    # the sums: n terms each
            xpad = np.abs(cache.conv.xpad)
            scale = (scale_du[:, None, :] * xpad).sum(axis=(0, 2)).reshape(w.shape)
            close(grads_d[2].get(), grads[2], dtype, n + 40, scale)
            close(grads_d[3].get(), grads[3], dtype, n + 40, scale_du.sum())
        else:
            assert np.array_equal(np.isnan(grads_d[2].get()), np.isnan(grads[2]))


@needs_cc
@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_branch_kernels_match_the_numpy_path(cupy, dtype, dropout):
    """The branch in train mode: b₀ left to the BatchNorm's stats kernel, BatchNorm's apply,
    ReLU and dropout in one kernel (the same uniforms: the kernel's hash, the reference's on NumPy), their
    backward after the two masked column sums; against model.branch_forward/backward on NumPy."""
    from paeff_np.model import BRANCHES, Config, branch_backward, branch_forward, init_params
    cfg = Config(face_dim=24, voice_dim=12, embed_dim=16, n_classes=5, dropout=dropout)
    params, buffers = init_params(cfg, seed=3, dtype=dtype)
    rng = np.random.default_rng(5)
    B = 64
    params[BRANCHES[0] + "0.bias"] = (rng.standard_normal(16) * 3).astype(dtype)   # b₀ ≠ 0.01
    x = rng.standard_normal((B, 24)).astype(dtype)
    x[:, 0] *= 1e3
    dh4 = rng.standard_normal((B, 16)).astype(dtype)
    h4, buf, cache = branch_forward(params, buffers, BRANCHES[0], x, True, dropout, ReferenceDraws(9))
    grads = branch_backward(dh4, cache)
    dev = lambda d: {k: cupy.asarray(v) for k, v in d.items()}
    h4_d, buf_d, cache_d = branch_forward(dev(params), dev(buffers), BRANCHES[0], cupy.asarray(x), True,
                                          dropout, backend.default_rng(9, cupy))
    grads_d = branch_backward(cupy.asarray(dh4), cache_d)
    assert np.array_equal(cache_d.relu.get(), cache.relu)
    if dropout:
        np.testing.assert_array_equal(cache_d.drop.get(), cache.drop)
    else:
        assert cache_d.drop is None
    # x W₀ᵀ (+ b₀ on NumPy) and the BatchNorm: as the BatchNorm test, over 24 + B terms;
    # x̂ errs by that relative to |x W₀ᵀ| + |b₀|, and the layers after by a few roundings more
    h0 = np.abs(x) @ np.abs(params[BRANCHES[0] + "0.weight"]).T + np.abs(params[BRANCHES[0] + "0.bias"])
    inv_std = cache.bn.inv_std
    k = 2 * B + 24 + 8
    close(cache_d.bn.xhat.get(), cache.bn.xhat, dtype, k, h0 * inv_std)
    W4 = np.abs(params[BRANCHES[0] + "4.weight"])
    h3 = np.abs(cache.bn.gamma) * h0 * inv_std + np.abs(params[BRANCHES[0] + "1.bias"])
    drop = 1.0 if cache.drop is None else cache.drop
    close(h4_d.get(), h4, dtype, k + 16, (h3 * drop) @ W4.T + np.abs(params[BRANCHES[0] + "4.bias"]))
    for key in ("running_mean", "running_var"):
        full = BRANCHES[0] + "1." + key
        close(buf_d[full].get(), buf[full], dtype, k, np.abs(buffers[full]) + h0.max(axis=0) ** 2)
    # backward: dh₃ = dh₄ W₄ (16 terms), then the BatchNorm's sums over B rows
    dh3 = (np.abs(dh4) @ W4) * drop
    term = dh3 + np.abs(cache.bn.xhat) * (dh3 * np.abs(cache.bn.xhat)).sum(axis=0) / B + dh3.sum(axis=0) / B
    dx_scale = np.abs(cache.bn.gamma) * inv_std * term
    for key, scale in (("1.weight", (dh3 * np.abs(cache.bn.xhat)).sum(axis=0)), ("1.bias", dh3.sum(axis=0)),
                       ("0.bias", dx_scale.sum(axis=0)), ("0.weight", dx_scale.T @ np.abs(x))):
        close(grads_d[BRANCHES[0] + key].get(), grads[BRANCHES[0] + key], dtype, 2 * B + 16 + k, scale)
    for key in ("4.weight", "4.bias"):
        np.testing.assert_allclose(grads_d[BRANCHES[0] + key].get(), grads[BRANCHES[0] + key],
                                   rtol=0, atol=(B + 4) * np.finfo(dtype).eps * float(
                                       np.abs(dh4).sum(axis=0).max() * (h3.max() * drop.max() if dropout else h3.max())
                                       * 4))


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_model_glue_kernels_match_the_numpy_path(cupy, dtype):
    """forward/backward's glue on CuPy: tanh(m Wᵀ + b) after the product, (dz₁ + dz₂)(1 − z²),
    α₁L_A + α₂L_OP + α₃L_CE, and l2_normalize_backward(de₁ + de₂) + dh."""
    from paeff_np.layers import l2_normalize_forward
    from paeff_np.model import _head_forward, _head_tanh_backward, _normalize_backward, _weighted_loss
    rng = np.random.default_rng(8)
    m, W, b = edges(dtype)[:, :16], rng.standard_normal((16, 16)).astype(dtype), rng.standard_normal(16).astype(dtype)
    dev = cupy.asarray
    with np.errstate(all="ignore"):
        z, _, _ = _head_forward(m, W, b)
        z_d, cache_d, t_d = _head_forward(dev(m), dev(W), dev(b))
    assert t_d is z_d and cache_d.W.shape == W.shape          # the tanh's cache is its output
    scale = np.abs(m) @ np.abs(W).T + np.abs(b)
    with np.errstate(all="ignore"):
        close(z_d.get(), z, dtype, 16 + 2, (1 - z * z) * scale)      # 16-term product, +, tanh (≤ 2 ulp)
    z = np.nan_to_num(z)
    dz1, dz2 = edges(dtype, 1)[:, :16], edges(dtype, 2)[:, :16]
    with np.errstate(all="ignore"):
        dr, dr_d = _head_tanh_backward(dz1, dz2, z), _head_tanh_backward(dev(dz1), dev(dz2), dev(z))
        close(dr_d.get(), dr, dtype, 4, (np.abs(dz1) + np.abs(dz2)) * (1 + z * z))
    terms = [np.asarray(v, dtype) for v in (0.7, 2.5, 1e-3)]
    loss = _weighted_loss((0.3, 0.35, 0.35), terms)
    loss_d = _weighted_loss((0.3, 0.35, 0.35), [dev(t) for t in terms])
    close(loss_d.get(), loss, dtype, 5, 0.3 * 0.7 + 0.35 * 2.5 + 0.35e-3)
    x = edges(dtype, 4)
    x[2] /= 1e20                        # the norm of a finite row; the clamp at eps: rows 0 and 1
    de1, de2, dh = edges(dtype, 5), edges(dtype, 6), edges(dtype, 7)
    for arr in (de1, de2, dh):
        arr[2] /= 1e20
        arr[6] /= 1e20
    e, cache = l2_normalize_forward(x)
    _, cache_d = l2_normalize_forward(dev(x))
    D = x.shape[1]
    for a2, a3 in ((de2, dh), (None, dh), (de2, None), (None, None)):
        with np.errstate(all="ignore"):
            ref = _normalize_backward(de1, a2, a3, cache)
            got = _normalize_backward(dev(de1), None if a2 is None else dev(a2), None if a3 is None else dev(a3),
                                      cache_d)
            de = np.abs(de1) + (0 if a2 is None else np.abs(a2))
            radial = (np.abs(e) * de).sum(axis=1, keepdims=True)
            close(got.get(), ref, dtype, 2 * D + 6, (de + np.abs(e) * radial) / cache.denom
                  + (0 if a3 is None else np.abs(a3)))


# --- the Poincaré alignment (poincare.py) --------------------------------------------

@needs_cc
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_feature_clip_kernels_match_the_numpy_path(cupy, dtype):
    """h̃ = h·min(1, r/(‖h‖ + ε)) and its backward, with rows at the clamp's edges: ‖h‖ = 0
    (the safe norm), just inside and just outside r, far outside, tiny, huge, NaN."""
    from paeff_np.poincare import CLIP_EPS, feature_clip_backward, feature_clip_forward
    r = 2.3
    rng = np.random.default_rng(21)
    B, D = 30, 11
    h = rng.standard_normal((B, D))
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    radii = np.concatenate([[0.0, 1e-7, r - 2e-5, r + 1e-4, r * 1.001, 40.0, 1e15], rng.uniform(0.1, 6.0, B - 7)])
    h *= radii[:, None]
    h[7, 3] = np.nan
    h = h.astype(dtype)
    dout = edges(dtype, 22, B, D)
    dout[2] /= 1e20
    dev = cupy.asarray
    with np.errstate(all="ignore"):
        out, cache = feature_clip_forward(h, r)
        dh = feature_clip_backward(dout, cache)
        out_d, cache_d = feature_clip_forward(dev(h), r)
        dh_d = feature_clip_backward(dev(dout), cache_d)
    assert np.array_equal(cache_d.active.get(), cache.active)
    assert not cache.active[0, 0] and not cache.active[2, 0] and cache.active[3, 0] and not cache.active[7, 0]
    # the norm (D terms, halved by √) and r/(‖h‖ + ε): D + 3 roundings, one more for h·f
    close(cache_d.factor.get(), cache.factor, dtype, D + 3)
    close(out_d.get(), out, dtype, D + 4)
    with np.errstate(all="ignore"):
        hd = np.abs(h * dout).sum(axis=1, keepdims=True)
        safe = np.where(cache.norm > 0, cache.norm, 1.0)
        scale = cache.factor * (np.abs(dout) + hd / (safe * (cache.norm + CLIP_EPS)) * np.abs(h))
        # a NaN row is not shrunk (its flag is off): dh = dout exactly, whatever its magnitudes
        close(dh_d.get(), dh, dtype, 2 * D + 8, np.where(cache.active, scale, 0.0))


def _distance_budget(x, y, c, dS=None, tau=None):
    """First-order error magnitudes of the closed-form distances, from the float64 NumPy
    path on the same inputs: each B × B entry's terms, weighted by its conditioning
    (‖num‖² as a difference of larger terms, 1/(1 − a²), den), for the forward and, given
    dS, for dx and dy. Returns ``(dist_scale, dx_scale, dy_scale)``."""
    from paeff_np.poincare import MIN_NUM_SQ, distance_matrix_forward
    x, y = x.astype(np.float64), y.astype(np.float64)
    _, k = distance_matrix_forward(x, y, c)
    sq_x, sq_y, G, A, Bp = k.sq_x, k.sq_y, np.abs(k.gram), np.abs(k.coef_a), np.abs(k.coef_b)
    t_num = A * A * sq_x + 2 * A * Bp * G + Bp * Bp * sq_y
    t_den = c * c * sq_x * sq_y + 2 * c * G + 1
    num_sq = np.maximum(k.num_norm ** 2, MIN_NUM_SQ)
    a = k.artanh_arg
    # where the guard acts ‖num‖ is the constant 1e-10, exact: no conditioning from ‖num‖²
    num_cond = np.where(k.num_active, t_num / num_sq, 0.0)
    cond = 1 + num_cond + t_den / k.den + 2 * a * a / (1 - a * a) * (1 + num_cond)
    # the sums of squares and G: D terms each; their relative error enters every term once
    dist = 2 / np.sqrt(c) * a / (1 - a * a) * cond * k.artanh_active
    if dS is None:
        return dist, None, None
    dD = np.abs(dS) / (1.0 if tau is None else tau)
    h = dD / (1 - a * a) * k.artanh_active / k.den
    dden = h * a * 2 / np.sqrt(c)
    ds = h * k.num_active / k.num_norm
    da = 2 * ds * (A * sq_x + Bp * G)
    dgram = 2 * c * (da + dden) + 2 * A * Bp * ds
    row = (A * (1 + c * sq_y) + 2 * c * Bp * sq_y) * ds + c * c * dden * sq_y
    col = Bp * Bp * ds + c * da + c * c * dden * sq_x
    dx = (dgram * cond) @ np.abs(y) + 2 * (row * cond).sum(axis=1, keepdims=True) * np.abs(x)
    dy = (dgram * cond).T @ np.abs(x) + 2 * (col * cond).sum(axis=0)[:, None] * np.abs(y)
    return dist, dx, dy


def _ball_points(dtype, c, B=12, D=7, seed=31, antipodal=False):
    """Points of the ball (√c‖x‖ in [0.05, 0.7]); x₀ = y₀ = 0 and an exactly coincident
    dyadic pair at c = 1 (‖num‖² = 0: the MIN_NUM_SQ guard acts); with ``antipodal``, an
    antipodal pair at the projection's radius (the artanh clamp acts; near the boundary d is
    ill-conditioned, 1/(1 − a²) ~ 1e5, so that row is checked apart)."""
    from paeff_np.hyperbolic import ball_radius
    rng = np.random.default_rng(seed)
    def points(n, seed):
        p = np.random.default_rng(seed).standard_normal((n, D))
        return p * (rng.uniform(0.05, 0.7, (n, 1)) / (np.sqrt(c) * np.linalg.norm(p, axis=1, keepdims=True)))
    x, y = points(B, seed + 1), points(B, seed + 2)
    x[0] = y[0] = 0.0
    if c == 1.0:        # dyadic: ‖x‖², G, A and B' exact, ‖num‖² = 0 on both paths (not rounding noise
        x[1] = y[1] = np.array([0.25, 0.125, 0.0, -0.125, 0.0, 0.0625, 0.0])[:D] * 0.5   # on either side of 1e-20)
    if antipodal:
        u = points(1, seed + 3)[0]
        x[2] = u / np.linalg.norm(u) * ball_radius(c)
        y[2] = -x[2]
    return x.astype(dtype), y.astype(dtype)


@needs_cc
@pytest.mark.parametrize("c", [1.0, 0.05])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_distance_kernels_match_the_numpy_path(cupy, dtype, c):
    """The distance matrix and the logits S = −D/τ, forward and backward: one B × B kernel
    each way (then two sums, the products, one kernel each for dx and dy) against
    distance_matrix_forward/backward and distance_logits_forward/backward on NumPy."""
    from paeff_np.poincare import (distance_logits_backward, distance_logits_forward, distance_matrix_backward,
                                   distance_matrix_forward)
    x, y = _ball_points(dtype, c)
    B, D = x.shape
    dS = np.random.default_rng(33).standard_normal((B, B)).astype(dtype)
    dev = cupy.asarray
    tau = 0.07
    with np.errstate(all="ignore"):
        dist, cache = distance_matrix_forward(x, y, c)
        dx, dy = distance_matrix_backward(dS, cache)
        dist_d, cache_d = distance_matrix_forward(dev(x), dev(y), c)
        dx_d, dy_d = distance_matrix_backward(dev(dS), cache_d)
        S, lcache = distance_logits_forward(x, y, c, tau)
        lx, ly = distance_logits_backward(dS, lcache)
        S_d, lcache_d = distance_logits_forward(dev(x), dev(y), c, tau)
        lx_d, ly_d = distance_logits_backward(dev(dS), lcache_d)
        for name in ("num_active", "artanh_active"):
            assert np.array_equal(getattr(cache_d, name).get(), getattr(cache, name)), name
        assert not cache.num_active[0, 0] and cache.num_active[1, 1] == (c != 1.0)
        k = D + 24          # the sums of squares and G (D terms), then about 20 roundings and atanh (3 ulp)
        dist_scale, dx_scale, dy_scale = _distance_budget(x, y, c, dS)
        close(dist_d.get(), dist, dtype, k, dist_scale)
        close(S_d.get(), S, dtype, k + 1, dist_scale / tau)
        # backward: B terms in each sum and product on top
        close(dx_d.get(), dx, dtype, k + B + 8, dx_scale)
        close(dy_d.get(), dy, dtype, k + B + 8, dy_scale)
        _, lx_scale, ly_scale = _distance_budget(x, y, c, dS, tau)
        close(lx_d.get(), lx, dtype, k + B + 9, lx_scale)
        close(ly_d.get(), ly, dtype, k + B + 9, ly_scale)
        # the artanh clamp: the antipodal pair's entry clamped on both paths, and it passes
        # exactly no gradient
        x, y = _ball_points(dtype, c, antipodal=True)
        dist, cache = distance_matrix_forward(x, y, c)
        dist_d, cache_d = distance_matrix_forward(dev(x), dev(y), c)
        assert np.array_equal(cache_d.artanh_active.get(), cache.artanh_active) and not cache.artanh_active[2, 2]
        close(dist_d.get()[2, 2], dist[2, 2], dtype, 5)          # the clamp's value: atanh (3 ulp), 2 products
        only = np.zeros_like(dS)
        only[2, 2] = 1.0
        for g in distance_matrix_backward(dev(only), cache_d) + distance_matrix_backward(only, cache):
            assert not np.any(backend.to_host(g))
        # a NaN coordinate: row i of D and of dx NaN, and through dGᵀx every row of dy, on both paths
        x[-1, 0] = np.nan
        dist, cache = distance_matrix_forward(x, y, c)
        dist_d, cache_d = distance_matrix_forward(dev(x), dev(y), c)
        for a, b in zip((dist_d,) + distance_matrix_backward(dev(dS), cache_d),
                        (dist,) + distance_matrix_backward(dS, cache)):
            assert np.array_equal(np.isnan(a.get()), np.isnan(b)) and np.isnan(b).any()


@needs_cc
@pytest.mark.parametrize("riemannian", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_clip_to_ball_kernels_match_the_numpy_path(cupy, dtype, riemannian):
    """The Poincaré alignment's P(expmap0(clip(h))) on CuPy (model.py: the clip's and the
    map's kernels joined, forward and backward) against feature_clip and to_ball one after
    the other on NumPy; rows with ‖h‖ = 0, below MIN_NORM, unclipped, clipped, far out."""
    from paeff_np.model import Config, _clip_to_ball_backward_cupy, _clip_to_ball_forward_cupy
    from paeff_np.hyperbolic import to_ball_backward, to_ball_forward
    from paeff_np.poincare import feature_clip_backward, feature_clip_forward
    cfg = Config(alignment="poincare", riemannian_grad=riemannian, clip_radius=2.3, curvature=0.05)
    rng = np.random.default_rng(41)
    B, D = 30, 13
    h = rng.standard_normal((B, D))
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    h *= np.concatenate([[0.0, 1e-7, 2.0, 2.3 + 1e-3, 40.0, 1e6], rng.uniform(0.1, 6.0, B - 6)])[:, None]
    h = h.astype(dtype)
    dp = rng.standard_normal((B, D)).astype(dtype)
    g, clip = feature_clip_forward(h, cfg.clip_radius)
    p, ball = to_ball_forward(g, cfg.curvature, riemannian)
    dh = feature_clip_backward(to_ball_backward(dp, ball), clip)
    p_d, clip_d, ball_d = _clip_to_ball_forward_cupy(cupy.asarray(h), cfg)
    dh_d = _clip_to_ball_backward_cupy(cupy.asarray(dp), clip_d, ball_d)
    assert np.array_equal(clip_d.active.get(), clip.active)
    assert clip.active.sum() > 3 and not clip.active[:3].any()
    # forward: ‖h‖ (D terms), then the clip's and the map's roundings (about 20, tanh 2 ulp);
    # ‖clip(h)‖ = f‖h‖ here against the NumPy path's second row norm: D more
    close(p_d.get(), p, dtype, 2 * D + 24, np.abs(p))
    # backward: ⟨h, dp⟩ (D terms) through the map's and the clip's per-row numbers (≈ 30 roundings)
    ex = ball.expmap0
    hdp = np.abs(h * dp).sum(axis=1, keepdims=True)
    ds_dn = np.abs(ex.sqrt_c * (1 - ex.t * ex.t) / ex.a) + np.abs(ex.t / (ex.a * ex.n))
    dg = ex.s * np.abs(dp) + (clip.factor * hdp * ds_dn / ex.n + ex.s * ex.s / ball.project.n ** 2 * hdp) * np.abs(g)
    safe = np.where(clip.norm > 0, clip.norm, 1.0)
    terms = clip.factor * (dg + (np.abs(h) * dg).sum(axis=1, keepdims=True) / (safe * (clip.norm + 1e-5)) * np.abs(h))
    close(dh_d.get(), dh, dtype, 3 * D + 40, terms)
