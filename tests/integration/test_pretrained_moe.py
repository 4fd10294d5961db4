"""The label-skew benchmark's pre-training text (benches/pretrained_moe.py) holds no test passage of
the benchmark's seeds, nor any passage of a scene block that a test passage comes from; the routing
entropy per label is the entropy of each label's expert histogram."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benches.pretrained_moe import _entropy, held_out_texts, pretraining_texts
from fcmoe.config import LabelSkewDataConfig
from silo_agent.data.classification import DEFAULT_LABELS, normalise_text, passage_pool


def test_pretraining_text_leaves_out_every_test_passage_and_its_scene_block():
    labelskew = LabelSkewDataConfig(passage_lines=2, min_chars=40, max_chars=160, examples_per_silo=16,
                                    test_examples_per_label=8).model_dump(mode="json")
    settings = [{"name": "a", "silos": 4, "labelskew": {**labelskew, "alpha": 0.1}},
                {"name": "b", "silos": 4, "labelskew": {**labelskew, "alpha": 1.0}}]
    held_out = held_out_texts(settings, seeds=2)
    assert len(held_out) >= 2 * 3 * 8  # at least the global test sets of two seeds
    texts, left_out = pretraining_texts(labelskew, held_out)
    assert not held_out & {normalise_text(t) for t in texts}
    pool = [p for per_label in passage_pool("shakespeare_genre", DEFAULT_LABELS["shakespeare_genre"], "modern", 2, 40, 160,
                                     None) for p in per_label]
    tainted = {p.group for p in pool if normalise_text(p.text) in held_out}
    kept = set(texts)
    assert not any(p.text in kept for p in pool if p.group in tainted)
    assert left_out == sum(p.group in tainted for p in pool) and len(texts) + left_out == len(pool)
    # a third seed's test passages are not all left out: held_out_seeds bounds --seeds
    assert held_out_texts(settings[:1], seeds=3) - held_out


def test_routing_entropy_by_hand():
    assert _entropy(np.array([5.0, 0, 0, 0])) == 0.0
    assert _entropy(np.array([1.0, 1, 1, 1])) == pytest.approx(math.log(4))
    assert _entropy(np.array([3.0, 1])) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
