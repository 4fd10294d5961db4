"""A silo's local training over ``world_size`` processes (gloo on CPU) equals one process's.

"Equal" is the largest absolute difference of any trained number, below 1e-5 (float32 sums taken
in another order; the measured gap is about 1e-7). Each spawn of two ranks costs a few seconds of
interpreter and model start-up, so the cases are few and each covers several features.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, as_local_checkpoint, kill_process_groups, silo_config, smoke_config
from torch.distributed.tensor import DTensor

from fcmoe.config import ModelConfig, SiloConfig, dump_config, parse_config
from fcmoe.errors import ConfigError, LayoutError, RunError
from fcmoe.launch.inprocess import run_in_process
from fcmoe.model import build_model, load_trainable_state, trainable_state
from fcmoe.model.discovery import decoder_layers, vocabulary_modules
from fcmoe.plan import RoundPlan
from silo_agent.data import ByteTokenizer, Example, ExampleBatches, build_silo_dataset
from silo_agent.distributed import RankSetup, SiloRanks, check_world_size, scored_tokens, shard_rows
from silo_agent.routing import RoutingMeter
from silo_agent.training import evaluate, train_locally

pytestmark = [pytest.mark.subprocess, pytest.mark.tls, pytest.mark.slow]

TOLERANCE = 1e-5  # max abs difference of any trained number, one round
ROUNDS_TOLERANCE = 1e-3  # relative difference of the update over several rounds
CPU = torch.device("cpu")
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "num_experts": 4, "top_k": 2}


def _data() -> ExampleBatches:
    train, _ = build_silo_dataset(silo_index=0, num_silos=1, domains=["shift_up", "copy", "reverse"],
                                  partition="domain", alpha=0.5, samples_per_silo=64, eval_fraction=0.25, seed=0)
    return ExampleBatches(train, ByteTokenizer(), 24)


def _start_state(model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """A trainable state away from PEFT's zero LoRA B (as after a first round), so every factor learns."""
    generator = torch.Generator().manual_seed(1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator)
            for k, v in trainable_state(build_model(model_config)).items()}


def _train(model_config: ModelConfig, start: dict[str, torch.Tensor], data: ExampleBatches, plan: RoundPlan,
           world_size: int, parallel: str = "ddp", checkpointing: bool = False):
    model = build_model(model_config)
    load_trainable_state(model, start)
    if world_size == 1:
        result = train_locally(model, data, plan, CPU)
        return trainable_state(model), result
    setup = RankSetup(model_config, parallel, world_size, cuda=False, activation_checkpointing=checkpointing)
    ranks = SiloRanks(model, setup, data, CPU)
    try:
        result = ranks.train(plan)
        return ranks.trainable_state(), result
    finally:
        ranks.close()




@pytest.mark.parametrize("parallel,mode,checkpointing", [
    ("ddp", "full", False), pytest.param("fsdp", "full", False, marks=pytest.mark.ci_only),
    pytest.param("ddp", "lora", False, marks=pytest.mark.ci_only), ("fsdp", "lora", True)])
def test_two_processes_give_the_one_process_update_with_accumulation_and_prox(parallel, mode, checkpointing):
    """LoRA on the experts or whole experts, the router trained too, each sharded (fsdp) or replicated (ddp);
    activation checkpointing recomputes the same numbers."""
    model_config = ModelConfig.model_validate({"builtin": TINY, "trainable": {"mode": mode, "router": True}})
    data = _data()
    plan = RoundPlan(local_steps=2, batch_size=5, grad_accum=2, learning_rate=0.01, prox_mu=0.5, seed=5)
    # the first batch splits 3 + 2 rows with unequal token counts: a mean of per-rank means would be wrong
    first = data.sample(plan.batch_size, torch.Generator().manual_seed(plan.seed))
    assert scored_tokens(shard_rows(first, 0, 2)) != scored_tokens(shard_rows(first, 1, 2))
    start = _start_state(model_config)
    one, one_result = _train(model_config, start, data, plan, 1)
    two, two_result = _train(model_config, start, data, plan, 2, parallel, checkpointing)
    assert set(one) == set(two)
    gap = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert gap < TOLERANCE < moved, (gap, moved)
    assert (two_result.steps, two_result.tokens) == (one_result.steps, one_result.tokens)
    assert two_result.loss_first == pytest.approx(one_result.loss_first, abs=1e-5)
    assert two_result.loss_last == pytest.approx(one_result.loss_last, abs=1e-5)


