"""End to end on a real GPU: skipped without one (with the probe's reason),
failed under PAEFF_REQUIRE_GPU=1. The strict CuPy test double
(tests/test_strict_xp.py) runs the same paths on every CI run, but only a GPU
shows that CUDA computes what NumPy does."""
import json
import math
import os
import subprocess
import sys

import numpy as np

import paeff_np as pn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_trainer_on_the_gpu_saves_resumes_and_evaluates(cuda, tiny_run):
    records, params, results, out = tiny_run("cuda", dropout=0.4)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert os.path.isfile(os.path.join(out, "checkpoint.npz"))
    assert all(np.isfinite(p).all() for p in params.values())
    assert 0.0 <= results["unseenunheard/random"]["eer"] <= 1.0


def test_bench_quick_on_the_gpu(cuda, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--device", "cuda",
                           "--json", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    gpu = data["devices"][0]
    assert gpu["device"] == "cuda" and gpu["main"]["ms_per_step"] > 0
    assert data["environment"]["cuda"]["device_name"]


def test_first_step_loss_agrees_with_the_cpu(cuda):
    """The same parameters and batch: float32 loss on both devices. The largest
    reduction has 256 terms (K·D products are summed in float32 by cuBLAS and
    OpenBLAS in different orders: error ≲ √256·2⁻²⁴ ≈ 1e-6 relative); rtol 1e-5."""
    cfg = pn.Config(face_dim=256, voice_dim=64, embed_dim=32, n_classes=27, dropout=0.0)
    params, buffers = pn.init_params(cfg, seed=0, dtype=np.float32)
    rng = np.random.default_rng(0)
    face = np.abs(rng.standard_normal((64, 256), dtype=np.float32))
    voice = rng.standard_normal((64, 64), dtype=np.float32)
    labels = rng.integers(0, 27, 64)
    losses = {}
    for xp in (np, cuda):
        dev = lambda d: {k: xp.asarray(v) for k, v in d.items()}
        loss, terms, _, _ = pn.loss_and_grads(dev(params), dev(buffers), xp.asarray(face),
                                              xp.asarray(voice), xp.asarray(labels), cfg)
        losses[xp.__name__] = [float(loss)] + [float(terms[k]) for k in sorted(terms)]
    np.testing.assert_allclose(losses["cupy"], losses["numpy"], rtol=1e-5)


def test_cpu_and_gpu_runs_agree(cuda, tiny_run, tiny_world):
    """One seed, no dropout (CuPy's and NumPy's generators draw different
    masks). Epoch-1 mean losses to rtol 1e-3: after the first step, Adam's
    normalised update m/√v turns rounding-level differences of near-zero
    gradients into steps of up to ±lr, so float32 runs drift apart faster than
    one step's 1e-5. EERs within list noise: one list of n pairs has n/2
    positives, and an EER there is uncertain by about 1/√(n/2) (two standard
    errors of a proportion)."""
    cpu_records, _, cpu_results, _ = tiny_run("cpu", name="cpu")
    gpu_records, _, gpu_results, _ = tiny_run("cuda", name="gpu")
    for k in ("loss", "align", "opl", "ce"):
        np.testing.assert_allclose(gpu_records[0][k], cpu_records[0][k], rtol=1e-3, err_msg=k)
    from paeff_np.data.synth import make_synthetic
    tests = make_synthetic(**tiny_world).tests
    for key, r in cpu_results.items():
        noise = 1.0 / math.sqrt(len(tests[key].same) / 2)
        assert abs(gpu_results[key]["eer"] - r["eer"]) <= noise, key
