"""The library's CuPy paths, run on every CI run through ``strict_xp``, a strict
CuPy TEST DOUBLE on NumPy: a host/device leak fails here without a GPU.

This replaces no GPU run (tests/test_gpu.py is that): the double computes
with NumPy on the CPU, so it proves the code keeps CuPy's rules, not that
CUDA computes what NumPy does.
"""
import importlib
import json
import os
import sys

import numpy as np
import pytest

import strict_xp
from paeff_np import backend, layers
from paeff_np.optim import ADAMW_KERNEL, adamw_update

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cupy(monkeypatch):
    return strict_xp.install(monkeypatch)


# --- the double enforces CuPy's rules ---------------------------------------------------

def test_double_refuses_implicit_host_conversion(cupy):
    a = cupy.asarray(np.arange(6.0).reshape(2, 3))
    for leak in (lambda: np.asarray(a), lambda: np.array(a), lambda: np.concatenate([np.ones((1, 3)), a]),
                 lambda: a + np.ones(3), lambda: np.ones(3) * a, lambda: cupy.where(a > 1, a, np.zeros(3))):
        with pytest.raises(TypeError):
            leak()
    with pytest.raises(TypeError):
        a[0] = np.zeros(3)
    assert float(a.sum()) == 15.0 and int(a[1, 2]) == 5 and bool(a[0, 1])   # one number: allowed
    host = a.get()
    assert isinstance(host, np.ndarray) and host.tolist() == [[0, 1, 2], [3, 4, 5]]
    host[0, 0] = 99.0
    assert float(a[0, 0]) == 0.0                                  # .get() is a copy


def test_double_treated_as_cupy_by_the_backend(cupy):
    a = cupy.asarray(np.ones((4, 2)))
    assert backend.get_array_module(np.ones(1), a) is cupy and backend.is_cupy(a)
    assert backend.array_module("cuda") is cupy
    assert isinstance(backend.to_device(np.ones(2), "cuda"), cupy.ndarray)
    assert isinstance(backend.to_host(a), np.ndarray)
    view = backend.to_device(np.zeros(10), "cuda")[2:8].reshape(2, 3)
    assert isinstance(view.base, cupy.ndarray)                    # views know their base (flat.py)
    np.testing.assert_allclose(layers.normal_cdf(cupy.asarray([0.0, 1.0])).get(), [0.5, 0.8413447460685429])
    y, mask = layers.dropout_forward(cupy.asarray(np.ones(8)), 0.5, backend.default_rng([1, 2], cupy))
    assert isinstance(y, cupy.ndarray) and isinstance(mask, cupy.ndarray)


def test_adamw_kernel_source_is_the_formula(cupy):
    """The double runs the kernel's CUDA C source: on the same float32 data it
    gives the bits of the NumPy path of ``adamw_update``."""
    rng = np.random.default_rng(0)
    p, g, m, v = (rng.standard_normal(50).astype(np.float32) for _ in range(4))
    v = np.abs(v)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                 bias1=1 - 0.9 ** 3, sqrt_bias2=(1 - 0.999 ** 3) ** 0.5)
    host = [a.copy() for a in (p, g, m, v)]
    device = [cupy.asarray(a) for a in (p, g, m, v)]
    adamw_update(*host, **hyper)
    adamw_update(*device, **hyper)
    for h, d in zip(host, device):
        np.testing.assert_array_equal(d.get(), h)
    assert list(backend._kernel_memo) == [tuple(ADAMW_KERNEL.values())]


def test_the_double_reads_cs_conditional_operator_and_fmax(cupy):
    """``c ? a : b`` (nested, in parentheses) runs elementwise as in CUDA C; fmax/fmin keep
    C's rule that a NaN operand yields the other one."""
    assert strict_xp._python_expression("x < 0 ? -x : (y > 1 ? y : 2) * x") == \
        "_select(x < 0, -x, (_select(y > 1, y, 2)) * x)"
    k = cupy.ElementwiseKernel("T x, T y", "T z, T w",
                               "z = x < 0 ? -x : (y > 1 ? y : 2) * x; w = fmax(x, y);", "t")
    x, y = cupy.asarray(np.array([-3.0, 2.0, 2.0, np.nan])), cupy.asarray(np.array([0.0, 5.0, 0.5, 1.0]))
    z, w = k(x, y)
    np.testing.assert_array_equal(z.get(), [3.0, 10.0, 4.0, np.nan])
    np.testing.assert_array_equal(w.get(), [0.0, 5.0, 2.0, 1.0])


