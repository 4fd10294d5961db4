"""silo_agent/data/records.py: JSONL records round-trip; a malformed line is named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fcmoe.errors import DataError
from silo_agent.data import Example, load_jsonl, write_jsonl


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
