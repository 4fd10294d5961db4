"""silo_agent/data/label_skew.py: Dirichlet label splits, their skew, entropy and counts."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from fcmoe.errors import DataError
from silo_agent.data.classification import labelskew_split
from silo_agent.data.label_skew import balanced_counts, dirichlet_label_split, label_counts, label_entropy

ALPHAS = (0.1, 0.5, 1.0)


LABELS = np.repeat(np.arange(3), balanced_counts(640, 3))  # 10 silos x 64, three labels: 214, 213, 213


# Training examples per silo (rows) and genre (comedy, history, tragedy) of the default
# shakespeare_genre split for 10 silos (examples_per_silo 64, seed 0): the split the benchmark uses.
COUNTS = {
    0.1: [[27, 0, 1], [40, 1, 0], [0, 16, 6], [4, 0, 205], [3, 0, 0],
          [7, 8, 0], [92, 0, 0], [29, 187, 0], [7, 0, 0], [5, 1, 1]],
    0.5: [[0, 2, 151], [18, 2, 41], [16, 7, 2], [0, 3, 1], [17, 62, 0],
          [1, 5, 0], [108, 0, 0], [8, 0, 2], [5, 127, 0], [41, 5, 16]],
    1.0: [[0, 51, 76], [15, 11, 8], [37, 42, 0], [13, 18, 2], [25, 4, 1],
          [41, 4, 19], [3, 7, 36], [25, 5, 17], [21, 10, 54], [34, 61, 0]],
}


def _show(counts: np.ndarray, alpha: float) -> None:
    """The label counts per silo, as `pytest -s` prints them."""
    print(f"\nalpha={alpha}: silo  comedy history tragedy  entropy")
    for i, (row, h) in enumerate(zip(counts, label_entropy(counts))):
        print(f"          {i:>4}  " + " ".join(f"{int(n):>7}" for n in row) + f"  {h:7.3f}")


@pytest.mark.parametrize("alpha", ALPHAS)
def test_split_uses_every_example_once_leaves_no_silo_empty_and_is_seeded(alpha):
    parts = dirichlet_label_split(LABELS, 10, alpha, seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(LABELS)))  # a partition: each example exactly once
    assert all(len(p) >= 1 for p in parts)
    again = dirichlet_label_split(LABELS, 10, alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_label_split(LABELS, 10, alpha, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    counts = label_counts(LABELS, parts, 3)
    assert counts.sum(axis=0).tolist() == [214, 213, 213]


def test_skew_falls_as_alpha_grows():
    entropy = {a: np.mean([label_entropy(label_counts(LABELS, dirichlet_label_split(LABELS, 10, a, s), 3)).mean()
                           for s in range(8)]) for a in ALPHAS}
    assert entropy[0.1] < entropy[0.5] < entropy[1.0] < math.log(3)
    dominant = {a: np.mean([(c.max(axis=1) / c.sum(axis=1)).mean() for c in
                            (label_counts(LABELS, dirichlet_label_split(LABELS, 10, a, s), 3) for s in range(8))])
                for a in ALPHAS}
    assert dominant[0.1] > dominant[0.5] > dominant[1.0]  # share of each silo's main label


def test_min_per_silo_redraws_and_refuses_what_cannot_work():
    parts = dirichlet_label_split(LABELS, 10, 0.1, seed=0, min_per_silo=8)
    assert min(len(p) for p in parts) >= 8
    with pytest.raises(DataError, match="cannot give 10 silos 100 each"):
        dirichlet_label_split(LABELS, 10, 0.5, seed=0, min_per_silo=100)
    with pytest.raises(DataError, match="Dirichlet draws"):
        dirichlet_label_split(np.repeat(np.arange(2), 15), 10, 0.01, seed=0, min_per_silo=3)
    with pytest.raises(DataError, match="alpha"):
        dirichlet_label_split(LABELS, 10, 0.0, seed=0)
    with pytest.raises(DataError, match="integer"):
        dirichlet_label_split(np.array([0.5, 1.5]), 2, 1.0, seed=0)


def test_entropy_and_balanced_counts_by_hand():
    assert label_entropy(np.array([[5, 0, 0], [1, 1, 0], [2, 2, 2], [0, 0, 0]])) == pytest.approx(
        [0.0, math.log(2), math.log(3), 0.0])
    assert balanced_counts(10, 3).tolist() == [4, 3, 3]
    assert balanced_counts(640, 3).tolist() == [214, 213, 213]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_label_counts_per_silo(alpha):
    split = labelskew_split(num_silos=10, alpha=alpha)
    _show(split.counts, alpha)
    assert split.labels == ("comedy", "history", "tragedy")
    assert split.counts.tolist() == COUNTS[alpha]
    for silo, records in enumerate(split.train):  # the table is what the silos hold
        held = Counter(e.domain for e in records)
        assert [held[name] for name in split.labels] == COUNTS[alpha][silo]
    assert split.counts.sum() == 640 and (split.counts.sum(axis=1) >= 1).all()
