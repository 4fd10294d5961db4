"""silo_agent/data/tokenize.py: tokenisers, loss masks, padding, truncation counts and batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcmoe.errors import DataError
from silo_agent.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    Example,
    ExampleBatches,
    HFTokenizer,
    collate,
    encode_example,
    generate,
)


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
