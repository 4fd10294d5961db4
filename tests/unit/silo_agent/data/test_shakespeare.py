"""silo_agent/data/shakespeare.py: scenes, passages and held-out blocks; partitions by genre, era, play and role."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch

from fcmoe.config import parse_config
from fcmoe.errors import ConfigError, DataError
from fcmoe.model import build_model
from silo_agent.data.loading import load_data
from silo_agent.data.shakespeare import (
    SiloSplit,
    Unit,
    assign,
    build_shakespeare_dataset,
    held_out_blocks,
    partition_silos,
    passages,
    role_units,
    split_silo,
)
from silo_agent.data.shakespeare_text import BLOCK_LINES, Speech, Work, load_works
from silo_agent.training import evaluate

PARTITIONS = ("genre", "era", "play", "role")


@pytest.fixture(scope="module")
def works() -> tuple[Work, ...]:
    return load_works()  # parsed once per process (cached in the module too)


def _work(works: tuple[Work, ...], key: str) -> Work:
    return next(w for w in works if w.key == key)


def _spoken(passage: str) -> list[str]:
    """The text lines of a passage: each speech's ``Speaker:`` line left out."""
    lines: list[str] = []
    for speech in passage.split("\n\n"):
        rows = speech.split("\n")
        lines.extend(rows[1:] if len(rows) > 1 and rows[0].endswith(":") else rows)
    return lines


def _splits(works, partition: str, seed: int = 0, num_silos: int = 4) -> list[SiloSplit]:
    return partition_silos(works, num_silos, partition=partition, seed=seed)


def _config(**shakespeare) -> dict:
    return {"data": {"shakespeare": shakespeare, "max_length": 64},
            "silo": {"name": "silo1", "index": 1, "num_silos": 4}}


def test_blocks_are_scenes_cut_at_block_lines(works):
    for work in works:
        sizes: dict[int, int] = {}
        for s in work.speeches:
            sizes[s.block] = sizes.get(s.block, 0) + len(s.lines)
        assert sorted(sizes) == list(range(len(sizes)))
        multi = [b for b in sizes if sum(1 for s in work.speeches if s.block == b) > 1]
        assert all(sizes[b] <= BLOCK_LINES for b in multi), work.key  # a lone longer speech may exceed it


def test_passages_are_bounded_even_and_never_cross_blocks():
    speeches = [Speech("A", ("a1", "a2"), 0), Speech("B", ("b1",) * 9, 0), Speech("A", ("a3",), 1),
                Speech("C", ("c",), 1)]
    blocks = passages(speeches, passage_lines=4)
    assert blocks == (("A:\na1\na2",) + ("B:\nb1\nb1\nb1",) * 3,  # 9 lines -> 3 + 3 + 3, not 4 + 4 + 1
                      ("A:\na3\n\nC:\nc",))
    with pytest.raises(DataError):
        passages(speeches, passage_lines=0)


@pytest.mark.parametrize("passage_lines", [4, 8])
def test_every_example_respects_passage_lines(works, passage_lines):
    for split in partition_silos(works, 4, partition="genre", passage_lines=passage_lines, examples_per_silo=300):
        for example in split.train + split.held_out:
            assert 1 <= len(_spoken(example.response)) <= passage_lines
            assert example.prompt == ""


@pytest.mark.parametrize("partition", PARTITIONS)
def test_partition_gives_disjoint_nonempty_deterministic_silos(works, partition):
    splits = _splits(works, partition)
    assert len(splits) == 4
    for a, b in combinations(splits, 2):
        assert not set(a.units) & set(b.units)
    for split in splits:
        assert split.train and split.held_out
        assert not split.train_blocks & split.held_out_blocks  # held-out is whole blocks
        assert {u for u, _ in split.held_out_blocks} <= set(split.units)
        long_held = {e.response for e in split.held_out if e.response.count("\n") >= 3}
        assert not long_held & {e.response for e in split.train}
        share = len(split.held_out) / (len(split.train) + len(split.held_out))
        assert 0.05 < share < 0.2, share
    again = _splits(works, partition)
    assert [(s.units, s.train, s.held_out) for s in again] == [(s.units, s.train, s.held_out) for s in splits]
    other = _splits(works, partition, seed=1)
    assert [s.units for s in other] == [s.units for s in splits]  # the seed moves held-out blocks only
    assert [s.held_out_blocks for s in other] != [s.held_out_blocks for s in splits]


def test_genre_silos_hold_one_distinct_genre_each(works):
    splits = _splits(works, "genre")
    genres = [{e.domain for e in s.train} for s in splits]
    assert genres == [{"comedy"}, {"history"}, {"tragedy"}, {"poem"}]
    assert all({e.domain for e in s.held_out} == g for s, g in zip(splits, genres))


def test_more_silos_than_genres_split_works_between_them(works):
    splits = _splits(works, "genre", num_silos=8)
    assert [{e.domain for e in s.train} for s in splits] == [{"comedy"}, {"history"}, {"tragedy"}, {"poem"}] * 2
    for a, b in combinations(splits, 2):
        assert not set(a.units) & set(b.units)
    four = set().union(*(s.held_out_blocks for s in _splits(works, "genre")))
    assert set().union(*(s.held_out_blocks for s in splits)) == four  # a unit's blocks, whatever its silo


