"""The CUDA paths give what the CPU paths give: local training (with the personal adapter), DP's
per-sample gradients and ghost clipping, a whole in-process round, and bfloat16 training.

Skipped where no GPU is visible (the CI machines have none); run on a GPU host with
``python -m pytest -q tests/test_cuda.py``. Float32 on both sides; TF32 is off, so the only
differences are the order of floating-point sums in the kernels.
"""

import numpy as np
import pytest
import torch
from conftest import silo_config, smoke_config
from test_dp_per_sample import GHOST_CASES, batch, tiny

from fcmoe.config import parse_config
from fcmoe.inprocess import run_in_process
from fcmoe.model import build_model
from fcmoe.model.build import trainable_state
from silo_agent.agent import load_data
from silo_agent.dp.ghost import GhostClipping
from silo_agent.dp.per_sample import PerSampleGradients
from silo_agent.personal import PersonalAdapter
from silo_agent.training import LocalPlan, evaluate, train_locally

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

CPU, GPU = torch.device("cpu"), torch.device("cuda")
PLAN = LocalPlan(local_steps=8, batch_size=8, learning_rate=0.01, seed=3)


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _silo(tmp_path, dtype: str = "float32"):
    data = smoke_config(tmp_path).model_dump(mode="json")
    data["model"]["dtype"] = dtype
    data["silo"] = {"name": "silo0", "index": 0, "num_silos": 2}
    return parse_config(data)


def _train(config, device: torch.device):
    model = build_model(config.model, "cpu", seed=0).to(device)  # LoRA's init draws from the CPU generator
    data = load_data(config)
    adapter = PersonalAdapter.for_model(model, 0.01)
    result = train_locally(model, data.train, PLAN, device, adapter=adapter)
    personal = evaluate(model, data.eval, device, 8, adapter)
    return model, adapter, result, personal


def test_local_training_with_the_adapter_on_cuda_matches_cpu(tmp_path):
    config = _silo(tmp_path)
    cpu_model, cpu_adapter, cpu_result, cpu_eval = _train(config, CPU)
    gpu_model, gpu_adapter, gpu_result, gpu_eval = _train(config, GPU)
    assert gpu_result.tokens == cpu_result.tokens
    assert gpu_result.loss_last == pytest.approx(cpu_result.loss_last, rel=1e-4)
    gpu_state = trainable_state(gpu_model)
    for name, value in trainable_state(cpu_model).items():
        torch.testing.assert_close(gpu_state[name].cpu(), value, rtol=1e-3, atol=1e-4, msg=name)
    torch.testing.assert_close(gpu_adapter.residual.weight.cpu(), cpu_adapter.residual.weight, rtol=1e-3, atol=1e-4)
    assert gpu_adapter.gain == pytest.approx(cpu_adapter.gain, rel=1e-3, abs=1e-5)
    for domain, (loss, count) in cpu_eval.items():
        assert gpu_eval[domain][1] == count and gpu_eval[domain][0] == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize("family,mode", GHOST_CASES)
def test_dp_per_sample_gradients_and_ghost_clipping_on_cuda_match_cpu(family, mode):
    data = batch()
    on_cpu = tiny(family, mode, False)
    on_gpu = tiny(family, mode, False).to(GPU)
    cpu_grads, cpu_losses = PerSampleGradients(on_cpu)(data)
    gpu_grads, gpu_losses = PerSampleGradients(on_gpu)({k: v.to(GPU) for k, v in data.items()})
    torch.testing.assert_close(gpu_losses.cpu(), cpu_losses, rtol=1e-5, atol=1e-6)
    for name, g in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name].cpu(), g, rtol=1e-4, atol=1e-6, msg=name)
    _, cpu_norms = GhostClipping(on_cpu, max_grad_norm=0.05).norms(data)
    _, gpu_norms = GhostClipping(on_gpu, max_grad_norm=0.05).norms({k: v.to(GPU) for k, v in data.items()})
    torch.testing.assert_close(gpu_norms.cpu().float(), cpu_norms.float(), rtol=1e-4, atol=0)


def test_an_fcmoe_round_with_cuda_silos_gives_the_cpu_global_model(tmp_path):
    """Three silos training on the GPU, the aggregator on the CPU (as deployed): the global model after
    two FC-MoE rounds is the one CPU silos produce. Both runs get the same run id, to which the sketch
    keys are bound."""
    def run(device: str):
        config = smoke_config(tmp_path / device, min_silos=3, rounds=2, min_group_size=1, strategy={"name": "fcmoe"})
        silos = []
        for i in range(3):
            data = silo_config(config, f"silo{i}", 0, index=i, num_silos=3).model_dump(mode="json")
            data["silo"].update({"sketch_key": "ab" * 32, "device": device})
            silos.append(parse_config(data))
        coordinator = run_in_process(config, silos, run_id="cuda-vs-cpu")
        assert coordinator.machine.succeeded and coordinator.machine.version == 2
        return coordinator

    cpu, gpu = run("cpu"), run("cuda")
    for unit, vec in cpu.global_units.items():
        np.testing.assert_allclose(gpu.global_units[unit], vec, rtol=1e-3, atol=1e-4, err_msg=unit)


def test_bfloat16_training_on_cuda_learns(tmp_path):
    config = _silo(tmp_path, dtype="bfloat16")
    model = build_model(config.model, "cpu", seed=0).to(GPU)
    assert next(model.parameters()).dtype == torch.bfloat16
    data = load_data(config)
    before = evaluate(model, data.eval, GPU, 8)
    train_locally(model, data.train, LocalPlan(local_steps=20, batch_size=8, learning_rate=0.01, seed=0), GPU)
    after = evaluate(model, data.eval, GPU, 8)
    mean = lambda e: sum(loss for loss, _ in e.values()) / sum(n for _, n in e.values())  # noqa: E731
    assert mean(after) < mean(before) - 0.1
