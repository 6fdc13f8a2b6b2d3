"""A small MusicXML reader for what the chorale parse needs: the soprano's notes and the key.

``music21``'s converter builds a full score (every part, beam, lyric and layout element) and takes about
0.15 s of CPU a chorale; this reader walks the XML tree once and keeps only the part names, the first key
signature, the soprano's notes, rests and ties and the bass's last note, in about a tenth of that. It handles
the plain layout of the corpus chorales (one voice a part, chords, ties, pickup bars, a ``<forward>`` gap after
the last note) and returns ``None`` for anything else it meets (several voices in a part, grace or cue notes, microtones, measure numbers that are not
integers (bar "4a" counts as bar 4, as in music21), a tie it can not follow), so that the caller parses that score with ``music21`` instead.
``tests/test_sequence_chorales.py`` checks that both give the same tokens.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from xml.etree import ElementTree

STEPS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


@dataclass
class Event:
    """One soprano note (``pitch`` the highest MIDI pitch of a chord) or rest (``pitch=None``), ties merged."""

    pitch: int | None
    quarter_length: Fraction
    measure: int


@dataclass
class ScoreSummary:
    soprano: list[Event] | None     # None: no part named "soprano"
    fifths: int | None              # the first key signature (sharps > 0, flats < 0); None: none
    last_bass_pitch: int | None     # the lowest MIDI pitch of the bass part's last note; None: no note


class Unsupported(Exception):
    """The score uses something this reader does not follow; parse it with music21."""


def _root(path: Path) -> ElementTree.Element:
    if path.suffix == ".mxl":
        with zipfile.ZipFile(path) as archive:
            container = ElementTree.fromstring(archive.read("META-INF/container.xml"))
            rootfile = container.find(".//rootfile")
            if rootfile is None:
                raise Unsupported("no rootfile in META-INF/container.xml")
            return ElementTree.fromstring(archive.read(rootfile.get("full-path")))
    return ElementTree.parse(path).getroot()


def _pitch(note: ElementTree.Element) -> int:
    pitch = note.find("pitch")
    if pitch is None:  # an unpitched note
        raise Unsupported("unpitched note")
    alter = float(pitch.findtext("alter", "0"))
    if alter != int(alter):
        raise Unsupported("microtone")
    return STEPS[pitch.findtext("step")] + int(alter) + 12 * (int(pitch.findtext("octave")) + 1)


def _notes(part: ElementTree.Element):
    """(measure number, note element, quarter length, is chord member) of a one-voice part, in order."""
    divisions, forward = None, False
    for measure in part.findall("measure"):
        number = re.fullmatch(r"(\d+)[a-zA-Z]?", measure.get("number", ""))  # "4a": bar 4 (music21's suffix)
        if number is None:
            raise Unsupported(f"measure number {measure.get('number')!r}")
        number = number.group(1)
        for element in measure:
            if element.tag == "attributes":
                divisions = int(element.findtext("divisions") or divisions or 0) or divisions
            elif element.tag == "backup":
                raise Unsupported("several voices")
            elif element.tag == "forward":  # a gap: harmless after the last note (trailing rests are dropped)
                forward = True
            elif element.tag == "note":
                if forward:
                    raise Unsupported("a note after a <forward> gap")
                if element.find("grace") is not None or element.find("cue") is not None:
                    raise Unsupported("grace or cue note")
                if not divisions:
                    raise Unsupported("note before <divisions>")
                length = Fraction(int(element.findtext("duration")), divisions)
                yield int(number), element, length, element.find("chord") is not None


def _soprano(part: ElementTree.Element) -> list[Event]:
    events: list[Event] = []
    open_tie = False  # the last event ends in a tie that the next note continues
    for measure, note, length, chord in _notes(part):
        rest = note.find("rest") is not None
        ties = {t.get("type") for t in note.findall("tie")}
        if chord:  # another pitch of the chord just read: the highest one counts
            if rest or not events or events[-1].pitch is None:
                raise Unsupported("chord member after a rest")
            events[-1].pitch = max(events[-1].pitch, _pitch(note))
            continue
        pitch = None if rest else _pitch(note)
        if open_tie:
            if "stop" not in ties or pitch != events[-1].pitch:
                raise Unsupported("a tie that is not continued by the same pitch")
            events[-1].quarter_length += length
        else:
            if "stop" in ties:
                raise Unsupported("a tie stop without a start")
            events.append(Event(pitch, length, measure))
        open_tie = "start" in ties
    if open_tie:
        raise Unsupported("a tie left open")
    return events


def _last_pitch(part: ElementTree.Element) -> int | None:
    last: list[int] = []
    for _, note, _, chord in _notes(part):
        if note.find("rest") is not None:
            continue
        last = [*last, _pitch(note)] if chord else [_pitch(note)]
    return min(last) if last else None


def read_score(path: str | Path) -> ScoreSummary | None:
    """The summary of a ``.mxl``/``.xml`` chorale score, or ``None`` where music21 should parse it."""
    path = Path(path)
    if path.suffix not in (".mxl", ".xml"):
        return None
    try:
        root = _root(path)
        if root.tag != "score-partwise":
            raise Unsupported(root.tag)
        names = {p.get("id"): f"{p.findtext('part-name') or ''} {p.get('id') or ''}".lower()
                 for p in root.iter("score-part")}
        parts = root.findall("part")
        if not parts:
            raise Unsupported("no part")
        for part in parts:
            for tag in ("transpose", "staves"):
                if part.find(f"measure/attributes/{tag}") is not None:
                    raise Unsupported(tag)
        soprano = next((p for p in parts if "soprano" in names.get(p.get("id"), "")), None)
        bass = next((p for p in parts if "bass" in names.get(p.get("id"), "")), parts[-1])
        fifths = None
        for part in parts:
            found = part.find("measure/attributes/key/fifths")
            if found is not None:
                fifths = int(found.text)
                break
        return ScoreSummary(_soprano(soprano) if soprano is not None else None, fifths, _last_pitch(bass))
    except (Unsupported, KeyError, ValueError, TypeError, ElementTree.ParseError, zipfile.BadZipFile):
        return None


__all__ = ["Event", "ScoreSummary", "read_score"]
