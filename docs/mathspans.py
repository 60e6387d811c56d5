"""The math spans of a GitHub markdown page, found the way GitHub finds them.

    python docs/mathspans.py docs/math.md     (lists the spans and the problems)

GitHub renders four forms (docs.github.com, "Writing mathematical expressions"):

- inline ``$…$``: the opening ``$`` is followed by a non-space, the closing one
  is preceded by a non-space (``$ x$`` and ``$x $`` are not math); ``\\$`` is a
  literal dollar;
- inline ``$`…`$``: a code span wrapped in dollars, for TeX that markdown
  would otherwise touch;
- display ``$$`` on a line of its own, the TeX on the lines between, ``$$``
  again on a line of its own;
- display fenced blocks whose info string is ``math``.

Code spans and every other fenced block are code, not math. ``spans`` returns
the math; ``problems`` returns what GitHub would get wrong or what this page
forbids, each as ``(line number, message)``:

- a ``$`` that opens or closes no span (``$`` next to a space, a lone ``$``);
- a closing ``$`` followed by a digit (Pandoc's rule, which some renderers
  follow: the span would not close there);
- ``|`` inside inline math on a table row (GFM splits cells at every ``|``
  before it parses inlines; write ``\\vert``, ``\\lVert … \\rVert``);
- an ``_`` or ``*`` that CommonMark's flanking rules let open emphasis,
  followed later in the same paragraph by one that may close it, with either
  inside an inline ``$…$`` span: if markdown's emphasis ran before the math,
  it would pair them and break both spans. (Write ``x_i`` or ``x_{i}``, not
  ``}_i`` after an opener, or use ``$`…`$``.)
- an indented code block (four spaces): the old page kept its formulas there;
- a fenced code block that is not ``python``, ``bash`` or ``text``, or a code
  span, ``bash`` or ``text`` block holding formula characters (Σ, ∂, ‖, ᵀ, …);
- formula characters in the prose outside math (Greek letters, Σ, ‖, ⊙, √,
  ≈, ≤, sub- and superscript digits, combining accents such as x̂), and raw
  ``^{…}`` or ``_{…}`` outside math.

A ``python`` block is exempt: §14 quotes model.py verbatim.
"""
import re
import sys
import unicodedata
from typing import NamedTuple

FENCE = re.compile(r"^(\s{0,3})(`{3,}|~{3,})\s*([^\s`]*)")
CODE_LANGUAGES = {"python", "bash", "text"}
# Characters that mean a formula is written as text rather than typeset.
FORMULA_CHARS = set("ΣΠ∂‖⊙⊕⊗√∇∈∉∞∝⟨⟩≈≤≥≠≡±×·ᵀ⁻⁺⁰¹²³⁴⁵⁶⁷⁸⁹₀₁₂₃₄₅₆₇₈₉ₐₑᵢⱼₖₗₘₙₜ′″∑∏∫𝔻ℝ")
GREEK = set("αβγδεζηθϑικλμνξπρσςτυφϕχψωΓΔΘΛΞΦΨΩ")
PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


class Span(NamedTuple):
    line: int        # 1-based line where the span starts
    tex: str
    display: bool


def _code_spans(text):
    """``(start, end, inner)`` of every code span of one line (backtick runs of equal length)."""
    out, i = [], 0
    while True:
        m = re.compile(r"`+").search(text, i)
        if not m:
            return out
        run = m.group()
        close = re.compile(r"(?<!`)" + run + r"(?!`)").search(text, m.end())
        if not close:
            i = m.end()
            continue
        out.append((m.start(), close.end(), text[m.end():close.start()]))
        i = close.end()


def _flanking(text, i):
    """CommonMark's ``(can_open, can_close)`` for the delimiter character at ``text[i]``."""
    ch = text[i]
    j, k = i, i
    while j > 0 and text[j - 1] == ch:
        j -= 1
    while k + 1 < len(text) and text[k + 1] == ch:
        k += 1
    before = text[j - 1] if j > 0 else " "
    after = text[k + 1] if k + 1 < len(text) else " "
    ws_b, ws_a = before.isspace(), after.isspace()
    p_b = before in PUNCT or unicodedata.category(before).startswith("P")
    p_a = after in PUNCT or unicodedata.category(after).startswith("P")
    left = not ws_a and (not p_a or ws_b or p_b)
    right = not ws_b and (not p_b or ws_a or p_a)
    if ch == "_":
        return left and (not right or p_b), right and (not left or p_a)
    return left, right


