"""The gradient checker as a product: layers written from scratch, as a user
would, correct and buggy, must get the right verdict and a message that says
why. Every test runs on NumPy and through the strict CuPy test double
(``xp`` below), unless it is about the command line."""
import os
import subprocess
import sys

import numpy as np
import pytest

import strict_xp
from paeff_np.gradcheck import (TOLERANCE, GradientCheckError, assert_gradients_ok, check_layer,
                                check_op, gradcheck)
from paeff_np.layers import relu_backward, relu_forward, tanh_backward, tanh_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = 1e-5   # the checker's step


@pytest.fixture(params=["numpy", "strict_cupy"])
def xp(request, monkeypatch):
    """NumPy, or the strict CuPy double (host/device rules enforced)."""
    return np if request.param == "numpy" else strict_xp.install(monkeypatch)


def normal(xp, *shape, seed=0, scale=1.0, shift=0.0):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale + shift)


def xp_of(x):
    from paeff_np.backend import get_array_module
    return get_array_module(x)


# --- user layers ----------------------------------------------------------------------

def layernorm_forward(x, gamma, beta, eps=1e-5):
    m = xp_of(x)
    xc = x - x.mean(axis=1, keepdims=True)
    inv = 1.0 / m.sqrt((xc * xc).mean(axis=1, keepdims=True) + eps)
    xhat = xc * inv
    return xhat * gamma + beta, (xhat, inv, gamma)


def layernorm_backward(dy, cache):
    xhat, inv, gamma = cache
    g = dy * gamma
    dx = inv * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def layernorm_backward_without_the_mean_term(dy, cache):
    xhat, inv, gamma = cache
    g = dy * gamma
    return inv * (g - xhat * (g * xhat).mean(axis=1, keepdims=True)), (dy * xhat).sum(axis=0), dy.sum(axis=0)


def layernorm_inputs(xp, rows, cols, beta_shift=0.0):
    return [normal(xp, rows, cols, seed=1), normal(xp, cols, seed=2),
            normal(xp, cols, seed=3, shift=beta_shift)]


def matmul_forward(x, W):
    return x @ W, (x, W)


def matmul_backward(dy, cache):
    x, W = cache
    return dy @ W.T, x.T @ dy


# --- defect 1: a backward that writes into dout ------------------------------------------

def test_a_backward_doubling_dout_in_place_fails_and_is_named(xp):
    """The identity whose backward doubles dout in place and returns it: the
    gradient is wrong (2 × numeric) and the side effect is named."""
    def backward(dout, cache):
        dout *= 2.0
        return dout
    with pytest.raises(GradientCheckError) as failed:
        check_layer(lambda x: (x * 1.0, None), backward, [normal(xp, 4, 5)])
    message = str(failed.value)
    assert "backward wrote into dout" in message
    assert "constant ratio: analytic ≈ 2 × numeric" in message


def test_a_correct_in_place_backward_has_a_right_gradient_and_a_named_side_effect(xp):
    """A correct tanh whose backward works in place: its gradient agrees (the
    checker gave it a copy of dout); only the side effect fails it, and
    side_effects="report" names it without failing."""
    def backward(dout, t):
        dout *= 1.0 - t * t
        return dout
    report = check_layer(tanh_forward, backward, [normal(xp, 4, 5)], raises=False)
    assert report.errors[0] < 1e-9
    assert not report.ok and report.side_effects[0].startswith("backward wrote into dout")
    kept = check_layer(tanh_forward, backward, [normal(xp, 4, 5)], side_effects="report")
    assert kept.ok and kept.side_effects


# --- defect 2: large outputs -----------------------------------------------------------------

def test_a_large_offset_on_many_entries_passes(xp):
    """y = x + 1e3 on 1,600 entries: the old sum-then-difference failed (1.5e-7)."""
    report = check_op(lambda x: x + 1e3, lambda dout: dout, [normal(xp, 40, 40)])
    assert report.errors[0] < TOLERANCE


