"""Smoke test of bench.py: it runs and reports; no timing is asserted. And
the FLOP count (paeff_np.model.step_flops) and environment record it uses."""
import json
import os
import subprocess
import sys

import strict_xp
import paeff_np as pn
from paeff_np import envinfo
from paeff_np.model import GATED_HIDDEN, step_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--device", "cpu",
         "--json", str(out)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=dict(os.environ, CUPY_TF32="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratio to large matmul:" in proc.stdout and "step / floor = " in proc.stdout
    assert "BLAS" in proc.stdout and "OPENBLAS_CORETYPE" in proc.stdout
    data = json.loads(out.read_text())
    cpu = data["devices"][0]
    assert cpu["device"] == "cpu" and [r["batch"] for r in cpu["scaling"]] == [256, 256, 256]
    assert cpu["main"]["flops_per_step"] > 0 and cpu["main"]["ratio"] > 0
    assert cpu["main"]["ms_floor"] > 0 and cpu["main"]["step_over_floor"] > 0
    assert cpu["main"]["alignments"]["poincare_over_hyperbolic"] > 0 and "Poincaré distance" in proc.stdout
    assert data["environment"]["cupy_tf32"] == "1" and data["environment"]["cuda"] is None


def test_bench_cuda_without_a_usable_gpu_is_one_line(tmp_path):
    fake = tmp_path / "fake" / "cupy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('stand-in CuPy: libcudart.so.12 not found')\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--device", "cuda"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path / "fake")))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("bench.py: error: ") and proc.stderr.count("\n") == 1
    assert "libcudart.so.12 not found" in proc.stderr and "[ctk]" in proc.stderr


def test_cuda_record_names_the_device_and_versions(monkeypatch):
    cupy = strict_xp.install(monkeypatch)
    monkeypatch.setattr(cupy.cuda.runtime, "driverGetVersion", lambda: 12040)
    monkeypatch.setattr(cupy.cuda.runtime, "runtimeGetVersion", lambda: 12080)
    monkeypatch.setenv("CUPY_TF32", "1")
    env = envinfo.environment(cupy)
    assert env["cuda"]["device_name"] == "strict CuPy test double (NumPy)"
    assert (env["cuda"]["driver_version"], env["cuda"]["runtime_version"]) == ("12.4", "12.8")
    assert env["cupy_tf32"] == "1"
    gpu_line = [line for line in envinfo.summary_lines(env) if line.startswith("GPU:")]
    assert gpu_line and "CUPY_TF32=1" in gpu_line[0] and "driver 12.4" in gpu_line[0]


def test_step_flops_counts_the_products():
    """The FLOP count of the main case, by hand: 2·m·n·k per product."""
    B, D, F, V, K = 1024, 256, 4096, 512, 901
    total, rows = step_flops(pn.Config(), B)
    linears = 2 * (2 * B * D * F) + 2 * (2 * B * D * V) + 3 * 3 * (2 * B * D * D) + 3 * (2 * B * D * K)
    products = 3 * (2 * B * B * D) + 2 * (2 * B * B * D)           # alignment and OPL
    assert total == linears + products and len(rows) == 21


def test_step_flops_of_the_gated_baseline_without_alignment():
    B, D, F, V, K, H = 64, 32, 100, 50, 7, GATED_HIDDEN
    total, rows = step_flops(pn.Config(face_dim=F, voice_dim=V, embed_dim=D, n_classes=K,
                                       fusion="gated", alignment="none"), B)
    linears = (2 * (2 * B * D * F) + 2 * (2 * B * D * V) + 2 * 3 * (2 * B * D * D)
               + 3 * (2 * B * 2 * D * H) + 3 * (2 * B * H * D) + 3 * (2 * B * D * D) + 3 * (2 * B * D * K))
    assert total == linears + 2 * (2 * B * B * D) and len(rows) == 24


def test_bench_refuses_a_bad_row_thread_count(monkeypatch, capsys):
    import bench
    monkeypatch.setenv("PAEFF_ROW_THREADS", "many")
    assert bench.main(["--quick", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PAEFF_ROW_THREADS must be a whole number" in err
