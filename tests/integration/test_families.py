"""Every Mixture-of-Experts causal-LM family registered in the installed transformers, the way users run one.

One case per ``model_type`` (the list is read from transformers when the tests are collected, so a
family added upstream shows up here as a failing case until it is supported): a tiny model of the
family is saved with a tokenizer and loaded through ``model.source: local``; its unit layout is
checked (every trainable number in exactly one unit; changing one expert's unit changes that expert
only), and its routing meter (every MoE layer, shares summing to one); LoRA on experts and router;
two federated rounds in process with FedAvg and with FC-MoE (finite, falling loss); with learning
rate 0 the global model is the start, exactly; one DP step each way. A family that cannot work is in
:data:`families.EXCLUDED` with its reason (docs/models.md lists it), never skipped.

Each case also records what trains and what DP supports; ``make families-table`` writes those rows
into docs/models.md (``FCMOE_FAMILY_ROWS=FILE`` collects them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import silo_config, smoke_config
from families import EXCLUDED, moe_model_types, save_tiny_checkpoint
from fcmoe.config import ModelConfig, parse_config
from fcmoe.errors import ConfigError, LayoutError
from fcmoe.launch.inprocess import run_in_process
from fcmoe.model import ExpertLayout, base_fingerprint, build_model, load_trainable_state, trainable_state
from fcmoe.model.discovery import MoeStructure, discover
from fcmoe.model.stream import CheckpointStream
from fcmoe.plan import RoundPlan

pytestmark = [pytest.mark.slow]

FAMILIES = moe_model_types()
# DP must work here: ghost clipping of full experts and the router (norms checked), and a LoRA step
DP_REQUIRED = {"mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe"}
SILOS = 2
# `make test` runs a slice that covers every way discovery reads a family (fused / transposed with biases /
# 2-D stacked / ParallelExperts / embedding-table experts; routers that are modules, Linears or MLPs;
# meters reading the experts' call, a dense or a sorted router output, product keys; zero-compute rows;
# hybrid and composite models);
# the others are ci_only: .ci/run runs every family transformers registers.
SLICE = ("dbrx", "deepseek_v3", "doge", "gemma4", "gpt_oss", "granitemoe", "jetmoe", "llama4_text",
         "longcat_flash", "mixtral", "nemotron_h", "zaya")
CASES = [pytest.param(t, marks=() if t in SLICE else pytest.mark.ci_only) for t in FAMILIES if t not in EXCLUDED]
# sharded over two ranks: fused experts; shared experts; transposed experts with biases; a router that mixes
# rows of a batch (Doge); input embeddings read outside their forward (Gemma 4). .ci/run: every family.
FSDP_SLICE = ("mixtral", "qwen2_moe", "gpt_oss", "doge", "gemma4")
FSDP_CASES = [pytest.param(t, marks=() if t in FSDP_SLICE else pytest.mark.ci_only)
              for t in FAMILIES if t not in EXCLUDED]
UPDATE_TOLERANCE = 1e-3  # relative difference of one round's update, sharded against one process


def test_the_case_list_is_every_moe_family_of_the_installed_transformers():
    assert len(FAMILIES) >= 40 and {"mixtral", "qwen2_moe", "dbrx", "jetmoe", "gpt_oss"} <= set(FAMILIES)
    assert set(EXCLUDED) <= set(FAMILIES), "an excluded family that transformers no longer has"
    assert set(SLICE) <= set(FAMILIES) - set(EXCLUDED)
    assert len(FAMILIES) - len(EXCLUDED) >= 38


def test_every_excluded_family_is_listed_with_its_reason_in_the_docs():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    for model_type, reason in EXCLUDED.items():
        assert f"| {model_type} | excluded: {reason} |" in doc


def test_a_model_without_experts_is_refused_at_start_naming_its_class(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(LayoutError, match="^LlamaForCausalLM: no expert container found"):
        build_model(ModelConfig(source="local", path=tmp_path / "dense"))


def _local(checkpoint, **trainable) -> ModelConfig:
    return ModelConfig(source="local", path=checkpoint, trainable={"mode": "lora", "lora_rank": 2, "lora_alpha": 4,
                                                                   "router": True, **trainable})


def _effective_experts(model: torch.nn.Module, structure: MoeStructure) -> dict[tuple[int, int], torch.Tensor]:
    """Each (layer, expert)'s effective numbers: base tensors plus PEFT's delta on them."""
    deltas: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if type(module).__name__ == "ParamWrapper":
            param = module.get_param()
            deltas[id(param)] = deltas.get(id(param), 0) + module.get_delta_weight("default").detach()
    out: dict[tuple[int, int], list[torch.Tensor]] = {}
    for layer in structure.layers:
        for t in layer.tensors:
            w = (t.param.detach() + deltas.get(id(t.param), 0)).reshape(t.view)
            for e in range(t.view[0]):
                out.setdefault((layer.index, e), []).append(w[e].reshape(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def check_layout(model: torch.nn.Module) -> ExpertLayout:
    layout = ExpertLayout.from_model(model)
    structure = discover(model)
    sizes = layout.unit_sizes()
    # every trainable number in exactly one unit: each unit's own mark comes back, none is left zero
    marks = {u: np.full(n, i + 1, np.float32) for i, (u, n) in enumerate(sizes.items())}
    merged = layout.merge(marks)
    assert all(bool((t != 0).all()) for t in merged.values())
    back = layout.split(merged)
    assert all(np.array_equal(back[u], marks[u]) for u in marks)
    # changing one expert's unit changes that expert's effective weights only
    experts = [u for u in layout.units if u.is_expert]
    assert experts, "no expert unit"
    target = experts[min(1, len(experts) - 1)]
    state = trainable_state(model)
    before = _effective_experts(model, structure)
    units = layout.split(state)
    units[str(target)] = units[str(target)] + np.random.default_rng(0).normal(0, 0.1, sizes[str(target)]).astype(np.float32)
    load_trainable_state(model, layout.merge(units))
    after = _effective_experts(model, structure)
    load_trainable_state(model, state)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {(target.layer, target.expert)}, (str(target), sorted(changed))
    return layout


def check_routing_meter(model: torch.nn.Module, layout: ExpertLayout, structure: MoeStructure) -> None:
    """Every MoE layer is metered, padding left out, and each layer's expert shares sum to one."""
    from silo_agent.routing import RoutingMeter

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    meter = RoutingMeter()
    with torch.no_grad(), meter.attached(model):
        meter.mask = mask.reshape(-1).bool()
        model(input_ids=ids, attention_mask=mask)
    assert set(meter.mass) == {layer.index for layer in structure.layers}
    assert all(tokens == 20 for tokens in meter.tokens.values()), meter.tokens
    shares = meter.shares(layout)
    for layer in structure.layers:
        total = sum(v for k, v in shares.items() if k.startswith(f"L{layer.index}.E"))
        assert total == pytest.approx(1.0, abs=1e-9), (layer.index, total)


