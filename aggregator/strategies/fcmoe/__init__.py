"""FC-MoE on the aggregator's side, in one folder: the strategy, the sign-and-cosine consensus it
groups by, and the projection of conflicting group sums. The silo's side of it is
silo_agent/projection.py (silo-side projection) and silo_agent/personal.py (retention)."""

from aggregator.strategies.fcmoe.strategy import FcMoe

__all__ = ["FcMoe"]
