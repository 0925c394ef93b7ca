"""The grading configuration (``grading/points.toml``) and the student parts it must match.

Everything here is read generically: the part names come from the reference modules'
``# BEGIN SOLUTION (part): ...`` markers (``tools/make_release.py``'s ``strip_solutions``
over its ``MODULES``), and the configuration must name exactly those parts.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Tuple

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_PATH = REPO_ROOT / "grading" / "points.toml"
VISIBILITIES = ("hidden", "after_due_date", "after_published", "visible")


class ConfigError(ValueError):
    """points.toml is malformed or does not match the student parts of the reference."""


def _make_release():
    tools = str(REPO_ROOT / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import make_release  # noqa: E402

    return make_release


@dataclass
class Part:
    name: str
    points: float
    forbidden: Tuple[str, ...] = ()
    module: str = ""  # the reference module (relative path) that holds its region(s)


@dataclass
class Config:
    parts: Dict[str, Part]
    timeout: float = 60.0
    submission_timeout: float = 1200.0
    hidden_visibility: str = "after_published"
    notebooks: Tuple[str, ...] = ()
    notebook_points: float = 0.0
    notebook_cell_timeout: float = 600.0
    path: Path = CONFIG_PATH
    # Relative paths of the modules that hold student parts, and of the other modules.
    student_modules: Tuple[str, ...] = ()
    provided_modules: Tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return sum(p.points for p in self.parts.values()) + self.notebook_points


def student_parts(root: Path = REPO_ROOT) -> Dict[str, List[str]]:
    """``{module relative path: [part names in order]}`` of the reference under ``root``
    (every module of ``make_release.MODULES``, parts or not)."""
    mr = _make_release()
    found: Dict[str, List[str]] = {}
    for name in mr.MODULES:
        path = root / name
        if not path.is_file():
            continue
        _, parts = mr.strip_solutions(path.read_text(), name)
        found[name] = list(dict.fromkeys(parts))
    return found


def _read_toml(path: Path) -> dict:
    """``path`` parsed as TOML (an unreadable file or bad TOML is a ConfigError)."""
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _parse_part(path: Path, name: str, table: object, module: str) -> Part:
    """One ``[parts.NAME]`` table as a Part, its values checked."""
    if not isinstance(table, dict) or "points" not in table:
        raise ConfigError(f"{path}: [parts.{name}] needs `points`")
    points = table["points"]
    if not isinstance(points, (int, float)) or points < 0:
        raise ConfigError(f"{path}: [parts.{name}] points must be a number >= 0, not {points!r}")
    forbidden = table.get("forbidden", [])
    if not isinstance(forbidden, list) or not all(isinstance(f, str) and f for f in forbidden):
        raise ConfigError(f"{path}: [parts.{name}] forbidden must be a list of dotted names")
    unknown = set(table) - {"points", "forbidden"}
    if unknown:
        raise ConfigError(f"{path}: [parts.{name}] unknown keys {sorted(unknown)}")
    return Part(name, float(points), tuple(forbidden), module)


def _check_parts_match(path: Path, parts: Dict[str, Part], module_of: Dict[str, str]) -> None:
    """Raises a ConfigError naming the parts the reference marks but ``parts`` lacks, and
    the configured parts that no module marks."""
    missing = [p for p in module_of if p not in parts]
    extra = [p for p in parts if p not in module_of]
    if missing or extra:
        lines = [f"{path} does not match the student parts of the reference modules"]
        if missing:
            lines.append("  parts without points (add [parts.NAME]): " + ", ".join(
                f"{p} ({module_of[p]})" for p in missing))
        if extra:
            lines.append("  configured parts that no module marks: " + ", ".join(extra))
        raise ConfigError("\n".join(lines))


def _check_totals(path: Path, config: Config) -> None:
    """Positive time limits, and points that total 100."""
    if config.timeout <= 0 or config.submission_timeout <= 0:
        raise ConfigError(f"{path}: timeout and submission_timeout must be positive")
    if abs(config.total - 100) > 1e-6:
        raise ConfigError(f"{path}: the points total {config.total:g}, not 100")


def load_config(path: Path = CONFIG_PATH, root: Path = REPO_ROOT, check_parts: bool = True) -> Config:
    """Read and validate ``points.toml``.

    Raises:
        ConfigError: unreadable TOML, bad values, points not totalling 100, or (with
            ``check_parts``) parts that differ from the reference's solution regions,
            naming the missing and the extra parts.
    """
    data = _read_toml(path)
    defaults = data.get("defaults", {})
    notebooks = data.get("notebooks", {})
    raw_parts = data.get("parts", {})
    if not isinstance(raw_parts, dict) or not raw_parts:
        raise ConfigError(f"{path}: no [parts.NAME] tables")
    by_module = student_parts(root)
    module_of = {part: module for module, parts in by_module.items() for part in parts}
    parts = {name: _parse_part(path, name, table, module_of.get(name, "")) for name, table in raw_parts.items()}
    if check_parts:
        _check_parts_match(path, parts, module_of)
    visibility = defaults.get("hidden_visibility", "after_published")
    if visibility not in VISIBILITIES:
        raise ConfigError(f"{path}: hidden_visibility must be one of {VISIBILITIES}")
    config = Config(
        parts=parts,
        timeout=float(defaults.get("timeout", 60)),
        submission_timeout=float(defaults.get("submission_timeout", 1200)),
        hidden_visibility=visibility,
        notebooks=tuple(notebooks.get("files", ())),
        notebook_points=float(notebooks.get("points", 0)),
        notebook_cell_timeout=float(notebooks.get("cell_timeout", 600)),
        path=Path(path),
        student_modules=tuple(m for m, p in by_module.items() if p),
        provided_modules=tuple(m for m, p in by_module.items() if not p),
    )
    _check_totals(path, config)
    return config


def provided_functions(path: Path) -> FrozenSet[str]:
    """Qualified names of the functions and methods of a reference module that hold no
    solution region (provided code). Calls from them to forbidden names are allowed."""
    source = Path(path).read_text()
    mr = _make_release()
    region_lines = [i for i, line in enumerate(source.splitlines(), start=1) if mr.BEGIN.match(line)]
    provided = set()

    def visit(node, prefix: str, inside_student: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{prefix}{child.name}"
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                student = inside_student or any(start <= line <= child.end_lineno for line in region_lines)
                if not student:
                    provided.add(qualname)
                inner = f"{qualname}.<locals>." if not isinstance(child, ast.ClassDef) else f"{qualname}."
                visit(child, inner, student)
            else:
                visit(child, prefix, inside_student)

    visit(ast.parse(source), "", False)
    return frozenset(provided)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m grading.config``: validate points.toml and print the parts."""
    config = load_config()
    for part in config.parts.values():
        print(f"{part.name:<24}{part.points:>6g}  {part.module:<24}{', '.join(part.forbidden)}")
    print(f"{'total':<24}{config.total:>6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
