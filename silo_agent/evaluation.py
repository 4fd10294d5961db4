"""What a silo reports of its held-out evaluations: losses per domain, pooled losses, reliability."""

from __future__ import annotations

import numpy as np

from protos import fcmoe_pb2 as pb


def domain_losses(result: dict[str, tuple[float, int]]) -> list[pb.DomainLoss]:
    return [pb.DomainLoss(domain=d, loss_sum=s, tokens=n) for d, (s, n) in sorted(result.items())]


def mean_loss(result: dict[str, tuple[float, int]]) -> float:
    losses = [s / n for s, n in result.values() if n]
    return float(np.mean(losses)) if losses else float("nan")


def token_loss(result: dict[str, tuple[float, int]]) -> float:
    tokens = sum(n for _, n in result.values())
    return sum(s for s, _ in result.values()) / tokens if tokens else float("nan")


def reliability(global_eval: dict[str, tuple[float, int]], local_eval: dict[str, tuple[float, int]]) -> float:
    """Relative reduction of the silo's held-out token loss by local training, bounded to [0, 1].

    Pooled over the held-out tokens, not averaged over domains: a minor domain (a few examples of a
    rule that conflicts with the silo's main one, in a Dirichlet split) keeps a minimum of held-out
    examples and would otherwise weigh as much as the main domain. Averaged, local training looked
    harmful to every silo of the Dirichlet benchmark from its third round on, and reliability
    screened them all out."""
    before, after = token_loss(global_eval), token_loss(local_eval)
    if not (np.isfinite(before) and np.isfinite(after)) or before <= 0:
        return 0.0
    return float(min(1.0, max(0.0, (before - after) / before)))
