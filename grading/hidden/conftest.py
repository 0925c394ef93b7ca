"""Hidden tests use the fixtures of the shipped tests (``tests/conftest.py``).

``tests/conftest.py`` is a directory conftest, so pytest applies it only under ``tests/``.
This file executes it once more as a private module and re-exports its fixtures (and
nothing else: its hooks and options are already registered when ``tests/`` is collected
in the same run). Importing it also runs its module-level setup, e.g. putting
``A5_SUBMISSION`` first on ``sys.path`` so that ``import fcos`` finds the submission.
Hidden tests follow the conventions of ``tests/``: ``@pytest.mark.part("name")`` on every
test, and plain ``import fcos`` / ``import two_stage_detector``. Keep their file names
distinct from those in ``tests/`` (``test_hidden_*.py``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from _pytest.fixtures import getfixturemarker

_TESTS_CONFTEST = Path(__file__).resolve().parents[2] / "tests" / "conftest.py"
_spec = importlib.util.spec_from_file_location("a5_public_tests_conftest", _TESTS_CONFTEST)
_public = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _public
_spec.loader.exec_module(_public)

for _name, _value in vars(_public).items():
    if not _name.startswith("__") and getfixturemarker(_value) is not None:
        globals()[_name] = _value
