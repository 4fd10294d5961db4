"""Exact per-sample gradients for MoE experts (fused tensors, LoRA on them, routers, attention LoRA),
against a per-example loop, on Mixtral-, Qwen2-MoE-, OLMoE-, DeepSeek-V3-, GPT-OSS- and GraniteMoE-style
tiny models; ghost clipping's norms against them; and Opacus' DPOptimizer clipping them."""

from __future__ import annotations

import tempfile

import pytest
import torch
from opacus.optimizers import DPOptimizer

from families import save_tiny_checkpoint
from fcmoe.config import ModelConfig
from fcmoe.model import build_model
from silo_agent.data import IGNORE_INDEX
from silo_agent.dp.per_sample import PerSampleGradients, sample_loss

BUILTIN = ("mixtral", "qwen2_moe", "olmoe")
# more Hugging Face families, as tiny checkpoints (tests/families.py): GPT-OSS stores its stacks
# transposed with per-expert biases, DeepSeek-V3 routes by groups with shared experts, GraniteMoE
# keeps its experts under block_sparse_moe
FAMILIES = ("deepseek_v3", "gpt_oss", "granitemoe")
CASES = [(family, mode, attention) for family in BUILTIN
         for mode, attention in (("full", False), ("lora", False), ("lora", True))]
CASES += [(family, mode, False) for family in FAMILIES for mode in ("full", "lora")]


def tiny(family: str, mode: str, attention_lora: bool):
    trainable = {"mode": mode, "router": True, "lora_rank": 4, "lora_alpha": 8, "attention_lora": attention_lora}
    if family in BUILTIN:
        spec = ModelConfig.model_validate({
            "source": "builtin",
            "builtin": {"family": family, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                        "num_kv_heads": 2, "num_experts": 4, "top_k": 2},
            "trainable": trainable})
        model = build_model(spec, "cpu", seed=0)
    else:
        with tempfile.TemporaryDirectory() as folder:
            save_tiny_checkpoint(family, folder, seed=0)
            model = build_model(ModelConfig(source="local", path=folder, trainable=trainable), "cpu", seed=0)
    with torch.no_grad():  # LoRA B starts at zero, which would leave A's gradients zero: make both count
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def batch(size: int = 5, length: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (size, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    mask[1, 8:] = 0  # a right-padded row
    labels[1, 8:] = IGNORE_INDEX
    labels[2, :4] = IGNORE_INDEX  # a prompt whose loss does not count
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family,mode,attention_lora", CASES)
def test_per_sample_gradients_equal_a_per_example_loop(family, mode, attention_lora):
    model = tiny(family, mode, attention_lora)
    data = batch()
    grads, losses = PerSampleGradients(model)(data)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(trainable)
    if mode == "lora":
        assert any("lora_A" in n and "experts" in n for n in trainable)
    for i in range(data["input_ids"].shape[0]):
        model.zero_grad()
        logits = model(input_ids=data["input_ids"][i:i + 1], attention_mask=data["attention_mask"][i:i + 1]).logits
        loss = sample_loss(logits, data["labels"][i:i + 1])
        loss.backward()
        assert float(losses[i]) == pytest.approx(float(loss.detach()), rel=1e-5)
        for name, p in trainable.items():
            assert grads[name].shape[1:] == p.shape
            rel = float((grads[name][i] - p.grad).norm() / p.grad.norm().clamp_min(1e-12))
            assert rel < 1e-5, (name, i, rel)


def test_left_padding_is_refused():
    model = tiny("mixtral", "lora", False)
    data = batch()
    data["attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="right-padded"):
        PerSampleGradients(model)(data)


def test_opacus_dp_optimizer_clips_the_supplied_per_sample_gradients():
    model = tiny("qwen2_moe", "lora", True)
    data = batch(size=6)
    engine = PerSampleGradients(model)
    grads, _ = engine(data)
    params = list(engine.trainable.values())
    clip = 0.05
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=6)
    norms = torch.sqrt(sum(g.reshape(6, -1).pow(2).sum(1) for g in grads.values()))
    assert bool((norms > clip).all())  # every sample is clipped at this bound
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = {n: torch.einsum("b,b...->...", factor, g) / 6 for n, g in grads.items()}
    before = {n: p.detach().clone() for n, p in engine.trainable.items()}
    optimizer.zero_grad()
    engine.clip(data)
    optimizer.step()
    for name, p in engine.trainable.items():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], rtol=1e-4, atol=1e-7)


def test_a_second_engine_on_the_same_model_gives_the_same_gradients():
    model = tiny("olmoe", "lora", False)
    data = batch()
    first, _ = PerSampleGradients(model)(data)
    second, _ = PerSampleGradients(model)(data)  # e.g. the next round's engine
    for name, g in first.items():
        torch.testing.assert_close(second[name], g)


GHOST_CASES = [(family, mode) for family in BUILTIN + FAMILIES for mode in ("full", "lora")]


@pytest.mark.parametrize("family,mode", GHOST_CASES)
def test_ghost_clipping_gives_the_per_sample_norms_and_the_clipped_sum(family, mode):
    from silo_agent.dp.ghost import GhostClipping, supports

    model = tiny(family, mode, False)
    assert supports(model)
    data = batch()
    grads, _ = PerSampleGradients(model)(data)
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()))
    ghost = GhostClipping(model, max_grad_norm=0.05)
    _, ghost_norms = ghost.norms(data)
    torch.testing.assert_close(ghost_norms.float(), norms, rtol=1e-5, atol=0)
    model.zero_grad()
    ghost.clip(data)
    factor = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    for name, p in ghost.trainable.items():
        expected = torch.einsum("b,b...->...", factor, grads[name])
        assert float((p.grad - expected).norm() / expected.norm()) < 1e-5, name


def test_attention_lora_goes_through_per_sample_gradients():
    from silo_agent.dp.ghost import supports
    from silo_agent.dp.training import DpStep, private_step_parts

    model = tiny("mixtral", "lora", True)
    assert not supports(model)
    engine, optimizer = private_step_parts(model, DpStep(1.0, 1.0, 0.1), 8, 1e-3)
    assert isinstance(engine, PerSampleGradients) and type(optimizer) is DPOptimizer
