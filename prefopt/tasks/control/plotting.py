"""The return-per-round plot of a control run (``returns.png``)."""

from __future__ import annotations

from pathlib import Path

from prefopt.atomic import atomic_path


def plot_returns(history: list[dict[str, float]], ref_mean: float, ref_se: float, path: Path, title: str) -> Path:
    """Mean +- s.e. of the evaluation return after each round, against the reference's band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [h["round"] + 1 for h in history]
    means = [ref_mean] + [h["mean"] for h in history]
    ses = [ref_se] + [h["se"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.axhspan(ref_mean - ref_se, ref_mean + ref_se, color="0.85", label="reference (+- s.e.)")
    ax.axhline(ref_mean, color="0.5", lw=1)
    ax.errorbar(rounds, means, yerr=ses, marker="o", capsize=3, label="policy")
    ax.set_xlabel("rounds of DPO done")
    ax.set_ylabel("episodic return")
    ax.set_xticks(rounds)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


__all__ = ["plot_returns"]
