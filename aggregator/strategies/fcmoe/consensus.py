"""FC-MoE's weighting and grouping, per expert unit. Pure functions on arrays (no I/O).

Inputs for one unit u over the n silos that reported: importance components, and keyed sketches
``Y [n, k]`` of their clipped deltas. Formulas (docs/algorithm.md has the derivation and references):

    r_i    = clip(rel_i / saturation, floor, 1)         reliability weight (rel_i: relative held-out gain)
    s_i,u  = n_i * share_i,u ** gamma * r_i              importance (each factor switchable)
             or share_i,u * ||delta_i,u||                  (importance_measure: activation_norm)
    w_i,u  = s_i,u / sum_j s_j,u
    C_-i   = sum_{j != i} w_j y_j                       leave-one-out consensus sketch
    c_i    = cos(y_i, C_-i)                             direction agreement        in [-1, 1]
    a_i    = sum_b |y_ib| [sign y_ib = sign C_-i,b] / sum_b |y_ib|   sign agreement  in [0, 1]
    z_i    = (c_i + (2 a_i - 1)) / 2                    agreement score            in [-1, 1]
    group  = conflict if z_i < tau else consensus       both groups >= min_group_size, else merged
    phi_i  = floor + (1 - floor) * max(0, z_i)
    alpha_i,u = w_i,u phi_i / sum_j w_j,u phi_j
"""

from __future__ import annotations

import numpy as np

from crypto import sketch

CONSENSUS, CONFLICT = 0, 1


def importance(num_examples: np.ndarray, reliability: np.ndarray, routing_share: np.ndarray,
               use_routing: bool = True, use_reliability: bool = True, routing_power: float = 1.0) -> np.ndarray:
    """Importance ``s [n, U]`` of each silo for each unit (sample count always counts)."""
    n = np.asarray(num_examples, dtype=np.float64)[:, None]
    s = np.broadcast_to(n, np.shape(routing_share)).astype(np.float64)
    if use_routing:
        s = s * np.clip(np.asarray(routing_share, dtype=np.float64), 0.0, None) ** routing_power
    if use_reliability:
        s = s * np.asarray(reliability, dtype=np.float64)[:, None]
    return s


def activation_norm_importance(routing_share: np.ndarray, unit_norm: np.ndarray) -> np.ndarray:
    """The FC-MoE paper's importance ``s [n, U]``: activation frequency x update norm,
    ``s_i,u = share_i,u * ||delta_i,u||`` (norm of the silo's clipped delta, which the silo reports per
    unit as a scalar: under masking the aggregator cannot compute it). Shared units have share 1, so
    they are weighed by norm alone. Normalise with :func:`normalise`."""
    share = np.clip(np.asarray(routing_share, dtype=np.float64), 0.0, None)
    return share * np.clip(np.asarray(unit_norm, dtype=np.float64), 0.0, None)


def reliability_weight(reliability: np.ndarray, floor: float, saturation: float) -> np.ndarray:
    """A round's relative held-out improvement as a weight factor: ``clip(rel / saturation, floor, 1)``.

    Saturating on purpose: reliability screens out rounds that did not help the silo's own held-out
    data (diverged, corrupted, poisoned); it does not rank healthy silos by how fast their task is
    learned, which would tilt the global model towards the easiest domains (docs/algorithm.md)."""
    return np.clip(np.asarray(reliability, dtype=np.float64) / saturation, floor, 1.0)


def normalise(scores: np.ndarray) -> np.ndarray:
    """Column-wise shares; a unit nobody scored is shared equally."""
    scores = np.asarray(scores, dtype=np.float64)
    total = scores.sum(axis=0, keepdims=True)
    equal = np.full_like(scores, 1.0 / scores.shape[0])
    return np.where(total > 0, scores / np.where(total > 0, total, 1.0), equal)


def agreement(sketches: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out cosine ``c [n]`` and magnitude-weighted sign agreement ``a [n]`` for one unit, as
    each silo computes it for itself against the unmasked sketch sum (crypto/sketch.py)."""
    y = np.asarray(sketches, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    total = (w[:, None] * y).sum(axis=0)
    pairs = [sketch.agreement(y[i], total - w[i] * y[i]) for i in range(len(y))]
    return np.array([c for c, _ in pairs]), np.array([a for _, a in pairs])


def agreement_score(cos: np.ndarray, sign: np.ndarray) -> np.ndarray:
    return np.asarray(sketch.agreement_score(cos, sign))


def partition(scores: np.ndarray, min_group_size: int, threshold: float = 0.0) -> np.ndarray:
    """Group of each silo (CONSENSUS or CONFLICT); one group when either would be too small."""
    groups = np.where(np.asarray(scores) < threshold, CONFLICT, CONSENSUS)
    conflict = int((groups == CONFLICT).sum())
    if conflict < min_group_size or len(groups) - conflict < min_group_size:
        return np.full(len(groups), CONSENSUS)
    return groups


def phi(scores: np.ndarray, floor: float) -> np.ndarray:
    return floor + (1.0 - floor) * np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)


def coefficients(weights: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """``alpha = w * phi``, normalised to sum to one over the silos."""
    raw = np.asarray(weights, dtype=np.float64) * np.asarray(factors, dtype=np.float64)
    total = raw.sum()
    return raw / total if total > 0 else np.full(len(raw), 1.0 / len(raw))
