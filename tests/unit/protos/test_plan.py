"""protos/plan.py: the round plan and its message carry the same fields and round-trip."""


def test_the_round_plan_and_its_message_carry_the_same_fields_and_round_trip():
    from fcmoe.plan import RoundPlan
    from protos import fcmoe_pb2 as pb
    from protos.plan import WIRE_FIELDS, from_message, to_message

    assert set(WIRE_FIELDS) == {f.name for f in pb.TrainInstructions.DESCRIPTOR.fields}
    plan = RoundPlan(round=4, local_steps=3, batch_size=5, grad_accum=2, learning_rate=0.25, weight_decay=0.5,
                     clip_norm=2.0, prox_mu=0.125, seed=2**40 + 3, retention_lambda=0.75,
                     retention_by_importance=True, personal_adapter=True, sketch_buckets=64, needs_signals=True,
                     silo_projection="previous_global", reanchor_lambda=0.5, report_norms=True, secure_mode="masking",
                     session=(4 << 16) | 1, skip_evaluation=True)
    assert from_message(pb.TrainInstructions.FromString(to_message(plan).SerializeToString()), 4) == plan
