"""Smoke test of bench.py: it runs and reports; no timing is asserted."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--device", "cpu",
         "--json", str(out)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratio to large matmul:" in proc.stdout
    assert "BLAS" in proc.stdout and "OPENBLAS_CORETYPE" in proc.stdout
    data = json.loads(out.read_text())
    cpu = data["devices"][0]
    assert cpu["device"] == "cpu" and [r["batch"] for r in cpu["scaling"]] == [256, 256, 256]
    assert cpu["main"]["flops_per_step"] > 0 and cpu["main"]["ratio"] > 0


def test_step_flops_counts_the_products():
    """The FLOP count of the main case, by hand: 2·m·n·k per product."""
    sys.path.insert(0, ROOT)
    import bench
    import paeff_np as pn
    B, D, F, V, K = 1024, 256, 4096, 512, 901
    total, rows = bench.step_flops(pn.Config(), B)
    linears = 2 * (2 * B * D * F) + 2 * (2 * B * D * V) + 3 * 3 * (2 * B * D * D) + 3 * (2 * B * D * K)
    products = 3 * (2 * B * B * D) + 2 * (2 * B * B * D)           # alignment and OPL
    assert total == linears + products and len(rows) == 21
