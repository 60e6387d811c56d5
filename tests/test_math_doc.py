"""docs/math.md stays true to the code: its links resolve, §14 quotes model.py
exactly, Appendix B and the docstrings point at each other."""
import ast
import os
import re

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
