"""Tokenisation, loss masking and batching for causal-LM fine-tuning on a silo.

Two tokenisers share one small interface: :class:`ByteTokenizer` needs no files (tests, the
built-in synthetic domains, tiny randomly initialised models) and :class:`HFTokenizer` wraps the
tokenizer shipped with a real checkpoint, read from local disk only, because a silo must not
reach out to the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch

from fcmoe.errors import DataError

from .records import Example

IGNORE_INDEX = -100  # the label value torch / transformers cross-entropy skips


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer; ``bos_token_id`` may be absent."""

    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255 plus BOS/EOS/PAD; the vocab is rounded up to 260 for the model."""

    bos_token_id: int = 256
    eos_token_id: int = 257
    pad_token_id: int = 258
    vocab_size: int = 260

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``'s UTF-8 bytes, no special tokens."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte tokens in ``ids``; specials are dropped, broken UTF-8 is replaced."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory behind the :class:`Tokenizer` interface."""

    def __init__(self, local_dir: Path) -> None:
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise DataError(f"{local_dir}: tokenizer directory does not exist")
        from transformers import AutoTokenizer  # deferred: importing transformers is slow

        try:
            self._tok = AutoTokenizer.from_pretrained(str(local_dir), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(" :")
            raise DataError(f"{local_dir}: cannot load tokenizer: {message}") from None
        if self._tok.eos_token_id is None:
            raise DataError(f"{local_dir}: tokenizer has no EOS token; responses could not end")
        self.bos_token_id: int | None = self._tok.bos_token_id
        self.eos_token_id: int = int(self._tok.eos_token_id)
        pad = self._tok.pad_token_id
        self.pad_token_id: int = self.eos_token_id if pad is None else int(pad)
        self.vocab_size: int = len(self._tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (the caller adds BOS/EOS itself)."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens skipped."""
        return str(self._tok.decode(list(ids), skip_special_tokens=True))


def tokenizer_for(model) -> Tokenizer:
    """The tokenizer of a ``model`` config: bytes for built-in models, the checkpoint's own otherwise."""
    return ByteTokenizer() if model.source == "builtin" else HFTokenizer(model.path)


def _encode_whole(tok: Tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of the whole record, before any cut (see :func:`encode_example`)."""
    head = ([] if tok.bos_token_id is None else [tok.bos_token_id]) + tok.encode(ex.prompt)
    tail = tok.encode(ex.response) + [tok.eos_token_id]
    return head + tail, [IGNORE_INDEX] * len(head) + tail


def _check_max_length(max_length: int) -> None:
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")


def encode_example(tok: Tokenizer, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for ``[BOS] + prompt + response + [EOS]``, cut to ``max_length``.

    Labels are ``-100`` on BOS and the prompt so the loss only teaches the response (and when to
    stop, via EOS); a plain-text record has an empty prompt, so everything but BOS is scored.
    Prompt and response are encoded separately so the mask boundary is exact. BOS is omitted for
    tokenizers that have none. A cut record loses its end (EOS included); :func:`count_truncation`
    says how many records of a set that happens to and by how much.
    """
    _check_max_length(max_length)
    input_ids, labels = _encode_whole(tok, ex)
    return input_ids[:max_length], labels[:max_length]


@dataclass(frozen=True)
class Truncation:
    """What cutting a set of records to ``max_length`` tokens loses (lengths count BOS and EOS)."""

    records: int  # records in the set
    cut: int  # records longer than max_length, which lose their end
    max_length: int
    longest: int  # tokens of the longest record before the cut; max_length >= longest keeps all whole
    most_cut: int  # most tokens cut from one record: max(0, longest - max_length)
    tokens_cut: int  # tokens cut from all records together

    def fields(self) -> dict[str, int]:
        """The numbers as ``log_event`` fields."""
        return {"records": self.records, "cut": self.cut, "max_length": self.max_length,
                "longest": self.longest, "most_cut": self.most_cut, "tokens_cut": self.tokens_cut}


def count_truncation(lengths: Sequence[int], max_length: int) -> Truncation:
    """How many of the records of whole lengths ``lengths`` a cut to ``max_length`` shortens, and by
    how much; pure arithmetic on the lengths (:func:`encoded_length` gives one record's)."""
    _check_max_length(max_length)
    if any(n < 0 for n in lengths):
        raise DataError("record lengths must be >= 0")
    over = [n - max_length for n in lengths if n > max_length]
    return Truncation(records=len(lengths), cut=len(over), max_length=max_length,
                      longest=max(lengths, default=0), most_cut=max(over, default=0), tokens_cut=sum(over))


def encoded_length(tok: Tokenizer, ex: Example) -> int:
    """Tokens of ``ex`` encoded whole: BOS (if the tokenizer has one) + prompt + response + EOS."""
    return len(_encode_whole(tok, ex)[0])


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row; padding gets ``attention_mask=0`` and label ``-100``."""
    if not batch:
        raise DataError("cannot collate an empty batch")
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        if len(ids) != len(labs):
            raise DataError(f"batch row {row}: {len(ids)} input ids but {len(labs)} labels")
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


EVAL_SUBSET_SEED = 20_250_601  # fixes which held-out examples a capped evaluation uses (federation.evaluation)


class ExampleBatches:
    """A silo's examples, tokenised once, served as random training or ordered eval batches.

    ``truncation`` (a :class:`Truncation`) says how many examples ``max_length`` cut and by how much.
    """

    def __init__(self, examples: Sequence[Example], tok: Tokenizer, max_length: int) -> None:
        if not examples:
            raise DataError("no examples to batch")
        whole = [_encode_whole(tok, ex) for ex in examples]
        # what max_length cuts off, for the silo to log: a cut record silently loses its end
        self.truncation = count_truncation([len(ids) for ids, _ in whole], max_length)
        self._pairs = [(ids[:max_length], labels[:max_length]) for ids, labels in whole]
        self._domains = [ex.domain for ex in examples]
        self._pad_id = tok.pad_token_id
        for index, (_, labels) in enumerate(self._pairs):
            if all(label == IGNORE_INDEX for label in labels):
                # Such a row has no loss term; a batch made only of them would give a NaN loss.
                raise DataError(
                    f"example {index}: prompt fills max_length={max_length}, nothing left to train on"
                )

    def __len__(self) -> int:
        return len(self._pairs)

    @property
    def domains(self) -> list[str]:
        """The domain of each example, in order."""
        return list(self._domains)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A random training batch drawn with ``generator``.

        Rows within a batch are distinct when ``batch_size <= len(self)`` (otherwise drawn with
        replacement); successive calls draw independently, so examples repeat across steps.
        """
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self._pairs)
        if batch_size <= n:
            index = torch.randperm(n, generator=generator)[:batch_size]
        else:
            index = torch.randint(n, (batch_size,), generator=generator)
        return collate([self._pairs[i] for i in index.tolist()], self._pad_id)

    def poisson(self, rate: float, generator: torch.Generator) -> dict[str, torch.Tensor] | None:
        """Every example independently with probability ``rate`` (Poisson sampling, which DP-SGD's
        accounting assumes); None when none was drawn."""
        if not 0 < rate <= 1:
            raise DataError(f"sampling rate must be in (0, 1], got {rate}")
        index = (torch.rand(len(self._pairs), generator=generator) < rate).nonzero().flatten()
        return collate([self._pairs[i] for i in index.tolist()], self._pad_id) if len(index) else None

    def eval_subset(self, max_examples: int | None = None) -> list[int]:
        """The examples an evaluation capped at ``max_examples`` uses, in order: all of them when the cap
        is None or not below the count, else the first ``max_examples`` of one fixed permutation (seed
        ``EVAL_SUBSET_SEED``, independent of the run): the same subset every round, in every process,
        so that capped losses stay comparable across rounds, and drawn across domains (held-out files are
        often sorted by domain, where the first M would be one domain)."""
        n = len(self._pairs)
        if max_examples is None or max_examples >= n:
            return list(range(n))
        if max_examples < 1:
            raise DataError(f"max_examples must be >= 1, got {max_examples}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(EVAL_SUBSET_SEED))
        return sorted(order[:max_examples].tolist())

    def iter_eval(self, batch_size: int, max_examples: int | None = None
                  ) -> Iterator[tuple[dict[str, torch.Tensor], list[str]]]:
        """Every example (of :meth:`eval_subset` when ``max_examples`` is given) exactly once, in order,
        as ``(batch, domain of each row)``."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        index = self.eval_subset(max_examples)
        for start in range(0, len(index), batch_size):
            rows = index[start:start + batch_size]
            yield collate([self._pairs[i] for i in rows], self._pad_id), [self._domains[i] for i in rows]
