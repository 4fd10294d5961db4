"""Restart matrix: model set-up x secure-aggregation mode x phase, over real processes.

The aggregator is a real ``fcmoe aggregator`` process serving gRPC + mutual TLS on loopback; three
real silo agents are driven task by task (tests/restarts.py, conftest.TaskDriver), so that each
SIGKILL lands in a known phase: a phase cannot move on while the silos it waits for hold their task.
After each kill the same command starts the aggregator again; it resumes from its last checkpoint and
the silos rejoin when it answers their next poll with JOIN. One case is one set-up x mode, killed
once per phase in sequence:

set-ups (those of the demos, configs/demo*.yaml, at the size of configs/smoke.yaml; 2 layers, 4 experts)
    router     Mixtral, LoRA on the experts and the router trained (every layer has a shared unit
               "L0.shared", listed first by the layout, last by a checkpoint file), FedAvg
    qwen2_moe  Qwen2-MoE with its shared expert, ``trainable.mode: full`` + router: the shared expert
               and its gate are trained and travel in each layer's shared unit, FedAvg
    fcmoe      the router set-up with FC-MoE as configs/demo_fcmoe.yaml runs it (the defaults: silos
               project against the last global update and re-anchor; no sketch stage): kills as router's
    fcmoe_sketch  the router set-up with FC-MoE's sketch variant (projection_side: aggregator); in mode
               masking every round runs the masked sketch stage SKETCH -> CHECK -> UNMASK -> AGREE
               before UPLOAD -> CHECK -> UNMASK (mode ckks has no sketch stage)
modes
    masking    pairwise + self masks, Shamir shares, a signed consistency check before any unmask
    ckks       CKKS ciphertexts, summed by the aggregator, decrypted by the key-holder silo (DECRYPT)

Why every case has two runs. A silo resends its round's update in a redone attempt only while no sum
holding it can have been revealed: once it sent unmask shares for a stage (masking) or an encrypted
update that the key holder may have decrypted in a sum (ckks), it trains that round afresh with
another seed (silo_agent/agent.py, TrainedRound.exposed/retrain), since resending the same update
would let the aggregator read it from the difference of two sums. A kill after such a reveal
therefore cannot end with the model of an uninterrupted run, by design. So each case runs twice:

1. "compared": killed in every phase that comes before any reveal. Every silo resends what it trained
   (asserted: no silo trained any round twice), and the global model at every version on disk, the
   final one included, equals the uninterrupted in-process run's (fcmoe.launch.inprocess), atol below.
2. "after a reveal": killed in every phase that follows a reveal. Checked for completion: every round
   completes with all three updates, the final evaluation is pooled, every silo exits 0, and exactly
   the exposed silos trained the redone round afresh (``retrains``: how many times per silo and round).

Kills, in this order (r1, r2: round; "n in": how many answers of that phase the aggregator held when
killed; each kill's restart resumes from the last completed round, asserted from the log):

  case            compared (bit-for-bit, atol)                        after a reveal (completion)
  router/qwen2/  waiting (1 of 3 joined); r1 training (1 report in);  r1 unmasking (1 silo revealed)
  fcmoe-masking  r1 sharing (1 in); r1 uploading (2 masked updates
                  in); r2 checking (1 signature in); r2 unmasking
                  (0 revealed); final evaluation (1 in). 2 rounds      1 round
  fcmoe_sketch-  waiting; r1 training (1 in); r1 sharing (1 in);      r1 sketch unmasking (1 revealed);
  masking         r1 sketching (2 masked sketches in); r2 sketch       r1 agreeing (1 in); r1 uploading
                  checking (1 in); r2 sketch unmasking (0 revealed);   (2 in); r1 update checking (1 in);
                  final evaluation (1 in). 2 rounds                    r1 update unmasking (1 revealed).
                                                                       1 round
  any-ckks        waiting; r1 training (1 in); r1 sharing (1 in: the   r1 uploading (1 encrypted update
                  dealer has drawn the CKKS key); r1 uploading (0 in); in); r2 decrypting (the key holder
                  final evaluation (1 in). 1 round                     holds its task). 2 rounds

Tolerances of the compared runs. masking: both runs encode the same deltas to the same fixed point
and the masked sums are exact modulo 2^32, so they agree to float rounding (atol 1e-6). ckks: every
decryption is flooded with fresh Gaussian noise (crypto/ckks.py: sigma about 7e-6 per coordinate
for 3 contributors), so no two ckks runs, interrupted or not, are bitwise equal: atol 1e-4 (over 10
sigma of the difference of two floods). Over more rounds local AdamW training amplifies that noise
(two uninterrupted 2-round ckks runs differ by about 1e-3), hence the compared ckks run has 1 round.
FC-MoE's sketches are keyed by the run id and the run secret a silo draws at random: the
uninterrupted run is given the crashed run's two (restarts.uninterrupted).

Cost: 36 to 80 s a case on 2 cores (each restart is a new process: about 3.5 s), about 6 min for
all eight. Plain ``pytest`` runs ``SLICE`` (about 80 s); the seven others are ``ci_only`` (.ci/run runs
them, after ``make test``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from restarts import aggregator_process  # noqa: F401 (a fixture)
from fcmoe.config import FCMOE_SKETCH_VARIANT
from restarts import K, Federation, aggregator_events, assert_same_as_uninterrupted, federation_configs, metrics_rows

pytestmark = [pytest.mark.subprocess, pytest.mark.tls, pytest.mark.slow]

ROUTER = {"trainable": {"mode": "lora", "lora_rank": 4, "lora_alpha": 8, "router": True}}
SETUPS = {
    "router": (ROUTER, {"name": "fedavg"}),
    "qwen2_moe": ({"builtin": {"family": "qwen2_moe"}, "trainable": {"mode": "full", "router": True}},
                  {"name": "fedavg"}),
    "fcmoe": (ROUTER, {"name": "fcmoe"}),  # the default: silo-side projection, re-anchoring, no sketch stage
    "fcmoe_sketch": (ROUTER, {"name": "fcmoe", "fcmoe": FCMOE_SKETCH_VARIANT}),  # with its masked sketch stage
}
MODES = ("masking", "ckks")
ATOL = {"masking": 1e-6, "ckks": 1e-4}
SILOS = 3
# plain pytest: the demo's FC-MoE with its sketch stage under masking (trained router, the most phases to
# be killed in); .ci/run: the seven others (ckks, Qwen2-MoE with full experts, the default FC-MoE among them)
SLICE = {"fcmoe_sketch-masking"}


@dataclass(frozen=True)
class Kill:
    """Drive the silos until the aggregator is in this phase, then SIGKILL it and start it again."""

    kind: int | None  # the task every silo (or ``holders``) holds then; None: waiting, one silo joined
    round: int = 0  # the task's round (EVALUATE: the model version evaluated)
    answered: int = 0  # how many of them did their task before the kill
    stage: str = ""  # masking: "sketch" or "update" (CHECK and UNMASK come in both)
    holders: int | None = None  # DECRYPT: the key holder alone

    def drive(self, fed: Federation) -> None:
        if self.kind is None:
            fed.agents[0].join()
        else:
            fed.run_until(self.kind, self.round, self.answered, stage=self.stage, holders=self.holders)

    @property
    def resumes_from(self) -> int:
        """The model version the restarted aggregator goes on from."""
        return self.round if self.kind in (None, K.EVALUATE) else self.round - 1


@dataclass(frozen=True)
class Run:
    rounds: int
    kills: list[Kill]
    retrains: dict[tuple[str, int], int] = field(default_factory=dict)  # (silo, round) -> afresh; else 0
    key_requests: frozenset[int] = frozenset()  # ckks: the aggregator starts (1, 2, ...) that asked for the key


def plans(setup: str, mode: str) -> tuple[Run, Run]:
    """(compared run, run killed after reveals) of one case; the docstring's table."""
    first = [Kill(None), Kill(K.TRAIN, 1, 1), Kill(K.SHARE, 1, 1)]
    if mode == "ckks":
        # the dealer (silo0) drew the CKKS key and sent it sealed before the 3rd start was killed: the
        # 4th asks again (silo0 sends the same key) and saves it; later starts read it from disk
        return (Run(1, [*first, Kill(K.UPLOAD, 1, 0), Kill(K.EVALUATE, 1, 1)], key_requests=frozenset({3, 4})),
                # silo0's encrypted update was in: it trains round 1 afresh; in round 2 everyone's was
                Run(2, [Kill(K.UPLOAD, 1, 1), Kill(K.DECRYPT, 2, 0, holders=1)],
                    {("silo0", 1): 1, ("silo0", 2): 1, ("silo1", 2): 1, ("silo2", 2): 1}, frozenset({1})))
    if setup == "fcmoe_sketch":
        return (Run(2, [*first, Kill(K.SKETCH, 1, 2), Kill(K.CHECK, 2, 1, "sketch"), Kill(K.UNMASK, 2, 0, "sketch"),
                        Kill(K.EVALUATE, 2, 1)]),
                # before the 1st kill silo0 had sent its sketch-stage unmask shares, before each of the 4
                # later ones all three had: silo0 trains round 1 afresh 5 times, the others 4
                Run(1, [Kill(K.UNMASK, 1, 1, "sketch"), Kill(K.AGREE, 1, 1), Kill(K.UPLOAD, 1, 2, "update"),
                        Kill(K.CHECK, 1, 1, "update"), Kill(K.UNMASK, 1, 1, "update")],
                    {("silo0", 1): 5, ("silo1", 1): 4, ("silo2", 1): 4}))
    return (Run(2, [*first, Kill(K.UPLOAD, 1, 2), Kill(K.CHECK, 2, 1, "update"), Kill(K.UNMASK, 2, 0, "update"),
                    Kill(K.EVALUATE, 2, 1)]),
            Run(1, [Kill(K.UNMASK, 1, 1, "update")], {("silo0", 1): 1}))


