"""The whole network: gradient checks of the total loss for every Config
variant, the PyTorch reference fixtures, and the public contract."""
import json
import os

import numpy as np
import pytest

import paeff_np as pn
from conftest import SMALL, TOL, pre_batchnorm_biases, small_batch, to_xp
from paeff_np.backend import default_rng
from paeff_np.gradcheck import relative_error

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "torch-reference")   # made by fixtures/make_fixtures.py
FIXTURES = os.environ.get("PAEFF_FIXTURES", FIXTURES)

VARIANTS = [
    dict(),                                                     # PAEFF defaults
    dict(egff_kernel=5, egff_mix="raw"),                        # the authors' code
    dict(egff_kernel=3, egff_gate="sum"),
    dict(egff_kernel=3, egff_gate="concat"),
    dict(egff_gate="concat", egff_mix="raw"),
    dict(alignment="euclidean"),
    dict(alignment="none", egff_kernel=5),
    dict(fusion="gated", alignment="none"),
    dict(fusion="gated", alignment="hyperbolic"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_whole_loss_gradient(xp, variant, dropout):
    """Every parameter of every variant; Riemannian scaling off (it is not a
    derivative); dropout with the same mask at every evaluation."""
    cfg = pn.Config(**SMALL, **variant, dropout=dropout, riemannian_grad=False)
    params, buffers = pn.init_params(cfg, seed=1, dtype=np.float64)
    params, buffers = to_xp(params, xp), to_xp(buffers, xp)
    face, voice, labels = small_batch(xp)
    rng = lambda: default_rng(3, xp) if dropout else None

    def loss():
        return pn.loss_and_grads(params, buffers, face, voice, labels, cfg, rng=rng())[0]
    _, _, grads, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg, rng=rng())
    assert set(grads) == set(params)
    zero = pre_batchnorm_biases(cfg)
    pn.gradcheck(loss, params, {k: g for k, g in grads.items() if k not in zero}, tol=TOL)
    for k in zero:
        assert float(xp.abs(grads[k]).max()) < 1e-13


ALIGNMENT_READS = {"hyperbolic": (2, 3), "euclidean": (2, 3), "poincare": (0, 1), "none": ()}


@pytest.mark.parametrize("alignment", sorted(ALIGNMENT_READS))
def test_alignment_pair_gradient(xp, alignment):
    """``alignment_forward``/``alignment_backward`` as one op of inputs
    ``h_f, h_v, e_f, e_v``: finite differences for the inputs it reads
    (Riemannian scaling off: not a derivative), exact zeros for the others,
    and the weight ``dloss`` scales every gradient."""
    from paeff_np.gradcheck import check_layer
    from paeff_np.model import alignment_backward, alignment_forward
    assert set(ALIGNMENT_READS) == set(pn.model.ALIGNMENTS)
    cfg = pn.Config(**SMALL, alignment=alignment, riemannian_grad=False, temperature=0.2)
    rng = np.random.default_rng(4)
    h_f, h_v = (xp.asarray(rng.standard_normal((5, 6)) * 1.5) for _ in range(2))
    e_f, e_v = (xp.asarray(rng.standard_normal((5, 6)) * 0.4) for _ in range(2))
    inputs = [h_f, h_v, e_f, e_v]
    reads = ALIGNMENT_READS[alignment]
    if reads:
        report = check_layer(alignment_forward, alignment_backward, inputs, settings=dict(cfg=cfg),
                             no_grads=tuple(i for i in range(4) if i not in reads))
        assert sorted(report.errors) == list(reads)
    loss, cache = alignment_forward(*inputs, cfg)
    grads = alignment_backward(1.0, cache)
    weighted = alignment_backward(0.3, cache)
    assert (float(loss) == 0.0) == (alignment == "none")
    for i, (g, g_weighted) in enumerate(zip(grads, weighted)):
        assert g.shape == inputs[i].shape
        assert (i in reads) == bool(xp.any(g != 0)), i
        assert relative_error(g_weighted, 0.3 * g) < 1e-14, i


def test_riemannian_scaling_only_changes_what_feeds_the_alignment():
    """With the scaling on, the parameters whose gradient does not pass through
    the alignment (the head, the fusion) are unchanged."""
    face, voice, labels = small_batch(np)
    out = {}
    for on in (False, True):
        cfg = pn.Config(**SMALL, dropout=0.0, riemannian_grad=on)
        params, buffers = pn.init_params(cfg, seed=1, dtype=np.float64)
        out[on] = pn.loss_and_grads(params, buffers, face, voice, labels, cfg)
    assert float(out[False][0]) == float(out[True][0])                    # same forward
    for k in ("logits_layer.weight", "res_mix.weight", "fusion_layer.conv.weight"):
        np.testing.assert_array_equal(out[False][2][k], out[True][2][k])
    assert relative_error(out[True][2]["face_branch.fc1.0.weight"],
                          out[False][2]["face_branch.fc1.0.weight"]) > 1e-6


def _fixture_cases():
    path = os.path.join(FIXTURES, "index.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("case", _fixture_cases(), ids=lambda c: c["file"])
def test_matches_pytorch_reference(xp, case):
    """Loss, terms, every gradient, BatchNorm buffers and embeddings against
    PyTorch autograd in float64 (PyTorch reference fixtures)."""
    data = np.load(os.path.join(FIXTURES, case["file"]), allow_pickle=False)
    cfg = pn.Config(**case["config"])
    group = lambda prefix: {k[len(prefix):]: xp.asarray(data[k]) for k in data.files if k.startswith(prefix)}
    params, buffers = group("params/"), group("buffers/")
    # init_params names and shapes every array exactly as the PyTorch state_dict
    fresh_params, fresh_buffers = pn.init_params(cfg, seed=0, dtype=np.float64)
    assert {k: v.shape for k, v in fresh_params.items()} == {k: v.shape for k, v in params.items()}
    assert {k: v.shape for k, v in fresh_buffers.items()} == {k: v.shape for k, v in buffers.items()}
    loss, terms, grads, new_buffers = pn.loss_and_grads(
        params, buffers, xp.asarray(data["face"]), xp.asarray(data["voice"]),
        xp.asarray(data["labels"]), cfg)
    errors = {"loss": relative_error(loss, data["loss"])}
    errors.update({f"terms/{k}": relative_error(v, data[f"terms/{k}"]) for k, v in terms.items()})
    zero = pre_batchnorm_biases(cfg)
    assert set(grads) == set(params)
    for k, g in grads.items():
        if k in zero:   # both sides are rounding noise around an exact zero
            assert float(xp.abs(g).max()) < 1e-13 and np.abs(data[f"grads/{k}"]).max() < 1e-13
        else:
            errors[f"grads/{k}"] = relative_error(g, data[f"grads/{k}"])
    assert set(new_buffers) == {k[len("new_buffers/"):] for k in data.files if k.startswith("new_buffers/")}
    for k, v in new_buffers.items():
        errors[f"new_buffers/{k}"] = relative_error(v, data[f"new_buffers/{k}"])
    emb_f, emb_v = pn.embed(params, new_buffers, xp.asarray(data["face"]), xp.asarray(data["voice"]), cfg)
    errors["embed/face"] = relative_error(emb_f, data["embed/face"])
    errors["embed/voice"] = relative_error(emb_v, data["embed/voice"])
    worst = max(errors, key=errors.get)
    # CuPy tolerance: relative to each array's largest entry; the fixtures' products have ≤ 10 terms and
    # the longest chain is ~50 ops of ≤ 5 ulp (normcdf; exp/log 1, tanh/pow 2): ≲ 250 ulp ≈ 6e-14 < 1e-12
    assert errors[worst] < 1e-12, (worst, errors[worst])


def test_fixtures_are_present():
    """The reference cases are part of the suite: their absence is a failure, not a skip."""
    assert len(_fixture_cases()) == 8, f"PyTorch reference fixtures not found under {FIXTURES}"


def test_contract_as_documented():
    """The README example, at full size, in float32."""
    cfg = pn.Config(face_dim=4096, voice_dim=512, embed_dim=256, n_classes=901,
                    fusion="egff", egff_kernel=1, egff_gate="product", egff_mix="activated",
                    alignment="hyperbolic", curvature=0.05, riemannian_grad=True,
                    temperature=0.07, dropout=0.4, opl_gamma=0.7, loss_weights=(0.3, 0.35, 0.35))
    assert cfg == pn.Config()
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float32)
    assert params["face_branch.fc1.0.weight"].shape == (256, 4096)
    assert params["fusion_layer.conv.weight"].shape == (1, 1, 1)
    assert params["logits_layer.weight"].shape == (901, 256)
    assert buffers["face_branch.fc1.1.num_batches_tracked"].dtype == np.int64
    rng = np.random.default_rng(0)
    face = np.abs(rng.standard_normal((64, 4096))).astype(np.float32)
    voice = rng.standard_normal((64, 512)).astype(np.float32)
    labels = rng.integers(0, 901, 64)
    loss, terms, grads, buffers = pn.loss_and_grads(params, buffers, face, voice, labels, cfg, rng=rng)
    assert set(terms) == {"align", "opl", "ce"} and set(grads) == set(params)
    a1, a2, a3 = cfg.loss_weights
    assert float(loss) == pytest.approx(a1 * float(terms["align"]) + a2 * float(terms["opl"])
                                        + a3 * float(terms["ce"]), rel=1e-6)
    assert all(g.dtype == np.float32 and g.shape == params[k].shape for k, g in grads.items())
    assert int(buffers["face_branch.fc1.1.num_batches_tracked"]) == 1
    face_emb, voice_emb = pn.embed(params, buffers, face, voice, cfg)
    assert face_emb.shape == (64, 256) and face_emb.dtype == np.float32
    opt = pn.AdamW(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    before = params["res_mix.weight"].copy()
    opt.step(params, grads, lr=None)
    assert not np.array_equal(before, params["res_mix.weight"])
    assert pn.cosine_lr(0, 2e-5, 50, eta_min=1e-8) == pytest.approx(2e-5)


def test_loss_and_grads_leaves_inputs_alone():
    cfg = pn.Config(**SMALL, dropout=0.0)
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float64)
    snapshot = {k: v.copy() for k, v in {**params, **buffers}.items()}
    face, voice, labels = small_batch(np)
    _, _, _, new = pn.loss_and_grads(params, buffers, face, voice, labels, cfg)
    for k, v in {**params, **buffers}.items():
        np.testing.assert_array_equal(v, snapshot[k])
    assert int(new["voice_branch.fc1.1.num_batches_tracked"]) == 1


def test_buffers_after_steps_and_eval_mode():
    """Three train steps move the running statistics exactly as BatchNorm1d does;
    eval mode uses them and leaves them alone."""
    cfg = pn.Config(**SMALL, dropout=0.0, fusion="gated")
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float64)
    W, b = params["face_branch.fc1.0.weight"], params["face_branch.fc1.0.bias"]
    mean, var = np.zeros(6), np.ones(6)
    for step in range(3):
        face, voice, labels = small_batch(np, seed=step)
        _, _, _, buffers = pn.loss_and_grads(params, buffers, face, voice, labels, cfg)
        h = face @ W.T + b
        mean, var = 0.9 * mean + 0.1 * h.mean(0), 0.9 * var + 0.1 * h.var(0, ddof=1)
    np.testing.assert_allclose(buffers["face_branch.fc1.1.running_mean"], mean, rtol=1e-13)
    np.testing.assert_allclose(buffers["face_branch.fc1.1.running_var"], var, rtol=1e-13)
    assert int(buffers["fusion_layer.attention.0.block.1.num_batches_tracked"]) == 3
    face, voice, _ = small_batch(np, seed=9)
    e1 = pn.embed(params, buffers, face, voice, cfg)
    e2 = pn.embed(params, buffers, face[:3], voice[:3], cfg)   # eval mode: rows independent
    np.testing.assert_allclose(e1[0][:3], e2[0], rtol=1e-13)


