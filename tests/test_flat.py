"""The flat parameter buffer (paeff_np.flat) and AdamW's flat path, which must
equal the per-key path bit for bit."""
import numpy as np
import pytest

import paeff_np as pn
from paeff_np.backend import to_host
from paeff_np.flat import FlatViews, flat_like, flatten, gather_into
from paeff_np.optim import adamw_update

SMALL = dict(face_dim=24, voice_dim=12, embed_dim=8, n_classes=5)


def some_arrays(xp, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w": (3, 5), "b": (5,), "one": (1,), "conv": (1, 1, 3), "big": (7, 11)}
    return {k: xp.asarray(rng.standard_normal(s).astype(dtype)) for k, s in shapes.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flatten_views_write_through(xp, dtype):
    arrays = some_arrays(xp, dtype)
    flat, views = flatten(arrays)
    assert isinstance(views, FlatViews) and views.flat is flat and views.is_intact()
    assert flat.ndim == 1 and flat.dtype == dtype and flat.flags.c_contiguous
    assert type(flat) is type(arrays["w"])                      # same array module
    assert list(views) == list(arrays)
    for k, a in arrays.items():
        assert views[k].shape == a.shape and views[k].dtype == a.dtype
        np.testing.assert_array_equal(to_host(views[k]), to_host(a))
        assert views[k] is not a                                # a copy, not the input
        offset = views.layout.offsets[k]
        assert (offset * flat.itemsize) % 256 == 0             # aligned segments
    views["w"][1, 2] = 42.0                                     # view → flat
    assert float(flat[views.layout.offsets["w"] + 1 * 5 + 2]) == 42.0
    flat[views.layout.offsets["b"] + 3] = -7.0                  # flat → view
    assert float(views["b"][3]) == -7.0
    views["big"] *= 2                                           # in-place ops write through
    np.testing.assert_array_equal(to_host(views["big"]), 2 * to_host(arrays["big"]))
    assert views.is_intact()
    views["w"] = xp.zeros((3, 5), dtype)                        # replacing a value breaks the link
    assert not views.is_intact()


def test_gather_into_and_flat_like(xp):
    arrays = some_arrays(xp, np.float32)
    flat, views = flatten(arrays)
    grads = some_arrays(xp, np.float32, seed=1)
    g = flat_like(flat)
    assert g.shape == flat.shape and g.dtype == flat.dtype and float(abs(g).sum()) == 0
    assert gather_into(g, grads, views.layout) is g
    gviews = views.layout.views(g)
    for k in arrays:
        np.testing.assert_array_equal(to_host(gviews[k]), to_host(grads[k]))
    padding = np.ones(flat.shape[0], bool)
    for k in arrays:
        o = views.layout.offsets[k]
        padding[o:o + arrays[k].size] = False
    assert padding.any() and not to_host(g)[padding].any()      # padding stays zero


def test_flatten_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="dtype"):
        flatten({"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float64)})


def _train_both(xp, dtype, steps, flat_grads):
    """The same AdamW run on plain dicts and on a flat buffer."""
    rng = np.random.default_rng(0)
    start = some_arrays(np, dtype)
    plain = {k: xp.asarray(v.copy()) for k, v in start.items()}
    _, flat_params = flatten({k: xp.asarray(v) for k, v in start.items()})
    opt_plain, opt_flat = pn.AdamW(lr=1e-2), pn.AdamW(lr=1e-2)
    gbuf = flat_like(flat_params.flat)
    for t in range(steps):
        grads = {k: xp.asarray(rng.standard_normal(v.shape).astype(dtype)) for k, v in start.items()}
        lr = pn.cosine_lr(t, 1e-2, steps)
        opt_plain.step(plain, grads, lr=lr)
        if flat_grads:
            gather_into(gbuf, grads, flat_params.layout)
            opt_flat.step(flat_params, flat_params.layout.views(gbuf), lr=lr)
        else:
            opt_flat.step(flat_params, grads, lr=lr)
    return plain, flat_params, opt_plain, opt_flat


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flat_grads", [False, True])
def test_adamw_flat_equals_per_key_bit_for_bit(xp, dtype, flat_grads):
    plain, flat_params, opt_plain, opt_flat = _train_both(xp, dtype, 150, flat_grads)
    assert isinstance(opt_flat.m, FlatViews)                    # the flat path was taken
    for k in plain:
        np.testing.assert_array_equal(to_host(flat_params[k]), to_host(plain[k]))
        np.testing.assert_array_equal(to_host(opt_flat.m[k]), to_host(opt_plain.m[k]))
        np.testing.assert_array_equal(to_host(opt_flat.v[k]), to_host(opt_plain.v[k]))
        assert flat_params[k].dtype == dtype
    assert opt_flat.t == opt_plain.t == 150


def test_adamw_flat_on_the_model(xp):
    """A few real steps of the model: flat params + flat AdamW == plain dicts."""
    cfg = pn.Config(**SMALL, dropout=0.0)
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float32)
    plain = {k: xp.asarray(v.copy()) for k, v in params.items()}
    _, flat_params = flatten({k: xp.asarray(v) for k, v in params.items()})
    buffers = {k: xp.asarray(v) for k, v in buffers.items()}
    rng = np.random.default_rng(3)
    opt_plain, opt_flat = pn.AdamW(lr=1e-3), pn.AdamW(lr=1e-3)
    b_plain = b_flat = buffers
    for _ in range(5):
        face = xp.asarray(np.abs(rng.standard_normal((16, 24))).astype(np.float32))
        voice = xp.asarray(rng.standard_normal((16, 12)).astype(np.float32))
        labels = xp.asarray(rng.integers(0, 5, 16))
        _, _, g_plain, b_plain = pn.loss_and_grads(plain, b_plain, face, voice, labels, cfg)
        _, _, g_flat, b_flat = pn.loss_and_grads(flat_params, b_flat, face, voice, labels, cfg)
        opt_plain.step(plain, g_plain)
        opt_flat.step(flat_params, g_flat)
    assert flat_params.is_intact()
    # exact on CuPy too: the same kernels on the same inputs (cuBLAS is deterministic for one shape
    # and alignment; every flat segment starts on a 256-byte boundary, as a separate array does)
    for k in plain:
        np.testing.assert_array_equal(to_host(flat_params[k]), to_host(plain[k]))


def test_adamw_flat_state_round_trip(tmp_path):
    """state_dict of the flat path has the per-key format; loading it (into a
    fresh optimizer, flat or not) continues exactly."""
    plain, flat_params, opt_plain, opt_flat = _train_both(np, np.float32, 20, False)
    meta_f, arrays_f = opt_flat.state_dict()
    meta_p, arrays_p = opt_plain.state_dict()
    assert meta_f == meta_p and set(arrays_f) == set(arrays_p) == {
        f"{s}/{k}" for s in "mv" for k in plain}
    for k in arrays_p:
        assert arrays_f[k].shape == arrays_p[k].shape
        np.testing.assert_array_equal(arrays_f[k], arrays_p[k])
    np.savez(tmp_path / "opt.npz", **arrays_f)                  # as a checkpoint stores it
    loaded = dict(np.load(tmp_path / "opt.npz"))
    resumed_flat, resumed_plain = pn.AdamW(), pn.AdamW()
    resumed_flat.load_state_dict(meta_f, loaded)
    resumed_plain.load_state_dict(meta_p, loaded)
    _, p_flat = flatten({k: v.copy() for k, v in flat_params.items()})
    p_plain = {k: v.copy() for k, v in plain.items()}
    rng = np.random.default_rng(9)
    for _ in range(10):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in plain.items()}
        for opt, p in ((opt_plain, plain), (opt_flat, flat_params),
                       (resumed_plain, p_plain), (resumed_flat, p_flat)):
            opt.step(p, grads)
    for k in plain:
        for other in (flat_params, p_plain, p_flat):
            np.testing.assert_array_equal(other[k], plain[k])
    assert isinstance(resumed_flat.m, FlatViews)                # re-flattened after loading


def test_adamw_update_is_the_formula(xp):
    """``adamw_update`` on a non-contiguous and a contiguous array gives the
    same bits as the step written out with NumPy operators."""
    rng = np.random.default_rng(5)
    shape = (6, 40000)            # 240,000 elements: many CUDA blocks, both memory orders
    p, g, m, v = (rng.standard_normal(shape) for _ in range(4))
    v = np.abs(v)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                 bias1=1 - 0.9 ** 3, sqrt_bias2=(1 - 0.999 ** 3) ** 0.5)
    ref_p = p * (1 - hyper["lr"] * hyper["weight_decay"])
    ref_m = hyper["beta1"] * m + (1 - hyper["beta1"]) * g
    ref_v = hyper["beta2"] * v + (1 - hyper["beta2"]) * g * g
    ref_p = ref_p - (hyper["lr"] / hyper["bias1"]) * ref_m / (np.sqrt(ref_v) / hyper["sqrt_bias2"]
                                                             + hyper["eps"])
    for layout in ("C", "F"):
        arrs = [xp.asarray(np.array(a, order=layout)) for a in (p, g, m, v)]
        adamw_update(*arrs, **hyper)
        for got, ref in ((arrs[0], ref_p), (arrs[2], ref_m), (arrs[3], ref_v)):
            if xp is np:          # the same operations in the same order: the same bits
                np.testing.assert_array_equal(got, ref)
            else:
                # CuPy tolerance: one fused kernel; NVRTC contracts a·b + c into FMAs (one rounding
                # instead of two) and sqrt/÷ are IEEE-exact: ≤ 1 ulp per statement, ≤ 4 ulp of the
                # terms; atol covers p − step cancelling towards 0. rtol 1e-12 ≈ 4500 ulp.
                np.testing.assert_allclose(to_host(got), ref, rtol=1e-12, atol=1e-15)