def _inline(text, lineno, in_table):
    """Math spans and problems of one line of prose."""
    spans, problems, math_ranges = [], [], []
    prose = list(text)
    code = _code_spans(text)
    for start, end, inner in code:
        if start > 0 and text[start - 1] == "$" and end < len(text) and text[end] == "$":
            spans.append(Span(lineno, inner.strip(), False))
            math_ranges.append((start - 1, end + 1))
            for pos in range(start - 1, end + 1):
                prose[pos] = " "
        else:
            for pos in range(start, end):
                prose[pos] = "`"
            bad = sorted(set(inner) & FORMULA_CHARS)
            if bad:
                problems.append((lineno, f"code span `{inner}` holds a formula character {''.join(bad)}"))
    masked = "".join(prose)
    i = 0
    while True:
        j = masked.find("$", i)
        if j < 0:
            break
        if j > 0 and masked[j - 1] == "\\":
            i = j + 1
            continue
        if j + 1 >= len(masked) or masked[j + 1].isspace() or masked[j + 1] == "$":
            problems.append((lineno, f"a $ that opens no math span at column {j + 1} ($ next to a space?)"))
            i = j + 1
            continue
        k = j + 1
        while True:
            k = masked.find("$", k)
            if k < 0 or masked[k - 1] != "\\":
                break
            k += 1
        if k < 0:
            problems.append((lineno, f"a $ at column {j + 1} that no $ closes"))
            break
        if masked[k - 1].isspace():
            problems.append((lineno, f"the $ at column {k + 1} closes no span: a space before it"))
        if k + 1 < len(masked) and masked[k + 1].isdigit():
            problems.append((lineno, f"the $ at column {k + 1} is followed by a digit"))
        tex = text[j + 1:k]
        if in_table and "|" in tex:
            problems.append((lineno, f"'|' inside inline math on a table row: ${tex}$ (use \\vert, \\lVert)"))
        spans.append(Span(lineno, tex, False))
        math_ranges.append((j, k + 1))
        masked = masked[:j] + " " * (k + 1 - j) + masked[k + 1:]
        i = k + 1
    # what is left is prose: no formula written as text there
    for ch in sorted(set(masked) & (FORMULA_CHARS | GREEK)):
        problems.append((lineno, f"formula character {ch!r} outside math"))
    if any(unicodedata.combining(ch) for ch in masked):
        problems.append((lineno, "a combining accent outside math (x̂ and the like: typeset \\hat x)"))
    if re.search(r"[\^_]\{", masked.replace("`", " ")):
        problems.append((lineno, "raw ^{…} or _{…} outside math"))
    return spans, problems, math_ranges


def _emphasis_problems(lines):
    """Delimiter runs that could pair across or into inline math (one paragraph: ``lines``)."""
    problems = []
    for ch in "_*":
        openers, closers = [], []
        for lineno, text, math_ranges in lines:
            masked = text
            for start, end, _ in _code_spans(text):   # code, and $`…`$ math: markdown leaves them alone
                masked = masked[:start] + "x" * (end - start) + masked[end:]
            for link in re.finditer(r"\]\([^)\s]*\)", masked):   # a link's destination is no text
                masked = masked[:link.start()] + "x" * (link.end() - link.start()) + masked[link.end():]
            for pos, c in enumerate(masked):
                if c != ch or (pos > 0 and masked[pos - 1] == "\\"):
                    continue
                in_math = any(a < pos < b for a, b in math_ranges)
                can_open, can_close = _flanking(masked, pos)
                if can_open:
                    openers.append((lineno, pos, in_math))
                if can_close:
                    closers.append((lineno, pos, in_math))
        for o_line, o_pos, o_math in openers:
            for c_line, c_pos, c_math in closers:
                if (c_line, c_pos) > (o_line, o_pos) and (o_math or c_math):
                    problems.append((o_line, f"'{ch}' at column {o_pos + 1} may open emphasis that the "
                                             f"'{ch}' on line {c_line}, column {c_pos + 1} closes, "
                                             "across inline math"))
                    break
    return problems


def parse(markdown):
    """``(spans, problems)`` of a markdown page."""
    spans, problems = [], []
    # a blockquote's (and a GitHub alert's) content is markdown like the page's
    lines = [re.sub(r"^>[ ]?", "", line) for line in markdown.split("\n")]
    paragraph = []
    i = 0
    while i < len(lines):
        line, lineno = lines[i], i + 1
        fence = FENCE.match(line)
        if fence:
            marker, info = fence.group(2), fence.group(3)
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(marker):
                j += 1
            body = "\n".join(lines[i + 1:j])
            if info == "math":
                spans.append(Span(lineno, body.strip(), True))
            elif info not in CODE_LANGUAGES:
                problems.append((lineno, f"a fenced block of '{info or 'no language'}': write math, python, "
                                         "bash or text"))
            elif info != "python":
                bad = sorted(set(body) & (FORMULA_CHARS | GREEK))
                if bad:
                    problems.append((lineno, f"a {info} block holds formula characters {''.join(bad)}"))
            problems += _emphasis_problems(paragraph)
            paragraph = []
            i = j + 1
            continue
        if line.strip() == "$$":
            j = i + 1
            while j < len(lines) and lines[j].strip() != "$$":
                j += 1
            if j == len(lines):
                problems.append((lineno, "a $$ block that no $$ line closes"))
            spans.append(Span(lineno, "\n".join(lines[i + 1:j]).strip(), True))
            problems += _emphasis_problems(paragraph)
            paragraph = []
            i = j + 1
            continue
        if not line.strip():
            problems += _emphasis_problems(paragraph)
            paragraph = []
            i += 1
            continue
        if re.match(r" {4,}\S", line) and not paragraph:
            problems.append((lineno, "an indented code block: typeset the formula, or fence the code"))
        if "$$" in line:
            problems.append((lineno, "$$ inside a line: put display math's $$ on lines of their own"))
        in_table = line.lstrip().startswith("|")
        found, bad, math_ranges = _inline(line, lineno, in_table)
        spans += found
        problems += bad
        if line.lstrip().startswith(("#", "|", "- ", "* ", "![")) or re.match(r"\s*\d+\. ", line):
            problems += _emphasis_problems(paragraph)   # a new block (or a table row) starts
            paragraph = []
        paragraph.append((lineno, line, math_ranges))
        if in_table:
            problems += _emphasis_problems(paragraph)
            paragraph = []
        i += 1
    problems += _emphasis_problems(paragraph)
    return spans, problems


def main(argv):
    with open(argv[1], encoding="utf-8") as f:
        spans, problems = parse(f.read())
    for span in spans:
        print(f"{span.line:5d} {'display' if span.display else 'inline '} {span.tex!r}")
    for lineno, message in problems:
        print(f"{argv[1]}:{lineno}: {message}", file=sys.stderr)
    print(f"{len(spans)} math spans, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