def test_entry_check_names_the_array_and_both_shapes():
    """One shape/dtype check where arrays enter the model (loss_and_grads and embed)."""
    cfg = pn.Config(**SMALL, dropout=0.0)
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float64)
    face, voice, labels = small_batch(np)
    bad = {
        r"face has shape \(8, 5\); expected \(8, 7\) = \(batch, face_dim\)": dict(face=face[:, :5]),
        r"voice has shape \(6, 5\); expected \(8, 5\)": dict(voice=voice[:6]),
        r"labels has shape \(7,\); expected \(8,\)": dict(labels=labels[:7]),
        r"labels has dtype float64; expected integers": dict(labels=labels.astype(float)),
        r"face has dtype float32; expected float64": dict(face=face.astype(np.float32)),
        r"face has shape \(7,\); expected \(batch, 7\) = \(batch, face_dim\)": dict(face=face[0]),
        r"voice is a list, not an array": dict(voice=voice.tolist()),
        r"face is a NoneType, not an array": dict(face=None),
        r"face and voice have no rows": dict(face=face[:0], voice=voice[:0], labels=labels[:0]),
        r"params\['voice_branch.fc1.0.weight'\] has shape \(6, 4\); expected \(6, 5\)":
            dict(params={**params, "voice_branch.fc1.0.weight": params["voice_branch.fc1.0.weight"][:, :4]}),
    }
    for message, change in bad.items():
        args = {**dict(params=params, face=face, voice=voice, labels=labels), **change}
        with pytest.raises(ValueError, match=message):
            pn.loss_and_grads(args["params"], buffers, args["face"], args["voice"], args["labels"], cfg)
        if "labels" not in change:
            with pytest.raises(ValueError, match=message):
                pn.embed(args["params"], buffers, args["face"], args["voice"], cfg)


