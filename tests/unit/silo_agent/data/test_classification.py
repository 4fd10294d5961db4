"""silo_agent/data/classification.py: labelled passages from Shakespeare and fortunes, disjoint test sets,
config refusals."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fcmoe.config import parse_config
from fcmoe.errors import ConfigError, DataError
from silo_agent.data.classification import (
    CUES,
    DEFAULT_LABELS,
    FORTUNES_DIR,
    build_labelskew_dataset,
    fortunes_passages,
    label_word,
    labelskew_split,
    labelskew_test_set,
    parse_fortunes,
)
from silo_agent.data.label_skew import label_entropy
from silo_agent.data.loading import load_data


def _show(counts: np.ndarray, alpha: float) -> None:
    """The label counts per silo, as `pytest -s` prints them."""
    print(f"\nalpha={alpha}: silo  comedy history tragedy  entropy")
    for i, (row, h) in enumerate(zip(counts, label_entropy(counts))):
        print(f"          {i:>4}  " + " ".join(f"{int(n):>7}" for n in row) + f"  {h:7.3f}")


def _config(**labelskew):
    return {"data": {"labelskew": {"alpha": 0.5, "examples_per_silo": 16, "test_examples_per_label": 10,
                                   **labelskew}, "max_length": 320},
            "silo": {"name": "silo3", "index": 3, "num_silos": 10}}


def test_global_test_is_balanced_and_all_test_sets_are_disjoint_from_training():
    split = labelskew_split(num_silos=10, alpha=0.5, eval_fraction=0.2, test_examples_per_label=40)
    assert Counter(e.domain for e in split.global_test) == {name: 40 for name in split.labels}
    train = {e.prompt for silo in split.train for e in silo}
    assert len(train) == 640  # no passage twice
    global_test = {e.prompt for e in split.global_test}
    assert len(global_test) == 120 and not global_test & train
    seen = set(global_test)
    for silo, test in enumerate(split.local_test):
        mine = {e.prompt for e in test}
        assert len(mine) == len(test) and not mine & train and not mine & seen  # disjoint from all others
        seen |= mine
        own = Counter(e.domain for e in test)  # the silo's own label mix: ceil(c * 0.2 / 0.8) per label it holds
        assert [own[n] for n in split.labels] == [math.ceil(c / 4) for c in split.counts[silo]]
    assert labelskew_test_set(num_silos=10, alpha=0.5, eval_fraction=0.2, test_examples_per_label=40) \
        == list(split.global_test)


def test_test_passages_share_no_scene_block_with_training():
    from silo_agent.data.classification import passage_pool

    split = labelskew_split(num_silos=10, alpha=0.5)
    group = {p.text + CUES["shakespeare_genre"]: p.group
             for passages in passage_pool("shakespeare_genre", split.labels, "modern", 4, 32, 600, None) for p in passages}
    trained = {group[e.prompt] for silo in split.train for e in silo}
    tested = {group[e.prompt] for e in [*split.global_test, *(e for silo in split.local_test for e in silo)]}
    assert trained and tested and not trained & tested
    assert len({g.split("/")[0] for g in tested}) >= 20  # held-out blocks come from many works


def test_records_are_classification_records():
    split = labelskew_split(num_silos=10, alpha=1.0, passage_lines=4)
    words = {label_word(n) for n in split.labels}
    for record in [*split.global_test, *(e for silo in split.train for e in silo)]:
        assert record.prompt.endswith(CUES["shakespeare_genre"]) and len(record.prompt) > 32
        assert record.response in words and record.response == " " + record.domain
        speeches = record.prompt[: -len(CUES["shakespeare_genre"])].split("\n\n")
        assert sum(len(s.splitlines()) - 1 for s in speeches) <= 4  # spoken lines (a speaker tag heads each)


def test_too_little_text_is_one_clear_error():
    with pytest.raises(DataError, match="label 'poem'.*lower examples_per_silo"):
        labelskew_split(num_silos=10, labels=["comedy", "poem"], examples_per_silo=300)


def test_loading_through_the_silo_data_path():
    config = parse_config(_config())
    assert config.data.builtin is None and config.data.labelskew is not None
    data = load_data(config)
    train, held_out = build_labelskew_dataset(silo_index=3, num_silos=10, **config.data.labelskew.model_dump())
    split = labelskew_split(num_silos=10, alpha=0.5, examples_per_silo=16, test_examples_per_label=10)
    assert data.num_train == len(train) == int(split.counts[3].sum()) and len(data.eval) == len(held_out)
    held = Counter(data.train.domains)
    assert [held[n] for n in split.labels] == split.counts[3].tolist()
    assert all(e.prompt.endswith("\nGenre:") and e.response == " " + e.domain for e in train + held_out)
    with pytest.raises(DataError, match="lose their label; set max_length to"):
        load_data(parse_config({**_config(), "data": {**_config()["data"], "max_length": 64}}))


def test_config_keys_and_refusals():
    with pytest.raises(ConfigError, match="one data source"):
        parse_config({"data": {"labelskew": {}, "builtin": {}}})
    with pytest.raises(ConfigError, match="one data source"):
        parse_config({"data": {"labelskew": {}, "shakespeare": {}}})
    with pytest.raises(ConfigError, match="farce"):
        parse_config({"data": {"labelskew": {"labels": ["comedy", "farce"]}}})
    with pytest.raises(ConfigError, match="min_chars"):
        parse_config({"data": {"labelskew": {"min_chars": 700}}})
    with pytest.raises(ConfigError, match="alpha"):
        parse_config({"data": {"labelskew": {"alpha": 0}}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"data": {"labelskew": {"dirichlet_alpha": 0.5}}})


def test_fortune_files_parse_without_io():
    text = "First one.\n\t-- Someone\n%\nB\x08Bo\x08ol\x08ld\x08d\x07 text\n%\n\n%\nLast\n"
    assert parse_fortunes(text) == ["First one.\n\t-- Someone", "Bold text", "Last"]


def test_missing_fortunes_name_the_apt_package(tmp_path: Path):
    with pytest.raises(DataError, match="apt-get install fortunes"):
        fortunes_passages(["law"], data_dir=tmp_path / "absent")


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason=f"{FORTUNES_DIR} missing: Debian package `fortunes` "
                    "(as root: apt-get install fortunes, or make venv)")
def test_fortunes_category_split():
    split = labelskew_split(num_silos=10, source="fortunes_category", alpha=0.5, examples_per_silo=32,
                            test_examples_per_label=30)
    _show(split.counts, 0.5)
    assert split.labels == DEFAULT_LABELS["fortunes_category"] and split.counts.sum() == 320
    assert (split.counts.sum(axis=1) >= 1).all()
    assert Counter(e.domain for e in split.global_test) == {n: 30 for n in split.labels}
    train = {e.prompt for silo in split.train for e in silo}
    assert not train & {e.prompt for e in split.global_test}
    assert all(e.prompt.endswith("\nCategory:") and e.response == " " + e.domain for silo in split.train for e in silo)
