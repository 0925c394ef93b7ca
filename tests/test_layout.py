"""Layout rules of the reference's code (instructor-only: not shipped in the student release).

* No function over ``MAX_LINES`` lines (``end_lineno - lineno + 1``: signature, docstring and
  body), unless a ``# Long:`` comment at the top of its body says why (e.g. the docstring
  states every argument's shape, or the course API fixes the signature).
* ``a5_helper.py``, the facade, re-exports no private (underscore) name except those of
  ``ALLOWED_PRIVATE``: code that needs a private helper imports it from its ``a5.*`` module.
"""
from __future__ import annotations

import ast
import os
import textwrap
from pathlib import Path
from typing import List

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.part("provided"),
    pytest.mark.skipif("A5_SUBMISSION" in os.environ, reason="grading a submission"),
]

MAX_LINES = 60
LONG_MARKER = "# Long:"
# The comment must come before the body's code or within its first LONG_WINDOW lines.
LONG_WINDOW = 3
SCANNED = ("fcos.py", "two_stage_detector.py", "a5_helper.py", "a5/*.py", "tools/*.py", "grading/*.py",
           "benchmarks/*.py", "compat/*.py")
# Private names that a notebook or a compat/ module needs through a5_helper (none today).
ALLOWED_PRIVATE: frozenset = frozenset()


def _says_why(node: ast.AST, lines: List[str]) -> bool:
    """Whether a ``# Long:`` comment opens the body of ``node``: after its docstring (or
    its ``def`` line) and before the end of the body's first ``LONG_WINDOW`` lines of code."""
    body = node.body
    has_docstring = ast.get_docstring(node, clean=False) is not None
    after = body[0].end_lineno if has_docstring else node.lineno
    code = body[1:] if has_docstring else body
    first_code = code[0].lineno if code else node.end_lineno
    window = lines[after:first_code - 1 + LONG_WINDOW]
    return any(line.strip().startswith(LONG_MARKER) for line in window)


def long_functions(source: str, filename: str = "<source>") -> List[str]:
    """``"file:line name (N lines)"`` of every function of ``source`` over ``MAX_LINES``
    lines whose body does not open with a ``# Long:`` comment."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        if length > MAX_LINES and not _says_why(node, lines):
            found.append(f"{filename}:{node.lineno} {node.name} ({length} lines)")
    return found


def private_exports(source: str) -> List[str]:
    """The private (``_name``, not dunder) names that a module's top level imports or defines."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [alias.asname or alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return [n for n in names if n.startswith("_") and not n.startswith("__")]


def _scanned_files() -> List[Path]:
    return sorted({path for pattern in SCANNED for path in REPO_ROOT.glob(pattern)})


# --------------------------------------------------------------------------------------
# The checks can fail
# --------------------------------------------------------------------------------------


def _function(length: int, comment_at: int = 0, docstring: bool = True, indent: str = "") -> str:
    """A function of ``length`` lines; ``comment_at`` > 0 puts a ``# Long:`` comment on that
    line of the body (1: the first line after the docstring)."""
    head = ["def f(x):"] + (['    """Doc."""'] if docstring else [])
    body = [f"    x = x + {i}" for i in range(length - len(head) - 1)] + ["    return x"]
    if comment_at:
        body.insert(comment_at - 1, "    # Long: the docstring states every shape.")
        body.pop(-2)
    return textwrap.indent("\n".join(head + body) + "\n", indent)


def test_long_function_without_a_reason_is_listed():
    assert long_functions(_function(MAX_LINES)) == []
    assert long_functions(_function(MAX_LINES + 1), "m.py") == [f"m.py:1 f ({MAX_LINES + 1} lines)"]
    assert long_functions(_function(MAX_LINES + 1, docstring=False), "m.py") == [f"m.py:1 f ({MAX_LINES + 1} lines)"]


def test_long_comment_counts_only_at_the_top_of_the_body():
    assert long_functions(_function(MAX_LINES + 5, comment_at=1)) == []
    assert long_functions(_function(MAX_LINES + 5, comment_at=1, docstring=False)) == []
    assert long_functions(_function(MAX_LINES + 5, comment_at=LONG_WINDOW)) == []
    assert long_functions(_function(MAX_LINES + 5, comment_at=LONG_WINDOW + 1)) != []
    assert long_functions(_function(MAX_LINES + 5, comment_at=30)) != []
    plain = _function(MAX_LINES + 5).replace("x = x + 0", "x = x + 0  # Long: not a comment line of its own")
    assert long_functions(plain) != []


