"""Shakespeare's works as genuinely non-IID silo data: passages, held-out blocks and partitioners.

The works of LEAF's Shakespeare benchmark, where each speaking role is a federated client, parsed
by silo_agent/data/shakespeare_text.py. Every step is a pure function of the installed texts and the
arguments:

1. A :class:`Unit` is what one silo receives whole: a work (``genre``, ``era``, ``play``
   partitions) or one speaking role of a play (``role``, LEAF style). Its text is packed into
   passages of at most ``passage_lines`` spoken lines that never cross a block.
2. Held-out passages are whole blocks drawn per unit (seeded), so held-out text follows the same
   distribution as the silo's training text (every unit contributes about ``eval_fraction``) and
   shares no passage with it: only the lines at a held-out block's two edges have a neighbour in
   training. A random split of lines would put a line's neighbours, which largely predict it,
   into training.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fcmoe.errors import DataError
from fcmoe.logs import log_event

from .records import Example
from .shakespeare_text import ERAS, GENRES, Era, Speech, Work, load_works

log = logging.getLogger(__name__)

PartitionName = Literal["genre", "play", "era", "role"]
PARTITIONS: tuple[PartitionName, ...] = ("genre", "play", "era", "role")

# --- passages and units -----------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """What one silo receives whole: a work, or one speaking role of a play (``id`` is
    ``play/speaker``). ``blocks`` holds the unit's passages, block by block, in text order."""

    id: str
    domain: str
    blocks: tuple[tuple[str, ...], ...]
    lines: int

    @property
    def passages(self) -> int:
        """Number of passages (examples before any cap) over all blocks."""
        return sum(len(b) for b in self.blocks)


def _chunks(lines: Sequence[str], size: int) -> list[Sequence[str]]:
    """``lines`` cut into the fewest chunks of at most ``size`` lines, as even as possible (a
    9-line speech with size 8 gives 5 + 4, not 8 + 1)."""
    count = math.ceil(len(lines) / size)
    bounds = [round(i * len(lines) / count) for i in range(count + 1)]
    return [lines[bounds[i] : bounds[i + 1]] for i in range(count)]


def _render(speeches: Sequence[tuple[str | None, Sequence[str]]]) -> str:
    """A passage as text: each speech as ``Speaker:`` then its lines, speeches separated by a
    blank line; the same layout for both spellings, so spelling is what tells eras apart."""
    parts = []
    for speaker, lines in speeches:
        body = "\n".join(lines)
        parts.append(body if speaker is None else f"{speaker}:\n{body}")
    return "\n\n".join(parts)


def passages(speeches: Sequence[Speech], passage_lines: int) -> tuple[tuple[str, ...], ...]:
    """Speeches packed into passages of at most ``passage_lines`` lines, grouped by block.

    Whole consecutive speeches are packed while they fit; a longer speech becomes passages of its
    own. No passage crosses a block, so held-out blocks share no passage with training ones.
    """
    if passage_lines < 1:
        raise DataError(f"passage_lines must be >= 1, got {passage_lines}")
    by_block: dict[int, list[str]] = {}
    current: list[tuple[str | None, Sequence[str]]] = []
    size, block = 0, None

    def flush() -> None:
        nonlocal size
        if current:
            by_block.setdefault(block, []).append(_render(current))  # type: ignore[arg-type]
            current.clear()
            size = 0

    for speech in speeches:
        if speech.block != block:
            flush()
            block = speech.block
        if size + len(speech.lines) <= passage_lines:
            current.append((speech.speaker, speech.lines))
            size += len(speech.lines)
            continue
        flush()
        if len(speech.lines) <= passage_lines:
            current.append((speech.speaker, speech.lines))
            size = len(speech.lines)
            continue
        for chunk in _chunks(speech.lines, passage_lines):
            current.append((speech.speaker, chunk))
            size = len(chunk)
            flush()
    flush()
    return tuple(tuple(by_block[b]) for b in sorted(by_block))