def _federate(tmp_path, checkpoint, strategy: dict, mode: str, learning_rate: float = 0.01):
    config = smoke_config(tmp_path, min_silos=SILOS, rounds=2, min_group_size=1, strategy=strategy)
    data = config.model_dump(mode="json")
    data["model"] = _local(checkpoint, mode=mode).model_dump(mode="json")
    data["federation"]["local"]["learning_rate"] = learning_rate
    config = parse_config(data)
    silos = [silo_config(config, f"silo{i}", 0, index=i, num_silos=SILOS) for i in range(SILOS)]
    return run_in_process(config, silos, run_id="families")


@pytest.mark.parametrize("model_type", CASES)
def test_family_trains_and_federates_from_a_local_checkpoint(model_type, tmp_path):
    checkpoint = tmp_path / model_type
    save_tiny_checkpoint(model_type, checkpoint, seed=0)
    full = build_model(_local(checkpoint, mode="full"))
    structure = discover(full)
    check_layout(full)
    row = {"model_type": model_type, "class": structure.model_class, "experts": structure.num_experts,
           "moe_layers": len(structure.layers), "full": "yes", "router": "yes" if structure.router_params else "no",
           "shared": "yes" if structure.shared_params else "none", "routing": structure.facts.routing}
    mode = "lora"
    if structure.facts.no_lora:  # refused at start with one line naming the class
        with pytest.raises(ConfigError, match=f"not for {structure.model_class}: "):
            build_model(_local(checkpoint))
        mode, row["lora"] = "full", f"no: {structure.facts.no_lora}"
    else:
        row["lora"] = "yes"
    row["attention_lora"] = _attention_lora(checkpoint) if mode == "lora" else "no"
    model = build_model(_local(checkpoint, mode=mode))
    layout = check_layout(model)
    check_routing_meter(model, layout, structure)

    for strategy in ({"name": "fedavg"}, {"name": "fcmoe"}):
        coord = _federate(tmp_path / strategy["name"], checkpoint, strategy, mode)
        losses = [r["global_loss"] for r in coord.metrics.rows()]
        assert coord.machine.succeeded and all(np.isfinite(losses)), losses
        assert losses[-1] < losses[0], (strategy["name"], losses)
    still = _federate(tmp_path / "lr0", checkpoint, {"name": "fedavg"}, mode, learning_rate=0.0)
    start = layout.split(trainable_state(build_model(_local(checkpoint, mode=mode))))
    assert set(still.global_units) == set(start)
    assert all(np.array_equal(still.global_units[u], start[u]) for u in start)

    row.update(_dp_support(checkpoint, row["lora"] == "yes"))
    if model_type in DP_REQUIRED:
        assert row["dp_full"] == "yes (ghost clipping, norms = per-sample)" and row["dp_lora"].startswith("yes"), row
    if os.environ.get("FCMOE_FAMILY_ROWS"):
        with open(os.environ["FCMOE_FAMILY_ROWS"], "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("model_type", CASES)
def test_family_checkpoint_read_layer_by_layer_gives_from_pretrained_tensors(model_type, tmp_path):
    """What a sharded silo hands its ranks (:class:`CheckpointStream`: the checkpoint read one layer at a
    time, through transformers' conversions) is what ``from_pretrained`` loads, tensor for tensor, and
    digests to the same base fingerprint (the aggregator checks it when the silo joins)."""
    save_tiny_checkpoint(model_type, tmp_path, seed=0)
    spec = _local(tmp_path)
    if discover(build_model(_local(tmp_path, mode="full"))).facts.no_lora:
        spec = _local(tmp_path, mode="full")
    whole = build_model(spec)
    expected = dict(whole.named_parameters())
    expected.update(whole.named_buffers())
    stream = CheckpointStream(spec)
    got = {}
    for name, tensor in stream:
        assert name not in got, f"{name} twice"
        got[name] = (tensor.shape, tensor.dtype, "lora_" in name or torch.equal(tensor, expected[name]))
    assert got.keys() == expected.keys()
    assert [n for n, (shape, dtype, same) in got.items()
            if not same or shape != expected[n].shape or dtype != expected[n].dtype] == []
    assert stream.fingerprint() == base_fingerprint(whole)


@pytest.mark.subprocess
@pytest.mark.parametrize("model_type", FSDP_CASES)
def test_family_sharded_over_two_ranks_evaluates_and_trains_as_one_process(model_type, tmp_path, caplog):
    """``silo.parallel: fsdp`` on two ranks (gloo), the checkpoint handed out to them as it is read layer by
    layer (as the agent does), the agent's model being rank 0's shard: evaluation
    through it, routing meter attached, gives one process's losses and routing (every rank runs the
    whole batch; measured: the same bits), and a round of training gives one process's update to 1e-3
    relative. A family whose training depends on how the batch is split (``FamilyFacts.split_changes_update``:
    Doge's router mixes the rows of a batch, PhiMoE's samples experts at random) cannot give that update:
    the silo says so at start, in one warning."""
    from silo_agent.data import ByteTokenizer, ExampleBatches, build_silo_dataset
    from silo_agent.distributed import RankSetup, SiloRanks
    from silo_agent.routing import RoutingMeter
    from silo_agent.training import evaluate, train_locally

    checkpoint, cpu = tmp_path / model_type, torch.device("cpu")
    save_tiny_checkpoint(model_type, checkpoint, seed=0)
    spec = _local(checkpoint, mode="full" if discover(build_model(_local(checkpoint, mode="full"))).facts.no_lora
                  else "lora")
    train, held_out = build_silo_dataset(silo_index=0, num_silos=1, domains=["shift_up", "copy"], partition="domain",
                                         alpha=0.5, samples_per_silo=16, eval_fraction=0.25, seed=0)
    data, eval_data = ExampleBatches(train, ByteTokenizer(), 24), ExampleBatches(held_out, ByteTokenizer(), 24)
    one = build_model(spec)
    generator = torch.Generator().manual_seed(1)  # away from PEFT's zero LoRA B, as after a first round
    start = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in trainable_state(one).items()}
    load_trainable_state(one, start)
    with caplog.at_level("WARNING", logger="silo_agent.distributed"):
        ranks = SiloRanks(CheckpointStream(spec), RankSetup(spec, "fsdp", 2, cuda=False, timeout_s=120), data, cpu)
    try:
        ranks.load_trainable_state(start)
        expected_meter, meter = RoutingMeter(), RoutingMeter()
        expected = evaluate(one, eval_data, cpu, 4, meter=expected_meter)
        got = evaluate(ranks.model, eval_data, cpu, 4, meter=meter)
        assert got.keys() == expected.keys() and all(got[d][1] == expected[d][1] for d in expected)
        assert all(got[d][0] == pytest.approx(expected[d][0], rel=1e-6) for d in expected)
        assert meter.mass.keys() == expected_meter.mass.keys()
        assert all(torch.allclose(meter.mass[k], expected_meter.mass[k], atol=1e-6) for k in meter.mass)
        plan = RoundPlan(local_steps=2, batch_size=4, learning_rate=0.01, seed=3)
        ranks.train(plan)
        train_locally(one, data, plan, cpu)
        sharded, alone = ranks.trainable_state(), trainable_state(one)
    finally:
        ranks.close()
    gap = sum(float(((sharded[k] - alone[k]).double() ** 2).sum()) for k in alone) ** 0.5
    moved = sum(float(((alone[k] - start[k]).double() ** 2).sum()) for k in alone) ** 0.5
    warned = [r.getMessage() for r in caplog.records if "event=update_differs_from_one_process" in r.getMessage()]
    if discover(one).facts.split_changes_update:
        assert len(warned) == 1 and "the batch is split over 2 processes" in warned[0], warned
        assert gap > UPDATE_TOLERANCE * moved
    else:
        assert not warned and gap <= UPDATE_TOLERANCE * moved, (gap, moved)


