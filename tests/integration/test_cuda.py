"""The CUDA paths give what the CPU paths give: local training (with the personal adapter), DP's
per-sample gradients and ghost clipping, a whole in-process round, and bfloat16 training.

Skipped where no GPU is visible (the CI machines have none); run on a GPU host with
``python -m pytest -q tests/integration/test_cuda.py``. Float32 on both sides; TF32 is off, so the only
differences are the order of floating-point sums in the kernels.
"""

import numpy as np
import pytest
import torch
from conftest import silo_config, smoke_config
from unit.silo_agent.dp.test_per_sample import GHOST_CASES, batch, tiny

from aggregator.server import initial_state
from fcmoe.config import parse_config
from fcmoe.launch.inprocess import run_in_process
from fcmoe.model import build_model
from fcmoe.model.build import trainable_state
from fcmoe.plan import RoundPlan
from silo_agent.data.loading import load_data
from silo_agent.dp.ghost import GhostClipping
from silo_agent.dp.per_sample import PerSampleGradients
from silo_agent.personal import PersonalAdapter
from silo_agent.training import evaluate, train_locally

pytestmark = [pytest.mark.subprocess]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

CPU, GPU = torch.device("cpu"), torch.device("cuda")
PLAN = RoundPlan(local_steps=8, batch_size=8, grad_accum=2, learning_rate=0.01, prox_mu=0.01, seed=3)


def _close_updates(after: dict, reference: dict, start: dict, rel: float = 1e-2) -> None:
    """Each tensor's change from ``start`` agrees with the reference's to ``rel`` of its size: AdamW
    divides by the gradient's running size, so summation-order noise on a near-zero gradient can move
    single entries by up to the learning rate; the update as a whole must still agree."""
    for name, ref in reference.items():
        moved = np.asarray(ref, np.float64) - np.asarray(start[name], np.float64)
        diff = np.asarray(after[name], np.float64) - np.asarray(ref, np.float64)
        assert np.linalg.norm(diff) <= rel * max(np.linalg.norm(moved), 1e-8), name


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _mean(evaluation: dict[str, tuple[float, int]]) -> float:
    return sum(loss for loss, _ in evaluation.values()) / sum(n for _, n in evaluation.values())


def _silo(tmp_path, dtype: str = "float32"):
    data = smoke_config(tmp_path).model_dump(mode="json")
    data["model"]["dtype"] = dtype
    data["silo"] = {"name": "silo0", "index": 0, "num_silos": 2}
    return parse_config(data)


def _train(config, device: torch.device):
    model = build_model(config.model, "cpu", seed=0).to(device)  # LoRA's init draws from the CPU generator
    data = load_data(config)
    adapter = PersonalAdapter.for_model(model, 0.01)
    start = {k: v.cpu().numpy() for k, v in trainable_state(model).items()}
    result = train_locally(model, data.train, PLAN, device, adapter=adapter)
    personal = evaluate(model, data.eval, device, 8, adapter)
    state = {k: v.cpu().numpy() for k, v in trainable_state(model).items()}
    state["adapter"] = adapter.residual.weight.detach().float().cpu().numpy()
    start["adapter"] = np.zeros_like(state["adapter"])
    return state, start, adapter.gain, result, personal


