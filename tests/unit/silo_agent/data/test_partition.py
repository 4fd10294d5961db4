"""silo_agent/data/partition.py: domain and Dirichlet partitions, exact counts, disjoint deterministic silos."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fcmoe.errors import DataError
from silo_agent.data import (
    DOMAINS,
    MIN_EVAL_PER_DOMAIN,
    Example,
    build_silo_dataset,
    dirichlet_proportions,
    partition_by_domain,
    silo_domain_counts,
)

FOUR = ["shift_up", "shift_down", "copy", "reverse"]


def _build(silo: int, partition: str = "domain", **overrides: object) -> tuple[list[Example], list[Example]]:
    kwargs: dict[str, object] = dict(
        silo_index=silo,
        num_silos=4,
        domains=FOUR,
        partition=partition,
        alpha=0.3,
        samples_per_silo=64,
        eval_fraction=0.1,
        seed=123,
    )
    kwargs.update(overrides)
    return build_silo_dataset(**kwargs)  # type: ignore[arg-type]


def test_partition_by_domain_pairs_conflicts() -> None:
    assert partition_by_domain(FOUR, 4) == [[d] for d in FOUR]
    assert partition_by_domain(FOUR, 6)[4:] == [["shift_up"], ["shift_down"]]


def test_dirichlet_rows_sum_to_one_and_deterministic() -> None:
    p = dirichlet_proportions(8, 6, 0.5, seed=11)
    assert p.shape == (8, 6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert (p >= 0).all()
    np.testing.assert_array_equal(p, dirichlet_proportions(8, 6, 0.5, seed=11))


def test_dirichlet_skew_depends_on_alpha() -> None:
    skewed = dirichlet_proportions(20, 6, 0.1, seed=0)
    assert (skewed.max(axis=1) > 0.5).mean() >= 0.7  # most silos dominated by one domain
    flat = dirichlet_proportions(20, 6, 100.0, seed=0)
    assert np.abs(flat - 1 / 6).max() < 0.08


def test_dirichlet_rejects_bad_alpha() -> None:
    with pytest.raises(DataError):
        dirichlet_proportions(4, 4, 0.0, seed=0)


@pytest.mark.parametrize("partition", ["domain", "dirichlet"])
def test_every_silo_gets_exact_count(partition: str) -> None:
    counts = silo_domain_counts(
        num_silos=7, domains=list(DOMAINS), partition=partition, alpha=0.05, samples_per_silo=30, seed=5
    )
    assert counts.shape == (7, len(DOMAINS))
    assert (counts.sum(axis=1) == 30).all() and (counts >= 0).all()


@pytest.mark.parametrize("partition", ["domain", "dirichlet"])
def test_build_silo_dataset_deterministic_nonempty_disjoint(partition: str) -> None:
    all_train_prompts: set[str] = set()
    for silo in range(4):
        train, evaluation = _build(silo, partition)
        assert (train, evaluation) == _build(silo, partition)
        assert len(train) == 64
        for domain, _ in Counter(e.domain for e in train).items():
            assert sum(e.domain == domain for e in evaluation) >= MIN_EVAL_PER_DOMAIN
        assert {e.domain for e in evaluation} == {e.domain for e in train}
        all_train_prompts |= {e.prompt for e in train}
        assert not {e.prompt for e in train} & {e.prompt for e in evaluation}
    for silo in range(4):
        assert not {e.prompt for e in _build(silo, partition)[1]} & all_train_prompts


def test_domain_partition_conflicting_silos_see_same_inputs() -> None:
    up, down = _build(0)[0], _build(1)[0]
    assert {e.domain for e in up} == {"shift_up"} and {e.domain for e in down} == {"shift_down"}
    assert [e.prompt for e in up] == [e.prompt for e in down]
    assert all(a.response != b.response for a, b in zip(up, down))
    # A second silo on the same domain gets fresh strings, not a copy.
    again = _build(4, num_silos=8)[0]
    assert {e.domain for e in again} == {"shift_up"}
    assert not {e.prompt for e in again} & {e.prompt for e in up}


def test_build_rejects_bad_arguments() -> None:
    with pytest.raises(DataError):
        _build(4)
    with pytest.raises(DataError):
        _build(0, domains=["copy", "copy"])
    with pytest.raises(DataError):
        _build(0, partition="iid")
