"""Classification accuracy of a causal LM on label-word records (data.labelskew).

A record's prompt ends with a cue (``"\\nGenre:"``) and its response is a label word (``" comedy"``).
The model's prediction is the candidate label word with the highest log-likelihood after the prompt:
:func:`score_label_words` computes, for every record and candidate, the summed log-probability of the
word's tokens (BOS + prompt encoded as in training, silo_agent/data/tokenize.py); :func:`label_accuracy`
turns such a score matrix into predictions and accuracy (pure arithmetic, no model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fcmoe.errors import DataError
from silo_agent.data import IGNORE_INDEX, Example, Tokenizer, collate
from silo_agent.training import forward_logits, logit_losses


@dataclass(frozen=True)
class LabelAccuracy:
    """``predicted[n]``: the label index chosen for record ``n``; ``accuracy``: the share right;
    ``per_label[k]``: the share right among records of label ``k`` (NaN when there is none), whose
    mean is the balanced accuracy."""

    predicted: np.ndarray
    accuracy: float
    per_label: np.ndarray

    @property
    def balanced(self) -> float:
        """Mean of the per-label accuracies over the labels present."""
        present = self.per_label[~np.isnan(self.per_label)]
        return float(present.mean()) if present.size else float("nan")


def label_accuracy(scores: np.ndarray | Sequence[Sequence[float]], targets: Sequence[int] | np.ndarray) -> LabelAccuracy:
    """Predictions and accuracy from ``scores[n, k]`` (any per-label score where higher is more
    likely: summed log-likelihoods of the label words, or first-token logits) and the true label
    index of every record. Ties go to the lower label index."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[0] != targets.shape[0] or scores.shape[1] < 1:
        raise DataError(f"scores must be [records, labels] with one target per record, got {scores.shape} and "
                        f"{targets.shape[0]} target(s)")
    if targets.size and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise DataError(f"targets must be label indices in [0, {scores.shape[1]})")
    if np.isnan(scores).any():
        raise DataError("scores hold NaN")
    predicted = scores.argmax(axis=1)
    right = predicted == targets
    per_label = np.array([right[targets == k].mean() if (targets == k).any() else np.nan
                          for k in range(scores.shape[1])])
    return LabelAccuracy(predicted, float(right.mean()) if right.size else float("nan"), per_label)


def target_indices(examples: Sequence[Example], label_words: Sequence[str]) -> np.ndarray:
    """The index in ``label_words`` of every record's response."""
    index = {word: k for k, word in enumerate(label_words)}
    missing = sorted({e.response for e in examples if e.response not in index})
    if missing:
        raise DataError(f"response(s) {missing[:5]} not among the label words {list(label_words)}")
    return np.array([index[e.response] for e in examples], dtype=np.int64)


def _rows(tok: Tokenizer, examples: Sequence[Example], words: list[list[int]], max_length: int | None
          ) -> list[tuple[list[int], list[int]]]:
    """One ``(input_ids, labels)`` row per (record, label word): BOS + prompt + word, scored on the
    word's tokens only. With ``max_length``, a longer prompt loses its beginning (the cue stays)."""
    rows = []
    for e in examples:
        head = ([] if tok.bos_token_id is None else [tok.bos_token_id]) + tok.encode(e.prompt)
        for word in words:
            keep = len(head) if max_length is None else max_length - len(word)
            if keep < 1:
                raise DataError(f"max_length={max_length} leaves no room for a prompt before a {len(word)}-token label")
            rows.append((head[-keep:] + word, [IGNORE_INDEX] * len(head[-keep:]) + word))
    return rows


@torch.no_grad()
def score_label_words(model: nn.Module, tok: Tokenizer, examples: Sequence[Example], label_words: Sequence[str],
                      device: torch.device | str = "cpu", batch_size: int = 32,
                      max_length: int | None = None) -> np.ndarray:
    """``scores[n, k]``: log-probability of ``label_words[k]``'s tokens after record ``n``'s prompt
    (the sum over the word's tokens), for :func:`label_accuracy`. The model is put in eval mode."""
    if not label_words or any(not w for w in label_words):
        raise DataError("label_words must be non-empty strings")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    words = [tok.encode(w) for w in label_words]
    rows = _rows(tok, examples, words, max_length)
    model.eval()
    out = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size], tok.pad_token_id).items()}
        losses, _ = logit_losses(forward_logits(model, batch), batch)
        out[start:start + len(losses)] = (-losses.sum(dim=1)).double().cpu().numpy()
    return out.reshape(len(examples), len(label_words))


def classify(model: nn.Module, tok: Tokenizer, examples: Sequence[Example], label_words: Sequence[str],
             device: torch.device | str = "cpu", batch_size: int = 32, max_length: int | None = None) -> LabelAccuracy:
    """Accuracy of ``model`` on label-word records: :func:`score_label_words` then :func:`label_accuracy`."""
    targets = target_indices(examples, label_words)
    return label_accuracy(score_label_words(model, tok, examples, label_words, device, batch_size, max_length), targets)
