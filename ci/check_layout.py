"""Layout rules that keep the tree easy to read and a fresh clone green.

- No Python file in python/ over 600 lines, no Rust file in native/ over
  1,200 lines, no function in either over 80 lines.
- No script folder that runs with itself on sys.path (bench/, ci/) holds a
  module named like an installed one (bench/kernels.py once shadowed
  Hugging Face's `kernels` and turned CI red).
- Nothing under tests/, ci/ or .ci/ reads ../shared: a clone of the project
  alone must pass its tests (the data is in tests/data).

Run by ci/lint.sh with the project's virtualenv: python ci/check_layout.py
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_PY_LINES, MAX_RS_LINES, MAX_FN_LINES = 600, 1200, 80
SCRIPT_DIRS = ("bench", "ci")
RS_FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")


def python_problems(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    out = []
    if text.count("\n") > MAX_PY_LINES:
        out.append(f"{path}: {text.count(chr(10))} lines (at most {MAX_PY_LINES})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FN_LINES:
                out.append(f"{path}:{node.lineno}: function {node.name} has {length} lines")
    return out


def _strip_rust_literals(line: str) -> str:
    """The line without comments, strings and char literals, so braces inside them do not count."""
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    return line.split("//", 1)[0]


def rust_function_lengths(lines: list[str]) -> list[tuple[int, str, int]]:
    """(first line, name, length) of every fn with a body, found by brace depth."""
    found = []
    for start, line in enumerate(lines):
        match = RS_FN.match(line)
        if match is None:
            continue
        depth, opened = 0, False
        for end in range(start, len(lines)):
            code = _strip_rust_literals(lines[end])
            if not opened and ";" in code and "{" not in code:
                break  # a declaration without a body (trait item, extern)
            depth += code.count("{") - code.count("}")
            opened = opened or "{" in code
            if opened and depth <= 0:
                found.append((start + 1, match.group(6), end - start + 1))
                break
    return found


def rust_problems(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    if len(lines) > MAX_RS_LINES:
        out.append(f"{path}: {len(lines)} lines (at most {MAX_RS_LINES})")
    for first, name, length in rust_function_lengths(lines):
        if length > MAX_FN_LINES:
            out.append(f"{path}:{first}: fn {name} has {length} lines")
    return out


def shadowing_problems() -> list[str]:
    out = []
    for folder in SCRIPT_DIRS:
        for script in sorted((ROOT / folder).glob("*.py")):
            spec = importlib.util.find_spec(script.stem)
            if spec is not None and spec.origin and Path(spec.origin).parent != script.parent:
                where = f"{folder}/{script.name}"
                out.append(f"{where} shadows the installed module {script.stem} ({spec.origin})")
    return out


def shared_readers() -> list[str]:
    out = []
    for folder in ("tests", "ci", ".ci"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in {".py", ".sh", ""} and path.is_file() and path != Path(__file__).resolve():
                text = path.read_text(encoding="utf-8", errors="replace")
                if re.search(r'"shared"|\.\./shared', text):
                    out.append(f"{path.relative_to(ROOT)} reads ../shared (put the data in tests/data)")
    return out


def main() -> int:
    # Scripts run with their own folder first on sys.path; find_spec must not see them.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in {ROOT / d for d in SCRIPT_DIRS}]
    problems = [p for f in sorted((ROOT / "python").rglob("*.py")) for p in python_problems(f)]
    problems += [p for f in sorted((ROOT / "native").rglob("*.rs")) for p in rust_problems(f)]
    problems += shadowing_problems() + shared_readers()
    for problem in problems:
        print(problem.replace(f"{ROOT}/", ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