def _attention_lora(checkpoint) -> str:
    """LoRA on attention's q/v projections too: the layout still holds (or a one-line refusal)."""
    try:
        check_layout(build_model(_local(checkpoint, attention_lora=True)))
    except ConfigError as exc:
        assert "has no attention projection named q_proj or v_proj" in str(exc)
        return "no (no q_proj / v_proj)"
    return "yes"


def _dp_support(checkpoint, lora: bool) -> dict[str, str]:
    """One private step each way, with the engine a DP silo picks (training.private_step_parts): ghost
    clipping where it covers every trainable tensor, else exact per-sample gradients by vmap."""
    from silo_agent.dp.ghost import GhostClipping
    from silo_agent.dp.per_sample import PerSampleGradients
    from silo_agent.dp.training import DpStep, private_step_parts

    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    out = {"dp_lora": "no LoRA"}
    for key, mode in (("dp_full", "full"), ("dp_lora", "lora"))[:1 + lora]:
        model = build_model(_local(checkpoint, mode=mode)).eval()
        try:
            with torch.no_grad():
                before = model(input_ids=ids).logits
            engine, _ = private_step_parts(model, DpStep(1.0, 1.0, 0.5), 2, 0.01)
            with torch.no_grad():  # the engines' forward (dense experts, eager attention) is the family's own
                torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)
            kind = "per-sample"
            if isinstance(engine, GhostClipping):  # its norms are the exact per-sample gradients' norms
                kind = "ghost clipping, norms = per-sample"
                try:
                    grads, _ = PerSampleGradients(model)(batch)
                except RuntimeError:  # vmap cannot run this family's layers (in-place linear attention)
                    kind = "ghost clipping; no per-sample reference"
                else:
                    exact = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()))
                    torch.testing.assert_close(engine.norms(batch)[1].float(), exact, rtol=1e-4, atol=1e-7)
            losses = engine.clip(batch)
            out[key] = f"yes ({kind})" if bool(torch.isfinite(losses).all()) else "non-finite loss"
        except Exception as exc:  # recorded for the table; asserted for DP_REQUIRED
            out[key] = f"no: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    return out