def test_labels_outside_the_classes_and_a_batch_of_one_are_refused():
    """A label of −1 would silently index the last class; 3 of 3 classes would be an
    IndexError deep in the cross-entropy; a training batch of 1 would divide by B − 1 = 0."""
    cfg = pn.Config(**SMALL, dropout=0.0)
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float64)
    face, voice, labels = small_batch(np)
    K = cfg.n_classes
    for bad_label in (-1, K, K + 100):
        bad = labels.copy()
        bad[3] = bad_label
        with pytest.raises(ValueError, match=rf"labels holds {bad_label}; expected class indices 0\.\.{K - 1}"):
            pn.loss_and_grads(params, buffers, face, voice, bad, cfg)
    with pytest.raises(ValueError, match="labels is None; a training step needs"):
        pn.loss_and_grads(params, buffers, face, voice, None, cfg)
    with pytest.raises(ValueError, match="a training batch needs at least 2 rows"):
        pn.loss_and_grads(params, buffers, face[:1], voice[:1], labels[:1], cfg)
    assert pn.embed(params, buffers, face[:1], voice[:1], cfg)[0].shape == (1, cfg.embed_dim)   # eval: fine


def test_named_caches():
    """The model's cache is read by name down to each layer (llm.c's named activations)."""
    from paeff_np.model import forward
    cfg = pn.Config(**SMALL, dropout=0.0)
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float64)
    face, voice, labels = small_batch(np)
    (loss, terms), _, cache = forward(params, buffers, face, voice, labels, cfg)
    assert cache.cfg is cfg and cache.face.prefix == "face_branch.fc1."
    np.testing.assert_array_equal(cache.face.lin0.x, face)
    assert cache.fusion.fusion == "egff" and cache.fusion.op.gate == "product"
    assert cache.align.alignment == "hyperbolic" and cache.align.clip_f is None
    assert bool(cache.align.ball_f.expmap0.norm_active.all())
    assert cache.tanh.shape == (8, SMALL["embed_dim"])               # z, the head's output
    assert float(loss) == pytest.approx(sum(w * float(terms[k]) for w, k in
                                            zip(cfg.loss_weights, ("align", "opl", "ce"))))