def test_agent_with_world_size_2_sends_the_same_update(tmp_path):
    """Through the agent's training call: one silo, one FedAvg round, world_size 1 against 2 (ddp, and fsdp,
    where the agent evaluates, loads and reads its model as rank 0's shard); the last case reads the same
    model from a local checkpoint, which under fsdp is handed to the ranks as it is read, layer by layer
    (the aggregator, which loads it whole, accepts the silo's base fingerprint when it joins)."""
    globals_ = []
    for world_size, parallel, local in ((1, "ddp", False), (2, "ddp", False), (2, "fsdp", False), (2, "fsdp", True)):
        config = smoke_config(tmp_path / f"{world_size}{parallel}{local}", min_silos=1, rounds=1, min_group_size=1)
        if local:
            config = as_local_checkpoint(config, tmp_path / "checkpoint")
        data = silo_config(config, "silo0", 0, index=0, num_silos=1).model_dump(mode="json")
        data["silo"].update(world_size=world_size, parallel=parallel)
        coordinator = run_in_process(config, [parse_config(data)])
        assert coordinator.machine.succeeded
        globals_.append(coordinator.global_units)
    one, *others = globals_
    for two in others:
        assert max(float(np.abs(one[u] - two[u]).max()) for u in one) < TOLERANCE


class _BrokenTokenizer(ByteTokenizer):
    """Maps '!' outside the model's vocabulary: the rank that draws that row fails in its forward."""

    def encode(self, text: str) -> list[int]:
        return [999 if c == ord("!") else c for c in super().encode(text)]


def test_a_failing_rank_is_one_error_line_not_a_hang():
    model_config = ModelConfig.model_validate({"builtin": TINY})
    # two rows, two ranks: exactly one rank holds the broken row; the other waits in DDP's all-reduce
    data = ExampleBatches([Example("ab=", "ba", "copy"), Example("cd=", "!!", "copy")], _BrokenTokenizer(), 24)
    model = build_model(model_config)
    ranks = SiloRanks(model, RankSetup(model_config, "ddp", 2, cuda=False, timeout_s=120), data, CPU)
    try:
        began = time.monotonic()
        with pytest.raises(RunError) as caught:
            ranks.train(RoundPlan(local_steps=2, batch_size=2))
        assert time.monotonic() - began < 60  # the failure, not the process group's timeout, ended it
    finally:
        ranks.close()
    message = str(caught.value)
    assert "\n" not in message and "of 2 failed" in message and "IndexError" in message
    assert multiprocessing.active_children() == []


def test_world_size_settings_are_checked():
    visible = torch.cuda.device_count()
    wanted = max(2, visible + 1)
    with pytest.raises(ConfigError, match=rf"world_size = {wanted}: only {visible} GPU\(s\) visible"):
        check_world_size(SiloConfig(name="s", device="cuda", world_size=wanted))
    check_world_size(SiloConfig(name="s", device="cpu", world_size=4))  # CPU: any number of processes
    with pytest.raises(ConfigError, match="world_size=2 with dp.enabled"):
        parse_config({"silo": {"name": "s", "world_size": 2, "dp": {"enabled": True, "noise_multiplier": 1.0}}})
    with pytest.raises(ConfigError, match="parallel 'fsdp' with dp.enabled: DP-SGD does not run on sharded models"):
        parse_config({"silo": {"name": "s", "parallel": "fsdp", "dp": {"enabled": True, "noise_multiplier": 1.0}}})
    with pytest.raises(ConfigError, match="silo.parallel"):
        parse_config({"silo": {"name": "s", "world_size": 2, "parallel": "zero3"}})
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        parse_config({"silo": {"name": "s", "device": "cuda:1", "world_size": 2}})
    with pytest.raises(ConfigError, match="silo.world_size = 0"):
        parse_config({"silo": {"name": "s", "world_size": 0}})


