"""The few lines a run ends with: what ran, the headline metric (reference -> policy), the win rate, and where the
results are. Printed by the CLI and written to the run folder as ``summary.txt``; every number stays in
``summary.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: the headline metric of a domain's evaluation, in order of preference (the first one both models report)
HEADLINE_KEYS = ("return_mean", "reward_mean", "accuracy")

#: files a run folder may hold, with what they are, in the order they are listed
MAIN_FILES = (
    ("summary.json", "every metric"),
    ("policy.safetensors", "the trained policy's weights"),
    ("checkpoints/last.ckpt", "checkpoint (resume with ckpt_path=last)"),
    ("logs", "training curves (CSV)"),
)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def headline(evaluation: dict) -> tuple[str, float, float | None, float, float | None] | None:
    """``(name, reference, reference s.e., policy, policy s.e.)`` of the headline metric, or None."""
    reference, policy = evaluation.get("reference"), evaluation.get("policy")
    if not isinstance(reference, dict) or not isinstance(policy, dict):
        return None
    shared = [k for k in policy if k in reference and _number(policy[k]) is not None and _number(reference[k]) is not None]
    names = [k for k in HEADLINE_KEYS if k in shared] or [k for k in shared if k.endswith("_mean")] or shared
    if not names:
        return None
    name = names[0]
    se_key = name[: -len("_mean")] + "_se" if name.endswith("_mean") else name + "_se"
    return (name, float(reference[name]), _number(reference.get(se_key)), float(policy[name]),
            _number(policy.get(se_key)))


def _fmt(value: float, se: float | None) -> str:
    return f"{value:.4g} ± {se:.3g}" if se is not None else f"{value:.4g}"


def format_run_summary(summary: dict, run_dir: Path) -> str:
    """The short human summary of a finished run (a few lines, no trailing newline)."""
    evaluation = summary.get("eval") or {}
    loss = summary.get("loss")
    loss = "+".join(map(str, loss)) if isinstance(loss, (list, tuple)) else loss
    what = evaluation.get("env_id")
    rounds = len(summary.get("rounds") or [])
    lines = [f"prefopt: {summary.get('domain')}{f' ({what})' if what else ''} finished: loss {loss} "
             f"(beta {summary.get('beta')}), reference {summary.get('reference')}, seed {summary.get('seed')}, "
             f"{rounds} round{'s' if rounds != 1 else ''}"]
    head = headline(evaluation)
    if head is not None:
        name, ref, ref_se, pol, pol_se = head
        lines.append(f"  {name}: reference {_fmt(ref, ref_se)} -> policy {_fmt(pol, pol_se)}")
    win_rate = _number(evaluation.get("win_rate"))
    if win_rate is not None:
        lines.append(f"  win rate: {win_rate:.3f} (how often the policy beats the reference on the same held-out "
                     "case; ties count half)")
    lines.append(f"  run folder: {run_dir}")
    listed = [(name, about) for name, about in MAIN_FILES if (run_dir / name).exists()]
    pictures = sorted(p.name for p in run_dir.glob("*.png"))
    if pictures:
        listed.append((", ".join(pictures), "pictures"))
    listed.append(("summary.txt", "this summary"))
    width = max(len(name) for name, _ in listed)
    lines += [f"    {name.ljust(width)}  {about}" for name, about in listed]
    return "\n".join(lines)


def write_run_summary(summary: dict, run_dir: Path) -> str:
    """Print the run's summary and write it to ``run_dir/summary.txt`` (rank 0 only under DDP)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from prefopt.atomic import atomic_write

    text = format_run_summary(summary, Path(run_dir))
    if rank_zero_only.rank == 0:
        atomic_write(Path(run_dir) / "summary.txt", text + "\n")
        print(text, flush=True)
    return text
