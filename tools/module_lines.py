"""Count the lines of the two utility scripts: per section (their ``# N. Title`` headers) and in all
as code, docstring, comment and blank lines, the figures behind the modules' line limits.

    python tools/module_lines.py                 # the working tree
    python tools/module_lines.py --rev 01a1793   # a commit (read with git show)
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULES = ("kidneyseg_utils.py", "kidneyseg_studies.py")


def sections(text: str) -> dict[str, int]:
    """Lines per section, from each ``# N. Title`` header (its ``# ===`` rule above included) to the
    next; what comes before the first is the header."""
    lines = text.splitlines()
    starts = [(i - 1, line[2:].split(":")[0]) for i, line in enumerate(lines) if re.match(r"# \d+\. ", line)]
    bounds = [0, *(start for start, _ in starts), len(lines)]
    names = ["header", *(name for _, name in starts)]
    return {name: bounds[k + 1] - bounds[k] for k, name in enumerate(names)}


def kinds(text: str) -> dict[str, int]:
    """Lines that are docstrings (of the module, classes and functions), comments, blank, or code."""
    lines = text.splitlines()
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
                if isinstance(first.value.value, str):
                    docstrings.update(range(first.lineno, first.end_lineno + 1))
    blank = sum(1 for line in lines if not line.strip())
    comment = sum(
        1 for i, line in enumerate(lines, 1) if line.strip().startswith("#") and i not in docstrings
    )
    counts = {"docstring": len(docstrings), "comment": comment, "blank": blank}
    return {"code": len(lines) - sum(counts.values()), **counts, "total": len(lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="a commit to count instead of the working tree")
    args = parser.parse_args()
    for name in MODULES:
        if args.rev:
            show = ["git", "show", f"{args.rev}:{name}"]
            text = subprocess.run(show, cwd=REPO, capture_output=True, text=True, check=True).stdout
        else:
            text = (REPO / name).read_text(encoding="utf-8")
        print(f"{name} ({args.rev or 'working tree'})")
        for section, count in sections(text).items():
            print(f"  {count:5d}  {section}")
        print("  " + ", ".join(f"{kind} {count}" for kind, count in kinds(text).items()))


if __name__ == "__main__":
    main()
