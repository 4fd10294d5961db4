"""Dirichlet label skew: which training examples each silo gets, as a pure function of the labels.

The split of Hsu, Qi and Brown (2019, "Measuring the effects of non-identical data distribution")
as FedML (and Wang et al.'s FedMA code before it) implements it: for every label ``k``, in label
order, the indices of that label are shuffled and cut among the silos in proportions
``p_k ~ Dir(alpha * 1_num_silos)``. Like FedML, a silo that already holds its mean share of the
data (``len(labels) / num_silos``) gets no more of the following labels (its proportion is zeroed
before renormalising), which keeps silo sizes from drifting far apart, and the whole draw is
repeated until every silo holds at least ``min_per_silo`` examples. Small ``alpha`` gives each silo
one or two labels; large ``alpha`` tends to every silo holding the global label mix.

No I/O here: the data source (silo_agent/data/classification.py) maps the indices to examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fcmoe.errors import DataError

MAX_DRAWS = 1000  # whole draws tried before giving up on min_per_silo


def dirichlet_label_split(labels: Sequence[int] | np.ndarray, num_silos: int, alpha: float, seed: int,
                          min_per_silo: int = 1) -> list[np.ndarray]:
    """Indices into ``labels`` for every silo: a partition of ``range(len(labels))`` (each index in
    exactly one silo), each silo's indices sorted, every silo holding at least ``min_per_silo``.

    Seeded by ``seed`` alone (numpy ``default_rng``), so every silo computes the same split.
    Raises :class:`DataError` when the arguments cannot work (too few examples for ``num_silos *
    min_per_silo``) or :data:`MAX_DRAWS` draws all left some silo short (tiny ``alpha`` with few
    examples: lower ``min_per_silo`` or give more examples).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError("labels must be a 1-D array of integer label ids")
    if num_silos < 1:
        raise DataError(f"num_silos must be >= 1, got {num_silos}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"dirichlet alpha must be a finite number > 0, got {alpha}")
    if min_per_silo < 0:
        raise DataError(f"min_per_silo must be >= 0, got {min_per_silo}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    total = len(labels)
    if total < num_silos * min_per_silo:
        raise DataError(f"{total} examples cannot give {num_silos} silos {min_per_silo} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    fewest = 0
    for _ in range(MAX_DRAWS):
        parts = _draw(labels, classes, num_silos, alpha, rng)
        fewest = min(len(p) for p in parts)
        if fewest >= min_per_silo:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DataError(f"{MAX_DRAWS} Dirichlet draws (alpha={alpha}, {num_silos} silos, {total} examples) all left "
                    f"a silo with fewer than {min_per_silo} examples (last: {fewest}); give more examples, a larger "
                    "alpha or a smaller minimum")


def _draw(labels: np.ndarray, classes: np.ndarray, num_silos: int, alpha: float,
          rng: np.random.Generator) -> list[list[int]]:
    """One FedML-style draw: every label's shuffled indices cut by Dir(alpha) proportions."""
    parts: list[list[int]] = [[] for _ in range(num_silos)]
    mean = len(labels) / num_silos
    for k in classes:
        index = np.flatnonzero(labels == k)
        rng.shuffle(index)
        shares = rng.dirichlet(np.full(num_silos, float(alpha)))
        shares = np.nan_to_num(shares, nan=0.0) * np.array([len(p) < mean for p in parts])
        if shares.sum() <= 0:  # every open silo drew an exact zero (tiny alpha): the label goes to the smallest
            shares = np.eye(num_silos)[min(range(num_silos), key=lambda i: (len(parts[i]), i))]
        shares = shares / shares.sum()
        cuts = (np.cumsum(shares) * len(index)).astype(np.int64)[:-1]
        for part, piece in zip(parts, np.split(index, cuts)):
            part.extend(piece.tolist())
    return parts


def label_counts(labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray], num_labels: int) -> np.ndarray:
    """Examples per silo and label, shape ``[len(parts), num_labels]``."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_labels)[:num_labels]
                     for p in parts]) if parts else np.zeros((0, num_labels), dtype=np.int64)


def label_entropy(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of every row's label distribution; 0 for a one-label silo, ``log L``
    for a silo holding all ``L`` labels equally. The usual measure of how skewed a split is."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=1)


def balanced_counts(total: int, num_labels: int) -> np.ndarray:
    """``total`` split over ``num_labels`` labels as evenly as possible (the first labels get the
    remainder), e.g. 10 over 3 gives ``[4, 3, 3]``."""
    if num_labels < 1 or total < 0:
        raise DataError(f"cannot split {total} examples over {num_labels} labels")
    return np.array([total // num_labels + (k < total % num_labels) for k in range(num_labels)], dtype=np.int64)
