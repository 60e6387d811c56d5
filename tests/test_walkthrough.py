"""docs/walkthrough.py: it runs, writes its figures, and says one line without matplotlib."""
import os
import re
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


# --- every number docs/math.md quotes from the walk-through is in what it prints ------

MATH = os.path.join(ROOT, "docs", "math.md")
# A decimal with two or more digits after the point, or a number in e-notation: the
# figures a page quotes. Section numbers (§17.2) and TeX powers (10^{-5}) are not.
NUMBER = re.compile(r"(?<![\w.§\\^{-])-?\d+\.\d{2,}(?:e[-+]?\d+)?(?![\w.])"
                    r"|(?<![\w.§\\^{-])-?\d+\.\d(?:e[-+]?\d+)(?![\w.])|(?<![\w.§\\^{-])\d+e[-+]\d+(?![\w.])")
# Numbers the page states that no run of the walk-through measures, each with its reason.
NOT_FROM_THE_WALKTHROUGH = {
    "0.999",                              # the projection's 1 − 10⁻³, a definition
    "0.005", "0.02",                      # settings: exercise 5's curvature, a test's clip radius
    "1.44", "2.24",                       # hand arithmetic in §17.4's example: 1.2², √5
    "0.507",                              # a property of the float32 grid, measured by tests/test_layers.py
}


def quoted_numbers(markdown):
    """The numbers of the page's prose and math, code blocks and code spans left out."""
    kept, fence = [], None
    for line in markdown.split("\n"):
        opening = re.match(r"^(?:> ?)?\s*(```|~~~)(\w*)", line)
        if opening:
            fence = None if fence is not None else opening.group(2)
            continue
        if fence is not None and fence != "math":
            continue
        kept.append(re.sub(r"(?<!\$)`[^`]*`(?!\$)", " ", line))
    return set(NUMBER.findall("\n".join(kept)))


def printed(number, output):
    """Whether ``output`` holds ``number`` at the precision the page quotes it (sign aside)."""
    value = abs(float(number))
    if "e" in number:
        digits = len(number.split("e")[0].lstrip("-").replace(".", "")) - 1
        form = f"{{:.{digits}e}}"
    else:
        form = f"{{:.{len(number.split('.')[1])}f}}"
    return any(form.format(abs(float(found))) == form.format(value)
               for found in re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", output))


@pytest.fixture(scope="module")
def walkthrough_output():
    run = subprocess.run([sys.executable, SCRIPT, "--print-only"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_every_number_the_page_quotes_is_printed(walkthrough_output):
    with open(MATH, encoding="utf-8") as f:
        numbers = quoted_numbers(f.read())
    assert len(numbers) > 100, "the pattern finds too few numbers: it is wrong"
    missing = sorted(n for n in numbers - NOT_FROM_THE_WALKTHROUGH if not printed(n, walkthrough_output))
    assert not missing, f"docs/math.md quotes numbers the walk-through does not print: {missing}"
    stale = sorted(n for n in NOT_FROM_THE_WALKTHROUGH if n not in numbers)
    assert not stale, f"allowed numbers the page no longer quotes: {stale}"


def test_the_quoted_number_check_catches_a_wrong_figure(walkthrough_output):
    """Figures the page once got wrong fail the check: Appendix A's loss (2.34, quoted as about
    5) and its rounding estimate (4.9e-08), each off in its last digit."""
    assert printed("2.34", walkthrough_output) and not printed("2.36", walkthrough_output)
    assert printed("4.9e-08", walkthrough_output) and not printed("4.7e-08", walkthrough_output)
    assert quoted_numbers("max is 1.2e-18 and $L = 2.34$, `3.14` is code, §17.2 a section\n") == \
        {"1.2e-18", "2.34"}


def test_every_walkthrough_section_the_page_names_is_printed(walkthrough_output):
    """The page cites the walk-through's sections by name (walk-through, "§2 BatchNorm"): each
    name starts a section heading of what it prints."""
    with open(MATH, encoding="utf-8") as f:
        names = set(re.findall(r'walk-?through(?:\.py`)?, "([^"]+)"', f.read()))
    assert len(names) >= 5, names
    headings = re.findall(r"^== (.*) ==$", walkthrough_output, flags=re.M)
    missing = sorted(n for n in names if not any(h.startswith(n) for h in headings))
    assert not missing, f"docs/math.md names walk-through sections it does not print: {missing}"
