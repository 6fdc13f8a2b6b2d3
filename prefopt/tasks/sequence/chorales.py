"""Bach chorale melodies from the ``music21`` corpus, as token sequences.

The corpus ships inside the ``music21`` wheel (``music21/corpus/bach``): nothing is downloaded. Every
chorale score (``.mxl``, ``.xml``, ``.krn``; the ``.rntxt`` harmonic analyses are skipped) is parsed once;
its soprano part (the part named "Soprano", else the score is skipped) has its ties merged. The key is
read from the score (:func:`chorale_key`): the tonic is the last bass note, the mode comes from the key
signature; modal chorales that fit no major or minor key are skipped. The melody is
transposed by the smallest shift (-6..+5 semitones) that puts the tonic on C for a major key and on A
for a minor key, and written as tokens:

``[BOS, MAJOR|MINOR, note, note, ..., EOS]``

where a note token stands for one (pitch, duration) pair: a MIDI pitch in ``[low, high]`` or a rest, and a
duration in quarter notes from ``durations`` (a parsed duration becomes the nearest one on a log scale).
A score with a pitch outside the range is skipped, and so is a melody whose tokens equal an earlier one
(the corpus has a few chorales twice). The *prompt* of a chorale is its BOS, mode and the notes of its
opening ``prompt_bars`` bars (a pickup bar, numbered 0, counts in addition).

The ``.mxl``/``.xml`` scores are read by :mod:`prefopt.tasks.sequence.musicxml` (a few milliseconds a score),
the others and any score that reader does not follow by music21 (about 0.25 s); the result is cached (:func:`load_chorales`) under a key made of the
tokenizer's config, ``prompt_bars``, ``limit`` and the music21 version.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from prefopt.cache import cached_tensors
from prefopt.errors import PrefoptError
from prefopt.tasks.sequence.musicxml import read_score

log = logging.getLogger(__name__)

PAD, BOS, EOS, MAJOR, MINOR = 0, 1, 2, 3, 4
SPECIALS = ("<pad>", "<bos>", "<eos>", "<major>", "<minor>")
MODES = ("major", "minor")
#: the tonic pitch class a melody is transposed to, per mode (C major, A minor)
TONIC = {"major": 0, "minor": 9}
PARSE_VERSION = 2

Note = tuple  # (midi pitch or None for a rest, duration in quarter notes)


@dataclass(frozen=True)
class ChoraleTokenizer:
    """(pitch, duration) note tokens after five special tokens; see the module docstring."""

    low: int = 52
    high: int = 88
    durations: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)

    def __post_init__(self):
        object.__setattr__(self, "durations", tuple(float(d) for d in self.durations))
        if not 0 <= self.low < self.high <= 127:
            raise PrefoptError(f"tokenizer low={self.low}, high={self.high}: need 0 <= low < high <= 127")
        if not self.durations or any(d <= 0 for d in self.durations) or list(self.durations) != sorted(
                set(self.durations)):
            raise PrefoptError(f"tokenizer durations={list(self.durations)}: need increasing positive values")

    def config(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def num_pitches(self) -> int:
        return self.high - self.low + 1

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.durations) * (1 + self.num_pitches)

    def duration_index(self, quarter_length: float) -> int:
        """The nearest duration on a log scale (so 0.125 -> 0.25 and 6 -> 4 with the defaults)."""
        q = max(float(quarter_length), 1e-3)
        return min(range(len(self.durations)), key=lambda i: abs(math.log(self.durations[i] / q)))

    def note_token(self, pitch: int | None, quarter_length: float) -> int:
        d = self.duration_index(quarter_length)
        if pitch is None:
            return len(SPECIALS) + d
        if not self.low <= pitch <= self.high:
            raise PrefoptError(f"pitch {pitch} outside the tokenizer's range [{self.low}, {self.high}]")
        return len(SPECIALS) + len(self.durations) * (1 + pitch - self.low) + d

    def is_note(self, token: int) -> bool:
        return len(SPECIALS) <= int(token) < self.vocab_size

    def decode_note(self, token: int) -> Note:
        """(pitch or None, duration) of a note token."""
        if not self.is_note(token):
            raise PrefoptError(f"token {token} is not a note token (specials are 0..{len(SPECIALS) - 1}, "
                               f"vocabulary size {self.vocab_size})")
        k = int(token) - len(SPECIALS)
        slot, d = divmod(k, len(self.durations))
        return (None if slot == 0 else self.low + slot - 1), self.durations[d]

    def notes(self, tokens: Sequence[int]) -> list[Note]:
        """The notes among ``tokens`` (special tokens are left out)."""
        return [self.decode_note(t) for t in tokens if self.is_note(t)]

    def encode(self, notes: Sequence[Note], mode: str, eos: bool = True) -> list[int]:
        if mode not in MODES:
            raise PrefoptError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
        body = [self.note_token(p, d) for p, d in notes]
        return [BOS, MAJOR if mode == "major" else MINOR, *body, *([EOS] if eos else [])]

    def mode_of(self, tokens: Sequence[int]) -> str:
        if len(tokens) < 2 or tokens[1] not in (MAJOR, MINOR):
            raise PrefoptError(f"a chorale sequence starts with BOS and a mode token; found {list(tokens[:2])}")
        return "major" if tokens[1] == MAJOR else "minor"


def chorale_paths() -> list[Path]:
    """The Bach chorale scores of the music21 corpus, in a fixed order (the bundled files only)."""
    from music21 import corpus

    paths = sorted({Path(p) for p in corpus.getComposer("bach")}, key=lambda p: p.name)
    paths = [p for p in paths if p.suffix in (".mxl", ".xml", ".krn")]
    if not paths:
        raise PrefoptError("the music21 corpus has no Bach chorales (music21/corpus/bach is missing); "
                           "install the full music21 wheel")
    return paths


def _soprano(score):
    for part in score.parts:
        name = f"{part.partName or ''} {part.id or ''}".lower()
        if "soprano" in name:
            return part
    return None


def _bass(score):
    for part in score.parts:
        if "bass" in f"{part.partName or ''} {part.id or ''}".lower():
            return part
    return score.parts[-1]


def chorale_key(score) -> tuple[int, str] | None:
    """(tonic pitch class, mode) of a chorale, or ``None`` for a modal one.

    A chorale ends on its tonic chord, so the tonic is the pitch class of the last bass note. The mode is
    the key signature's: major if that note is the signature's major tonic, minor if it is its relative
    minor. Otherwise (an old "Dorian" signature with one flat too few, say) music21's key analysis decides,
    if it agrees on the tonic; if not (a Phrygian or other modal ending), ``None``.
    """
    from music21 import key as m21key

    notes = list(_bass(score).flatten().notes)
    signatures = list(score.recurse().getElementsByClass(m21key.KeySignature))
    if not notes or not signatures:
        return None
    tonic = min(p.midi for p in notes[-1].pitches) % 12
    mode = _signature_key(signatures[0].sharps, tonic)
    if mode is not None:
        return tonic, mode
    analysed = score.analyze("key")
    if analysed.tonic.pitchClass == tonic and analysed.mode in MODES:
        return tonic, analysed.mode
    return None


def _signature_key(fifths: int, tonic: int) -> str | None:
    """The mode whose tonic under a key signature of ``fifths`` is the pitch class ``tonic`` (None: neither)."""
    major = (7 * fifths) % 12
    if tonic == major:
        return "major"
    if tonic == (major + 9) % 12:
        return "minor"
    return None


def _events_music21(path: Path) -> tuple[list[tuple[int | None, float, int]], tuple[int, str]] | None:
    """The soprano's (pitch, quarter length, measure) events and the key, as music21 reads the score."""
    from music21 import converter

    score = converter.parse(str(path), forceSource=True)  # forceSource: no music21 pickle cache is used
    part = _soprano(score)
    if part is None:
        return None
    found = chorale_key(score)
    if found is None:
        return None
    events = []
    for element in part.stripTies().flatten().notesAndRests:
        pitch = None if element.isRest else max(p.midi for p in element.pitches)
        events.append((pitch, float(element.quarterLength), int(element.measureNumber or 0)))
    return events, found