def test_local_training_with_the_adapter_on_cuda_matches_cpu(tmp_path):
    config = _silo(tmp_path)
    cpu_state, start, cpu_gain, cpu_result, cpu_eval = _train(config, CPU)
    gpu_state, _, gpu_gain, gpu_result, gpu_eval = _train(config, GPU)
    assert gpu_result.tokens == cpu_result.tokens
    assert gpu_result.loss_last == pytest.approx(cpu_result.loss_last, rel=1e-3)
    _close_updates(gpu_state, cpu_state, start)
    assert gpu_gain == pytest.approx(cpu_gain, rel=1e-2, abs=1e-4)
    for domain, (loss, count) in cpu_eval.items():
        assert gpu_eval[domain][1] == count and gpu_eval[domain][0] == pytest.approx(loss, rel=1e-3)


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
    _, _, start = initial_state(cpu.config)
    _close_updates(gpu.global_units, cpu.global_units, start)
    cpu_rows, gpu_rows = cpu.metrics.rows(), gpu.metrics.rows()
    for key in ("global_loss", "local_loss"):  # round 0 has no local loss
        losses = [[r[key] for r in rows if r.get(key) is not None] for rows in (cpu_rows, gpu_rows)]
        assert len(losses[0]) >= 2 and losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_bfloat16_training_on_cuda_learns(tmp_path):
    config = _silo(tmp_path, dtype="bfloat16")
    model = build_model(config.model, "cpu", seed=0).to(GPU)
    assert next(model.parameters()).dtype == torch.bfloat16
    data = load_data(config)
    adapter = PersonalAdapter.for_model(model, 0.01)  # float32, on a bfloat16 model's features
    before = evaluate(model, data.eval, GPU, 8)
    train_locally(model, data.train, RoundPlan(local_steps=20, batch_size=8, learning_rate=0.01, seed=0), GPU,
                  adapter=adapter)
    after = evaluate(model, data.eval, GPU, 8)
    assert np.isfinite(adapter.gain) and np.isfinite(_mean(evaluate(model, data.eval, GPU, 8, adapter)))
    assert _mean(after) < _mean(before) - 0.1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fsdp over two ranks needs two GPUs")
@pytest.mark.parametrize("parallel, streamed", [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_two_gpu_ranks_give_the_one_gpu_update(parallel, streamed, tmp_path):
    """NCCL between two GPUs, the model sharded (fsdp) or replicated (ddp): the one-GPU update; sharded
    from a local checkpoint too, read layer by layer as it is handed to the GPUs (as the agent does)."""
    from integration.test_distributed import TINY, _data, _start_state

    from fcmoe.config import ModelConfig
    from fcmoe.model import load_trainable_state
    from fcmoe.model.build import build_base_model
    from fcmoe.model.stream import CheckpointStream
    from silo_agent.distributed import RankSetup, SiloRanks

    spec = ModelConfig.model_validate({"builtin": TINY, "trainable": {"mode": "lora", "router": True}})
    if streamed:
        build_base_model(spec).save_pretrained(tmp_path)
        spec = spec.model_copy(update={"source": "local", "path": tmp_path})
    data, start, cuda = _data(), _start_state(spec), torch.device("cuda", 0)
    plan = RoundPlan(local_steps=2, batch_size=6, grad_accum=2, learning_rate=0.01, prox_mu=0.5, seed=5)
    trained = []
    for world_size in (1, 2):
        # as the agent does with a built-in model: under fsdp it is built on the host only to be handed out
        model = build_model(spec, "cpu" if world_size > 1 and parallel == "fsdp" else cuda)
        load_trainable_state(model, start)
        if world_size == 1:
            train_locally(model, data, plan, cuda)
            state = trainable_state(model)
        else:
            ranks = SiloRanks(CheckpointStream(spec) if streamed else model, RankSetup(spec, parallel, 2, cuda=True),
                              data, cuda)
            del model  # under fsdp GPU 0 holds rank 0's shard only
            try:
                ranks.load_trainable_state(start)
                ranks.train(plan)
                assert ranks.builds_per_rank == [1, 1]
                state = ranks.trainable_state()
            finally:
                ranks.close()
        trained.append({k: v.cpu() for k, v in state.items()})
    one, two = trained
    gap = sum(float(((two[k] - one[k]).double() ** 2).sum()) for k in one) ** 0.5
    moved = sum(float(((one[k] - start[k]).double() ** 2).sum()) for k in one) ** 0.5
    assert gap <= 1e-3 * moved, (gap, moved)
