"""docs/walkthrough.py: it runs, writes its figures, and says one line without matplotlib."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "docs", "walkthrough.py")
FIGURES = {"computational_graph.png", "check_every_op.png", "hyperbolic_equals_euclidean.png",
           "batchnorm_bias_float32.png", "fd_error_vs_h.png", "gelu_sigmoid_tails.png",
           "poincare_operating_point.png", "riemannian_factor.png"}


def test_walkthrough_writes_every_figure(tmp_path):
    pytest.importorskip("matplotlib")
    run = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "fig")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert FIGURES <= set(os.listdir(tmp_path / "fig"))
    assert "ρ = tanh(√c)/√c = 0.98366" in run.stdout
    assert "κ = (1 − cρ²)²/4 = 0.22640" in run.stdout


def test_walkthrough_without_matplotlib(tmp_path):
    """A stub package that fails to import stands in for a missing matplotlib."""
    stub = tmp_path / "stub" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "stub")}
    run = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "fig")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "matplotlib" in run.stderr
    assert not (tmp_path / "fig").exists()
