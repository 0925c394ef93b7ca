"""The mutation suite: every plausible student mistake in ``grading/mutations*.py`` must
fail its own part (public or hidden tests, all other parts from the reference) with a
message that says what was expected and what was computed.

The copies are graded by two processes (two cores) that each grade many copies
(``support.grade_many``); the results are shared by the parametrised tests, one per
mutation.
"""
from __future__ import annotations

import os
from typing import Dict

import pytest

import support
from grading.mutations import Mutation, all_mutations

pytestmark = [
    pytest.mark.part("provided"),
    pytest.mark.skipif("A5_SUBMISSION" in os.environ, reason="grading a submission"),
]

MUTATIONS = all_mutations()


def _mutated_source(mutation: Mutation) -> str:
    source = (support.REPO_ROOT / mutation.module).read_text()
    count = source.count(mutation.old)
    if count != 1:
        raise AssertionError(f"{mutation.name}: the text to replace occurs {count} times in {mutation.module}")
    mutated = source.replace(mutation.old, mutation.new)
    # The replaced text must lie in a student region of that part: it is gone once the
    # part's regions are stripped, and still there when the others are.
    others = [p for p in support.parts_by_module()[mutation.module] if p != mutation.part]
    kept_only_this, _ = support.make_release.strip_solutions(source, mutation.module, keep=[mutation.part])
    stripped_this, _ = support.make_release.strip_solutions(source, mutation.module, keep=others)
    assert mutation.old in kept_only_this and mutation.old not in stripped_this, (
        f"{mutation.name}: the replaced text is not inside the regions of part {mutation.part}")
    compile(mutated, mutation.module, "exec")
    return mutated


@pytest.fixture(scope="module")
def mutation_results(tmp_path_factory) -> Dict[str, support.PartResult]:
    root = tmp_path_factory.mktemp("mutations")
    jobs = []
    for index, mutation in enumerate(MUTATIONS):
        checkout = support.make_checkout(root / f"m{index}", sources={mutation.module: _mutated_source(mutation)})
        jobs.append((checkout, mutation.part, mutation.module))
    results = support.grade_many(jobs, workers=2, stop_at_first_failure=True)
    return {mutation.name: result for mutation, result in zip(MUTATIONS, results)}


def test_at_least_three_mutations_per_part():
    counts = {part: 0 for parts in support.parts_by_module().values() for part in parts}
    for mutation in MUTATIONS:
        assert mutation.part in counts, f"{mutation.name}: unknown part"
        counts[mutation.part] += 1
    assert all(n >= 3 for n in counts.values()), {p: n for p, n in counts.items() if n < 3}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_mutation_fails_its_part_with_a_message(mutation, mutation_results):
    result = mutation_results[mutation.name]
    assert result.failed > 0, f"not caught: {mutation.name}\n{result.output}"
    explained = [m for m in result.messages if "expected" in m.lower()]
    assert explained, f"{mutation.name}: no failure says what was expected:\n" + "\n".join(result.messages)
