"""Instructor-side grading: points (``points.toml``), the pytest plugin that grades
(``plugin.py``), the plausible-mistake mutations (``mutations*.py``) and the autograder
scripts. The hidden tests live in ``tests/hidden/``.

Never shipped to students (``tools/make_release.py`` copies neither ``grading/`` nor
``tests/hidden/``). See README.md, "Instructors: grading a class".
"""