def test_config_rejects_bad_values():
    for bad in (dict(fusion="x"), dict(egff_kernel=2), dict(egff_gate="max"), dict(egff_mix="y"),
                dict(alignment="z"), dict(dropout=1.0), dict(loss_weights=(1, 2)), dict(curvature=0)):
        with pytest.raises(ValueError, match="Config"):
            pn.Config(**bad)
    assert pn.Config.from_dict(pn.Config(fusion="gated").to_dict()) == pn.Config(fusion="gated")


@pytest.mark.parametrize("variant", [dict(), dict(egff_gate="concat", egff_kernel=5), dict(fusion="gated")])
def test_init_params_follows_spec(variant):
    """Xavier-uniform Linear weights, biases 0.01; BatchNorm 1/0 and 0/1 buffers;
    conv U(±1/√(C_in·k)) (docs/spec.md §4)."""
    cfg = pn.Config(**SMALL, **variant)
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float64)
    for key, w in params.items():
        if key.endswith(".weight") and w.ndim == 2:                      # Linear
            bound = np.sqrt(6.0 / (w.shape[0] + w.shape[1]))
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound, key
            np.testing.assert_array_equal(params[key[:-6] + "bias"], 0.01)
        elif key.startswith("fusion_layer.conv."):
            c_in, k = params["fusion_layer.conv.weight"].shape[1:]
            assert np.abs(w).max() <= 1.0 / np.sqrt(c_in * k)
        elif key.endswith(".weight"):                                    # BatchNorm
            np.testing.assert_array_equal(w, 1.0)
            np.testing.assert_array_equal(params[key[:-6] + "bias"], 0.0)
    for key, b in buffers.items():
        expected = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}[key.rsplit(".", 1)[1]]
        np.testing.assert_array_equal(b, expected)
    again, _ = pn.init_params(cfg, seed=0, dtype=np.float64)
    assert all(np.array_equal(params[k], again[k]) for k in params)        # a seed fixes the draw


