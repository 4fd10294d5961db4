"""FC-MoE end to end in one process (coordinator + silo agents, codec on every tensor)."""

import numpy as np
from conftest import silo_config, smoke_config

from fcmoe.config import FCMOE_SKETCH_VARIANT, parse_config
from fcmoe.launch.inprocess import run_in_process


def _configs(tmp_path, strategy, **federation):
    config = smoke_config(tmp_path, min_silos=3, rounds=2, min_group_size=1, strategy=strategy, **federation)
    key = "ab" * 32
    silos = []
    for i in range(3):
        data = silo_config(config, f"silo{i}", 0, index=i, num_silos=3).model_dump(mode="json")
        data["silo"]["sketch_key"] = key
        silos.append(parse_config(data))
    return config, silos


def test_fcmoe_round_trip_with_sketches_groups_and_retention(tmp_path):
    config, silos = _configs(tmp_path, {"name": "fcmoe", "fcmoe": FCMOE_SKETCH_VARIANT})
    coord = run_in_process(config, silos)
    assert coord.machine.succeeded and coord.machine.version == 2
    rows = coord.metrics.rows()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["updates"] == 3 and "mean_agreement" in rows[2] and -1 <= rows[2]["mean_agreement"] <= 1
    assert 0 < rows[2]["plan_seconds"] < rows[2]["round_seconds"] and 0 < rows[2]["aggregate_seconds"]
    assert rows[-1]["global_loss"] < rows[0]["global_loss"] and rows[2]["local_loss"] < rows[1]["local_loss"]
    # sketches travel in the sketch stage (8 expert + shared units x 256 buckets), never in the report
    assert all(s["sketch_bytes"] >= 8 * 256 * 4 > s["report_bytes"] for s in rows[1]["silos"].values())


def test_local_only_keeps_the_global_model(tmp_path):
    config, silos = _configs(tmp_path, {"name": "local"})
    coord = run_in_process(config, silos)
    rows = coord.metrics.rows()
    assert rows[0]["global_loss"] == rows[-1]["global_loss"]
    assert rows[-1]["local_loss"] < rows[1]["local_loss"]  # silos keep training their own models


def test_in_process_is_deterministic(tmp_path):
    """Same seeds and run id, same result: FC-MoE's sketch keys are bound to the run id, which is
    random unless given (benches.convergence gives one per seed)."""
    a = run_in_process(*_configs(tmp_path / "a", {"name": "fcmoe"}), run_id="bench-seed0")
    b = run_in_process(*_configs(tmp_path / "b", {"name": "fcmoe"}), run_id="bench-seed0")
    assert a.run_id == b.run_id == "bench-seed0"
    for unit, vec in a.global_units.items():
        np.testing.assert_array_equal(vec, b.global_units[unit])


def test_silos_report_the_personal_adapter_only_while_it_helps(tmp_path, monkeypatch):
    """One run id, three runs: no adapter, an adapter scored as hurting, one scored as helping. The
    adapter never changes the federated model, so the first two report the same personalised losses
    (the trained model's) and the third reports others."""
    from silo_agent.personal import PersonalAdapter

    def personalised(name: str, strategy: dict, helps: bool | None) -> list[float]:
        if helps is not None:
            monkeypatch.setattr(PersonalAdapter, "helps", property(lambda self: helps))
        rows = run_in_process(*_configs(tmp_path / name, strategy), run_id="gate").metrics.rows()
        return [r["local_loss"] for r in rows[1:]]

    without = personalised("without", {"name": "fcmoe", "fcmoe": {"retention": False}}, None)
    assert personalised("hurting", {"name": "fcmoe"}, False) == without
    assert personalised("helping", {"name": "fcmoe"}, True) != without


def test_a_given_run_id_is_checked_and_never_resumes_another_run(tmp_path):
    import pytest

    from aggregator.server import build_coordinator
    from fcmoe.errors import ConfigError

    config, silos = _configs(tmp_path, {"name": "fedavg"})
    with pytest.raises(ConfigError, match="1 to 64 letters"):
        run_in_process(config, silos, run_id="a|b")
    build_coordinator(config)  # an unfinished run in run.output_dir, resumable
    with pytest.raises(ConfigError, match="holds unfinished run"):
        build_coordinator(config, run_id="fixed")


def test_sketch_sums_that_cannot_fit_a_message_are_refused_at_start(tmp_path):
    import pytest

    from aggregator.coordinator import Coordinator
    from aggregator.strategies import build_strategy
    from fcmoe.errors import ConfigError

    config = smoke_config(tmp_path, strategy={"name": "fcmoe", "fcmoe": {**FCMOE_SKETCH_VARIANT, "sketch_buckets": 1 << 20}})
    units = {f"L0.E{e}": 8 for e in range(8)}
    with pytest.raises(ConfigError, match="sketch_buckets = 1048576"):
        Coordinator(config, "h", "f", units, {u: np.zeros(8, np.float32) for u in units},
                    build_strategy(config.federation.strategy), tmp_path)


def test_model_and_tokenizer_from_a_local_checkpoint_directory(tmp_path):
    """A real deployment's path: model.source local (safetensors + config) and its AutoTokenizer."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fcmoe.config import BuiltinModelConfig, ModelConfig
    from fcmoe.model.build import build_base_model

    checkpoint = tmp_path / "olmoe-tiny"
    base = ModelConfig(builtin=BuiltinModelConfig(family="olmoe", hidden_size=32, intermediate_size=64,
                                                  num_heads=4, num_kv_heads=2, seed=3))
    build_base_model(base).save_pretrained(checkpoint)
    vocab = {tok: i for i, tok in enumerate(["</s>", "[UNK]", "=", "\n", *string.ascii_lowercase])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]").save_pretrained(checkpoint)

    config, silos = _configs(tmp_path, {"name": "fedavg"})
    swap = lambda c: parse_config({**c.model_dump(mode="json"),  # noqa: E731
                                   "model": {"source": "local", "path": str(checkpoint)}})
    coord = run_in_process(swap(config), [swap(s) for s in silos])
    rows = coord.metrics.rows()
    assert coord.machine.succeeded and rows[-1]["global_loss"] < rows[0]["global_loss"]


def test_routing_shares_are_measured_under_the_global_model(tmp_path, monkeypatch):
    """A silo's routing share says how its held-out data uses the experts of the model being
    aggregated, so it cannot depend on how the silo trains that round: the first round's shares
    (same initial model) are the same at two learning rates, although the updates differ."""
    from aggregator.strategies.fcmoe import FcMoe

    seen: list[dict[str, list[float]]] = []
    coefficients = FcMoe.coefficients

    def spy(self, round_, units, reports, agreement=None):
        if round_ == 1:
            seen.append({x: list(r.routing_share.values()) for x, r in reports.items()})
        return coefficients(self, round_, units, reports, agreement)

    monkeypatch.setattr(FcMoe, "coefficients", spy)
    finals = []
    for lr in (0.01, 0.05):  # the aggregator's instructions set the silos' learning rate
        local = {"local_steps": 4, "batch_size": 8, "learning_rate": lr, "clip_norm": 5.0}
        config, silos = _configs(tmp_path / str(lr), {"name": "fcmoe"}, local=local)
        finals.append(run_in_process(config, silos, run_id="routing").global_units)
    assert seen[0] == seen[1]
    assert any(len(set(np.round(v, 6))) > 2 for v in seen[0].values())  # real, uneven expert shares
    assert any(not np.array_equal(finals[0][u], finals[1][u]) for u in finals[0])
