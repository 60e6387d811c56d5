"""Smoke test of bench.py: it runs and reports; no timing is asserted. And
the FLOP count (paeff_np.model.step_flops) and environment record it uses."""
import errno
import json
import os
import subprocess
import sys

import pytest
import strict_xp
import paeff_np as pn
from paeff_np.run import envinfo
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


def _no_benchmark(monkeypatch):
    """bench.py with the timing replaced by a failure: a check must fire before it."""
    import bench

    def started(*args):
        raise AssertionError("the benchmark started")
    monkeypatch.setattr(bench, "run_device", started)
    monkeypatch.setattr(bench, "end_to_end", started)
    return bench


def _one_error_line(capsys, *words):
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("bench.py: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(w in err for w in words), err


@pytest.mark.parametrize("flags, words", [
    (["--repeats", "-3"], ["--repeats -3", ">= 1"]),
    (["--repeats", "0"], ["--repeats 0", ">= 1"]),
    (["--e2e", "--e2e-epochs", "-1"], ["--e2e-epochs -1", "1..50"]),
    (["--e2e", "--e2e-epochs", "0"], ["--e2e-epochs 0", "1..50"]),
    (["--e2e", "--e2e-epochs", "51"], ["--e2e-epochs 51", "1..50"]),
    (["--e2e-epochs", "2"], ["--e2e-epochs 2", "add --e2e"]),
])
def test_bench_refuses_bad_counts_before_running(monkeypatch, capsys, flags, words):
    bench = _no_benchmark(monkeypatch)
    assert bench.main(["--quick", "--device", "cpu"] + flags) == 2
    _one_error_line(capsys, *words)


def test_bench_refuses_a_json_path_it_cannot_write_before_running(monkeypatch, capsys, tmp_path):
    bench = _no_benchmark(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("kept\n")
    cases = [(tmp_path, "is a folder"), (a_file / "x.json", "Not a directory")]
    if os.path.isdir("/proc"):
        cases.append(("/proc/x.json", "cannot create a file in /proc"))
    if os.path.exists("/dev/null"):
        cases.append(("/dev/null", "is not a regular file"))
    for path, why in cases:
        assert bench.main(["--quick", "--device", "cpu", "--json", str(path)]) == 2
        _one_error_line(capsys, f"--json {path}", why)
    assert a_file.read_text() == "kept\n"
    assert bench.main(["--quick", "--device", "cpu", "--json", ""]) == 2
    _one_error_line(capsys, "--json is empty")


def test_bench_repeats_default_only_when_not_given(monkeypatch):
    import argparse
    import bench
    seen = []
    monkeypatch.setattr(bench, "bench_case", lambda *a, repeats, **k: seen.append(repeats) or {"batch": 256})
    monkeypatch.setattr(bench, "adamw_compare", lambda dev, repeats: {})
    monkeypatch.setattr(bench, "compare_alignments", lambda *a, **k: {})
    for quick, repeats, expected in ((True, None, 5), (False, None, 30), (True, 1, 1)):
        seen.clear()
        bench.measure_cases(None, argparse.Namespace(quick=quick, repeats=repeats), 1.0)
        assert set(seen) == {expected}


def test_bench_makes_a_missing_json_folder(monkeypatch, capsys, tmp_path):
    import bench
    monkeypatch.setattr(bench, "run_device", lambda dev, args, log: {"device": dev.name})
    out = tmp_path / "new" / "bench.json"
    assert bench.main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["devices"] == [{"device": "cpu"}]
    assert f"wrote {out}" in capsys.readouterr().out


def test_bench_says_so_when_the_final_write_fails(monkeypatch, capsys, tmp_path):
    import bench
    monkeypatch.setattr(bench, "run_device", lambda dev, args, log: {"device": dev.name})

    def disk_full(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(bench, "write_json", disk_full)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--device", "cpu", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench.py: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(out) in err and "No space left on device" in err and "printed above" in err
