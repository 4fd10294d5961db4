"""silo_agent/classify.py: label accuracy by hand and label-word scores of a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcmoe.config import parse_config
from fcmoe.errors import DataError
from fcmoe.model import build_model
from silo_agent.classify import classify, label_accuracy, score_label_words, target_indices
from silo_agent.data import ByteTokenizer, Example


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
