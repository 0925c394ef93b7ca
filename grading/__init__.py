"""Instructor-only grading material: hidden tests, points, mutations. Never released."""
