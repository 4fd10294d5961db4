"""Deterministic split of the built-in conflict domains across silos.

Every silo process calls :func:`build_silo_dataset` with the same arguments except
``silo_index`` and gets its own share, with no coordination: all randomness comes from
``seed`` through fixed, independent sub-streams (train inputs, eval inputs, Dirichlet draw).

Train inputs come from ONE shared stream of random strings. Each domain's examples are a run of
consecutive strings of that stream, and silo ``i`` takes the run that follows silos ``0..i-1``'s
share of the same domain. Different domains therefore reuse the same strings (silos on
``shift_up`` and ``shift_down`` see the same inputs with opposite targets), while two silos on the
same domain see different strings (together they hold more data of that domain).

Eval inputs come from a separate stream, are identical for a given domain on every silo (so
per-domain losses are comparable across silos) and never occur among the train inputs of any
silo.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from fcmoe.errors import DataError

from .conflict import check_domain, random_inputs, render
from .records import Example

Partition = Literal["domain", "dirichlet"]

MIN_EVAL_PER_DOMAIN = 8
_TRAIN_STREAM, _EVAL_STREAM, _DIRICHLET_STREAM = 1, 2, 3
_MAX_EVAL_ATTEMPTS = 8


def derive_seed(seed: int, stream: int) -> int:
    """An independent integer seed for sub-stream ``stream`` of ``seed`` (via numpy SeedSequence)."""
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0])


def _check_silos(num_silos: int) -> None:
    if num_silos < 1:
        raise DataError(f"num_silos must be >= 1, got {num_silos}")


def partition_by_domain(domains: Sequence[str], num_silos: int) -> list[list[str]]:
    """Silo ``i`` gets the single domain ``domains[i % len(domains)]``.

    With 4 silos and ``[shift_up, shift_down, copy, reverse]``, silos 0/1 and 2/3 hold
    conflicting pairs; with more silos than domains the assignment wraps around.
    """
    _check_silos(num_silos)
    if not domains:
        raise DataError("domain partition needs at least one domain")
    return [[domains[i % len(domains)]] for i in range(num_silos)]


def dirichlet_proportions(num_silos: int, num_domains: int, alpha: float, seed: int) -> np.ndarray:
    """Label-skew mixture weights, shape ``[num_silos, num_domains]``, every row summing to 1.

    Convention (Hsu et al. 2019 style, per-domain split): for each domain ``d`` draw
    ``q_d ~ Dir(alpha * 1_num_silos)``, the share of that domain's data each silo receives.
    Silo ``i``'s mixture is column ``i`` of those shares normalised over domains, i.e. every
    domain is assumed to contribute the same amount of data in total. Small ``alpha`` makes each
    silo dominated by one or two domains; large ``alpha`` tends to the uniform mixture. A silo that
    received an exactly-zero share of every domain (possible only for tiny ``alpha``) gets domain
    ``i % num_domains`` alone, so no silo is left empty.
    """
    _check_silos(num_silos)
    if num_domains < 1:
        raise DataError(f"num_domains must be >= 1, got {num_domains}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"dirichlet alpha must be a finite number > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(num_silos, float(alpha)), size=num_domains)  # [domains, silos]
    weights = np.nan_to_num(shares.T, nan=0.0)  # [silos, domains]
    totals = weights.sum(axis=1, keepdims=True)
    empty = totals[:, 0] <= 0
    weights[empty] = np.eye(num_domains)[np.arange(num_silos)[empty] % num_domains]
    return weights / weights.sum(axis=1, keepdims=True)


def split_count(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing exactly to ``total`` in proportion to ``weights`` (largest remainder).

    Ties break toward the lower index, so the result is deterministic.
    """
    exact = np.asarray(weights, dtype=np.float64) * total
    counts = np.floor(exact).astype(np.int64)
    remainder = exact - counts
    order = np.argsort(-remainder, kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


def silo_domain_counts(
    *,
    num_silos: int,
    domains: Sequence[str],
    partition: Partition,
    alpha: float,
    samples_per_silo: int,
    seed: int,
) -> np.ndarray:
    """Train examples per silo and domain, shape ``[num_silos, len(domains)]``; rows sum to
    ``samples_per_silo``. Every silo can compute the whole matrix, which it needs to know where
    its slice of the shared input stream starts."""
    if samples_per_silo < 1:
        raise DataError(f"samples_per_silo must be >= 1, got {samples_per_silo}")
    if partition == "domain":
        index = {name: j for j, name in enumerate(domains)}
        weights = np.zeros((num_silos, len(domains)))
        for i, assigned in enumerate(partition_by_domain(domains, num_silos)):
            for name in assigned:
                weights[i, index[name]] += 1.0 / len(assigned)
    elif partition == "dirichlet":
        weights = dirichlet_proportions(
            num_silos, len(domains), alpha, derive_seed(seed, _DIRICHLET_STREAM)
        )
    else:
        raise DataError(f"unknown partition {partition!r}; allowed: domain, dirichlet")
    return np.stack([split_count(samples_per_silo, row) for row in weights])


def _check_domains(domains: Sequence[str]) -> None:
    if not domains:
        raise DataError("need at least one domain")
    if len(set(domains)) != len(domains):
        raise DataError(f"domains must be distinct, got {list(domains)}")
    for name in domains:
        check_domain(name)


def eval_count(train_count: int, eval_fraction: float) -> int:
    """Eval examples for a domain with ``train_count`` train examples: ``eval_fraction`` of that,
    but never fewer than :data:`MIN_EVAL_PER_DOMAIN`, so per-domain loss is not just noise."""
    return max(MIN_EVAL_PER_DOMAIN, int(np.ceil(eval_fraction * train_count)))


def disjoint_inputs(
    n: int, seed: int, exclude: set[str], min_len: int, max_len: int
) -> list[str]:
    """The first ``n`` distinct strings of stream ``seed`` that are not in ``exclude``.

    Draws a larger prefix and doubles it until enough survive; raises if the string space is too
    small (e.g. very short lengths) to hold that many fresh inputs.
    """
    draw = 2 * n + 16
    for _ in range(_MAX_EVAL_ATTEMPTS):
        fresh: list[str] = []
        seen: set[str] = set()
        for x in random_inputs(draw, seed, min_len, max_len):
            if x not in exclude and x not in seen:
                seen.add(x)
                fresh.append(x)
                if len(fresh) == n:
                    return fresh
        draw *= 2
    raise DataError(
        f"cannot find {n} eval inputs disjoint from train inputs with lengths "
        f"{min_len}..{max_len}; use longer strings or fewer samples"
    )


def build_silo_dataset(
    *,
    silo_index: int,
    num_silos: int,
    domains: Sequence[str],
    partition: Partition,
    alpha: float,
    samples_per_silo: int,
    eval_fraction: float,
    seed: int,
    min_len: int = 4,
    max_len: int = 8,
) -> tuple[list[Example], list[Example]]:
    """``(train, eval)`` for silo ``silo_index``, a pure function of its arguments.

    ``train`` has exactly ``samples_per_silo`` examples, grouped by domain in ``domains`` order.
    ``eval`` has, for every domain present in ``train``, ``ceil(eval_fraction * count)`` examples
    but at least :data:`MIN_EVAL_PER_DOMAIN`; its inputs never appear in any silo's train inputs.
    """
    _check_silos(num_silos)
    if not 0 <= silo_index < num_silos:
        raise DataError(f"silo_index must be in [0, {num_silos}), got {silo_index}")
    if not 0.0 <= eval_fraction <= 1.0:
        raise DataError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    _check_domains(domains)
    counts = silo_domain_counts(
        num_silos=num_silos,
        domains=domains,
        partition=partition,
        alpha=alpha,
        samples_per_silo=samples_per_silo,
        seed=seed,
    )
    starts = counts.cumsum(axis=0) - counts  # where each silo's run begins, per domain
    stream_length = int(counts.sum(axis=0).max())
    stream = random_inputs(stream_length, derive_seed(seed, _TRAIN_STREAM), min_len, max_len)
    train: list[Example] = []
    for j, name in enumerate(domains):
        start, count = int(starts[silo_index, j]), int(counts[silo_index, j])
        train.extend(render(name, stream[start : start + count]))
    present = [(j, name) for j, name in enumerate(domains) if counts[silo_index, j] > 0]
    need = max(eval_count(int(counts[silo_index, j]), eval_fraction) for j, _ in present)
    eval_seed = derive_seed(seed, _EVAL_STREAM)
    eval_inputs = disjoint_inputs(need, eval_seed, set(stream), min_len, max_len)
    evaluation: list[Example] = []
    for j, name in present:
        n_eval = eval_count(int(counts[silo_index, j]), eval_fraction)
        evaluation.extend(render(name, eval_inputs[:n_eval]))
    _check_disjoint(train, evaluation, silo_index)
    return train, evaluation


def _check_disjoint(train: list[Example], evaluation: list[Example], silo_index: int) -> None:
    """Guard the property eval numbers depend on: no eval prompt was trained on by this silo."""
    overlap = {ex.prompt for ex in train} & {ex.prompt for ex in evaluation}
    if overlap:
        raise DataError(
            f"silo {silo_index}: {len(overlap)} eval input(s) also in train, e.g. {min(overlap)!r}"
        )
