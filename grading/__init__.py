"""Instructor-side grading: points, the pytest plugin that grades, and hidden tests.

Never shipped to students (``tools/make_release.py`` does not copy ``grading/``).
See README.md, "Instructors: grading a class".
"""
