"""Tests for the silo-side data package: records, conflict domains, partitions, tokenisation."""

from __future__ import annotations

import json
import logging
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


# --- what max_length cuts, and the silo's log line about it -----------------------------------


def test_count_truncation_counts_cut_records_and_tokens() -> None:
    from silo_agent.data import count_truncation

    t = count_truncation([5, 10, 12, 3, 17], max_length=10)
    assert (t.records, t.cut, t.max_length, t.longest, t.most_cut, t.tokens_cut) == (5, 2, 10, 17, 7, 9)
    assert t.fields() == {"records": 5, "cut": 2, "max_length": 10, "longest": 17, "most_cut": 7, "tokens_cut": 9}
    whole = count_truncation([5, 10, 3], max_length=10)  # a record exactly max_length long is whole
    assert (whole.cut, whole.longest, whole.most_cut, whole.tokens_cut) == (0, 10, 0, 0)
    assert count_truncation([], max_length=4).fields() == {
        "records": 0, "cut": 0, "max_length": 4, "longest": 0, "most_cut": 0, "tokens_cut": 0}
    with pytest.raises(DataError, match="max_length"):
        count_truncation([3], max_length=0)
    with pytest.raises(DataError, match="lengths"):
        count_truncation([-1], max_length=4)


def test_truncation_of_example_batches_matches_encoding() -> None:
    from silo_agent.data import count_truncation, encoded_length

    tok = ByteTokenizer()
    examples = [Example("ab=", "cdef\n", "d"), Example("", "xy", "web"), Example("abcd=", "dcba\n", "r")]
    lengths = [encoded_length(tok, e) for e in examples]
    assert lengths == [1 + 3 + 5 + 1, 1 + 2 + 1, 1 + 5 + 5 + 1]
    assert lengths == [len(encode_example(tok, e, max_length=64)[0]) for e in examples]
    batches = ExampleBatches(examples, tok, max_length=8)
    assert batches.truncation == count_truncation(lengths, 8)
    assert (batches.truncation.cut, batches.truncation.most_cut, batches.truncation.tokens_cut) == (2, 4, 6)
    kept = collate([encode_example(tok, e, 8) for e in examples], tok.pad_token_id)
    assert torch.equal(next(batches.iter_eval(8))[0]["input_ids"], kept["input_ids"])  # same cut as before


def _silo_with_jsonl(tmp_path: Path, max_length: int):
    """A silo config (configs/smoke.yaml's model) on two small JSONL files of known byte lengths."""
    from fcmoe.config import load_config, parse_config

    # encoded with BOS and EOS: "the quick brown fox" 21 tokens, "2+2=" -> "4" 7; held out: 20 and 7
    train = [Example("", "the quick brown fox", "prose"), Example("2+2=", "4", "maths")] * 8
    held_out = [Example("", "jumps over the dog", "prose"), Example("3+3=", "6", "maths")] * 2
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", held_out)
    data = load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml").model_dump(mode="json")
    data.pop("simulation", None)
    data["run"]["output_dir"] = str(tmp_path / "run")
    data["data"] = {"train_file": str(tmp_path / "train.jsonl"), "eval_file": str(tmp_path / "eval.jsonl"),
                    "max_length": max_length}
    data["silo"] = {"name": "silo0", "pki_dir": str(tmp_path / "certs"), "threads": 1}
    return parse_config(data)


def _data_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "silo_agent.data.loading"
            and r.getMessage().startswith(("event=data_truncated", "event=data_loaded"))]


def test_silo_logs_what_max_length_cuts_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from crypto.pki import ensure_pki
    from silo_agent.agent import SiloAgent

    ensure_pki(tmp_path / "certs", ["silo0"])
    caplog.set_level(logging.INFO, logger="silo_agent.data.loading")
    agent = SiloAgent(_silo_with_jsonl(tmp_path, max_length=12))  # real certificates; connects only when run
    agent.client.close()
    assert _data_lines(caplog) == [
        ("WARNING", "event=data_truncated split=train records=16 cut=8 max_length=12 longest=21 most_cut=9 "
                    'tokens_cut=72 to_fix="set data.max_length to 21 or shorten the records"'),
        ("WARNING", "event=data_truncated split=held_out records=4 cut=2 max_length=12 longest=20 most_cut=8 "
                    'tokens_cut=16 to_fix="set data.max_length to 20 or shorten the records"'),
    ]
    assert agent.data.train.truncation.cut == 8 and agent.data.eval.truncation.tokens_cut == 16


def test_silo_logs_data_loaded_when_nothing_is_cut(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from silo_agent.data.loading import load_data

    caplog.set_level(logging.INFO, logger="silo_agent.data.loading")
    load_data(_silo_with_jsonl(tmp_path, max_length=21))  # the longest record exactly fits
    assert _data_lines(caplog) == [
        ("INFO", "event=data_loaded split=train records=16 cut=0 max_length=21 longest=21 most_cut=0 tokens_cut=0"),
        ("INFO", "event=data_loaded split=held_out records=4 cut=0 max_length=21 longest=20 most_cut=0 tokens_cut=0"),
    ]


def _builtin_sources() -> list[tuple[str, int, dict, int]]:
    """``(name, silos, build_silo_dataset arguments, the config's max_length)`` of every built-in data
    set a shipped config (or no config at all) trains on; Shakespeare configs set their own max_length."""
    from fcmoe.config import Config, load_config

    sources = []
    shipped = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    configs = [("(defaults)", Config())] + [(path.name, load_config(path)) for path in shipped]
    for name, config in configs:
        b = config.data.builtin
        if b is None:
            continue
        silos = config.simulation.silos if config.simulation else config.federation.min_silos
        args = dict(domains=b.domains, partition=b.partition, alpha=b.alpha, samples_per_silo=b.samples_per_silo,
                    eval_fraction=b.eval_fraction, seed=b.seed)
        sources.append((name, silos, args, config.data.max_length))
        for s in config.benchmark.settings if config.benchmark else []:
            if s.shakespeare is None:
                sources.append((f"{name}:{s.name}", s.silos, {**args, "domains": s.domains, "partition": s.partition,
                                                              "alpha": s.alpha}, config.data.max_length))
    return sources


def test_default_max_length_cuts_no_built_in_demo_record() -> None:
    from fcmoe.config import DataConfig
    from silo_agent.data import count_truncation, encoded_length

    default = DataConfig.model_fields["max_length"].default
    tok = ByteTokenizer()
    # every synthetic domain at its longest input (8 letters): `double` is the longest, 28 tokens
    for domain in DOMAINS:
        longest_inputs = generate(domain, 16, seed=0, min_len=8, max_len=8)
        worst = count_truncation([encoded_length(tok, e) for e in longest_inputs], default)
        assert worst.cut == 0 and worst.longest == (28 if domain == "double" else 20), domain
    sources = _builtin_sources()
    assert {"(defaults)", "demo.yaml", "demo_fcmoe.yaml", "demo_dp.yaml", "smoke.yaml",
            "bench_conflict.yaml:dirichlet-0.1"} <= {name for name, *_ in sources}
    for name, silos, args, own in sources:
        lengths = [encoded_length(tok, e) for i in range(silos)
                   for split in build_silo_dataset(silo_index=i, num_silos=silos, **args) for e in split]
        assert count_truncation(lengths, default).cut == 0, name
        assert count_truncation(lengths, own).cut == 0, name  # and the config's own max_length
