"""Tests for the silo-side data package: records, conflict domains, partitions, tokenisation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fcmoe.errors import DataError
from silo_agent.data import (
    CONFLICT_PAIRS,
    DOMAINS,
    IGNORE_INDEX,
    MIN_EVAL_PER_DOMAIN,
    ByteTokenizer,
    Example,
    ExampleBatches,
    HFTokenizer,
    build_silo_dataset,
    collate,
    dirichlet_proportions,
    encode_example,
    generate,
    load_jsonl,
    partition_by_domain,
    silo_domain_counts,
    write_jsonl,
)

FOUR = ["shift_up", "shift_down", "copy", "reverse"]


# --- conflict domains -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "x", "y"),
    [
        ("shift_up", "az", "ba"),
        ("shift_down", "az", "zy"),
        ("copy", "abc", "abc"),
        ("reverse", "abc", "cba"),
        ("sort_asc", "dbca", "abcd"),
        ("sort_desc", "dbca", "dcba"),
        ("upper", "abz", "ABZ"),
        ("double", "ab", "aabb"),
        ("rotate", "abc", "bca"),
    ],
)
def test_rules(domain: str, x: str, y: str) -> None:
    assert DOMAINS[domain](x) == y


def test_generate_format_and_lengths() -> None:
    examples = generate("reverse", 50, seed=3, min_len=4, max_len=6)
    assert len(examples) == 50
    for ex in examples:
        x = ex.prompt[:-1]
        assert ex.prompt == f"{x}=" and ex.response == f"{x[::-1]}\n" and ex.domain == "reverse"
        assert 4 <= len(x) <= 6 and x.isalpha() and x.islower()


@pytest.mark.parametrize(("a", "b"), CONFLICT_PAIRS)
def test_conflicting_domains_share_inputs_but_disagree(a: str, b: str) -> None:
    left, right = generate(a, 40, seed=7), generate(b, 40, seed=7)
    assert [e.prompt for e in left] == [e.prompt for e in right]
    differing = sum(l.response != r.response for l, r in zip(left, right))
    assert differing >= 38  # only palindromes / repeated letters may coincide


def test_generate_deterministic_and_seed_sensitive() -> None:
    assert generate("copy", 20, seed=1) == generate("copy", 20, seed=1)
    assert generate("copy", 20, seed=1) != generate("copy", 20, seed=2)


def test_unknown_domain_lists_allowed_names() -> None:
    with pytest.raises(DataError, match="shift_up"):
        generate("nope", 3, seed=0)


# --- partitions -------------------------------------------------------------------------------


def test_partition_by_domain_pairs_conflicts() -> None:
    assert partition_by_domain(FOUR, 4) == [[d] for d in FOUR]
    assert partition_by_domain(FOUR, 6)[4:] == [["shift_up"], ["shift_down"]]


def test_dirichlet_rows_sum_to_one_and_deterministic() -> None:
    p = dirichlet_proportions(8, 6, 0.5, seed=11)
    assert p.shape == (8, 6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert (p >= 0).all()
    np.testing.assert_array_equal(p, dirichlet_proportions(8, 6, 0.5, seed=11))


def test_dirichlet_skew_depends_on_alpha() -> None:
    skewed = dirichlet_proportions(20, 6, 0.1, seed=0)
    assert (skewed.max(axis=1) > 0.5).mean() >= 0.7  # most silos dominated by one domain
    flat = dirichlet_proportions(20, 6, 100.0, seed=0)
    assert np.abs(flat - 1 / 6).max() < 0.08


def test_dirichlet_rejects_bad_alpha() -> None:
    with pytest.raises(DataError):
        dirichlet_proportions(4, 4, 0.0, seed=0)


@pytest.mark.parametrize("partition", ["domain", "dirichlet"])
def test_every_silo_gets_exact_count(partition: str) -> None:
    counts = silo_domain_counts(
        num_silos=7, domains=list(DOMAINS), partition=partition, alpha=0.05, samples_per_silo=30, seed=5
    )
    assert counts.shape == (7, len(DOMAINS))
    assert (counts.sum(axis=1) == 30).all() and (counts >= 0).all()


def _build(silo: int, partition: str = "domain", **overrides: object) -> tuple[list[Example], list[Example]]:
    kwargs: dict[str, object] = dict(
        silo_index=silo,
        num_silos=4,
        domains=FOUR,
        partition=partition,
        alpha=0.3,
        samples_per_silo=64,
        eval_fraction=0.1,
        seed=123,
    )
    kwargs.update(overrides)
    return build_silo_dataset(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("partition", ["domain", "dirichlet"])
def test_build_silo_dataset_deterministic_nonempty_disjoint(partition: str) -> None:
    all_train_prompts: set[str] = set()
    for silo in range(4):
        train, evaluation = _build(silo, partition)
        assert (train, evaluation) == _build(silo, partition)
        assert len(train) == 64
        for domain, _ in Counter(e.domain for e in train).items():
            assert sum(e.domain == domain for e in evaluation) >= MIN_EVAL_PER_DOMAIN
        assert {e.domain for e in evaluation} == {e.domain for e in train}
        all_train_prompts |= {e.prompt for e in train}
        assert not {e.prompt for e in train} & {e.prompt for e in evaluation}
    for silo in range(4):
        assert not {e.prompt for e in _build(silo, partition)[1]} & all_train_prompts


def test_domain_partition_conflicting_silos_see_same_inputs() -> None:
    up, down = _build(0)[0], _build(1)[0]
    assert {e.domain for e in up} == {"shift_up"} and {e.domain for e in down} == {"shift_down"}
    assert [e.prompt for e in up] == [e.prompt for e in down]
    assert all(a.response != b.response for a, b in zip(up, down))
    # A second silo on the same domain gets fresh strings, not a copy.
    again = _build(4, num_silos=8)[0]
    assert {e.domain for e in again} == {"shift_up"}
    assert not {e.prompt for e in again} & {e.prompt for e in up}


def test_build_rejects_bad_arguments() -> None:
    with pytest.raises(DataError):
        _build(4)
    with pytest.raises(DataError):
        _build(0, domains=["copy", "copy"])
    with pytest.raises(DataError):
        _build(0, partition="iid")


# --- JSONL ------------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    examples = [
        Example(prompt="", response="plain text\nwith newline", domain="web"),
        Example(prompt="q: ä\u2028?", response="a", domain="qa"),
    ]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, examples)
    assert load_jsonl(path) == examples
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0]) == {
        "text": "plain text\nwith newline",
        "domain": "web",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]  # no temp file left behind


def test_jsonl_default_domain_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hi"}\n\n  \n{"prompt": "p", "response": "r", "domain": "x"}\n')
    assert load_jsonl(path, default_domain="dd") == [
        Example("", "hi", "dd"),
        Example("p", "r", "x"),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        "[1, 2]",
        '{"prompt": "p"}',
        '{"text": 3}',
        '{"prompt": "p", "response": null}',
        '{"text": "t", "prompt": "p", "response": "r"}',
        '{"text": "t", "extra": 1}',
        '{"text": "t", "domain": 5}',
        '{"text": "a", "text": "b"}',
        "{}",
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + bad + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: "):
        load_jsonl(path)


def test_missing_jsonl_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")


# --- tokenisation and batching ----------------------------------------------------------------


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert all(0 <= i < 256 for i in ids) and tok.vocab_size == 260
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id, tok.pad_token_id]) == "héllo"


def test_encode_example_masks_bos_and_prompt() -> None:
    tok = ByteTokenizer()
    ids, labels = encode_example(tok, Example("abc=", "cba\n", "reverse"), max_length=64)
    assert ids == [256, *b"abc=", *b"cba\n", 257]
    assert labels == [IGNORE_INDEX] * 5 + [*b"cba\n", 257]


def test_encode_example_plain_text_and_truncation() -> None:
    tok = ByteTokenizer()
    ids, labels = encode_example(tok, Example("", "xy", "web"), max_length=64)
    assert labels == [IGNORE_INDEX, *b"xy", 257] and ids == [256, *b"xy", 257]
    ids, labels = encode_example(tok, Example("ab=", "cdef\n", "d"), max_length=6)
    assert len(ids) == len(labels) == 6 and labels[:4] == [IGNORE_INDEX] * 4


def test_collate_pads_right() -> None:
    batch = collate([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=258)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 258, 258]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_example_batches_sample_and_eval() -> None:
    examples = generate("copy", 5, seed=0) + generate("reverse", 4, seed=0)
    batches = ExampleBatches(examples, ByteTokenizer(), max_length=32)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = batches.sample(4, g1), batches.sample(4, g2)
    assert all(torch.equal(a[k], b[k]) for k in a) and a["input_ids"].shape[0] == 4
    assert batches.sample(20, g1)["input_ids"].shape[0] == 20
    seen = list(batches.iter_eval(4))
    assert [len(domains) for _, domains in seen] == [4, 4, 1]
    assert [d for _, domains in seen for d in domains] == ["copy"] * 5 + ["reverse"] * 4
    first = collate([encode_example(ByteTokenizer(), e, 32) for e in examples[:4]], 258)
    assert torch.equal(seen[0][0]["input_ids"], first["input_ids"])


def test_example_batches_rejects_rows_without_loss() -> None:
    with pytest.raises(DataError, match="max_length"):
        ExampleBatches([Example("a long prompt", "r", "d")], ByteTokenizer(), max_length=4)


def test_hf_tokenizer_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        HFTokenizer(tmp_path / "nowhere")


def test_hf_tokenizer_from_local_dir(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "a": 1, "b": 2, "=": 3, "[UNK]": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]").save_pretrained(
        tmp_path
    )
    tok = HFTokenizer(tmp_path)
    assert tok.bos_token_id is None and tok.eos_token_id == 0 and tok.pad_token_id == 0  # pad -> eos
    assert tok.encode("ab=") == [1, 2, 3] and tok.decode([1, 2, 0]) == "a b"
    ids, labels = encode_example(tok, Example("ab=", "ba", "x"), max_length=16)
    assert ids == [1, 2, 3, 2, 1, 0] and labels == [IGNORE_INDEX] * 3 + [2, 1, 0]  # no BOS to mask


def test_a_wrong_key_lists_every_allowed_key_and_an_empty_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "response": "r", "txt": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: unknown key\(s\) \['txt'\]; allowed: \['domain', 'prompt', "
                                        r"'response', 'text'\]"):
        load_jsonl(path)
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=r"d.jsonl: no records \(the file is empty or holds only blank lines\)"):
        load_jsonl(path)


def test_train_and_eval_files_switch_the_built_in_data_off(tmp_path: Path) -> None:
    from fcmoe.config import parse_config

    config = parse_config({"run": {"name": "x"}, "model": {"source": "builtin"},
                           "data": {"train_file": str(tmp_path / "t.jsonl"), "eval_file": str(tmp_path / "e.jsonl")}})
    assert config.data.builtin is None and config.data.train_file == tmp_path / "t.jsonl"