def test_era_silos_differ_in_spelling_over_disjoint_genre_balanced_plays(works):
    splits = _splits(works, "era")
    assert [{e.domain for e in s.train} for s in splits] == [{"modern"}, {"folio"}] * 2
    assert [{_work(works, u).era for u in s.units} for s in splits] == [{"modern"}, {"folio"}] * 2
    plays = [[_work(works, u).play for u in s.units] for s in splits]
    dealt = [p for silo in plays for p in silo]
    assert len(dealt) == len(set(dealt)) == 35  # each play once, in one spelling; no poems, no Pericles
    for silo in splits:
        assert {_work(works, u).genre for u in silo.units} == {"comedy", "history", "tragedy"}
    odd = partition_silos(works, 3, partition="era")
    assert [{e.domain for e in s.train} for s in odd] == [{"modern"}, {"folio"}, {"modern"}]
    with pytest.raises(DataError, match="at least as many silos as eras"):
        partition_silos(works, 1, partition="era")


def test_play_partition_takes_the_longest_plays_or_the_named_ones(works):
    splits = _splits(works, "play")
    assert [s.units for s in splits] == [("hamlet_gut",), ("richard_iii_gut",), ("coriolanus_gut",),
                                         ("antony_and_cleopatra_gut",)]
    named = partition_silos(works, 2, partition="play", silos_from=["macbeth", "tempest", "king_lear"])
    assert [s.units for s in named] == [("macbeth_gut", "lear_gut"), ("tempest_gut",)]
    assert {e.domain for e in named[0].train} == {"macbeth", "king_lear"}
    with pytest.raises(DataError, match="unknown play"):
        partition_silos(works, 2, partition="play", silos_from=["hamlet", "no_such_play"])


def test_role_partition_respects_min_lines(works):
    modern = [w for w in works if w.era == "modern"]
    roles = role_units(modern, passage_lines=8, min_lines=64)
    assert len(roles) > 200 and all(r.lines >= 64 for r in roles)
    assert roles[0].id == "hamlet/Ham"  # the longest part in the canon
    strict = role_units(modern, passage_lines=8, min_lines=500)
    assert {r.id for r in strict} < {r.id for r in roles} and all(r.lines >= 500 for r in strict)
    splits = partition_silos(works, 4, partition="role", per_silo=3, min_lines=300)
    for split in splits:
        assert len(split.units) == 3
        assert {e.domain for e in split.train} == set(split.units)  # a role's own label
        assert all(next(r for r in roles if r.id == u).lines >= 300 for u in split.units)
    hamlet = next(r for r in roles if r.id == "hamlet/Ham")
    assert all(speech.startswith("Ham:\n") for block in hamlet.blocks for p in block for speech in p.split("\n\n"))
    with pytest.raises(DataError, match="only"):
        partition_silos(works, 4, partition="role", min_lines=1200)


def test_held_out_blocks_keep_both_sides_and_depend_on_the_unit_only():
    unit = Unit("u", "d", tuple(("p",) * 3 for _ in range(20)), 60)
    held = held_out_blocks(unit, 0.1, seed=0)
    assert 1 <= len(held) < 20 and held == held_out_blocks(unit, 0.1, seed=0)
    assert held_out_blocks(Unit("solo", "d", (("p", "q"),), 2), 0.5, seed=0) == frozenset()
    with pytest.raises(DataError, match="at least one"):
        split_silo(0, [Unit("solo", "d", (("p", "q"),), 2)], eval_fraction=0.1, seed=0, examples_per_silo=None)


def test_examples_per_silo_caps_train_and_scales_held_out(works):
    splits = partition_silos(works, 4, partition="genre", examples_per_silo=256, eval_fraction=0.2)
    for split in splits:
        assert len(split.train) == 256 and len(split.held_out) == math.ceil(256 * 0.2 / 0.8)


def test_assign_balances_shared_groups_and_refuses_too_few_units():
    units = [Unit(f"w{i}", "g", (("p",),), lines) for i, lines in enumerate([50, 40, 30, 20])]
    silos = assign([("g", units)], 2)
    assert [[u.id for u in s] for s in silos] == [["w0", "w3"], ["w1", "w2"]]
    with pytest.raises(DataError, match="1 unit"):
        assign([("g", units[:1])], 2)


def test_loading_through_config_gives_labelled_batches():
    config = parse_config(_config(partition="genre", examples_per_silo=24, eval_fraction=0.25))
    assert config.data.builtin is None
    data = load_data(config)
    assert data.num_train == 24 and len(data.eval) == 8
    assert set(data.train.domains) == set(data.eval.domains) == {"history"}
    train, held_out = build_shakespeare_dataset(silo_index=1, num_silos=4, partition="genre",
                                                examples_per_silo=24, eval_fraction=0.25)
    assert len(train) == 24 and len(held_out) == 8
    result = evaluate(build_model(config.model), data.eval, torch.device("cpu"), 8)
    assert set(result) == {"history"} and result["history"][1] > 0  # per-domain evaluation


def test_config_refuses_mixed_sources_and_bad_keys():
    with pytest.raises(ConfigError, match="one data source"):
        parse_config({"data": {"shakespeare": {}, "builtin": {}}})
    with pytest.raises(ConfigError, match="era.*spelling"):
        parse_config({"data": {"shakespeare": {"partition": "era", "spelling": "folio"}}})
    with pytest.raises(ConfigError, match="farce"):
        parse_config({"data": {"shakespeare": {"silos_from": ["comedy", "farce"]}}})