# --- the trainer, checkpoints, eval through the double -----------------------------

def test_trainer_resume_and_evaluate_through_the_double_match_the_cpu(cupy, tiny_run):
    """Without dropout nothing random differs. The CuPy path reads nothing back
    inside a step: OPL's M⁺ is summed over a mask and the symmetric CE takes its
    two exponentials (losses.py), so its float32 sums are rounded in another
    order than the CPU's. The epoch losses (device batches, flat AdamW kernel,
    one sync per epoch, save → load → resume) agree to float32 rounding
    (relative 1e-6; measured 2e-8), and the device's evaluation of its
    parameters is the CPU's evaluation of the same (checkpointed) parameters,
    bit for bit. (The parameters themselves drift apart by more than rounding:
    AdamW's m/√v turns a last-bit difference of a near-zero gradient into a
    step of lr; test_one_step_on_the_double_matches_the_cpu compares gradients.)"""
    from paeff_np.run import checkpoint as ckpt
    from paeff_np.data.synth import make_synthetic
    from paeff_np.run.evaluation import evaluate
    from conftest import TINY_WORLD
    cpu_records, _, _, _ = tiny_run("cpu", name="cpu")
    records, params, results, out = tiny_run("cuda", name="double")
    assert [r["epoch"] for r in records] == [c["epoch"] for c in cpu_records] == [1, 2]
    for r, c in zip(records, cpu_records):
        for k in ("loss", "align", "opl", "ce"):
            assert r[k] == pytest.approx(c[k], rel=1e-6), (r["epoch"], k)
    saved = ckpt.load(out)
    for k in params:
        np.testing.assert_array_equal(saved.params[k], params[k], err_msg=k)
    on_cpu = evaluate(saved.params, saved.buffers, saved.cfg, make_synthetic(**TINY_WORLD).tests, seed=0)
    assert json.dumps(results, sort_keys=True) == json.dumps(on_cpu, sort_keys=True)


@pytest.mark.parametrize("alignment", ["hyperbolic", "poincare"])
def test_one_step_on_the_double_matches_the_cpu(cupy, alignment):
    """One float64 step, CPU against the CuPy path (mask sums, device-chosen shifts and
    rows): the loss and every gradient agree to float64 rounding (relative 1e-9; absolute
    1e-13 for the gradients that are 0 up to rounding, the biases before a BatchNorm)."""
    import paeff_np as pn
    cfg = pn.Config(face_dim=24, voice_dim=12, embed_dim=16, n_classes=5, alignment=alignment, dropout=0.0)
    params, buffers = pn.init_params(cfg, seed=1, dtype=np.float64)
    rng = np.random.default_rng(2)
    face, voice = rng.standard_normal((32, 24)), rng.standard_normal((32, 12))
    labels = rng.integers(0, 5, 32)
    loss, _, grads, _ = pn.loss_and_grads(params, buffers, face, voice, labels, cfg)
    dev = lambda d: {k: cupy.asarray(v) for k, v in d.items()}
    d_loss, _, d_grads, _ = pn.loss_and_grads(dev(params), dev(buffers), cupy.asarray(face),
                                              cupy.asarray(voice), cupy.asarray(labels), cfg)
    assert float(d_loss) == pytest.approx(float(loss), rel=1e-12)
    for k, g in grads.items():
        np.testing.assert_allclose(d_grads[k].get(), g, rtol=1e-9, atol=1e-13, err_msg=k)