def test_a_batch_smaller_than_world_size_trains_in_one_process():
    model_config = ModelConfig.model_validate({"builtin": TINY})
    start, data, plan = _start_state(model_config), _data(), RoundPlan(local_steps=2, batch_size=1)
    one, one_result = _train(model_config, start, data, plan, 1)
    two, two_result = _train(model_config, start, data, plan, 2)  # no process started
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert (two_result.tokens, two_result.loss_last) == (one_result.tokens, one_result.loss_last)


def test_ranks_persist_across_rounds_and_a_rank_killed_mid_round_costs_that_round_only():
    """fsdp, LoRA on experts and router: three rounds on the same rank processes (one model build each),
    then SIGKILL to rank 1 while it trains: one error line, and the next round runs on fresh ranks and
    still gives the one-process update."""
    model_config = ModelConfig.model_validate({"builtin": TINY, "trainable": {"mode": "lora", "router": True}})
    data, start = _data(), _start_state(model_config)
    plan = RoundPlan(local_steps=2, batch_size=4, learning_rate=0.01, seed=3)
    model = build_model(model_config)
    load_trainable_state(model, start)
    ranks = SiloRanks(model, RankSetup(model_config, "fsdp", 2, cuda=False), data, CPU)
    try:
        pids = ranks.pids
        for _ in range(3):
            ranks.train(plan)
            assert ranks.pids == pids and ranks.builds_per_rank == [1, 1] and ranks.starts == 1
        reference = build_model(model_config)  # the one-process model trained the same three rounds
        load_trainable_state(reference, start)
        for _ in range(3):
            train_locally(reference, data, plan, CPU)
        # three rounds, each a fresh AdamW whose first steps divide a gradient by its own size: a
        # summation order's rounding grows past 1e-5 absolute; the update still agrees to 1e-3 relative
        assert _relative_gap(ranks.trainable_state(), trainable_state(reference), start) < ROUNDS_TOLERANCE

        killer = threading.Timer(1.0, os.kill, (pids[0], signal.SIGKILL))
        killer.start()
        began = time.monotonic()
        with pytest.raises(RunError) as caught:
            ranks.train(RoundPlan(local_steps=100_000, batch_size=4, seed=4))  # far longer than the timer
        killer.join()
        assert time.monotonic() - began < 30  # the death, not a timeout, ended the round
        assert str(caught.value) == "local training process 1 of 2 failed: exited with signal SIGKILL"

        ranks.load_trainable_state(start)  # the next round starts from the global model again, on fresh ranks
        ranks.train(plan)
        assert ranks.starts == 2 and ranks.pids != pids and ranks.builds_per_rank == [2, 1]
        once = build_model(model_config)
        load_trainable_state(once, start)
        train_locally(once, data, plan, CPU)
        assert _gap(ranks.trainable_state(), trainable_state(once)) < TOLERANCE
    finally:
        ranks.close()
    assert multiprocessing.active_children() == []