def work_unit(work: Work, domain: str, passage_lines: int) -> Unit:
    """A whole work as one unit, labelled ``domain``."""
    return Unit(work.key, domain, passages(work.speeches, passage_lines), work.lines)


def role_units(works: Iterable[Work], passage_lines: int, min_lines: int) -> list[Unit]:
    """LEAF-style clients: every (play, speaker) with at least ``min_lines`` spoken lines, its own
    speeches only, largest role first (ties by id, so the order is deterministic)."""
    units: list[Unit] = []
    for work in works:
        if work.genre == "poem":
            continue
        counts: dict[str, int] = {}
        for speech in work.speeches:
            if speech.speaker is not None:
                counts[speech.speaker] = counts.get(speech.speaker, 0) + len(speech.lines)
        for speaker, lines in counts.items():
            if lines >= min_lines:
                own = [s for s in work.speeches if s.speaker == speaker]
                role = f"{work.play}/{speaker}"
                units.append(Unit(role, role, passages(own, passage_lines), lines))
    return sorted(units, key=lambda u: (-u.lines, u.id))


# --- held-out split and partitioners ----------------------------------------------------------

_HELD_OUT_STREAM, _SAMPLE_STREAM = 11, 12


@dataclass(frozen=True)
class SiloSplit:
    """One silo's share: the units it holds and its examples. ``train_blocks`` and
    ``held_out_blocks`` name the ``(unit id, block index)`` pairs each side was drawn from; they
    never intersect."""

    units: tuple[str, ...]
    train: list[Example]
    held_out: list[Example]
    train_blocks: frozenset[tuple[str, int]]
    held_out_blocks: frozenset[tuple[str, int]]

    @property
    def chars(self) -> int:
        """Characters of text over both sides, what sizes a silo's data in the logs."""
        return sum(len(e.response) for e in self.train) + sum(len(e.response) for e in self.held_out)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent stream for ``keys`` under ``seed`` (numpy SeedSequence; no Python hash(),
    which changes between processes)."""
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def held_out_blocks(unit: Unit, eval_fraction: float, seed: int) -> frozenset[int]:
    """Blocks of ``unit`` held out: a seeded random order of its blocks, taken while the held-out
    passages stay nearest to ``eval_fraction`` of the unit's. A unit keeps at least one block for
    training, and one block of at least two goes to held-out, so each unit is represented in
    both (that is what makes held-out follow the silo's own distribution). The draw depends on
    the unit alone, not on which silo holds it."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    sizes = [len(block) for block in unit.blocks]
    if len(sizes) < 2:
        return frozenset()
    order = _rng(seed, _HELD_OUT_STREAM, zlib.crc32(unit.id.encode("utf-8"))).permutation(len(sizes))
    target = eval_fraction * sum(sizes)
    chosen: list[int] = []
    count = 0
    for block in order[:-1]:
        if count >= target:
            break
        if chosen and count + sizes[block] / 2 > target:
            continue  # would overshoot more than it helps; a smaller block may still fit
        chosen.append(int(block))
        count += sizes[block]
    return frozenset(chosen)


def _subsample(examples: list[Example], k: int, rng: np.random.Generator) -> list[Example]:
    """``k`` examples drawn without replacement, kept in text order."""
    if k >= len(examples):
        return examples
    return [examples[i] for i in sorted(rng.choice(len(examples), size=k, replace=False).tolist())]


def split_silo(
    silo_index: int, units: Sequence[Unit], *, eval_fraction: float, seed: int, examples_per_silo: int | None
) -> SiloSplit:
    """Train / held-out examples of one silo from its units.

    ``examples_per_silo`` caps the train side (a seeded draw per silo) and the held-out side in
    proportion, ``eval_fraction / (1 - eval_fraction)`` of the train count, so silos of very
    different sizes (the poems hold a tenth of the comedies) can be made equal.
    """
    train: list[Example] = []
    held_out: list[Example] = []
    train_blocks: set[tuple[str, int]] = set()
    held_blocks: set[tuple[str, int]] = set()
    for unit in units:
        held = held_out_blocks(unit, eval_fraction, seed)
        for index, block in enumerate(unit.blocks):
            side, names = (held_out, held_blocks) if index in held else (train, train_blocks)
            side.extend(Example(prompt="", response=text, domain=unit.domain) for text in block)
            names.add((unit.id, index))
    ids = tuple(u.id for u in units)
    if not train or not held_out:
        raise DataError(
            f"silo {silo_index} ({', '.join(ids)[:200]}): {len(train)} train and {len(held_out)} held-out "
            "passages; each side needs at least one (use more or larger works, or smaller passage_lines)")
    if examples_per_silo is not None:
        if examples_per_silo < 1:
            raise DataError(f"examples_per_silo must be >= 1, got {examples_per_silo}")
        if len(train) < examples_per_silo:
            log_event(log, "shakespeare_silo_short", level=logging.WARNING, silo=silo_index,
                      available=len(train), asked=examples_per_silo)
        rng = _rng(seed, _SAMPLE_STREAM, silo_index)
        train = _subsample(train, examples_per_silo, rng)
        held_out = _subsample(held_out, math.ceil(len(train) * eval_fraction / (1 - eval_fraction)), rng)
    return SiloSplit(ids, train, held_out, frozenset(train_blocks), frozenset(held_blocks))


def assign(groups: Sequence[tuple[str, Sequence[Unit]]], num_silos: int) -> list[list[Unit]]:
    """Units per silo from ordered ``(label, units)`` groups.

    With at least as many groups as silos, silo ``i`` takes whole groups ``i, i + n, ...``. With
    fewer, silos ``g, g + G, ...`` share group ``g`` and split its units by size (largest unit to
    the silo holding the fewest lines so far, ties to the lower index), so no unit is split and
    silos of one group stay balanced.
    """
    if num_silos < 1:
        raise DataError(f"num_silos must be >= 1, got {num_silos}")
    if not groups:
        raise DataError("no groups to partition")
    for label, units in groups:
        if not units:
            raise DataError(f"group {label!r} holds no text")
    silos: list[list[Unit]] = [[] for _ in range(num_silos)]
    if len(groups) >= num_silos:
        for g, (_, units) in enumerate(groups):
            silos[g % num_silos].extend(units)
        return silos
    for g, (label, units) in enumerate(groups):
        sharers = list(range(g, num_silos, len(groups)))
        if len(units) < len(sharers):
            raise DataError(f"group {label!r} has {len(units)} unit(s) for {len(sharers)} silos; use fewer silos")
        load = {i: 0 for i in sharers}
        for unit in sorted(units, key=lambda u: (-u.lines, u.id)):
            target = min(sharers, key=lambda i: (load[i], i))
            silos[target].append(unit)
            load[target] += unit.lines
    return silos


def _check_names(kind: str, names: Sequence[str], allowed: Sequence[str], where: str = "") -> None:
    if not names:
        raise DataError(f"silos_from must name at least one {kind}")
    if len(set(names)) != len(names):
        raise DataError(f"silos_from names a {kind} twice: {list(names)}")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        shown = ", ".join(list(allowed)[:40]) + (", ..." if len(allowed) > 40 else "")
        raise DataError(f"unknown {kind}(s) {unknown}{where}; allowed: {shown}")


def _top(units: Sequence[Unit], names: Sequence[str] | None, kind: str, num_silos: int,
         per_silo: int, min_lines: int = 0) -> list[tuple[str, Sequence[Unit]]]:
    """One-unit groups: the named units in that order, else the ``num_silos * per_silo`` largest."""
    by_id = {u.domain: u for u in units}  # the play id, or the role id
    if names is None:
        need = num_silos * per_silo
        if len(units) < need:
            raise DataError(f"{num_silos} silos x {per_silo} {kind}(s) need {need} {kind}s, only {len(units)} qualify")
        chosen = list(units)[:need]
    else:
        _check_names(kind, names, list(by_id), f" (with min_lines={min_lines})" if kind == "role" else "")
        chosen = [by_id[n] for n in names]
    return [(u.id, [u]) for u in chosen]


def _spelling(works: Sequence[Work], spelling: Era) -> list[Work]:
    if spelling not in ERAS:
        raise DataError(f"unknown spelling {spelling!r}; allowed: {', '.join(ERAS)}")
    return [w for w in works if w.era == spelling]


def by_genre(works: Sequence[Work], num_silos: int, *, genres: Sequence[str] | None = None,
             spelling: Era = "modern", passage_lines: int = 8) -> list[list[Unit]]:
    """Silos by First Folio genre (comedy, history, tragedy; plus poem): each work whole, labelled
    with its genre. Default groups: every genre present in that spelling."""
    chosen = _spelling(works, spelling)
    present = [g for g in GENRES if any(w.genre == g for w in chosen)]
    names = list(genres) if genres is not None else present
    _check_names("genre", names, present, f" in {spelling} spelling")
    return assign([(g, [work_unit(w, g, passage_lines) for w in chosen if w.genre == g]) for g in names], num_silos)


def by_era(works: Sequence[Work], num_silos: int, *, eras: Sequence[str] | None = None,
           passage_lines: int = 8) -> list[list[Unit]]:
    """Silos by spelling: silo ``i`` reads era ``eras[i % len(eras)]`` (modern, Globe-based, or
    First Folio), over the 35 plays the package has in both spellings.

    Every play goes to one silo only, in that silo's spelling, and plays are dealt so that every
    silo gets a similar mix of comedies, histories and tragedies and a similar amount of text:
    spelling is then the systematic difference between silos. Giving two silos the same play in
    two spellings would let a global model train, through one silo, on the other spelling of a
    scene held out at another; one silo with both versions could do so within itself.
    """
    names = list(eras) if eras is not None else list(ERAS)
    _check_names("era", names, ERAS)
    if num_silos < len(names):
        raise DataError(f"era partition needs at least as many silos as eras ({len(names)}), got {num_silos}")
    versions = {(w.play, w.era): w for w in works}
    both = sorted({w.play for w in works if (w.play, "modern") in versions and (w.play, "folio") in versions})
    if len(both) < num_silos:
        raise DataError(f"era partition: {len(both)} plays exist in both spellings, fewer than {num_silos} silos")
    silos: list[list[Unit]] = [[] for _ in range(num_silos)]
    for i, plays in enumerate(_deal_by_genre([versions[(p, "modern")] for p in both], num_silos)):
        era = names[i % len(names)]
        silos[i] = [work_unit(versions[(p, era)], era, passage_lines) for p in plays]
    return silos


def _deal_by_genre(plays: Sequence[Work], num_silos: int) -> list[list[str]]:
    """Play ids per silo: genre by genre, longest play first, each to the silo holding the fewest
    lines of that genre so far (ties: fewest lines overall, then lowest index)."""
    total = [0] * num_silos
    dealt: list[list[str]] = [[] for _ in range(num_silos)]
    for genre in GENRES:
        of_genre = [0] * num_silos
        for play in sorted((w for w in plays if w.genre == genre), key=lambda w: (-w.lines, w.play)):
            target = min(range(num_silos), key=lambda i: (of_genre[i], total[i], i))
            dealt[target].append(play.play)
            of_genre[target] += play.lines
            total[target] += play.lines
    return dealt


def by_play(works: Sequence[Work], num_silos: int, *, plays: Sequence[str] | None = None, per_silo: int = 1,
            spelling: Era = "modern", passage_lines: int = 8) -> list[list[Unit]]:
    """One or more whole works per silo, labelled with the play id: the named ones dealt in turn
    (silo ``i`` takes ``plays[i], plays[i + n], ...``), else the ``per_silo * num_silos`` longest
    plays (poems only when named)."""
    chosen = _spelling(works, spelling)
    units = [work_unit(w, w.play, passage_lines) for w in chosen if plays is not None or w.genre != "poem"]
    units.sort(key=lambda u: (-u.lines, u.id))
    return assign(_top(units, plays, "play", num_silos, per_silo), num_silos)


def by_role(works: Sequence[Work], num_silos: int, *, roles: Sequence[str] | None = None, per_silo: int = 1,
            min_lines: int = 64, spelling: Era = "modern", passage_lines: int = 8) -> list[list[Unit]]:
    """LEAF style: a client is one speaking role (``play/speaker``, e.g. ``hamlet/Ham``) with at
    least ``min_lines`` lines, holding only its own speeches; a silo holds ``per_silo`` roles,
    the largest first (silo ``i`` takes ranks ``i, i + n, ...``), or the named ones in turn.
    Speaker tags are the texts' own; First Folio tags vary within a play (``Bar.``/``Barn.``),
    so a Folio role may be split and modern spelling is the better default."""
    if min_lines < 1:
        raise DataError(f"min_lines must be >= 1, got {min_lines}")
    units = role_units(_spelling(works, spelling), passage_lines, min_lines)
    return assign(_top(units, roles, "role", num_silos, per_silo, min_lines), num_silos)


def partition_silos(
    works: Sequence[Work],
    num_silos: int,
    *,
    partition: PartitionName = "genre",
    silos_from: Sequence[str] | None = None,
    spelling: Era | None = None,
    per_silo: int = 1,
    min_lines: int = 64,
    passage_lines: int = 8,
    examples_per_silo: int | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
) -> list[SiloSplit]:
    """Every silo's :class:`SiloSplit` under one partition; every silo computes the same list."""
    if partition == "era":
        if spelling is not None:
            raise DataError("partition 'era' uses both spellings; leave spelling unset")
        if per_silo != 1:
            raise DataError("per_silo applies to partitions play and role")
        silos = by_era(works, num_silos, eras=silos_from, passage_lines=passage_lines)
    elif partition == "genre":
        if per_silo != 1:
            raise DataError("per_silo applies to partitions play and role")
        silos = by_genre(works, num_silos, genres=silos_from, spelling=spelling or "modern",
                         passage_lines=passage_lines)
    elif partition == "play":
        silos = by_play(works, num_silos, plays=silos_from, per_silo=per_silo, spelling=spelling or "modern",
                        passage_lines=passage_lines)
    elif partition == "role":
        silos = by_role(works, num_silos, roles=silos_from, per_silo=per_silo, min_lines=min_lines,
                        spelling=spelling or "modern", passage_lines=passage_lines)
    else:
        raise DataError(f"unknown partition {partition!r}; allowed: {', '.join(PARTITIONS)}")
    return [split_silo(i, units, eval_fraction=eval_fraction, seed=seed, examples_per_silo=examples_per_silo)
            for i, units in enumerate(silos)]


def build_shakespeare_dataset(
    *,
    silo_index: int,
    num_silos: int,
    partition: PartitionName = "genre",
    silos_from: Sequence[str] | None = None,
    spelling: Era | None = None,
    per_silo: int = 1,
    min_lines: int = 64,
    passage_lines: int = 8,
    examples_per_silo: int | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
    data_dir: Path | None = None,
) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)`` of silo ``silo_index``: a pure function of the installed texts and
    the arguments (the keys of ``data.shakespeare``), so silos agree without talking."""
    if not 0 <= silo_index < num_silos:
        raise DataError(f"silo_index must be in [0, {num_silos}), got {silo_index}")
    splits = partition_silos(
        load_works(data_dir), num_silos, partition=partition, silos_from=silos_from, spelling=spelling,
        per_silo=per_silo, min_lines=min_lines, passage_lines=passage_lines,
        examples_per_silo=examples_per_silo, eval_fraction=eval_fraction, seed=seed)
    mine = splits[silo_index]
    log_event(log, "shakespeare_silo", silo=silo_index, partition=partition, units=len(mine.units),
              domains=",".join(sorted({e.domain for e in mine.train})), train=len(mine.train),
              held_out=len(mine.held_out), chars=mine.chars)
    return mine.train, mine.held_out