def _run(folder: Path, make_aggregator, setup: str, mode: str, run: Run):
    """One federation in ``folder`` killed as ``run`` says; checks what every run must end with."""
    model, strategy = SETUPS[setup]
    aggregator, silos = federation_configs(folder, SILOS, mode=mode, strategy=strategy, model=model, rounds=run.rounds)
    agg = make_aggregator(aggregator, folder)
    fed = Federation(silos, agg)
    try:
        agg.start()
        for kill in run.kills:
            kill.drive(fed)
            agg.restart()
        fed.finish()
    finally:
        fed.close()

    assert fed.statuses == {c.silo.name: 0 for c in silos}, fed.statuses
    resumed = aggregator_events(agg.log, "run_resumed")
    assert [int(e["version"]) for e in resumed] == [k.resumes_from for k in run.kills]
    assert all(len(starts) == 1 for starts in fed.sessions.values()), "a restart reused a session (keys, masks)"
    out = aggregator.run.output_dir
    record = json.loads((out / "checkpoints" / "run.json").read_text())
    assert record["finished"] and record["run_id"] == resumed[0]["run_id"]
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == list(range(run.rounds + 1))
    assert all(r["updates"] == SILOS for r in rows[1:]), [r["updates"] for r in rows]
    assert rows[-1]["global_loss"] is not None  # the final evaluation was pooled
    expected = {(c.silo.name, r): run.retrains.get((c.silo.name, r), 0)
                for c in silos for r in range(1, run.rounds + 1)}
    assert fed.retrains == expected
    assert fed.ckks_key_requests == run.key_requests
    return aggregator, silos, fed, record


CASES = [pytest.param(setup, mode, id=f"{setup}-{mode}",
                      marks=() if f"{setup}-{mode}" in SLICE else pytest.mark.ci_only)
         for setup in SETUPS for mode in MODES]


@pytest.mark.parametrize("setup,mode", CASES)
def test_killed_in_every_phase_each_run_completes_and_ends_as_an_uninterrupted_one_until_a_reveal(
        tmp_path, aggregator_process, setup, mode):  # noqa: F811
    compared, after_reveal = plans(setup, mode)

    aggregator, silos, fed, record = _run(tmp_path / "compared", aggregator_process, setup, mode, compared)
    same: dict = {"run_id": record["run_id"]}
    if SETUPS[setup][1]["name"] == "fcmoe" and mode == "masking":  # the sketches' key
        held = {agent.state.run_keys.run_secret for agent in fed.agents}
        assert len(held) == 1 and None not in held, "the silos do not hold one run secret"
        same["run_secret"] = held.pop()
    assert_same_as_uninterrupted(aggregator, silos, tmp_path / "compared", atol=ATOL[mode], **same)

    _run(tmp_path / "after_reveal", aggregator_process, setup, mode, after_reveal)
