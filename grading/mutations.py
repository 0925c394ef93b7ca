"""Plausible student mistakes, applied to the reference to check that the tests catch them.

Each ``Mutation`` replaces one exact piece of a student region of the reference by a
wrong version that a student could plausibly write. ``tests/instructor/test_mutations.py``
applies each one to a copy of the repository and grades that copy's part (public and
hidden tests, every other part from the reference): the part must fail, with a message
that says what was expected and what was computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class Mutation:
    """``old`` (which must occur exactly once in ``module``) becomes ``new``."""

    part: str
    module: str
    old: str
    new: str
    mistake: str

    @property
    def name(self) -> str:
        return f"{self.part}: {self.mistake}"


def all_mutations() -> List[Mutation]:
    from grading.mutations_fcos import MUTATIONS as FCOS_MUTATIONS
    from grading.mutations_two_stage import MUTATIONS as TWO_STAGE_MUTATIONS

    return FCOS_MUTATIONS + TWO_STAGE_MUTATIONS
