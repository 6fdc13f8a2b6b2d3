"""A music-theory reward for chorale melody continuations, in the spirit of RL Tuner.

RL Tuner (Jaques et al. 2017, "Sequence Tutor") tuned a melody LSTM with rules of melodic composition:
stay in key, don't repeat a note too often, resolve large leaps, end on the tonic. This reward scores a
*completion* (the notes a model wrote after a prompt) with rules of the same kind. Melodies are in C major
or A minor (:mod:`prefopt.tasks.sequence.chorales` transposes every chorale there). Rests are skipped:
the rules look at the sequence of pitched notes ``p_1 .. p_n`` of the completion, preceded by the pitched
notes of the prompt for context (a repeat run or a leap may start in the prompt).

Counts, over the completion's ``n`` pitched notes:

``out_of_key``  notes whose pitch class is not in the scale: C major ``{C D E F G A B}``; A minor
                ``{A B C D E F G}`` plus the raised 6th and 7th ``F#`` and ``G#`` (melodic/harmonic minor).
``repeats``     notes that extend a run of equal pitches beyond ``max_repeats`` notes (with the default 3,
                the 4th, 5th, ... equal note in a row each count once).
``leaps``       intervals into a completion note that are a leap, ``|p_i - p_{i-1}| >= leap`` semitones
                (default 7, a fifth, as in RL Tuner), and are not resolved: the next pitched note must move
                by a step (1 or 2 semitones) in the opposite direction; a leap into the last note is
                unresolved. An interval wider than ``max_interval`` (default 12, an octave) always counts.

Terms:

``finished``    the completion ended with the end-of-melody token (rather than running out of length)
``tonic``       finished, and the last pitched note is the tonic (pitch class C in major, A in minor)
``short``       fewer than ``min_notes`` pitched notes (default 8)

Reward::

    R = tonic_bonus * [tonic] - (out_of_key + repeats + leaps) / max(n, 1)
        - unfinished_penalty * [not finished] - short_penalty * [short]

with ``tonic_bonus = unfinished_penalty = short_penalty = 1`` by default. The violations are a *rate*
(violations per note), so a melody can not raise its reward by being shorter; the short and unfinished
terms stop it from ending at once or never. ``R`` lies in ``[-5, 1]``: 1 for a clean
melody that ends on the tonic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from prefopt.errors import PrefoptError
from prefopt.tasks.sequence.chorales import MODES, TONIC, Note

#: allowed pitch classes per mode, for melodies in C major / A minor
SCALES = {"major": frozenset({0, 2, 4, 5, 7, 9, 11}), "minor": frozenset({9, 11, 0, 2, 4, 5, 7, 6, 8})}


@dataclass(frozen=True)
class ChoraleReward:
    """The reward of the module docstring; :meth:`components` gives every count and term."""

    leap: int = 7
    max_interval: int = 12
    max_repeats: int = 3
    min_notes: int = 8
    tonic_bonus: float = 1.0
    unfinished_penalty: float = 1.0
    short_penalty: float = 1.0

    def __post_init__(self):
        if self.leap < 3 or self.max_interval < self.leap:
            raise PrefoptError(f"reward leap={self.leap}, max_interval={self.max_interval}: need 3 <= leap <= "
                               "max_interval (semitones; a step is 1 or 2)")
        if self.max_repeats < 1 or self.min_notes < 0:
            raise PrefoptError(f"reward max_repeats={self.max_repeats} must be >= 1 and min_notes={self.min_notes} >= 0")

    def components(self, completion: Sequence[Note], mode: str, prompt: Sequence[Note] = (),
                   finished: bool = True) -> dict[str, float]:
        if mode not in MODES:
            raise PrefoptError(f"reward mode={mode!r}; allowed: {', '.join(MODES)}")
        context = [p for p, _ in prompt if p is not None]
        notes = [p for p, _ in completion if p is not None]
        n = len(notes)
        scale = SCALES[mode]
        out_of_key = sum(1 for p in notes if p % 12 not in scale)

        pitches = context + notes
        start = len(context)  # index in ``pitches`` of the first completion note
        repeats, run = 0, 1
        for i in range(1, len(pitches)):
            run = run + 1 if pitches[i] == pitches[i - 1] else 1
            if i >= start and run > self.max_repeats:
                repeats += 1

        leaps = 0
        for i in range(max(start, 1), len(pitches)):
            interval = pitches[i] - pitches[i - 1]
            if abs(interval) > self.max_interval:
                leaps += 1
            elif abs(interval) >= self.leap:
                after = pitches[i + 1] - pitches[i] if i + 1 < len(pitches) else 0
                resolved = 1 <= abs(after) <= 2 and (after > 0) != (interval > 0)
                leaps += 0 if resolved else 1

        tonic = bool(finished and n and notes[-1] % 12 == TONIC[mode])
        short = n < self.min_notes
        violations = (out_of_key + repeats + leaps) / max(n, 1)
        reward = (self.tonic_bonus * tonic - violations - self.unfinished_penalty * (not finished)
                  - self.short_penalty * short)
        return {"reward": float(reward), "notes": float(n), "out_of_key": float(out_of_key),
                "repeats": float(repeats), "leaps": float(leaps), "violation_rate": float(violations),
                "tonic": float(tonic), "finished": float(finished), "short": float(short)}

    def __call__(self, completion: Sequence[Note], mode: str, prompt: Sequence[Note] = (),
                 finished: bool = True) -> float:
        return self.components(completion, mode, prompt, finished)["reward"]


__all__ = ["ChoraleReward", "SCALES"]
