"""Building graded copies of the assignment and grading one part of them.

Used by the instructor tests: the release round trip (each part restored alone must score
fully, the untouched release zero) and the mutation suite (each plausible mistake must
fail its part). A copy holds the graded modules and the provided ``a5/`` package; the
tests run from this repository with ``A5_SUBMISSION`` pointing at the copy, so every other
part comes from the reference (``tests/isolation.py``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tools"))
sys.path.insert(0, str(REPO_ROOT))
import make_release  # noqa: E402

STUDENT_MODULES = ("fcos.py", "two_stage_detector.py")
# The test files (public and hidden) that grade the parts of each module.
TEST_FILES = {
    "fcos.py": ("tests/test_fcos.py", "tests/hidden/test_fcos_hidden.py"),
    "two_stage_detector.py": ("tests/test_two_stage_detector.py", "tests/hidden/test_two_stage_hidden.py"),
}


def parts_by_module() -> Dict[str, List[str]]:
    """Student parts of each module, in source order."""
    found = {}
    for name in STUDENT_MODULES:
        _, parts = make_release.strip_solutions((REPO_ROOT / name).read_text(), name)
        found[name] = list(dict.fromkeys(parts))
    return found


def make_checkout(dest: Path, keep: Optional[Iterable[str]] = None, sources: Optional[Dict[str, str]] = None) -> Path:
    """A graded copy in ``dest``: the student modules stripped except the ``keep`` parts
    (``keep=None``: the reference as it is), with ``sources`` overriding module texts."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in STUDENT_MODULES + ("a5_helper.py",):
        text = (REPO_ROOT / name).read_text()
        if sources and name in sources:
            text = sources[name]
        elif keep is not None and name in STUDENT_MODULES:
            text, _ = make_release.strip_solutions(text, name, keep=keep)
        (dest / name).write_text(text)
    shutil.copytree(REPO_ROOT / "a5", dest / "a5", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@dataclass
class PartResult:
    passed: int = 0
    failed: int = 0
    not_implemented: int = 0
    messages: List[str] = field(default_factory=list)
    output: str = ""


def _read_result(grade_json: Path, report: Path, part: str, output: str) -> PartResult:
    result = PartResult(output=output)
    if grade_json.is_file():
        row = json.loads(grade_json.read_text())["parts"].get(part, {})
        result.passed = row.get("passed", 0)
        result.failed = row.get("failed", 0)
        result.not_implemented = row.get("not_implemented", 0)
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            for failure in list(case.iter("failure")) + list(case.iter("error")):
                result.messages.append(f"{case.get('name')}: {failure.get('message', '')}")
    return result


def grade_many(jobs: List[tuple], workers: int = 2, stop_at_first_failure: bool = False,
               timeout: float = 3600) -> List[PartResult]:
    """Grade ``(checkout, part, module)`` jobs in ``workers`` processes that each run many
    jobs (``batch_grade.py``): torch is imported once per process, not once per job."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    specs = []
    for checkout, part, module in jobs:
        files = [f for f in TEST_FILES[module] if (REPO_ROOT / f).is_file()]
        specs.append({"checkout": str(checkout), "part": part, "files": files,
                      "junit": str(Path(checkout) / f"junit_{part}.xml"),
                      "grade_json": str(Path(checkout) / f"grade_{part}.json"),
                      "stop_at_first_failure": stop_at_first_failure})
    chunks = [specs[i::workers] for i in range(workers)]

    def run(chunk) -> str:
        if not chunk:
            return ""
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(chunk, handle)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        env.pop("A5_SUBMISSION", None)
        completed = subprocess.run([sys.executable, str(Path(__file__).with_name("batch_grade.py")), handle.name],
                                   cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        os.unlink(handle.name)
        return completed.stdout[-20000:] + completed.stderr[-5000:]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        outputs = list(pool.map(run, chunks))
    return [_read_result(Path(spec["grade_json"]), Path(spec["junit"]), spec["part"], "\n".join(outputs)[-4000:])
            for spec in specs]


def grade_part(checkout: Path, part: str, module: str, timeout: float = 600, stop_at_first_failure: bool = False
               ) -> PartResult:
    """Run the public and hidden tests of ``part`` on ``checkout`` (``stop_at_first_failure``:
    enough to know that a mistake is caught, and faster)."""
    files = [f for f in TEST_FILES[module] if (REPO_ROOT / f).is_file()]
    report = checkout / f"junit_{part}.xml"
    grade_json = checkout / f"grade_{part}.json"
    env = dict(os.environ, A5_SUBMISSION=str(checkout), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", *files, "--part", part, "-q", "-p", "no:cacheprovider",
               "-o", "addopts=", "--junitxml", str(report), "--grade-json", str(grade_json)]
    if stop_at_first_failure:
        command.append("-x")
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return _read_result(grade_json, report, part, completed.stdout[-4000:] + completed.stderr[-2000:])
