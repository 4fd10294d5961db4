"""silo_agent/agent.py: a redone attempt reuses its training only for the same model and instructions."""


def test_a_redone_attempt_reuses_training_only_for_the_same_model_and_instructions():
    import numpy as np

    from protos import fcmoe_pb2 as pb
    from silo_agent.agent import training_key

    units = {"L0.E0": np.arange(4, dtype=np.float32)}
    task = pb.Task(kind=pb.Task.TRAIN, round=2, train=pb.TrainInstructions(learning_rate=0.01, session=2 << 16))
    retry = pb.Task(kind=pb.Task.TRAIN, round=2, train=pb.TrainInstructions(learning_rate=0.01, session=2 << 16 | 5))
    changed = pb.Task(kind=pb.Task.TRAIN, round=2, train=pb.TrainInstructions(learning_rate=0.02, session=2 << 16))
    assert training_key("run", task, units) == training_key("run", retry, units)  # only the session differs
    assert training_key("run", task, units) != training_key("run", changed, units)
    assert training_key("run", task, units) != training_key("run", task, {"L0.E0": units["L0.E0"] + 1})
    assert training_key("run", task, units) != training_key("other", task, units)
