"""Classification silos under Dirichlet label skew (data.labelskew): the pure split, the two text
sources, the balanced global test set, loading through the silo's data path, and label accuracy."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fcmoe.config import parse_config
from fcmoe.errors import ConfigError, DataError
from fcmoe.model import build_model
from silo_agent.data.loading import load_data
from silo_agent.classify import classify, label_accuracy, score_label_words, target_indices
from silo_agent.data import ByteTokenizer, Example
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
from silo_agent.data.label_skew import (
    balanced_counts,
    dirichlet_label_split,
    label_counts,
    label_entropy,
)

ALPHAS = (0.1, 0.5, 1.0)
LABELS = np.repeat(np.arange(3), balanced_counts(640, 3))  # 10 silos x 64, three labels: 214, 213, 213

# Training examples per silo (rows) and genre (comedy, history, tragedy) of the default
# shakespeare_genre split for 10 silos (examples_per_silo 64, seed 0): the split the benchmark uses.
COUNTS = {
    0.1: [[27, 0, 1], [40, 1, 0], [0, 16, 6], [4, 0, 205], [3, 0, 0],
          [7, 8, 0], [92, 0, 0], [29, 187, 0], [7, 0, 0], [5, 1, 1]],
    0.5: [[0, 2, 151], [18, 2, 41], [16, 7, 2], [0, 3, 1], [17, 62, 0],
          [1, 5, 0], [108, 0, 0], [8, 0, 2], [5, 127, 0], [41, 5, 16]],
    1.0: [[0, 51, 76], [15, 11, 8], [37, 42, 0], [13, 18, 2], [25, 4, 1],
          [41, 4, 19], [3, 7, 36], [25, 5, 17], [21, 10, 54], [34, 61, 0]],
}


def _show(counts: np.ndarray, alpha: float) -> None:
    """The label counts per silo, as `pytest -s` prints them."""
    print(f"\nalpha={alpha}: silo  comedy history tragedy  entropy")
    for i, (row, h) in enumerate(zip(counts, label_entropy(counts))):
        print(f"          {i:>4}  " + " ".join(f"{int(n):>7}" for n in row) + f"  {h:7.3f}")


# --- the pure split ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
def test_split_uses_every_example_once_leaves_no_silo_empty_and_is_seeded(alpha):
    parts = dirichlet_label_split(LABELS, 10, alpha, seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(LABELS)))  # a partition: each example exactly once
    assert all(len(p) >= 1 for p in parts)
    again = dirichlet_label_split(LABELS, 10, alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_label_split(LABELS, 10, alpha, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    counts = label_counts(LABELS, parts, 3)
    assert counts.sum(axis=0).tolist() == [214, 213, 213]


def test_skew_falls_as_alpha_grows():
    entropy = {a: np.mean([label_entropy(label_counts(LABELS, dirichlet_label_split(LABELS, 10, a, s), 3)).mean()
                           for s in range(8)]) for a in ALPHAS}
    assert entropy[0.1] < entropy[0.5] < entropy[1.0] < math.log(3)
    dominant = {a: np.mean([(c.max(axis=1) / c.sum(axis=1)).mean() for c in
                            (label_counts(LABELS, dirichlet_label_split(LABELS, 10, a, s), 3) for s in range(8))])
                for a in ALPHAS}
    assert dominant[0.1] > dominant[0.5] > dominant[1.0]  # share of each silo's main label


def test_min_per_silo_redraws_and_refuses_what_cannot_work():
    parts = dirichlet_label_split(LABELS, 10, 0.1, seed=0, min_per_silo=8)
    assert min(len(p) for p in parts) >= 8
    with pytest.raises(DataError, match="cannot give 10 silos 100 each"):
        dirichlet_label_split(LABELS, 10, 0.5, seed=0, min_per_silo=100)
    with pytest.raises(DataError, match="Dirichlet draws"):
        dirichlet_label_split(np.repeat(np.arange(2), 15), 10, 0.01, seed=0, min_per_silo=3)
    with pytest.raises(DataError, match="alpha"):
        dirichlet_label_split(LABELS, 10, 0.0, seed=0)
    with pytest.raises(DataError, match="integer"):
        dirichlet_label_split(np.array([0.5, 1.5]), 2, 1.0, seed=0)


def test_entropy_and_balanced_counts_by_hand():
    assert label_entropy(np.array([[5, 0, 0], [1, 1, 0], [2, 2, 2], [0, 0, 0]])) == pytest.approx(
        [0.0, math.log(2), math.log(3), 0.0])
    assert balanced_counts(10, 3).tolist() == [4, 3, 3]
    assert balanced_counts(640, 3).tolist() == [214, 213, 213]


# --- shakespeare_genre ------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
def test_label_counts_per_silo(alpha):
    split = labelskew_split(num_silos=10, alpha=alpha)
    _show(split.counts, alpha)
    assert split.labels == ("comedy", "history", "tragedy")
    assert split.counts.tolist() == COUNTS[alpha]
    for silo, records in enumerate(split.train):  # the table is what the silos hold
        held = Counter(e.domain for e in records)
        assert [held[name] for name in split.labels] == COUNTS[alpha][silo]
    assert split.counts.sum() == 640 and (split.counts.sum(axis=1) >= 1).all()


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


def _config(**labelskew):
    return {"data": {"labelskew": {"alpha": 0.5, "examples_per_silo": 16, "test_examples_per_label": 10,
                                   **labelskew}, "max_length": 320},
            "silo": {"name": "silo3", "index": 3, "num_silos": 10}}


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


# --- fortunes_category ------------------------------------------------------------------------


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


# --- label accuracy ---------------------------------------------------------------------------


def test_label_accuracy_by_hand():
    scores = [[-1.0, -2.0, -3.0],  # -> 0, right
              [-5.0, -0.5, -9.0],  # -> 1, right
              [-2.0, -1.0, -1.5],  # -> 1, wrong (2)
              [-1.0, -1.0, -4.0]]  # tie -> 0, wrong (1)
    result = label_accuracy(scores, [0, 1, 2, 1])
    assert result.predicted.tolist() == [0, 1, 1, 0]
    assert result.accuracy == 0.5
    assert result.per_label.tolist() == [1.0, 0.5, 0.0]
    assert result.balanced == pytest.approx(0.5)
    assert np.isnan(label_accuracy([[0.0, 1.0]], [1]).per_label[0])
    with pytest.raises(DataError, match="label indices"):
        label_accuracy(scores, [0, 1, 2, 3])
    examples = [Example("a\nGenre:", " comedy", "comedy"), Example("b\nGenre:", " tragedy", "tragedy")]
    assert target_indices(examples, [" comedy", " history", " tragedy"]).tolist() == [0, 2]
    with pytest.raises(DataError, match="not among"):
        target_indices(examples, [" comedy"])


def test_label_word_scores_of_a_tiny_model():
    config = parse_config({})
    model = build_model(config.model)
    tok = ByteTokenizer()
    words = [" comedy", " history", " tragedy"]
    examples = [Example("Enter a fool.\nGenre:", " comedy", "comedy"),
                Example("The king is dead.\nGenre:", " history", "history"),
                Example("O!\nGenre:", " tragedy", "tragedy")]
    scores = score_label_words(model, tok, examples, words, batch_size=4)
    assert scores.shape == (3, 3) and np.isfinite(scores).all() and (scores < 0).all()
    # by hand: log-probabilities of the word's bytes after BOS + prompt
    ids = [tok.bos_token_id] + tok.encode(examples[1].prompt) + tok.encode(words[2])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    start = len(ids) - len(words[2])
    manual = sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
    assert scores[1, 2] == pytest.approx(manual, abs=1e-4)
    assert np.allclose(score_label_words(model, tok, examples, words, batch_size=1), scores, atol=1e-4)  # padding
    result = classify(model, tok, examples, words)
    assert result.predicted.tolist() == scores.argmax(axis=1).tolist() and 0.0 <= result.accuracy <= 1.0
    cut = score_label_words(model, tok, examples, words, max_length=12)  # long prompts lose their start
    assert cut.shape == (3, 3) and np.isfinite(cut).all()