def test_under_fsdp_the_agent_model_is_rank_0s_shard_and_its_forwards_lead_the_other_ranks(monkeypatch):
    """The agent's model under fsdp is rank 0's shard (the whole model it was built from is dropped):
    evaluation through it, routing meter attached, gives one process's losses and routing; the trainable
    state loads and reads back whole; a name it lacks is refused before any rank is told; a batch of
    fewer rows than ranks trains (a stand-in row that counts nil on the rank without rows) to one
    process's update, with no group gathered out of its turn (the embeddings and head while a layer runs;
    on the CPU, the layer before one whose backward runs); and the group is still in step for the next
    evaluation. A forward that fails part-way on rank 0 alone leaves the others inside it: the group is
    started afresh before its next use."""
    model_config = ModelConfig.model_validate({"builtin": TINY, "trainable": {"mode": "lora", "router": True}})
    train, held_out = build_silo_dataset(silo_index=0, num_silos=1, domains=["shift_up", "copy"], partition="domain",
                                         alpha=0.5, samples_per_silo=32, eval_fraction=0.25, seed=0)
    data, eval_data = ExampleBatches(train, ByteTokenizer(), 24), ExampleBatches(held_out, ByteTokenizer(), 24)
    start = _start_state(model_config)
    one = build_model(model_config)
    load_trainable_state(one, start)
    gathers: list[weakref.ref] = []  # rank 0's all-gather buffers (this process)
    real_gather = dist.all_gather_single  # what FSDP2 gathers a group with

    def gather(output: torch.Tensor, *args, **kwargs):
        gathers.append(weakref.ref(output))
        return real_gather(output, *args, **kwargs)

    def no_gather_held() -> bool:
        """Every gather's buffer let go. Gloo's worker thread drops its own reference to a finished
        gather a moment after FSDP did, so wait for that (a buffer FSDP itself still holds stays alive
        however long this waits: FSDP is blocked in this hook)."""
        deadline = time.monotonic() + 5
        while any(buffer() is not None for buffer in gathers):
            if time.monotonic() > deadline:
                return False
            gc.collect()
            time.sleep(0.01)
        return True

    monkeypatch.setattr(dist, "all_gather_single", gather)
    ranks = SiloRanks(build_model(model_config), RankSetup(model_config, "fsdp", 2, cuda=False), data, CPU)
    try:
        shard = sum(p.to_local().numel() for p in ranks.model.parameters())
        assert shard <= 0.55 * sum(p.numel() for p in one.parameters())  # rank 0 keeps about half
        ranks.load_trainable_state(start)
        assert _gap(ranks.trainable_state(), start) == 0
        with pytest.raises(LayoutError, match="'nope' is not trainable"):
            ranks.load_trainable_state({"nope": torch.zeros(1)})
        for _ in range(2):  # before and after training: the other ranks follow every forward
            expected_meter, meter = RoutingMeter(), RoutingMeter()
            expected = evaluate(one, eval_data, CPU, 4, meter=expected_meter)
            got = evaluate(ranks.model, eval_data, CPU, 4, meter=meter)
            assert set(got) == set(expected) and all(got[d][1] == expected[d][1] for d in expected)
            assert all(got[d][0] == pytest.approx(expected[d][0], rel=1e-5) for d in expected)
            assert set(meter.mass) == set(expected_meter.mass) and all(
                torch.allclose(meter.mass[k], expected_meter.mass[k], atol=1e-4) for k in meter.mass)
            plan = RoundPlan(local_steps=2, batch_size=1, learning_rate=0.01, seed=3)
            seen: list[list[bool]] = []
            vocabulary = vocabulary_modules(ranks.model)  # untied: each an FSDP group, not part of the root

            layers = decoder_layers(ranks.model)

            def while_a_layer_runs(*_):  # the embeddings were sharded again once they ran; the head is not gathered
                # yet; and on the CPU no gather's buffer outlives its copy into the layer's parameters
                seen.append([isinstance(next(m.parameters()), DTensor) for m in vocabulary] + [no_gather_held()])

            def after_its_backward(*_):  # the layer before is not being gathered ahead of its turn
                seen.append([no_gather_held()])

            handles = [layers[1].register_forward_pre_hook(while_a_layer_runs),
                       layers[1].register_full_backward_hook(after_its_backward)]
            ranks.train(plan)
            for handle in handles:
                handle.remove()
            assert len(vocabulary) == 2 and len(seen) == 2 * plan.local_steps and all(all(s) for s in seen)
            assert gathers  # the spy saw FSDP's gathers (else "none held" would say nothing)
            train_locally(one, data, plan, CPU)
            assert _gap(ranks.trainable_state(), trainable_state(one)) < TOLERANCE

        def out_of_memory(*_):  # rank 0 alone fails inside a forward, as running out of memory there would
            raise MemoryError("rank 0 only")

        pids, handle = ranks.pids, decoder_layers(ranks.model)[1].register_forward_pre_hook(out_of_memory)
        with pytest.raises(MemoryError):
            evaluate(ranks.model, eval_data, CPU, 4)
        handle.remove()
        ranks.load_trainable_state(trainable_state(one))  # the group is out of step: started afresh first
        assert ranks.starts == 2 and ranks.pids != pids
        assert _gap(ranks.trainable_state(), trainable_state(one)) == 0
        assert evaluate(ranks.model, eval_data, CPU, 4).keys() == expected.keys()
    finally:
        ranks.close()
    assert multiprocessing.active_children() == []


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """|update_a - update_b| / |update_b| over every trainable number (updates from ``start``)."""
    assert set(a) == set(b) == set(start)
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    return diff / sum(float(((b[k] - start[k]) ** 2).sum()) for k in b) ** 0.5


