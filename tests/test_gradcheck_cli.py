"""``python -m paeff_np.gradcheck``: the table, its exit status, its flags, and a
runner that reports a wrong backward as FAIL."""
import io
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from paeff_np.gradcheck import TOLERANCE
from paeff_np.gradcheck.cases import CASES, LOSS_CASES, OP_CASES, select
from paeff_np.gradcheck.report import main, run
from paeff_np.layers import gelu_backward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
    return subprocess.run([sys.executable, "-W", "error", "-m", "paeff_np.gradcheck", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def table_rows(stdout):
    """``{(case, input): (error, tolerance, status)}`` of the table's rows."""
    rows = {}
    for line in stdout.split("\n\n")[0].splitlines()[2:]:      # the table ends at a blank line
        fields = line.split()
        if len(fields) >= 5 and fields[-1] in ("ok", "FAIL"):
            case, error, tol, status = fields[0], float(fields[-3]), float(fields[-2]), fields[-1]
            rows[(case, " ".join(fields[1:-3]))] = (error, tol, status)
    return rows


def test_one_op_in_a_subprocess():
    """``--op gelu``: one row, its input x, a float64 error far below the tolerance, exit 0
    (``-W error``: no warning, e.g. runpy's double import)."""
    run_ = cli("--op", "gelu")
    assert run_.returncode == 0, run_.stderr
    assert run_.stderr == ""
    rows = table_rows(run_.stdout)
    assert list(rows) == [("gelu", "x")]
    error, tol, status = rows[("gelu", "x")]
    assert error < 1e-9 and tol == TOLERANCE and status == "ok"
    assert "all ok" in run_.stdout


def test_one_loss_variant_lists_every_parameter():
    """A whole-loss case selected alone shows one row per parameter, the biases
    before a train-mode BatchNorm (exactly 0) among them, judged against their noise floor."""
    run_ = cli("--op", "loss[alignment=euclidean]")
    assert run_.returncode == 0, run_.stderr
    rows = table_rows(run_.stdout)
    assert {case for case, _ in rows} == {"loss[alignment=euclidean]"}
    inputs = {name for _, name in rows}
    assert {"res_mix.weight", "fusion_layer.conv.weight", "face_branch.fc1.0.weight",
            "face_branch.fc1.0.bias"} <= inputs
    assert len(rows) == 18
    assert all(status == "ok" for _, _, status in rows.values())


def test_unknown_op_is_one_line_and_exit_2():
    run_ = cli("--op", "gelux")
    assert run_.returncode == 2
    assert run_.stdout == ""
    assert run_.stderr.strip().count("\n") == 0
    assert "unknown --op 'gelux'" in run_.stderr and "gelu" in run_.stderr and "loss[default]" in run_.stderr


def test_bad_flag_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--dtype", "float16"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--dtype" in err


def test_cuda_without_a_gpu_is_one_line_and_exit_2(monkeypatch, capsys):
    from paeff_np import backend
    monkeypatch.setattr(backend, "_probe_memo", [(None, "the GPU needs CuPy, which does not import")])
    assert main(["--op", "gelu", "--device", "cuda"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip().count("\n") == 0 and "CuPy" in out.err


def test_runner_reports_a_wrong_backward_as_fail():
    """A GELU whose backward drops the x·φ(x) term, run beside the right one:
    the runner marks it FAIL (and only it)."""
    def wrong_backward(dy, cache):
        return dy * cache.cdf
    broken = replace(CASES["gelu"], name="gelu[broken]", backward=wrong_backward)
    out = io.StringIO()
    rows = run([CASES["gelu"], broken], out=out)
    status = {row.case: row.ok for row in rows}
    assert status == {"gelu": True, "gelu[broken]": False}
    assert [r.error for r in rows if r.case == "gelu[broken]"][0] > 1e-2
    table = table_rows(out.getvalue())
    assert table[("gelu[broken]", "x")][2] == "FAIL" and table[("gelu", "x")][2] == "ok"


def test_runner_reports_a_raising_backward_as_fail():
    def raising_backward(dy, cache):
        raise ValueError("shapes do not match")
    broken = replace(CASES["relu"], name="relu[raises]", backward=raising_backward)
    out = io.StringIO()
    (row,) = run([broken], out=out)
    assert not row.ok and "ValueError: shapes do not match" in out.getvalue()


def test_main_exit_status_follows_the_rows(monkeypatch, capsys):
    """``main`` exits 1 when a selected case fails, 0 when all pass."""
    from paeff_np.gradcheck import report
    broken = replace(CASES["gelu"], name="gelu[broken]", backward=lambda dy, cache: 1.001 * gelu_backward(dy, cache))
    monkeypatch.setattr(report, "select", lambda name, registry: [broken])
    assert main(["--op", "gelu[broken]"]) == 1
    assert "1 of 1 cases FAIL: gelu[broken]" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["--op", "gelu"]) == 0


def test_float32_checks_the_float32_backward_against_float64_numerics(capsys):
    """--dtype float32: the float32 forward/backward against float64 differences,
    with the derived tolerance 64·ε₃₂·κ (κ ≥ 1), passes; one line says how."""
    assert main(["--op", "sigmoid", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    (error, tol, status), = table_rows(out).values()
    assert status == "ok" and error <= tol and tol >= 64 * np.finfo(np.float32).eps * 0.99
    assert "tolerance 64·ε₃₂·κ" in out


def test_riemannian_scaling_is_checked_against_the_alpha_kappa_loss(monkeypatch):
    """With the scaling on, the gradient is the derivative of the loss with
    α₁·κ; against the loss with α₁ itself it is wrong (the check can fail)."""
    from paeff_np import hyperbolic
    default = CASES["loss[default]"]
    assert max(default.check().errors.values()) < TOLERANCE
    monkeypatch.setattr(hyperbolic, "unit_row_riemannian_factor", lambda c: 1.0)
    assert max(default.check().errors.values()) > 1e-4


def test_registry_covers_every_op_and_variant():
    """Every forward/backward pair of the op modules has a case (riemannian_scale's
    backward is not a derivative: it has none); the Config variants cover both
    fusions, every EGFF gate and mix, every alignment, the Riemannian scaling
    on and off, dropout on and off."""
    from paeff_np import fusion, hyperbolic, layers, losses, poincare
    pairs = {name[:-len("_forward")] for module in (layers, hyperbolic, fusion, losses, poincare)
             for name in dir(module) if name.endswith("_forward") and not name.startswith("_")}
    covered = {case.forward.__name__.removesuffix("_forward") for case in OP_CASES}
    covered |= {"dropout"}                                     # through dropout_same_mask_forward
    assert pairs - covered == {"riemannian_scale"}
    variants = [dict(case.variant) for case in LOSS_CASES]
    seen = lambda key, default: {v.get(key, default) for v in variants}
    assert seen("fusion", "egff") == {"egff", "gated"}
    assert seen("egff_gate", "product") == {"product", "sum", "concat"}
    assert seen("egff_mix", "activated") == {"activated", "raw"}
    from paeff_np.model import ALIGNMENTS
    assert seen("alignment", "hyperbolic") == set(ALIGNMENTS)
    assert seen("riemannian_grad", True) == {True, False}
    assert seen("dropout", 0.4) == {0.4, 0.0}
    assert [c.name for c in select("egff")] == [n for n in CASES if n.startswith("egff[")]


def test_every_op_case_passes_in_float64():
    """The op half of the default table, in-process (the loss half: test_model.py)."""
    rows = run(OP_CASES, out=io.StringIO())
    assert {row.case for row in rows} == {case.name for case in OP_CASES}
    failed = [row for row in rows if not row.ok]
    assert not failed, failed


def test_list_prints_every_name(capsys):
    assert main(["--list"]) == 0
    assert capsys.readouterr().out.split("\n")[:-1] == list(CASES)


# --- the checker as a Python utility --------------------------------------------------

def _gelu_inputs():
    return [np.random.default_rng(0).standard_normal((4, 5))]


def test_tol_passes_a_right_backward_and_names_a_wrong_one():
    from paeff_np.gradcheck import TOLERANCE, check_layer
    from paeff_np.layers import gelu_backward, gelu_forward
    assert check_layer(gelu_forward, gelu_backward, _gelu_inputs(), tol=TOLERANCE).errors[0] < TOLERANCE
    off_by_1e_6 = lambda dy, cache: gelu_backward(dy, cache) * (1 + 1e-6)
    with pytest.raises(AssertionError, match=r"input 0, shape \(4, 5\): FAIL, error 1\.0e-06 > tolerance 1\.0e-07"):
        check_layer(gelu_forward, off_by_1e_6, _gelu_inputs(), tol=TOLERANCE)


def test_a_nan_gradient_is_an_infinite_error_not_a_pass():
    from paeff_np.gradcheck import check_layer
    from paeff_np.layers import gelu_backward, gelu_forward
    nan_backward = lambda dy, cache: gelu_backward(dy, cache) * np.nan
    assert check_layer(gelu_forward, nan_backward, _gelu_inputs(), raises=False).errors == {0: float("inf")}
    with pytest.raises(AssertionError, match="inf"):
        check_layer(gelu_forward, nan_backward, _gelu_inputs(), tol=1e-7)


@pytest.mark.parametrize("make,error,words", [
    (lambda x: x.tolist(), TypeError, "is a list, not an array"),
    (lambda x: np.float64(1.0), TypeError, "has no axis"),
    (lambda x: np.array(1.0), TypeError, "has no axis"),
    (lambda x: np.arange(20).reshape(4, 5), TypeError, "dtype int64; finite differences need floats"),
    (lambda x: x.astype(np.float32), TypeError, "needs float64 inputs"),
    (lambda x: np.broadcast_to(x, x.shape), ValueError, "read-only; the check perturbs it in place"),
], ids=["list", "scalar", "0-d", "integers", "float32", "read-only"])
def test_bad_inputs_are_named_before_any_difference_is_taken(make, error, words):
    from paeff_np.gradcheck import check_layer
    from paeff_np.layers import gelu_backward, gelu_forward
    x = make(_gelu_inputs()[0])
    with pytest.raises(error, match=words):
        check_layer(gelu_forward, gelu_backward, [x])


def test_the_step_must_be_positive():
    from paeff_np.gradcheck import check_layer
    from paeff_np.layers import gelu_backward, gelu_forward
    with pytest.raises(ValueError, match="step h must be a positive number"):
        check_layer(gelu_forward, gelu_backward, _gelu_inputs(), h=0)


def test_nothing_checked_is_an_error_not_a_pass():
    from paeff_np.gradcheck import check_op, gradcheck
    x = _gelu_inputs()[0]
    with pytest.raises(ValueError, match="no gradient to check"):
        check_op(np.tanh, lambda dout: None, [x], tol=1e-7)
    with pytest.raises(ValueError, match="no gradient to check"):
        gradcheck(lambda: float(np.tanh(x).sum()), {"x": x}, {}, tol=1e-7)
    with pytest.raises(ValueError, match="a gradient for 'y', which is not one of the inputs"):
        gradcheck(lambda: float(np.tanh(x).sum()), {"x": x}, {"y": x})


@pytest.mark.parametrize("tol", ["1e-7", float("nan"), -1.0, 0.0])
def test_tol_must_be_a_positive_number(tol):
    from paeff_np.gradcheck import check_layer
    from paeff_np.layers import gelu_backward, gelu_forward
    with pytest.raises(ValueError, match="tol must be a positive number"):
        check_layer(gelu_forward, gelu_backward, _gelu_inputs(), tol=tol)


def test_one_array_for_inputs_is_named():
    from paeff_np.gradcheck import check_layer
    from paeff_np.layers import gelu_backward, gelu_forward
    with pytest.raises(TypeError, match=r"inputs is one array; give a list of arrays, e.g. \[x\]"):
        check_layer(gelu_forward, gelu_backward, _gelu_inputs()[0])