def test_layernorm_with_a_large_beta_passes_on_every_input(xp):
    """β ≈ 1e4: every output is large, and the old check failed all three inputs."""
    report = check_layer(layernorm_forward, layernorm_backward, layernorm_inputs(xp, 8, 32, 1e4))
    assert report.ok and len(report.errors) == 3


def test_outputs_too_large_for_their_gradient_are_not_resolved_rather_than_passed(xp):
    """y = 10⁶ + x: at h = 1e-5 the outputs' rounding hides errors below ~7e-4
    of the gradient, so a 0.01% error would pass unseen: not resolved, and
    it says how to fix that; at h = 1e-3 a right backward passes and the
    0.01% error fails. (On the code before it, both passed at h = 1e-5, as
    did y = 10⁶ + 10⁻⁴x with its gradient's sign flipped.)"""
    x = normal(xp, 4, 5)
    for backward in (lambda d: d, lambda d: 1.0001 * d):
        report = check_op(lambda x: x + 1e6, backward, [x], raises=False)
        assert not report.ok and "not resolved" in str(report) and "a larger h" in str(report)
    flipped = check_op(lambda x: 1e6 + 1e-4 * x, lambda d: -1e-4 * d, [x], raises=False)
    assert not flipped.ok
    assert check_op(lambda x: x + 1e6, lambda d: d, [x], h=1e-3).ok
    assert not check_op(lambda x: x + 1e6, lambda d: 1.0001 * d, [x], h=1e-3, raises=False).ok


def test_an_ok_line_says_when_the_resolution_is_coarser_than_the_tolerance(xp):
    report = check_op(lambda x: x + 1e3, lambda d: d, [normal(xp, 4, 5)])
    assert 1e-7 < report.inputs[0].resolution < 1e-5
    assert "resolved to 7e-07 of the gradient's scale" in str(report)


# --- defect 3: kinks ------------------------------------------------------------------------

def _relu_input(xp):
    x = np.random.default_rng(1).standard_normal((10, 10))
    x.flat[:4] = [0.5 * H, -1.3 * H, 1.9 * H, -0.2 * H]      # inside the stencil's reach of 0
    return xp.asarray(x)


def test_a_relu_with_entries_at_the_kink_passes_and_names_them(xp):
    report = check_layer(relu_forward, relu_backward, [_relu_input(xp)])
    assert report.ok and report.inputs[0].kinks == 4
    assert report.inputs[0].checked == 100


def test_a_wrong_relu_still_fails_beside_kinks(xp):
    """A mask that lets x = 0.3 through with slope 0.5: judged on the entries away from the kink."""
    def backward(dout, mask):
        return dout * xp_of(dout).where(mask > 0, 1.0, 0.5)
    report = check_layer(relu_forward, backward, [_relu_input(xp)], raises=False)
    assert not report.ok and report.inputs[0].off > 10 and report.inputs[0].kinks == 4


def test_kinks_everywhere_fail_rather_than_pass_on_nothing(xp):
    x = xp.asarray(np.linspace(-1.5 * H, 1.5 * H, 12))
    report = check_layer(lambda x: (abs(x), x), lambda d, x: d * xp_of(x).sign(x), [x], raises=False)
    assert not report.ok and "sit at kinks" in str(report)


# --- defect 4: the default fails loudly ------------------------------------------------------

def test_a_wrong_gradient_raises_by_default_and_the_figures_are_explicit(xp):
    wrong = lambda dout, t: dout * (1.0 - t)
    with pytest.raises(GradientCheckError, match="input 0, shape \\(4, 5\\): FAIL"):
        check_layer(tanh_forward, wrong, [normal(xp, 4, 5)])
    report = check_layer(tanh_forward, wrong, [normal(xp, 4, 5)], raises=False)
    assert not report.ok and report.errors[0] > 1e-2


# --- defect 5: settings apart from options ---------------------------------------------------

def huber_forward(x, h):
    """Huber loss with delta ``h``, summed: a setting that shares the checker's old step name."""
    m = xp_of(x)
    small = abs(x) <= h
    return m.where(small, 0.5 * x * x, h * (abs(x) - 0.5 * h)).sum(), (x, small, h)


