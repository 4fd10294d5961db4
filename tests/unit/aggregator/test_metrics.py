"""aggregator/metrics.py: pooled losses are token-weighted per domain; a round's statistics row."""

from __future__ import annotations

import pytest

from aggregator.metrics import DomainPool, round_stats
from protos import fcmoe_pb2 as pb


def test_pooled_loss_is_token_weighted_per_domain_and_the_headline_is_their_plain_mean():
    pool = DomainPool()
    pool.add([pb.DomainLoss(domain="a", loss_sum=10.0, tokens=10), pb.DomainLoss(domain="b", loss_sum=3.0, tokens=1)])
    pool.add([pb.DomainLoss(domain="a", loss_sum=30.0, tokens=10), pb.DomainLoss(domain="c", loss_sum=0.0, tokens=0)])
    assert pool.by_domain() == {"a": 2.0, "b": 3.0}  # a domain nobody scored is left out
    assert pool.mean() == 2.5
    assert DomainPool().mean() is None


def test_round_stats_count_only_silos_that_trained():
    per_silo = {"a": {"train_seconds": 4.0, "tokens": 400, "bytes_up": 100, "report_bytes": 10, "bytes_down": 50},
                "b": {"train_seconds": 1.0, "tokens": 100, "report_bytes": 20, "secure_bytes": 70, "bytes_down": 150},
                "declined": {"report_bytes": 5, "bytes_down": 999}}
    stats = round_stats(per_silo, 2, 5.0, {"conflicts": 3}, secure_seconds=0.5, plan_seconds=0.1,
                        sketch_stage_seconds=0.2, aggregate_seconds=0.3)
    assert stats == pytest.approx({
        "conflicts": 3.0, "updates": 2, "round_seconds": 5.0, "slowest_train_seconds": 4.0, "overhead": 0.2,
        "bytes_up_mean": 100.0, "bytes_down_mean": 100.0, "aggregator_secure_seconds": 0.5, "plan_seconds": 0.1,
        "sketch_stage_seconds": 0.2, "aggregate_seconds": 0.3, "train_tokens_per_s": 100.0})
    assert round_stats({}, 0, 0.0, {}, secure_seconds=0, plan_seconds=0, sketch_stage_seconds=0,
                       aggregate_seconds=0)["overhead"] == 0.0