def _events(path: Path) -> tuple[list[tuple[int | None, float, int]], tuple[int, str]] | None:
    """:func:`_events_music21`, read by :func:`~prefopt.tasks.sequence.musicxml.read_score` where it can."""
    summary = read_score(path)
    if summary is None:
        return _events_music21(path)
    if summary.soprano is None:
        return None
    if summary.fifths is None or summary.last_bass_pitch is None:
        return None
    tonic = summary.last_bass_pitch % 12
    mode = _signature_key(summary.fifths, tonic)
    if mode is None:  # a modal signature: music21's key analysis decides (see chorale_key)
        return _events_music21(path)
    return [(e.pitch, float(e.quarter_length), e.measure) for e in summary.soprano], (tonic, mode)


def parse_chorale(path: Path, tokenizer: ChoraleTokenizer, prompt_bars: int) -> tuple[list[int], int] | None:
    """(tokens, prompt length) of one score, or ``None`` if it is skipped (see the module docstring)."""
    found = _events(Path(path))
    if found is None:
        return None
    events, (tonic, mode) = found
    shift = (TONIC[mode] - tonic + 6) % 12 - 6
    notes: list[Note] = []
    bars: list[int] = []
    for pitch, quarter_length, measure in events:
        if quarter_length <= 0:  # grace notes
            continue
        if pitch is None and not notes:  # leading rests carry nothing
            continue
        if pitch is not None:
            pitch += shift
            if not tokenizer.low <= pitch <= tokenizer.high:
                return None
        notes.append((pitch, quarter_length))
        bars.append(measure)
    while notes and notes[-1][0] is None:  # trailing rests
        notes.pop()
        bars.pop()
    if len(notes) < 4:
        return None
    first = min(bars)
    last_prompt_bar = prompt_bars if first == 0 else first + prompt_bars - 1
    prompt_notes = sum(1 for b in bars if b <= last_prompt_bar)
    prompt_notes = min(max(prompt_notes, 1), len(notes) - 1)
    return tokenizer.encode(notes, mode), 2 + prompt_notes