def huber_backward(dout, cache):
    x, small, h = cache
    return dout * xp_of(x).where(small, x, h * xp_of(x).sign(x))


def test_a_layer_setting_called_h_does_not_change_the_step(xp):
    report = check_layer(huber_forward, huber_backward, [normal(xp, 5, 4, seed=2)], settings={"h": 0.7})
    assert report.ok and "h = 1e-05" in str(report)


def test_a_layer_argument_outside_settings_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"unknown option 'delta'; the layer's own arguments go in settings="):
        check_layer(huber_forward, huber_backward, [np.ones(3)], delta=0.7)


def test_a_layer_setting_given_as_the_checkers_option_is_told_to_use_settings():
    with pytest.raises(TypeError, match=r"h= set the checker's option, not the layer's argument: "
                                        r"give it as settings=\{'h': \.\.\.\}"):
        check_layer(huber_forward, huber_backward, [np.ones(3)], h=0.7)


def test_seed_is_the_checkers_and_a_layer_seed_goes_in_settings(xp):
    def noisy_forward(x, seed):
        return x * float(np.random.default_rng(seed).uniform(1, 2)), seed

    def noisy_backward(dout, seed):
        return dout * float(np.random.default_rng(seed).uniform(1, 2))
    assert check_layer(noisy_forward, noisy_backward, [normal(xp, 3, 2)], settings={"seed": 3}, seed=5).ok


# --- defect 6: an exactly-zero gradient --------------------------------------------------------

def _centered(x, b):
    z = x + b
    return z - z.mean(axis=0, keepdims=True), None


def test_an_exactly_zero_gradient_passes_against_the_noise_floor(xp):
    """A bias that a centring removes: its gradient is exactly 0; the numeric
    one is rounding noise."""
    x, b = normal(xp, 6, 4), normal(xp, 4, seed=1)
    report = check_layer(_centered, lambda d, c: (d - d.mean(axis=0, keepdims=True), d.sum(axis=0) * 0.0), [x, b])
    assert report.ok and report.errors[1] <= TOLERANCE


def test_a_nonzero_gradient_where_the_truth_is_zero_fails(xp):
    x, b = normal(xp, 6, 4), normal(xp, 4, seed=1)
    report = check_layer(_centered, lambda d, c: (d - d.mean(axis=0, keepdims=True), d.sum(axis=0)),
                         [x, b], raises=False)
    assert report.inputs[0].ok and not report.inputs[1].ok


def test_the_whole_loss_biases_before_batchnorm_are_judged_by_the_checker():
    """The whole loss with every parameter, the exactly-zero biases included."""
    from paeff_np.gradcheck.cases import CASES
    report = CASES["loss[alignment=euclidean]"].check()
    assert report.ok and "face_branch.fc1.0.bias" in report.errors


def _softmax(s):
    e = xp_of(s).exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _centred_sum(x):
    return (x - x.mean()).sum(keepdims=True), x


def _softmax_sum(x):
    return _softmax(x).sum(axis=1), _softmax(x)


