"""A piano roll of melodies (reference vs policy continuations of the same prompts), as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from prefopt.atomic import atomic_path
from prefopt.tasks.sequence.chorales import Note


def piano_roll(rows: Sequence[Sequence[tuple[str, Sequence[Note], int, float]]], path: Path) -> None:
    """One subplot per (row, column): ``(title, notes, prompt_notes, reward)``; the prompt is drawn grey.

    Time runs along x in quarter notes, MIDI pitch along y (C lines marked). Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    pitches = [p for row in rows for _, notes, _, _ in row for p, _ in notes if p is not None] or [60]
    low, high = min(pitches) - 2, max(pitches) + 2
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(6 * n_cols, 1.9 * n_rows), squeeze=False, sharey=True)
    for r, row in enumerate(rows):
        for c, (title, notes, prompt_notes, reward) in enumerate(row):
            ax = axes[r][c]
            t = 0.0
            for i, (pitch, duration) in enumerate(notes):
                if pitch is not None:
                    color = "0.6" if i < prompt_notes else ("tab:blue" if c == 0 else "tab:orange")
                    ax.add_patch(matplotlib.patches.Rectangle((t, pitch - 0.4), duration * 0.95, 0.8, color=color))
                t += duration
            for octave_c in range(12 * (low // 12), high + 1, 12):
                ax.axhline(octave_c, color="0.85", lw=0.5, zorder=0)
            ax.set_xlim(0, max(t, 1.0))
            ax.set_ylim(low, high)
            ax.set_title(f"prompt {r}: {title} (reward {reward:+.2f})", fontsize=9)
            if c == 0:
                ax.set_ylabel("MIDI pitch")
    for ax in axes[-1]:
        ax.set_xlabel("quarter notes")
    fig.suptitle("chorale continuations (grey: prompt; blue: reference; orange: policy)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


__all__ = ["piano_roll"]