def _silo_process(command: list[str], path, log_path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(command + ["silo", str(path), "--no-progress"], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))


def test_a_silo_under_torchrun_keeps_its_ranks_through_a_real_federation(tmp_path, pki, aggregator_factory):
    """Three rounds over real gRPC + mutual TLS: silo0 is ``torchrun --nproc-per-node 2 -m fcmoe silo``
    with its model sharded (fsdp, router trained), the others are plain silos; the model is a local
    checkpoint, which silo0's rank 0 hands to the ranks as it reads it, layer by layer. Every round takes
    all three updates; silo0's ranks start once and each builds its model once."""
    data = as_local_checkpoint(smoke_config(tmp_path, min_silos=3, rounds=3), tmp_path / "checkpoint").model_dump(
        mode="json")
    data["model"]["trainable"]["router"] = True
    config = parse_config(data)
    agg = aggregator_factory(config)
    procs = []
    try:
        for index, name in enumerate(["silo0", "silo1", "silo2"]):
            silo = silo_config(config, name, agg.port, index=index).model_dump(mode="json")
            command = [sys.executable, "-m", "fcmoe"]
            if index == 0:
                silo["silo"]["parallel"] = "fsdp"
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "fcmoe"]
            dump_config(parse_config(silo), tmp_path / f"{name}.yaml")
            procs.append(_silo_process(command, tmp_path / f"{name}.yaml", tmp_path / f"{name}.log"))
        statuses = [proc.wait(timeout=300) for proc in procs]
    finally:
        kill_process_groups(procs)
    logs = [(tmp_path / f"silo{i}.log").read_text() for i in range(3)]
    assert statuses == [0, 0, 0], [text[-3000:] for text in logs]
    rows = [json.loads(line) for line in (config.run.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["updates"] == 3 for r in rows[1:])
    assert logs[0].count("event=ranks_started") == 1 and "launcher=torchrun" in logs[0]
    assert logs[0].count("event=distributed_training_done") == 3
    assert logs[0].count("builds=1/1 ") == 3
    assert logs[0].count("event=checkpoint_read") == 1 and "event=checkpoint_read" not in logs[1]


@pytest.mark.parametrize("parallel", [pytest.param("ddp", marks=pytest.mark.ci_only), "fsdp"])
def test_a_silo_whose_rank_dies_sits_out_that_round_and_trains_the_next(tmp_path, caplog, parallel):
    """In a federation of three (silo0 on two ranks), rank 1 of silo0 is killed as round 2 reaches it:
    silo0 declines round 2 in one line, the round goes on with the other two, and round 3 has all three.
    Under fsdp the first collective to fail is the agent loading the global model into the shards; there
    rank 1 is also killed as the final evaluation reaches silo0 (evaluation is collective under fsdp):
    silo0 evaluates once more on fresh ranks and reports."""
    config = smoke_config(tmp_path, min_silos=2, rounds=3)
    silos = []
    for index in range(3):
        data = silo_config(config, f"silo{index}", 0, index=index).model_dump(mode="json")
        data["silo"]["world_size"] = 2 if index == 0 else 1
        data["silo"]["parallel"] = parallel
        silos.append(parse_config(data))
    agents: list = []

    def kill_rank_at_round_2(silo: str, task) -> bool:
        if silo == "silo0" and task.kind == task.TRAIN and task.round == 2 and agents[0].ranks.starts == 1:
            os.kill(agents[0].ranks.pids[0], signal.SIGKILL)
        if silo == "silo0" and task.kind == task.EVALUATE and parallel == "fsdp" and agents[0].ranks.starts == 2:
            os.kill(agents[0].ranks.pids[0], signal.SIGKILL)
        return False

    with caplog.at_level(logging.WARNING, logger="silo_agent.agent"):
        coordinator = run_in_process(config, silos, kill_rank_at_round_2, agents=agents)
    assert coordinator.machine.succeeded
    rows = [json.loads(line) for line in (config.run.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["updates"] for r in rows[1:]] == [3, 2, 3]
    declined = [r.getMessage() for r in caplog.records
                if r.name == "silo_agent.agent" and "event=round_declined" in r.getMessage()]
    assert len(declined) == 1 and "round=2" in declined[0]
    assert "local training process 1 of 2 failed: exited with signal SIGKILL" in declined[0]
    retried = [r.getMessage() for r in caplog.records if "event=final_evaluation_retried" in r.getMessage()]
    assert len(retried) == (1 if parallel == "fsdp" else 0)
    assert agents[0].ranks.starts == (3 if parallel == "fsdp" else 2) and multiprocessing.active_children() == []


def test_a_rank_that_dies_before_joining_fails_the_start_at_once():
    """A spawned rank that cannot start (here: a thread count torch refuses) is named in one line within
    seconds; rank 0 does not wait out the rendezvous timeout."""
    model_config = ModelConfig.model_validate({"builtin": TINY})
    began = time.monotonic()
    with pytest.raises(RunError) as caught:
        SiloRanks(build_model(model_config), RankSetup(model_config, "ddp", 2, cuda=False, threads=0, timeout_s=300),
                  _data(), CPU)
    assert time.monotonic() - began < 60
    message = str(caught.value)
    assert message.startswith("local training process 1 of 2 failed: RuntimeError: ") and "\n" not in message
    assert multiprocessing.active_children() == [] and not torch.distributed.is_initialized()


def test_a_checkpoint_that_fails_part_way_through_the_hand_out_is_rank_0s_one_line(tmp_path):
    """Under fsdp rank 0 hands out a local checkpoint as it reads it; one that lacks a tensor fails only after
    the ranks took the rest. The other ranks are told, leave without a note of their own, and the start
    fails in one line naming the tensor, at once (no rank waits out the group's timeout)."""
    from safetensors.torch import load_file, save_file

    from fcmoe.model.stream import CheckpointStream

    config = as_local_checkpoint(smoke_config(tmp_path), tmp_path / "checkpoint")
    tensors = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, str(tmp_path / "checkpoint" / "model.safetensors"), metadata={"format": "pt"})
    began = time.monotonic()
    with pytest.raises(RunError) as caught:
        SiloRanks(CheckpointStream(config.model), RankSetup(config.model, "fsdp", 2, cuda=False, timeout_s=300),
                  _data(), CPU)
    assert time.monotonic() - began < 60
    message = str(caught.value)
    assert message.startswith("local training process 0 of 2 failed: LayoutError: model.path = ") and "\n" not in message
    assert "the checkpoint holds no value for 1 tensor(s) of the model" in message
    assert multiprocessing.active_children() == [] and not torch.distributed.is_initialized()


def test_fc_moe_with_a_sharded_silo_gives_the_global_model_of_one_process(tmp_path):
    """The FC-MoE set-up users run (configs/demo_fcmoe.yaml's defaults: routing-weighted importance, each
    silo projecting its delta and re-anchoring part of it, the personal adapter; router trained) with a
    local checkpoint, three silos, two rounds: silo0 on two fsdp ranks, which read the checkpoint layer
    by layer, gives the global model silo0 gives in one process."""
    globals_ = []
    for world_size in (1, 2):
        config = as_local_checkpoint(smoke_config(tmp_path / str(world_size), strategy={"name": "fcmoe"}, min_silos=3,
                                                  rounds=2, min_group_size=2), tmp_path / "checkpoint")
        silos = []
        for index in range(3):
            data = silo_config(config, f"silo{index}", 0, index=index).model_dump(mode="json")
            if index == 0:
                data["silo"].update(world_size=world_size, parallel="fsdp")
            silos.append(parse_config(data))
        coordinator = run_in_process(config, silos)
        assert coordinator.machine.succeeded
        rows = [json.loads(line) for line in (config.run.output_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["updates"] for r in rows[1:]] == [3, 3]
        globals_.append(coordinator.global_units)
    one, two = globals_
    assert max(float(np.abs(one[u] - two[u]).max()) for u in one) < TOLERANCE
