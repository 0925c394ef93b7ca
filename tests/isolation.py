"""Grading each student part on its own.

When the instructor grades a submission, the tests run from the instructor's copy of
the repository, beside the reference solution. A test of one part then runs with the
*reference* version of every other student part (``patch_other_parts``), so that it
fails only for mistakes in its own part: a correct loss scores full marks even when the
matcher it calls is still unwritten. In a student's own copy there is no reference
(``reference_modules`` returns None) and the tests run on the student's code as it is.

Which functions hold which part is read from the reference source: the function or
method around each ``# BEGIN SOLUTION (part): ...`` marker.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
import types
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

import pytest

# Modules with student parts, in import order (two_stage_detector imports fcos).
STUDENT_MODULES = ("fcos", "two_stage_detector")
_BEGIN = re.compile(r"^\s*# BEGIN SOLUTION \((?P<part>[\w.-]+)\)")


def _has_solutions(path: Path) -> bool:
    return path.is_file() and any(_BEGIN.match(line) for line in path.read_text().splitlines())


@lru_cache(maxsize=None)
def _load_reference(repo_root: Path) -> Dict[str, types.ModuleType]:
    """Import the reference modules under private names. While one is executed, the
    names it imports (``from fcos import ...``) resolve to the reference as well."""
    loaded: Dict[str, types.ModuleType] = {}
    saved = {name: sys.modules.get(name) for name in STUDENT_MODULES}
    try:
        for name in STUDENT_MODULES:
            spec = importlib.util.spec_from_file_location(f"_reference_{name}", repo_root / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
            sys.modules[name] = module  # for the later modules' imports
            spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return loaded


def reference_modules(repo_root: Path, submission: Path) -> Optional[Dict[str, types.ModuleType]]:
    """The reference modules when grading another checkout from the reference
    repository; None otherwise (the reference itself, or a student's copy)."""
    if submission == repo_root:
        return None
    if not all(_has_solutions(repo_root / f"{name}.py") for name in STUDENT_MODULES):
        return None
    return _load_reference(repo_root)


@lru_cache(maxsize=None)
def part_functions(path: str) -> Dict[str, List[str]]:
    """``part -> ["function", "Class.method", ...]``: the top-level functions and methods
    of the module at ``path`` that contain a solution region of that part."""
    source = Path(path).read_text()
    spans = []  # (first line, last line, qualified name)
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef):
            spans.append((node.lineno, node.end_lineno, node.name))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    spans.append((item.lineno, item.end_lineno, f"{node.name}.{item.name}"))
    parts: Dict[str, List[str]] = {}
    for lineno, line in enumerate(source.splitlines(), start=1):
        match = _BEGIN.match(line)
        if match:
            owner = next(name for first, last, name in spans if first <= lineno <= last)
            names = parts.setdefault(match["part"], [])
            if owner not in names:
                names.append(owner)
    return parts


def _for_class(function: types.FunctionType, cls: type) -> types.FunctionType:
    """``function`` (a method of the reference class) with its ``__class__`` cell, which
    zero-argument ``super()`` reads, pointing at the submission's class instead."""
    code = function.__code__
    if "__class__" not in code.co_freevars:
        return function
    cells = tuple(
        types.CellType(cls) if name == "__class__" else cell
        for name, cell in zip(code.co_freevars, function.__closure__)
    )
    rebound = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__, cells)
    rebound.__kwdefaults__ = function.__kwdefaults__
    rebound.__dict__.update(function.__dict__)
    return rebound


def patch_other_parts(
    monkeypatch: pytest.MonkeyPatch,
    reference: Dict[str, types.ModuleType],
    keep_part: Optional[str],
    test_module: Optional[types.ModuleType] = None,
) -> None:
    """Replace, in the loaded submission modules, every student function and method
    except those of ``keep_part`` by the reference's. Module-level functions are
    replaced wherever a submission module or the test module holds them
    (``two_stage_detector`` imports ``get_fpn_location_coords`` from ``fcos``; a test
    file imports the functions it calls)."""
    submission = {name: sys.modules[name] for name in STUDENT_MODULES if name in sys.modules}
    holders = list(submission.values()) + ([test_module] if test_module is not None else [])
    for ref_name, ref_module in reference.items():
        for part, qualnames in part_functions(ref_module.__file__).items():
            if part == keep_part:
                continue
            for qualname in qualnames:
                if "." in qualname:
                    class_name, method = qualname.split(".")
                    if ref_name not in submission or not hasattr(submission[ref_name], class_name):
                        continue
                    cls = getattr(submission[ref_name], class_name)
                    ref_function = getattr(ref_module, class_name).__dict__[method]
                    monkeypatch.setattr(cls, method, _for_class(ref_function, cls))
                    continue
                originals = {id(getattr(m, qualname)) for m in submission.values() if hasattr(m, qualname)}
                for holder in holders:
                    if id(getattr(holder, qualname, None)) in originals:
                        monkeypatch.setattr(holder, qualname, getattr(ref_module, qualname))