def test_resume_with_dropout_through_the_double_is_exact(cupy, tiny_run, tmp_path, capsys):
    """With dropout (CuPy's generator, seeded per epoch) a resumed run equals
    an uninterrupted one, and eval.py evaluates its checkpoint on the device."""
    from paeff_np.run import checkpoint as ckpt
    from paeff_np.run.cli import run
    from paeff_np.data.synth import make_synthetic
    from paeff_np.run.training import Trainer, TrainSettings
    records, params, results, out = tiny_run("cuda", dropout=0.4)
    saved = ckpt.load(out)
    dataset = make_synthetic(**saved.config["data"]["synthetic"])
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    straight = Trainer(dataset, saved.cfg, TrainSettings(**saved.config["train"]), str(straight_dir),
                       log=lambda line: None)
    assert [r["loss"] for r in straight.train()] == [r["loss"] for r in records]
    for k, v in straight.params.items():
        np.testing.assert_array_equal(v.get(), params[k], err_msg=k)

    sys.path.insert(0, ROOT)
    eval_cli = importlib.import_module("eval")
    capsys.readouterr()
    assert run(lambda: eval_cli.main(["--checkpoint", out, "--device", "cuda", "--json"]), "eval.py") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["unseenunheard/random"]["eer"] == results["unseenunheard/random"]["eer"]


def test_validation_and_best_npz_through_the_double_match_the_cpu(cupy, tmp_path):
    """The selection path on the device: validation lists held there, embedded in chunks,
    only distances copied back; best.npz written from device arrays and read back. The
    device trains in its own rounding (fused kernels, mask sums: see above), so its
    figures are checked against the CPU's validation of the same parameters: the
    selected epoch's record equals what NumPy computes from the selected (checkpointed)
    parameters, and best.npz holds exactly the device's parameters."""
    from paeff_np.data import Dataset
    from paeff_np.data.split import split_validation
    from paeff_np.data.synth import make_synthetic
    from paeff_np.model import Config
    from paeff_np.run.evaluation import validation_figures
    from paeff_np.run.training import Trainer, TrainSettings
    from conftest import TINY_WORLD

    dataset = make_synthetic(**TINY_WORLD)
    split = split_validation(dataset.train, 0.1, 0.05, seed=0)
    data = Dataset(train=split.train, tests=dataset.tests)
    cfg = Config(face_dim=split.train.face_dim, voice_dim=split.train.voice_dim, embed_dim=32,
                 n_classes=split.train.n_classes, dropout=0.0)
    settings = TrainSettings(epochs=3, lr=1e-3, batch_size=64, device="cuda", val_identities=0.1,
                             val_rows=0.05, select="val")
    trainer = Trainer(data, cfg, settings, str(tmp_path), log=lambda line: None, validation=split)
    assert all(isinstance(a, cupy.ndarray) for f, v, _ in trainer.validation.values() for a in (f, v))
    trainer.train()
    epoch, params, buffers, _ = trainer.selected_model()
    host = lambda d: {k: backend.to_host(v) for k, v in d.items()}
    params, buffers = host(params), host(buffers)
    from paeff_np.run import checkpoint as ckpt
    best = ckpt.load(str(tmp_path / "best.npz"))
    assert best.epoch == epoch
    for k in params:
        np.testing.assert_array_equal(best.params[k], params[k], err_msg=k)
    record = trainer.history[epoch - 1]
    for part, lst in split.lists.items():
        eer_auc = validation_figures(params, buffers, lst.face.astype(np.float32),
                                     lst.voice.astype(np.float32), lst.same, cfg)
        assert (record[f"val/{part}/eer"], record[f"val/{part}/auc"]) == (eer_auc["eer"], eer_auc["auc"])


def test_the_gradient_table_runs_through_the_double(cupy):
    """`python -m paeff_np.gradcheck --device cuda` on the double: every op case and
    one whole loss, with no host/device leak in the checker itself."""
    import io
    from paeff_np.gradcheck.cases import CASES, OP_CASES
    from paeff_np.gradcheck.report import run
    rows = run(OP_CASES + [CASES["loss[default]"]], xp=cupy, out=io.StringIO())
    failed = [row for row in rows if not row.ok]
    assert rows and not failed, failed