def test_methods_and_nested_functions_are_scanned():
    method = "class C:\n" + _function(MAX_LINES + 2, indent="    ")
    assert long_functions(method, "m.py") == [f"m.py:2 f ({MAX_LINES + 2} lines)"]
    nested = "def outer():\n" + _function(MAX_LINES + 2, indent="    ") + "    return f\n"
    assert [entry.split()[1] for entry in long_functions(nested)] == ["outer", "f"]


def test_private_exports_are_found():
    source = ("from __future__ import annotations\nimport sys\nfrom a5.data import (VOC_CLASSES, _md5,\n"
              "    _unwrap_subset as _unwrap)\nimport a5.cache as _cache\n_CACHE = {}\n__all__ = []\n"
              "def _helper():\n    pass\nclass Public:\n    _inner = 1\n")
    assert private_exports(source) == ["_md5", "_unwrap", "_cache", "_CACHE", "_helper"]


# --------------------------------------------------------------------------------------
# The reference follows them
# --------------------------------------------------------------------------------------


def test_no_function_over_60_lines_without_a_reason():
    files = _scanned_files()
    assert REPO_ROOT / "fcos.py" in files and REPO_ROOT / "a5" / "training.py" in files
    found = [entry for path in files
             for entry in long_functions(path.read_text(), path.relative_to(REPO_ROOT).as_posix())]
    assert not found, (f"functions over {MAX_LINES} lines: split them into named steps, or say why they stay "
                       f"long in a '{LONG_MARKER}' comment at the top of the body:\n  " + "\n  ".join(found))


def test_facade_exports_no_private_names():
    import a5_helper

    written = set(private_exports((REPO_ROOT / "a5_helper.py").read_text())) - ALLOWED_PRIVATE
    loaded = {n for n in vars(a5_helper) if n.startswith("_") and not n.startswith("__")} - ALLOWED_PRIVATE
    assert not written and not loaded, (
        f"a5_helper re-exports private names {sorted(written | loaded)}: import them from their a5.* "
        "module where they are used (or add them to ALLOWED_PRIVATE with the reason)")


def _python_blocks(markdown: str) -> List[str]:
    """The ```python code blocks of a Markdown text (fence lines removed, dedented)."""
    blocks, current = [], None
    for line in markdown.splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append(textwrap.dedent("\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _module_attributes(source: str, modules: frozenset) -> List[tuple]:
    """``(module, name)`` for every ``module.name`` (also through ``import module as alias``)
    and every ``from module import name`` in ``source`` whose module is one of ``modules``."""
    tree = ast.parse(source)
    aliases = {alias.asname or alias.name: alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names if alias.name in modules}
    aliases.update({name: name for name in modules})
    found = [(aliases[node.value.id], node.attr) for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases]
    found += [(node.module, alias.name) for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module in modules for alias in node.names]
    return found


def test_python_block_scanner_finds_attributes():
    text = ("x\n```python\n  import a5_helper as H\n  from fcos import FCOS\n  H.nope(1)\n  a5_helper.yes\n```\n"
            "```bash\na5_helper.skip\n```\n")
    blocks = _python_blocks(text)
    assert len(blocks) == 1
    found = _module_attributes(blocks[0], frozenset({"a5_helper", "fcos"}))
    assert sorted(found) == [("a5_helper", "nope"), ("a5_helper", "yes"), ("fcos", "FCOS")]


def test_readme_python_examples_use_names_that_exist():
    """The README's Python examples parse, and every `a5_helper.X` / `fcos.X` /
    `two_stage_detector.X` they call exists (a renamed or removed name fails here)."""
    import importlib

    modules = frozenset({"a5_helper", "fcos", "two_stage_detector"})
    missing = []
    for block in _python_blocks((REPO_ROOT / "README.md").read_text()):
        if "..." in block.split():  # an elided excerpt (the solution markers), not a program
            continue
        for module, name in _module_attributes(block, modules):
            if not hasattr(importlib.import_module(module), name):
                missing.append(f"{module}.{name}")
    assert not missing, f"README examples use names that do not exist: {missing}"