def _softmax_sum_backward(d, p):      # the real formula: entries of ~1e-17, not exact zeros
    return p * (d[:, None] - (d[:, None] * p).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("forward,backward", [
    (_centred_sum, lambda d, x: xp_of(x).zeros_like(x)),
    (_softmax_sum, _softmax_sum_backward),
], ids=["centred-sum", "softmax-sum"])
def test_a_gradient_zero_by_cancellation_passes_on_its_own(xp, forward, backward):
    """One input and no other scale: the outputs cancel to ~1e-16, so the
    outputs' noise floor is far below the numeric gradient's rounding (of the
    O(1) values inside); the code before this failed both, calling every
    entry a kink or the input not resolved. Zero (or ~1e-17) on both sides,
    to the rounding of values of the inputs' size, passes and says so."""
    report = check_layer(forward, backward, [normal(xp, 6, 4)])
    assert report.ok and "zero to rounding" in str(report)


def test_a_tiny_true_gradient_returned_as_zero_still_fails(xp):
    """y = 1e-10·x with a zero backward: the numeric gradient is tiny but
    exact (its one-sided slopes agree), not rounding."""
    report = check_op(lambda x: 1e-10 * x, lambda d: 0.0 * d, [normal(xp, 4, 5)], raises=False)
    assert not report.ok and report.errors[0] > 0.5


# --- defect 7: a wrong shape at once ---------------------------------------------------------

def test_a_wrong_shape_is_named_before_any_difference(xp):
    calls = []

    def forward(x, W):
        calls.append(1)
        return matmul_forward(x, W)

    def backward(dy, cache):
        dx, dW = matmul_backward(dy, cache)
        return dx, dW.T
    x, W = normal(xp, 30, 4), normal(xp, 4, 3, seed=1)
    with pytest.raises(ValueError, match=r"gradient of input 1 has shape \(3, 4\), the input \(4, 3\) "
                                         r"\(its transpose has the right shape: return \.T\?\)"):
        check_layer(forward, backward, [x, W])
    assert len(calls) <= 5          # the guards' calls, not 4 × 120 for input 0


# --- defect 8: tuples and pipes ------------------------------------------------------------

def two_outputs_forward(x):
    return (x * x, 3.0 * x), x


def test_a_plain_tuple_output_checks_every_output(xp):
    right = lambda douts, x: 2.0 * x * douts[0] + 3.0 * douts[1]
    wrong = lambda douts, x: 2.0 * x * douts[0] + 2.0 * douts[1]      # the second output's term off
    assert check_layer(two_outputs_forward, right, [normal(xp, 3, 4)]).ok
    with pytest.raises(GradientCheckError):
        check_layer(two_outputs_forward, wrong, [normal(xp, 3, 4)])


def test_a_forward_that_returns_only_its_output_is_told_to_use_check_op():
    with pytest.raises(TypeError, match="must return \\(out, cache\\).*use check_op"):
        check_layer(np.tanh, tanh_backward, [np.ones((2, 3))])


def test_list_into_a_closed_pipe_prints_no_traceback():
    """`--list | head`: the reader is gone before the writer writes."""
    child = subprocess.Popen([sys.executable, "-m", "paeff_np.gradcheck", "--list"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    err = child.stderr.read().decode()
    child.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err


# --- side-effect guards ------------------------------------------------------------------

def test_a_forward_writing_into_its_input_is_named(xp):
    def forward(x):
        x *= 1.0000001
        return x * 2.0, None
    with pytest.raises(GradientCheckError, match="forward wrote into input 0"):
        check_layer(forward, lambda d, c: 2.0 * d, [normal(xp, 3, 3)])


def test_a_forward_that_is_not_deterministic_is_named(xp):
    draws = np.random.default_rng(0)

    def forward(x):
        return x * xp_of(x).asarray(draws.uniform(0.9, 1.1, x.shape)), None
    with pytest.raises(GradientCheckError, match="forward is not deterministic"):
        check_layer(forward, lambda d, c: d, [normal(xp, 3, 3)])


def test_a_backward_that_is_not_deterministic_is_named(xp):
    calls = []

    def backward(dout, t):
        calls.append(1)
        return dout * (1.0 - t * t) * (1.0 + 1e-16 * len(calls) * 1e3)
    with pytest.raises(GradientCheckError, match="backward is not deterministic"):
        check_layer(tanh_forward, backward, [normal(xp, 3, 3)])


# --- entry-level diagnostics ---------------------------------------------------------------

def test_a_sign_flip_is_hinted_with_the_worst_entry(xp):
    with pytest.raises(GradientCheckError) as failed:
        check_layer(tanh_forward, lambda d, t: -d * (1.0 - t * t), [normal(xp, 3, 3)])
    message = str(failed.value)
    assert "sign flip: analytic = −numeric on every entry" in message
    assert "9 of 9 entries checked are off" in message and "worst entry [" in message


def test_a_transposed_gradient_is_hinted(xp):
    x, W = normal(xp, 5, 4), normal(xp, 4, 4, seed=1)
    with pytest.raises(GradientCheckError, match="agrees with the transposed gradient"):
        check_layer(matmul_forward, lambda dy, c: (matmul_backward(dy, c)[0], matmul_backward(dy, c)[1].T),
                    [x, W])


def test_a_gradient_wrong_only_on_the_diagonal_is_hinted(xp):
    """y = x − diag(x): the backward forgets the diagonal term."""
    m = np.eye(4, dtype=bool)
    forward = lambda x: (x - xp_of(x).where(xp_of(x).asarray(m), x, 0.0), None)
    with pytest.raises(GradientCheckError, match="wrong only on the diagonal"):
        check_layer(forward, lambda d, c: d, [normal(xp, 4, 4)])


def test_one_wrong_entry_is_located(xp):
    def backward(dout, t):
        g = dout * (1.0 - t * t)
        g[1, 2] = g[1, 2] * 1.01
        return g
    with pytest.raises(GradientCheckError) as failed:
        check_layer(tanh_forward, backward, [normal(xp, 3, 4)])
    message = str(failed.value)
    assert "1 of 12 entries checked are off" in message and "worst entry [1, 2]" in message


# --- fast mode -----------------------------------------------------------------------------

def test_fast_mode_passes_a_correct_relu_of_200k_entries_and_fails_one_wrong_on_1_percent():
    x = normal(np, 400, 500)
    report = check_layer(relu_forward, relu_backward, [x], fast=True)
    assert report.ok and len(report.inputs[0].directions) == 4 and report.inputs[0].checked == 32

    def wrong_on_1_percent(dout, mask):
        g = relu_backward(dout, mask)
        g.reshape(-1)[::100] *= 1.5
        return g
    assert not check_layer(relu_forward, wrong_on_1_percent, [x], fast=True, raises=False).ok


@pytest.mark.parametrize("rows,cols", [(30, 30), (100, 100)])
def test_fast_mode_fails_the_layernorm_bug_at_any_size(xp, rows, cols):
    """torch's fast mode allows atol·Σu·Σv, which grows with n and passes this
    bug from about 900 entries up; the directional error here is measured
    against ‖a‖₂ and does not grow."""
    inputs = layernorm_inputs(xp, rows, cols)
    assert check_layer(layernorm_forward, layernorm_backward, inputs, fast=True).ok
    report = check_layer(layernorm_forward, layernorm_backward_without_the_mean_term, inputs,
                         fast=True, raises=False)
    assert not report.inputs[0].ok and min(report.inputs[0].directions) > 1e-4


def test_the_directional_error_of_a_fixed_relative_bug_does_not_shrink_with_n():
    """A gradient 0.1% too large everywhere: the directional error is ≈ 1e-3 at 100 and at 40,000 entries."""
    errors = []
    for n in (10, 200):
        report = check_layer(tanh_forward, lambda d, t: 1.001 * d * (1.0 - t * t), [normal(np, n, n)],
                             fast=True, raises=False)
        errors.append(np.median(report.inputs[0].directions))
    assert all(2e-4 < e < 5e-3 for e in errors), errors


def test_fast_mode_on_the_double_with_kinks(xp):
    """Directions cross ReLU kinks; the kinked outputs are left out on both sides."""
    x = normal(xp, 50, 60)
    x[0, :5] = xp.asarray(np.array([0.3, -0.7, 1.1, -1.9, 0.0]) * H)
    assert check_layer(relu_forward, relu_backward, [x], fast=True, samples=10).ok


# --- mixed precision -------------------------------------------------------------------

def test_float32_backward_against_float64_numerics(xp):
    report = check_layer(layernorm_forward, layernorm_backward, layernorm_inputs(xp, 6, 8), dtype=np.float32)
    assert report.ok and "float32 tolerance 64·ε₃₂·κ" in report.inputs[0].note
    assert 64 * np.finfo(np.float32).eps <= report.inputs[0].tolerance < 1e-3


def test_float32_overflow_that_float64_does_not_see_fails(xp):
    """A softmax without the max subtracted: fine in float64, inf/inf in float32 at logits ~ 100."""
    def softmax_forward(s):
        e = xp_of(s).exp(s)
        p = e / e.sum(axis=1, keepdims=True)
        return p, p

    def softmax_backward(dp, p):
        return p * (dp - (dp * p).sum(axis=1, keepdims=True))
    s = normal(xp, 3, 4, shift=95.0)
    assert check_layer(softmax_forward, softmax_backward, [s]).ok
    with np.errstate(all="ignore"), pytest.raises(GradientCheckError):
        check_layer(softmax_forward, softmax_backward, [s], dtype=np.float32)


def test_a_float32_backward_returning_float64_is_named(xp):
    with pytest.raises(GradientCheckError, match="the float32 backward returned float64"):
        check_layer(tanh_forward, lambda d, t: (d * (1.0 - t * t)).astype(np.float64),
                    [normal(xp, 3, 3)], dtype=np.float32)


def test_gradcheck_of_a_scalar_in_float32(xp):
    x = normal(xp, 4, 3)
    analytic = {"x": (2.0 * x).astype(np.float32)}
    assert gradcheck(lambda: float((x * x).sum()), {"x": x}, analytic).ok
    with pytest.raises(GradientCheckError):
        gradcheck(lambda: float((x * x).sum()), {"x": x}, {"x": (2.001 * x).astype(np.float32)})


# --- the pytest helper and --module ---------------------------------------------------------

def test_assert_gradients_ok_passes_and_fails_with_the_message():
    assert assert_gradients_ok(tanh_forward, tanh_backward, [normal(np, 3, 3)]).ok
    with pytest.raises(AssertionError, match="sign flip"):
        assert_gradients_ok(tanh_forward, lambda d, t: -tanh_backward(d, t), [normal(np, 3, 3)])


USER_MODULE = '''
import numpy as np
from my_helpers import SCALE

def scale_forward(x, k):
    return x * k, k

def scale_backward(dout, k):
    return dout * k

def cube_op(x):
    return x ** 3

GRADCHECK_CASES = [
    dict(name="scale", forward=scale_forward, backward=scale_backward,
         inputs={"x": np.random.default_rng(0).standard_normal((3, 4))}, settings={"k": SCALE}),
    dict(name="cube[op]", forward=cube_op, backward=lambda dout: 3 * dout, protocol="op",
         inputs=lambda rng: {"x": rng.standard_normal(5)}, options={"fast": True}),
]
'''


def gradcheck_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "paeff_np.gradcheck", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_module_cases_run_in_the_table_with_its_exit_code(tmp_path):
    (tmp_path / "my_helpers.py").write_text("SCALE = 3.0\n")
    path = tmp_path / "my_layers.py"
    path.write_text(USER_MODULE)
    run = gradcheck_cli("--module", str(path))
    assert run.returncode == 1, run.stderr
    lines = run.stdout.splitlines()
    assert any(line.split()[:2] == ["scale", "x"] and line.endswith("ok") for line in lines)
    assert any(line.split()[:2] == ["cube[op]", "x"] and line.endswith("FAIL") for line in lines)
    assert "1 of 2 cases FAIL: cube[op]" in run.stdout and "cube[op]: gradient check FAILED" in run.stdout
    assert gradcheck_cli("--module", str(path), "--op", "scale").returncode == 0
    assert gradcheck_cli("--module", str(path), "--list").stdout.split() == ["scale", "cube[op]"]


@pytest.mark.parametrize("text,words", [
    (None, "no such file"),
    ("import numpy\n", "defines no GRADCHECK_CASES"),
    ("raise RuntimeError('boom')\n", "importing it raised RuntimeError: boom"),
    ("GRADCHECK_CASES = [dict(name='a', forward=print)]\n", "GRADCHECK_CASES[0]: missing backward, inputs"),
    ("GRADCHECK_CASES = [dict(name='a', forward=print, backward=print, inputs={}, h=1)]\n",
     "unknown key 'h'"),
], ids=["missing", "no-cases", "raises", "missing-keys", "unknown-key"])
def test_a_bad_module_is_one_line_and_exit_2(tmp_path, text, words):
    path = tmp_path / "bad.py"
    if text is not None:
        path.write_text(text)
    run = gradcheck_cli("--module", str(path))
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().count("\n") == 0 and words in run.stderr and str(path) in run.stderr
