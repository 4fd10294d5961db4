"""federation.evaluation: evaluation that costs what the operator chooses (every N rounds, on at most
M held-out examples, final evaluation on or off), with FC-MoE still weighing silos on valid numbers."""

import math

import numpy as np
from conftest import silo_config, smoke_config

from aggregator.coordinator import evaluates
from aggregator.rounds import Event, Phase, RoundMachine
from fcmoe.config import FCMOE_SKETCH_VARIANT, parse_config
from fcmoe.launch.inprocess import run_in_process
from silo_agent.data import ByteTokenizer, Example, ExampleBatches


def _configs(tmp_path, strategy, evaluation, rounds=4):
    config = smoke_config(tmp_path, min_silos=3, rounds=rounds, min_group_size=1, strategy=strategy,
                          evaluation=evaluation)
    silos = []
    for i in range(3):
        data = silo_config(config, f"silo{i}", 0, index=i, num_silos=3).model_dump(mode="json")
        data["silo"]["sketch_key"] = "ab" * 32
        silos.append(parse_config(data))
    return config, silos


def test_defaults_keep_every_round_evaluated():
    e = parse_config({}).federation.evaluation
    assert (e.every, e.max_examples, e.final) == (1, None, True)
    assert all(evaluates(r, 1) for r in range(1, 10))
    # round r evaluates version r - 1: versions 0, N, 2N, ...
    assert [r for r in range(1, 12) if evaluates(r, 5)] == [1, 6, 11]


def test_capped_evaluation_uses_one_fixed_subset_across_domains():
    examples = [Example(f"in{i}", f"out{i}", d) for d in ("a", "b", "c") for i in range(20)]  # sorted by domain
    batches = ExampleBatches(examples, ByteTokenizer(), 24)
    subset = batches.eval_subset(12)
    assert len(subset) == 12 and subset == sorted(set(subset)) and subset == batches.eval_subset(12)
    assert subset == ExampleBatches(examples, ByteTokenizer(), 24).eval_subset(12)  # another process, same subset
    assert len({examples[i].domain for i in subset}) == 3  # not the first 12, which are all domain "a"
    assert batches.eval_subset(None) == batches.eval_subset(60) == batches.eval_subset(99) == list(range(60))
    rows = [d for _, domains in batches.iter_eval(5, 12) for d in domains]
    assert rows == [examples[i].domain for i in subset]


def test_machine_without_final_evaluation_finishes_after_the_last_round():
    m = RoundMachine(total_rounds=1, min_silos=2, quorum=2, round_timeout_s=10, join_timeout_s=30, max_retries=0,
                     created_at=0.0, final_evaluation=False)
    m.join("a"), m.join("b")
    assert m.poll(0) == Event.ROUND_STARTED
    for s in "ab":
        m.record(Phase.TRAINING, s, 1, 1)
    assert m.poll(1) == Event.REPORTS_CLOSED
    m.open_upload(1)
    for s in "ab":
        m.record(Phase.UPLOADING, s, 1, 2)
    assert m.poll(2) == Event.UPLOADS_CLOSED
    m.complete_round(2)
    assert m.task("a").kind != "EVALUATE"
    assert m.poll(2) == Event.FINISHED and m.succeeded


def _eval_examples(row):
    return [s["eval_examples"] for s in row["silos"].values()]


def test_every_two_evaluates_versions_0_2_and_the_final_one(tmp_path):
    """FedAvg needs no signals: a skipped round runs no held-out example through any model."""
    coord = run_in_process(*_configs(tmp_path, {"name": "fedavg"}, {"every": 2}, rounds=4))
    assert coord.machine.succeeded
    rows = coord.metrics.rows()
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["global_loss"] is not None for r in rows] == [True, False, True, False, True]  # 4: final evaluation
    assert [r["local_loss"] is not None for r in rows[1:]] == [True, False, True, False]
    held_out = 16  # smoke data: 64 examples per silo, a quarter held out
    assert _eval_examples(rows[1]) == _eval_examples(rows[3]) == [2 * held_out] * 3  # global + trained model
    assert _eval_examples(rows[2]) == _eval_examples(rows[4]) == [0] * 3
    assert rows[-1]["global_loss"] < rows[0]["global_loss"]
    csv = (coord.output_dir / "metrics.csv").read_text().splitlines()
    assert csv[2].split(",")[1] == ""  # version 1: no loss, an empty cell


def test_fcmoe_skipped_rounds_meter_on_the_cap_reuse_reliability_and_weigh_sensibly(tmp_path):
    coord = run_in_process(*_configs(tmp_path, {"name": "fcmoe", "fcmoe": FCMOE_SKETCH_VARIANT}, {"every": 2, "max_examples": 5, "final": False},
                                     rounds=3))
    assert coord.machine.succeeded and coord.machine.version == 3
    rows = coord.metrics.rows()
    # version 3 is never evaluated: the final evaluation is off
    assert [r["global_loss"] is not None for r in rows] == [True, False, True, False]
    # evaluated rounds: global, trained and (while it helps) personalised model on 5 examples each;
    # skipped round 2: one metered pass of the global model over the same 5 (routing shares)
    assert all(10 <= n <= 15 for n in _eval_examples(rows[1]) + _eval_examples(rows[3]))
    assert _eval_examples(rows[2]) == [5] * 3
    for silo in rows[1]["silos"]:  # reliability of round 2 is round 1's, reused
        assert rows[2]["silos"][silo]["reliability"] == rows[1]["silos"][silo]["reliability"]
    for row in rows[1:]:
        assert row["updates"] == 3 and -1 <= row["mean_agreement"] <= 1
        assert all(0 <= s["reliability"] <= 1 for s in row["silos"].values())
    # the last plan: every silo weighs something on every unit, all finite
    alpha = np.array([[a for a in units.values()] for units in coord._coefficients.alpha.values()])
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 0)
    # capped: each pooled domain of version 0 holds at most 5 examples x 3 silos x 24 tokens
    tokens = coord.metrics.record(0).global_pool.tokens
    assert 0 < sum(tokens.values()) <= 5 * 3 * 24 and not math.isnan(rows[0]["global_loss"])