@dataclass
class Chorales:
    """Parsed chorales: ``tokens[i]`` is a list of ints, ``prompt_lengths[i]`` its prompt's token count."""

    tokens: list[list[int]]
    prompt_lengths: list[int]
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, index: Sequence[int]) -> "Chorales":
        return Chorales([self.tokens[i] for i in index], [self.prompt_lengths[i] for i in index],
                        [self.sources[i] for i in index] if self.sources else [])


def parse_chorales(paths: Sequence[Path], tokenizer: ChoraleTokenizer, prompt_bars: int, workers: int = 1,
                   progress: bool = False) -> list[tuple[list[int], int] | None]:
    """:func:`parse_chorale` of every path, in order, in ``workers`` forked processes (one: in this process).

    The scores are parsed independently, so the result does not depend on ``workers``. Where processes cannot
    be forked (Windows, or macOS's default), the parse runs in this process.
    """
    import multiprocessing
    from functools import partial

    from tqdm.auto import tqdm

    parse = partial(parse_chorale, tokenizer=tokenizer, prompt_bars=int(prompt_bars))
    bar = dict(total=len(paths), desc="parsing chorales", disable=not progress)
    if int(workers) <= 1 or len(paths) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [parse(p) for p in tqdm(paths, **bar)]
    with multiprocessing.get_context("fork").Pool(min(int(workers), len(paths))) as pool:
        return list(tqdm(pool.imap(parse, paths, chunksize=4), **bar))


def load_chorales(cache_dir, tokenizer: ChoraleTokenizer, prompt_bars: int = 2, limit: int | None = None,
                  progress: bool = True, workers: int = 1) -> Chorales:
    """Parse the corpus once (the first ``limit`` scores if set; in ``workers`` processes) and cache the token
    sequences."""
    import music21

    if int(prompt_bars) < 1:
        raise PrefoptError(f"prompt_bars={prompt_bars!r} must be >= 1")
    if limit is not None and int(limit) < 1:
        raise PrefoptError(f"limit={limit!r} must be >= 1 or null (all chorales)")
    if int(workers) < 1:
        raise PrefoptError(f"parse_workers={workers!r} must be an integer >= 1")
    paths = chorale_paths()
    if limit is not None:
        paths = paths[: int(limit)]
    config = {"version": PARSE_VERSION, "music21": music21.__version__, "tokenizer": tokenizer.config(),
              "prompt_bars": int(prompt_bars), "limit": limit}

    def build():
        rows, prompts, sources, seen = [], [], [], set()
        for i, parsed in enumerate(parse_chorales(paths, tokenizer, int(prompt_bars), int(workers), progress)):
            if parsed is None or tuple(parsed[0]) in seen:
                continue
            seen.add(tuple(parsed[0]))
            rows.append(parsed[0])
            prompts.append(parsed[1])
            sources.append(i)
        if not rows:
            raise PrefoptError(f"no usable chorale among the {len(paths)} scores parsed (limit={limit})")
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), PAD, dtype=torch.int64)
        for j, r in enumerate(rows):
            tokens[j, : len(r)] = torch.tensor(r)
        log.info("parsed %d chorale melodies from %d scores", len(rows), len(paths))
        return {"tokens": tokens, "lengths": torch.tensor([len(r) for r in rows]),
                "prompt_lengths": torch.tensor(prompts), "sources": torch.tensor(sources)}

    data = cached_tensors(cache_dir, "sequence-chorales", config, build)
    tokens = [row[:n].tolist() for row, n in zip(data["tokens"], data["lengths"].tolist())]
    return Chorales(tokens, data["prompt_lengths"].tolist(), [paths[i].name for i in data["sources"].tolist()])


def to_stream(notes: Sequence[Note], prompt_notes: int = 0, title: str | None = None):
    """A music21 stream of a melody (prompt notes marked with a lyric "p" on the first one)."""
    from music21 import metadata, note, stream

    part = stream.Part()
    for i, (pitch, quarter_length) in enumerate(notes):
        element = note.Rest(quarterLength=quarter_length) if pitch is None else note.Note(pitch, quarterLength=quarter_length)
        part.append(element)
    score = stream.Score([part])
    if title:
        score.insert(0, metadata.Metadata(title=title))
    return score


def write_midi(notes: Sequence[Note], path: Path) -> None:
    """Write a melody as a MIDI file, atomically (music21 writes a temp file that is then renamed)."""
    from prefopt.atomic import atomic_path

    with atomic_path(path) as tmp:
        to_stream(notes).write("midi", fp=str(tmp))


__all__ = ["BOS", "EOS", "MAJOR", "MINOR", "MODES", "PAD", "PARSE_VERSION", "ChoraleTokenizer", "Chorales", "TONIC",
           "chorale_key", "chorale_paths", "load_chorales", "parse_chorale", "parse_chorales", "to_stream", "write_midi"]
