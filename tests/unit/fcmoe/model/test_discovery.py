"""fcmoe/model/discovery.py's module lists: the decoder layers and the vocabulary modules FSDP shards as
groups of their own (every family's experts, routers and shared experts: tests/integration/test_families.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fcmoe.config import BuiltinModelConfig
from fcmoe.model.build import builtin_hf_config
from fcmoe.model.discovery import FAMILY_FACTS, FamilyFacts, decoder_layers, discover, vocabulary_modules


def _model(family: str, **overrides) -> torch.nn.Module:
    config = builtin_hf_config(BuiltinModelConfig(family=family))
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_decoder_layers_are_the_layer_list_in_order(family):
    model = _model(family)
    layers = decoder_layers(model)
    assert layers == list(model.model.layers)
    assert [layer.index for layer in discover(model).layers] == list(range(len(layers)))


def test_untied_embeddings_and_head_are_groups_of_their_own():
    model = _model("mixtral")
    assert vocabulary_modules(model) == [model.model.embed_tokens, model.lm_head]


def test_tied_embeddings_stay_in_the_root():
    model = _model("qwen2_moe", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert vocabulary_modules(model) == []


def test_a_family_that_reads_its_embeddings_directly_keeps_them_in_the_root(monkeypatch):
    model = _model("mixtral")
    monkeypatch.setitem(FAMILY_FACTS, "mixtral", FamilyFacts(embeddings_read_directly="reads embed_tokens.weight"))
    assert vocabulary_modules(model) == [model.lm_head]
