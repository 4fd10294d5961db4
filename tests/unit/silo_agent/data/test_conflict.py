"""silo_agent/data/conflict.py: the built-in conflicting domains, their rules, determinism and refusals."""

from __future__ import annotations

import pytest

from fcmoe.errors import DataError
from silo_agent.data import CONFLICT_PAIRS, DOMAINS, generate


@pytest.mark.parametrize(
    ("domain", "x", "y"),
    [
        ("shift_up", "az", "ba"),
        ("shift_down", "az", "zy"),
        ("copy", "abc", "abc"),
        ("reverse", "abc", "cba"),
        ("sort_asc", "dbca", "abcd"),
        ("sort_desc", "dbca", "dcba"),
        ("upper", "abz", "ABZ"),
        ("double", "ab", "aabb"),
        ("rotate", "abc", "bca"),
    ],
)
def test_rules(domain: str, x: str, y: str) -> None:
    assert DOMAINS[domain](x) == y


def test_generate_format_and_lengths() -> None:
    examples = generate("reverse", 50, seed=3, min_len=4, max_len=6)
    assert len(examples) == 50
    for ex in examples:
        x = ex.prompt[:-1]
        assert ex.prompt == f"{x}=" and ex.response == f"{x[::-1]}\n" and ex.domain == "reverse"
        assert 4 <= len(x) <= 6 and x.isalpha() and x.islower()


@pytest.mark.parametrize(("a", "b"), CONFLICT_PAIRS)
def test_conflicting_domains_share_inputs_but_disagree(a: str, b: str) -> None:
    left, right = generate(a, 40, seed=7), generate(b, 40, seed=7)
    assert [e.prompt for e in left] == [e.prompt for e in right]
    differing = sum(l.response != r.response for l, r in zip(left, right))
    assert differing >= 38  # only palindromes / repeated letters may coincide


def test_generate_deterministic_and_seed_sensitive() -> None:
    assert generate("copy", 20, seed=1) == generate("copy", 20, seed=1)
    assert generate("copy", 20, seed=1) != generate("copy", 20, seed=2)


def test_unknown_domain_lists_allowed_names() -> None:
    with pytest.raises(DataError, match="shift_up"):
        generate("nope", 3, seed=0)
