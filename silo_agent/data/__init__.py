"""Silo-side data: records and JSONL files, the built-in conflicting domains, the per-silo split,
tokenisation and batching. Everything here runs inside one silo; nothing is sent anywhere."""

from .conflict import CONFLICT_PAIRS, DOMAINS, NEUTRAL_DOMAINS, generate, random_inputs
from .partition import (
    MIN_EVAL_PER_DOMAIN,
    build_silo_dataset,
    dirichlet_proportions,
    partition_by_domain,
    silo_domain_counts,
)
from .records import Example, load_jsonl, write_jsonl
from .tokenize import (
    IGNORE_INDEX,
    ByteTokenizer,
    ExampleBatches,
    HFTokenizer,
    Tokenizer,
    Truncation,
    collate,
    count_truncation,
    encode_example,
    encoded_length,
    tokenizer_for,
)

__all__ = [
    "CONFLICT_PAIRS",
    "DOMAINS",
    "IGNORE_INDEX",
    "MIN_EVAL_PER_DOMAIN",
    "NEUTRAL_DOMAINS",
    "ByteTokenizer",
    "Example",
    "ExampleBatches",
    "HFTokenizer",
    "Tokenizer",
    "Truncation",
    "build_silo_dataset",
    "collate",
    "count_truncation",
    "dirichlet_proportions",
    "encode_example",
    "encoded_length",
    "generate",
    "load_jsonl",
    "partition_by_domain",
    "random_inputs",
    "silo_domain_counts",
    "tokenizer_for",
    "write_jsonl",
]