@pytest.mark.parametrize("variant", [dict(), dict(fusion="gated", alignment="euclidean"),
                                     dict(alignment="none")], ids=["default", "gated", "none"])
def test_step_matmuls_lists_every_product_of_the_step(variant):
    """``step_matmuls`` against the products ``loss_and_grads`` really performs
    (an ndarray subclass records each ``@``): same (m, n, k), same count."""
    performed = []

    class Recording(np.ndarray):
        def __matmul__(self, other):
            performed.append((self.shape[0], other.shape[1], self.shape[1]))
            return super().__matmul__(other)

        def __array_function__(self, func, types, args, kwargs):    # np.where, np.concatenate ...
            out = super().__array_function__(func, types, args, kwargs)
            return out.view(Recording) if isinstance(out, np.ndarray) else out

    cfg = pn.Config(**SMALL, **variant)
    params, buffers = pn.init_params(cfg, seed=1, dtype=np.float64)
    rec = lambda a: np.asarray(a).view(Recording)
    face, voice, labels = small_batch(np)
    pn.loss_and_grads({k: rec(v) for k, v in params.items()}, buffers, rec(face), rec(voice),
                      labels, cfg, rng=np.random.default_rng(0))
    listed = []
    for _, a_shape, b_shape, ta, tb in pn.model.step_matmuls(cfg, len(labels)):
        (m, k), (k2, n) = a_shape[::-1] if ta else a_shape, b_shape[::-1] if tb else b_shape
        assert k == k2
        listed.append((m, n, k))
    assert sorted(listed) == sorted(performed)
