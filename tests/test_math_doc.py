"""docs/math.md stays true to the code: its links resolve, §14 quotes model.py
exactly, Appendix B and the docstrings point at each other."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH = os.path.join(ROOT, "docs", "math.md")
CITED_MODULES = ["layers.py", "hyperbolic.py", "fusion.py", "losses.py", "poincare.py",
                 "model.py", "optim.py", "gradcheck/__init__.py"]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def public_functions(module):
    """``(name, docstring)`` of every public top-level function of ``paeff_np/module``."""
    tree = ast.parse(read(os.path.join(ROOT, "paeff_np", module)))
    return [(node.name, ast.get_docstring(node) or "") for node in tree.body
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]


def test_every_relative_link_resolves():
    links = re.findall(r"\]\(([^)\s]+)\)", read(MATH))
    relative = [link.split("#")[0] for link in links if not link.startswith(("http", "#"))]
    assert relative, "no relative link found: the pattern is wrong"
    missing = [link for link in relative
               if not os.path.exists(os.path.normpath(os.path.join(ROOT, "docs", link)))]
    assert not missing


@pytest.mark.parametrize("name", ["forward", "backward"])
def test_section_14_quotes_model_exactly(name):
    """The ```python blocks of §14 that define forward and backward are the code, verbatim."""
    blocks = re.findall(r"```python\n(.*?)```", read(MATH), re.S)
    quoted = [block for block in blocks if block.startswith(f"def {name}(")]
    assert len(quoted) == 1
    code = read(os.path.join(ROOT, "paeff_np", "model.py"))
    start = code.index(f"\ndef {name}(") + 1
    end = code.index("\ndef ", start + 1)
    assert quoted[0].rstrip() == code[start:end].rstrip()


@pytest.mark.parametrize("module", CITED_MODULES)
def test_every_public_function_cites_an_existing_section(module):
    text = read(MATH)
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))
    sections |= {"Appendix A", "Appendix B"}
    for name, doc in public_functions(module):
        cited = re.findall(r"docs/math\.md (?:§(\d+(?:\.\d+)?)|(Appendix [AB]))", doc)
        assert cited, f"{module}:{name} cites no docs/math.md section"
        for number, appendix in cited:
            assert (number or appendix) in sections, f"{module}:{name} cites a missing section"


@pytest.mark.parametrize("module", CITED_MODULES)
def test_appendix_b_indexes_every_public_function(module):
    index = read(MATH).split("## Appendix B.")[1]
    for name, _ in public_functions(module):
        assert f"`{name}`" in index, f"{module}:{name} is not in Appendix B"


# --- every formula typeset, and every math span valid for KaTeX ---------------------

sys.path.insert(0, os.path.join(ROOT, "docs"))
import mathspans  # noqa: E402

KATEX_CHECK = r"""
const katex = require(process.argv[1]);
const spans = JSON.parse(require("fs").readFileSync(0, "utf8"));
const bad = [];
for (const s of spans) {
  try { katex.renderToString(s.tex, {displayMode: s.display, throwOnError: true, strict: "error"}); }
  catch (e) { bad.push(`line ${s.line}: ${e.message}`); }
}
console.log(JSON.stringify(bad));
"""


def katex_module():
    """The path of the ``katex`` package, or ``None``: $PAEFF_KATEX_DIR, then the one .ci/run
    installs (.venv/node), then one Node finds by itself."""
    candidates = [os.environ.get("PAEFF_KATEX_DIR", ""), os.path.join(ROOT, ".venv", "node")]
    for base in filter(None, candidates):
        path = os.path.join(os.path.abspath(base), "node_modules", "katex")
        if os.path.isfile(os.path.join(path, "package.json")):
            return path
    found = subprocess.run(["node", "-e", "console.log(require.resolve('katex'))"],
                           capture_output=True, text=True)
    return "katex" if found.returncode == 0 else None


def test_the_page_has_no_formula_outside_math():
    """Every formula is typeset: no $ that GitHub would leave as text, no formula in a code block
    or span, no Unicode or raw ^{…} formula in the prose, no '|' splitting a table cell, no
    emphasis that could pair across inline math (docs/mathspans.py lists the rules)."""
    spans, problems = mathspans.parse(read(MATH))
    assert len(spans) > 1000, "too few math spans: the extractor is wrong"
    assert not problems, "\n".join(f"docs/math.md:{line}: {message}" for line, message in problems)


@pytest.mark.parametrize("markdown, problem", [
    ("a $ x$ b\n", "opens no math span"),
    ("a $x $ b\n", "closes no span"),
    ("| $a|b$ | c |\n", "'|' inside inline math"),
    ("$\\hat{x}_i$ and $y_{j}$\n", "may open emphasis"),
    ("    y = x Wᵀ + b\n", "indented code block"),
    ("```\ny = x\n```\n", "a fenced block of 'no language'"),
    ("the code: `y = x Wᵀ`\n", "holds a formula character"),
    ("the mean μ of x\n", "formula character 'μ' outside math"),
    ("x̂ is the input\n", "combining accent"),
    ("e^{−x} in prose\n", "raw ^{…}"),
    ("costs $5$0 more\n", "followed by a digit"),
])
def test_the_extractor_finds_each_pitfall(markdown, problem):
    _, problems = mathspans.parse(markdown)
    assert any(problem in message for _, message in problems), problems


def test_the_extractor_reads_spans_as_github_does():
    text = ("Inline $a_i$, $`b_{j}`$ and \\$5; `$not$ math`.\n\n$$\nc = d\n$$\n\n"
            "```math\ne = f\n```\n\n> [!NOTE]\n> $g$ in an aside\n")
    spans, problems = mathspans.parse(text)
    assert sorted((s.tex, s.display) for s in spans) == [
        ("a_i", False), ("b_{j}", False), ("c = d", True), ("e = f", True), ("g", False)]
    assert not problems


def test_every_math_span_parses_under_katex():
    """KaTeX, in strict mode, renders every span; .ci/run installs it (set PAEFF_REQUIRE_KATEX=1
    to make its absence a failure)."""
    required = os.environ.get("PAEFF_REQUIRE_KATEX") == "1"
    if shutil.which("node") is None:
        if required:
            pytest.fail("PAEFF_REQUIRE_KATEX=1 but node is not installed")
        pytest.skip("node is not installed: the KaTeX check of docs/math.md needs Node.js and the "
                    "katex package (.ci/run installs them with npm)")
    module = katex_module()
    if module is None:
        if required:
            pytest.fail("PAEFF_REQUIRE_KATEX=1 but the katex package is not installed")
        pytest.skip("the katex package is not installed: npm install --prefix .venv/node katex "
                    "(what .ci/run does)")
    spans, _ = mathspans.parse(read(MATH))
    payload = json.dumps([{"line": s.line, "tex": s.tex, "display": s.display} for s in spans])
    run = subprocess.run(["node", "-e", KATEX_CHECK, module], input=payload, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == []
    # the check itself can fail: a span KaTeX rejects
    bad = json.dumps([{"line": 1, "tex": "\\frac{1}{", "display": False},
                      {"line": 2, "tex": "\\notamacro x", "display": False}])
    run = subprocess.run(["node", "-e", KATEX_CHECK, module], input=bad, capture_output=True,
                         text=True, timeout=60)
    assert len(json.loads(run.stdout)) == 2


# --- the exercises: each command runs and prints what its solution says ----------------

def exercises_and_solutions():
    """``({k: exercise k's text}, {k: solution k's text})`` from the page's Exercises section."""
    text = read(MATH)
    section = text[text.index("## Exercises"):text.index("## References")]
    asked, answered = section.split("### Solutions")

    def numbered(part):
        items = re.split(r"^(\d+)\. ", part, flags=re.M)
        return {int(k): body for k, body in zip(items[1::2], items[2::2])}
    return numbered(asked), numbered(answered)


def commands(exercise):
    """The ``python -c "…"`` programs of one exercise, dedented as a shell would leave them."""
    return [textwrap.dedent(code) for code in re.findall(r'python -c "(.*?)"', exercise, flags=re.S)]


def run_python(code, cwd=ROOT):
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                         timeout=120)
    assert run.returncode == 0 and not run.stderr, run.stderr
    return run.stdout


def test_there_are_eight_to_twelve_exercises_each_with_its_solution():
    asked, answered = exercises_and_solutions()
    assert 8 <= len(asked) <= 12 and sorted(asked) == sorted(answered) == list(range(1, len(asked) + 1))


def test_the_exercises_commands_print_what_the_solutions_say():
    asked, answered = exercises_and_solutions()
    ran = set()
    for k, exercise in asked.items():
        for code in commands(exercise):
            out = run_python(code)
            ran.add(k)
            solution = " ".join(answered[k].split())
            if k == 1:      # the right backward passes; without its 2 the error is the one quoted
                assert "ok, error" in out, out
                wrong = run_python(code.replace("2 * dy * x", "dy * x"))
                quoted = re.search(r"reports \(error ([\d.e+-]+)\)", solution).group(1)
                assert f"error {quoted}" in wrong and "0.5 × numeric" in wrong, wrong
            elif k == 5:    # "the command prints the same to three digits"
                quoted = re.findall(r"\\sqrt\{[\d.]+\} = (\d\.\d{3})\$", solution)
                assert [f"{float(v):.3f}" for v in out.split()] == quoted, (out, quoted)
            elif k == 6:    # a difference and column sums of rounding size
                assert all(abs(float(v)) < 1e-12 for v in re.findall(r"-?\d[\d.]*e[-+]\d+", out)), out
            elif k in (8, 10):   # "The command prints 36.73681", "The library prints 1.46666659"
                quoted = re.search(r"prints ([\d.]+)", solution).group(1).rstrip(".")
                digits = len(quoted.split(".")[1])
                assert f"{float(out.split()[-1]):.{digits}f}" == quoted, (out, quoted)
            elif k == 9:    # "the command prints 0.26975… and 0.0297…"
                first, second = re.search(r"prints ([\d.]+)… and ([\d.]+)…", solution).groups()
                assert out.startswith(first) and f"({second}" in out, (out, first, second)
            else:
                raise AssertionError(f"exercise {k}'s command has no check here: add one")
    assert ran >= {1, 5, 6, 8, 9, 10}


def test_exercise_2_breaks_tanh_and_the_checker_says_what_the_solution_says(tmp_path):
    """Exercise 2 on a scratch copy of the package: the change it asks for, the row, the summary
    and the exit status its solution quotes."""
    asked, answered = exercises_and_solutions()
    broken = re.search(r"return `(dy \* [^`]*)`", asked[2]).group(1)
    shutil.copytree(os.path.join(ROOT, "paeff_np"), tmp_path / "paeff_np",
                    ignore=shutil.ignore_patterns("__pycache__"))
    layers = tmp_path / "paeff_np" / "layers.py"
    source = layers.read_text(encoding="utf-8")
    body = source[source.index("def tanh_backward"):]
    body = body[:body.index("\ndef ")]
    assert body.count("return dy * (1.0 - t * t)") == 1, body
    layers.write_text(source.replace(body, body.replace("return dy * (1.0 - t * t)", f"return {broken}")),
                      encoding="utf-8")
    command = re.search(r"run\s+`(python -m paeff_np\.gradcheck [^`]*)`", " ".join(asked[2].split())).group(1)
    run = subprocess.run([sys.executable] + command.split()[1:], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    solution = " ".join(answered[2].split())
    row = re.search(r"The row reads `([^`]*)`", solution).group(1)
    summary = re.search(r"the summary says `([^`]*)`", solution).group(1)
    status = int(re.search(r"the exit status is (\d+)", solution).group(1))
    assert run.returncode == status, run.stdout + run.stderr
    assert any(" ".join(line.split()) == row for line in run.stdout.splitlines()), run.stdout
    assert summary in run.stdout, run.stdout
