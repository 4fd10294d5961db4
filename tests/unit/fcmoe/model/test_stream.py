"""A local checkpoint read layer by layer gives ``build_model``'s tensors, never more than a layer at a time."""

from __future__ import annotations

import json
import re
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from families import save_tiny_checkpoint
from fcmoe.config import ModelConfig
from fcmoe.errors import ConfigError, LayoutError
from fcmoe.model import base_fingerprint, build_model
from fcmoe.model.stream import CheckpointStream

TRAINABLE = {"mode": "lora", "lora_rank": 2, "lora_alpha": 4, "router": True}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny Mixtral checkpoint: saved per expert (``w1``/``w2``/``w3``), fused by transformers on loading."""
    folder = tmp_path_factory.mktemp("mixtral")
    save_tiny_checkpoint("mixtral", folder)
    assert any(".experts.0.w1." in key for key in load_file(str(folder / "model.safetensors")))
    return folder


def _spec(folder) -> ModelConfig:
    return ModelConfig(source="local", path=folder, trainable=TRAINABLE)


def _layer(name: str) -> str:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return match.group(1) if match else ""


def test_stream_gives_build_models_tensors_and_fingerprint_one_layer_at_a_time(mixtral):
    whole = build_model(_spec(mixtral))
    expected = dict(whole.named_parameters())
    expected.update(whole.named_buffers())
    stream = CheckpointStream(_spec(mixtral))
    seen: dict[str, weakref.ref] = {}
    held_at_once = []  # the layers of every base tensor still alive, as each tensor arrives
    for name, tensor in stream:
        assert name not in seen
        assert tensor.shape == expected[name].shape and tensor.dtype == expected[name].dtype
        if "lora_" not in name:  # LoRA starts as PEFT starts it; the silo loads the run's state over it
            assert torch.equal(tensor, expected[name]), name
        if isinstance(expected[name], torch.nn.Parameter) and "lora_" not in name:
            seen[name] = weakref.ref(tensor)
            held_at_once.append({_layer(n) for n, ref in seen.items() if ref() is not None})
        del tensor
    assert seen.keys() | {n for n in expected if "lora_" in n or n not in dict(whole.named_parameters())} \
        == expected.keys()
    assert max(len(layers) for layers in held_at_once) == 1  # one group (a layer, or the rest) in memory
    assert {layer for layers in held_at_once for layer in layers} == {"", "0", "1"}
    assert stream.fingerprint() == base_fingerprint(whole)


def test_fingerprint_reads_what_was_not_streamed_yet(mixtral):
    assert CheckpointStream(_spec(mixtral)).fingerprint() == base_fingerprint(build_model(_spec(mixtral)))


def test_a_checkpoint_missing_a_tensor_is_one_line_naming_it(mixtral, tmp_path):
    for name in ("config.json", "generation_config.json"):
        if (mixtral / name).exists():
            shutil.copy(mixtral / name, tmp_path / name)
    tensors = load_file(str(mixtral / "model.safetensors"))
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LayoutError) as caught:
        list(CheckpointStream(_spec(tmp_path)))
    assert "the checkpoint holds no value for 1 tensor(s) of the model, e.g. " \
           "'base_model.model.model.layers.1.post_attention_layernorm.weight'" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_folder_without_safetensors_or_a_broken_index_is_refused_in_one_line(mixtral, tmp_path):
    shutil.copy(mixtral / "config.json", tmp_path / "config.json")
    with pytest.raises(ConfigError, match="no model.safetensors or model.safetensors.index.json"):
        CheckpointStream(_spec(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ConfigError, match="is not a safetensors index \\(KeyError\\)"):
        CheckpointStream(_spec(tmp_path))


def test_a_sharded_checkpoint_is_read_through_its_index(mixtral, tmp_path):
    """Two files and an index (as large checkpoints come): the same tensors as one file."""
    shutil.copy(mixtral / "config.json", tmp_path / "config.json")
    tensors = load_file(str(mixtral / "model.safetensors"))
    halves = ({k: v for k, v in tensors.items() if ".layers.1." not in k},
              {k: v for k, v in tensors.items() if ".layers.1." in k})
    weight_map = {}
    for i, half in enumerate(halves):
        save_file(half, str(tmp_path / f"model-{i}.safetensors"), metadata={"format": "pt"})
        weight_map.update({k: f"model-{i}.safetensors" for k in half})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert CheckpointStream(_spec(tmp_path)).fingerprint() == base_fingerprint(build_model(_spec(mixtral)))


def test_only_a_local_checkpoint_streams():
    with pytest.raises(ConfigError, match="only a local checkpoint can be read layer by layer"):
        CheckpointStream(ModelConfig())
