"""A round's plan on the wire: :class:`fcmoe.plan.RoundPlan` <-> ``TrainInstructions``, field by name.

The two carry the same fields (the round aside, which travels in the Task), so a field added to one
and not the other fails tests/unit/protos/test_plan.py instead of being dropped silently.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from fcmoe.plan import RoundPlan
from protos import fcmoe_pb2 as pb

WIRE_FIELDS = tuple(f.name for f in fields(RoundPlan) if f.name != "round")


def to_message(plan: RoundPlan) -> pb.TrainInstructions:
    values = asdict(plan)
    return pb.TrainInstructions(**{name: values[name] for name in WIRE_FIELDS})


def from_message(message: pb.TrainInstructions, round_: int) -> RoundPlan:
    return RoundPlan(round=round_, **{name: getattr(message, name) for name in WIRE_FIELDS})
