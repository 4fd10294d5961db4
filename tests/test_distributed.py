"""A silo's local training over ``world_size`` processes (gloo on CPU) equals one process's.

"Equal" is the largest absolute difference of any trained number, below 1e-5 (float32 sums taken
in another order; the measured gap is about 1e-7). Each spawn of two ranks costs a few seconds of
interpreter and model start-up, so the cases are few and each covers several features.
"""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest
import torch
from conftest import silo_config, smoke_config

from fcmoe.config import ModelConfig, SiloConfig, parse_config
from fcmoe.errors import ConfigError, RunError
from fcmoe.inprocess import run_in_process
from fcmoe.model import build_model, load_trainable_state, trainable_state
from silo_agent.data import ByteTokenizer, Example, ExampleBatches, build_silo_dataset
from silo_agent.distributed import RankSetup, SiloRanks, check_world_size, scored_tokens, shard_rows
from silo_agent.training import LocalPlan, train_locally

TOLERANCE = 1e-5  # max abs difference of any trained number
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


def _train(model_config: ModelConfig, start: dict[str, torch.Tensor], data: ExampleBatches, plan: LocalPlan,
           world_size: int, parallel: str = "ddp"):
    model = build_model(model_config)
    load_trainable_state(model, start)
    if world_size == 1:
        result = train_locally(model, data, plan, CPU)
    else:
        ranks = SiloRanks(model, RankSetup(model_config, parallel, world_size, cuda=False), data, CPU)
        try:
            result = ranks.train(plan)
        finally:
            ranks.close()
    return trainable_state(model), result


@pytest.mark.parametrize("parallel,mode", [("ddp", "full"), ("fsdp", "full"), ("ddp", "lora"), ("fsdp", "lora")])
def test_two_processes_give_the_one_process_update_with_accumulation_and_prox(parallel, mode):
    """LoRA on the experts or whole experts, the router trained too, each sharded (fsdp) or replicated (ddp)."""
    model_config = ModelConfig.model_validate({"builtin": TINY, "trainable": {"mode": mode, "router": True}})
    data = _data()
    plan = LocalPlan(local_steps=2, batch_size=5, grad_accum=2, learning_rate=0.01, prox_mu=0.5, seed=5)
    # the first batch splits 3 + 2 rows with unequal token counts: a mean of per-rank means would be wrong
    first = data.sample(plan.batch_size, torch.Generator().manual_seed(plan.seed))
    assert scored_tokens(shard_rows(first, 0, 2)) != scored_tokens(shard_rows(first, 1, 2))
    start = _start_state(model_config)
    one, one_result = _train(model_config, start, data, plan, 1)
    two, two_result = _train(model_config, start, data, plan, 2, parallel)
    assert set(one) == set(two)
    gap = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert gap < TOLERANCE < moved, (gap, moved)
    assert (two_result.steps, two_result.tokens) == (one_result.steps, one_result.tokens)
    assert two_result.loss_first == pytest.approx(one_result.loss_first, abs=1e-5)
    assert two_result.loss_last == pytest.approx(one_result.loss_last, abs=1e-5)


def test_agent_with_world_size_2_sends_the_same_update(tmp_path):
    """Through the agent's training call: one silo, one FedAvg round, world_size 1 against 2."""
    globals_ = []
    for world_size in (1, 2):
        config = smoke_config(tmp_path / str(world_size), min_silos=1, rounds=1, min_group_size=1)
        data = silo_config(config, "silo0", 0, index=0, num_silos=1).model_dump(mode="json")
        data["silo"]["world_size"] = world_size
        coordinator = run_in_process(config, [parse_config(data)])
        assert coordinator.machine.succeeded
        globals_.append(coordinator.global_units)
    one, two = globals_
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
            ranks.train(LocalPlan(local_steps=2, batch_size=2))
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
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        parse_config({"silo": {"name": "s", "device": "cuda:1", "world_size": 2}})
    with pytest.raises(ConfigError, match="silo.world_size = 0"):
        parse_config({"silo": {"name": "s", "world_size": 0}})


def test_a_batch_smaller_than_world_size_trains_in_one_process():
    model_config = ModelConfig.model_validate({"builtin": TINY})
    start, data, plan = _start_state(model_config), _data(), LocalPlan(local_steps=2, batch_size=1)
    one, one_result = _train(model_config, start, data, plan, 1)
    two, two_result = _train(model_config, start, data, plan, 2)  # no process started
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert (two_result.tokens, two_result.loss_last) == (one_result.tokens, one_result.loss_last)
