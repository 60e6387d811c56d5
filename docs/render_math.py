"""Render docs/math.md to HTML with KaTeX, and screenshot it in headless Chromium.

    python docs/render_math.py --out DIR [--katex-dir .venv/node] [--no-screenshot]

To look at the page as a reader will, formulas typeset: the math spans are the
ones GitHub finds (``docs/mathspans.py``), rendered by KaTeX; the rest of the
markdown is rendered by ``marked``. Writes ``DIR/math.html`` (one page) and,
unless ``--no-screenshot``, one HTML file and one PNG per top-level section
(``DIR/section-NN.png``, 1000 px wide), for a look with any image viewer.
With Chromium it also lists every formula wider than the page's 940 px
column (GitHub's is about as wide), which would be cut off or scroll.

Tools (none of them is a dependency of the library or of the tests):
``npm install --prefix .venv/node katex marked`` and Debian's ``chromium``
(``apt-get install chromium``).
"""
import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mathspans  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RENDER = r"""
const [katexDir, markedDir] = process.argv.slice(1);
const katex = require(katexDir);
const { marked } = require(markedDir);
const job = JSON.parse(require("fs").readFileSync(0, "utf8"));
let html = marked.parse(job.markdown);
job.spans.forEach((s, k) => {
  const out = katex.renderToString(s.tex, {displayMode: s.display, throwOnError: false});
  html = html.split(`MATHSPAN${k}Z`).join(out);
});
console.log(html);
"""
PAGE = """<!doctype html><html><head><meta charset="utf-8">
<link rel="stylesheet" href="{css}">
<style>
body {{ font-family: -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; font-size: 16px;
        line-height: 1.5; max-width: 940px; margin: 20px auto; padding: 0 20px; color: #1f2328; }}
code, pre {{ font-family: "DejaVu Sans Mono", monospace; font-size: 85%; background: #f6f8fa; }}
pre {{ padding: 12px; overflow: auto; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #d0d7de; padding: 4px 10px; }}
blockquote {{ border-left: 4px solid #0969da; margin: 0; padding: 0 14px; color: #1f2328;
             background: #f6f8fa; }}
img {{ max-width: 100%; }}
</style></head><body>
{body}
</body></html>
"""
# Run in the page: the rendered formulas that reach past the text column, one per line.
WIDTH_CHECK = """<script>window.addEventListener("load", () => {
  const body = document.body.getBoundingClientRect(), right = body.right - 20, out = [];
  document.querySelectorAll(".katex-html").forEach(e => {
    let far = 0;
    e.querySelectorAll("span").forEach(s => { const r = s.getBoundingClientRect();
                                             if (r.width > 0 && r.right > far) far = r.right; });
    if (far > right + 1) {
      const tex = e.parentElement.querySelector("annotation");
      out.push(Math.round(far - right) + " px too wide: " +
               (tex ? tex.textContent : "?").replace(/\\s+/g, " ").slice(0, 100));
    }
  });
  const pre = document.createElement("pre"); pre.id = "too-wide";
  pre.textContent = "TOO-WIDE\\n" + out.join("\\n"); document.body.appendChild(pre);
});</script>"""


def too_wide(browser, out):
    """The formulas of ``out/math.html`` wider than the text column, as Chromium lays them out."""
    with open(os.path.join(out, "math.html"), encoding="utf-8") as f:
        page = f.read().replace("</body>", WIDTH_CHECK + "</body>")
    path = os.path.join(os.path.abspath(out), "math-width-check.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,2000",
                          "--virtual-time-budget=30000", "--dump-dom", "file://" + path],
                         capture_output=True, text=True, timeout=300)
    found = re.search(r'<pre id="too-wide">TOO-WIDE\n(.*?)</pre>', run.stdout, flags=re.S)
    if found is None:
        return None
    return [html.unescape(line) for line in found.group(1).split("\n") if line]


def with_placeholders(markdown):
    """``(markdown with each math span replaced by MATHSPAN<k>Z, spans)``, spans in that order."""
    spans, out, fence, block = [], [], None, []
    for line in markdown.split("\n"):
        quote = re.match(r"^(>\s?)?", line).group()
        body = line[len(quote):]
        opening = re.match(r"^\s*(```|~~~)(\w*)", body)
        if fence is None and opening:
            fence = opening.group(2)
            if fence != "math":
                out.append(line)
            continue
        if fence is not None:
            if re.match(r"^\s*(```|~~~)\s*$", body):
                if fence == "math":
                    spans.append(mathspans.Span(0, "\n".join(block), True))
                    out.append(f"{quote}MATHSPAN{len(spans) - 1}Z")
                    block = []
                else:
                    out.append(line)
                fence = None
            elif fence == "math":
                block.append(body)
            else:
                out.append(line)
            continue
        found, _, ranges = mathspans._inline(body, 0, body.lstrip().startswith("|"))
        for (start, end), span in sorted(zip(ranges, found), key=lambda r: -r[0][0]):
            spans.append(span)
            body = body[:start] + f"MATHSPAN{len(spans) - 1}Z" + body[end:]
        out.append(quote + body)
    return "\n".join(out), spans


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--katex-dir", default=os.path.join(ROOT, ".venv", "node"),
                        help="folder holding node_modules/katex and node_modules/marked")
    parser.add_argument("--no-screenshot", action="store_true")
    args = parser.parse_args(argv)
    modules = os.path.join(os.path.abspath(args.katex_dir), "node_modules")
    for package in ("katex", "marked"):
        if not os.path.isdir(os.path.join(modules, package)):
            print(f"render_math: no {package} in {modules}: npm install --prefix {args.katex_dir} "
                  "katex marked", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(ROOT, "docs", "math.md"), encoding="utf-8") as f:
        markdown = f.read()
    # figures and links resolve from the output folder
    markdown = re.sub(r"\]\((?!http|#)([^)\s]+)\)",
                      lambda m: "](" + os.path.join(ROOT, "docs", m.group(1)) + ")", markdown)
    css = os.path.join(modules, "katex", "dist", "katex.min.css")
    sections = re.split(r"\n(?=## )", markdown)
    pages = [("math", markdown)] + [(f"section-{k:02d}", part) for k, part in enumerate(sections)]
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    for name, part in pages:
        text, spans = with_placeholders(part)
        job = json.dumps({"markdown": text, "spans": [s._asdict() for s in spans]})
        run = subprocess.run(["node", "-e", RENDER, os.path.join(modules, "katex"),
                              os.path.join(modules, "marked")], input=job, capture_output=True,
                             text=True, check=True)
        with open(os.path.join(args.out, f"{name}.html"), "w", encoding="utf-8") as f:
            f.write(PAGE.format(css=css, body=run.stdout))
        if name == "math" or args.no_screenshot:
            continue
        if browser is None:
            print("render_math: no chromium for the screenshots (apt-get install chromium)",
                  file=sys.stderr)
            return 2
        height = 400 + 34 * part.count("\n")
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size=1000,{height}",
                        f"--screenshot={os.path.join(os.path.abspath(args.out), name + '.png')}",
                        "file://" + os.path.join(os.path.abspath(args.out), name + ".html")],
                       capture_output=True, check=True, timeout=120)
    print(f"render_math: {len(pages) - 1} sections written to {args.out}")
    if browser is not None:
        wide = too_wide(browser, args.out)
        if wide is None:
            print("render_math: the width check did not run (no result from chromium)", file=sys.stderr)
        else:
            print(f"render_math: {len(wide)} formulas wider than the text column")
            for line in wide:
                print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
