"""``prefopt-report <sweep folder>``: one table for a Hydra multirun (or an Optuna search).

Every run folder under the sweep folder (one with ``.hydra/overrides.yaml``, ``summary.json`` or
``error.txt``) is read. Runs are grouped into *configurations* by their command-line overrides, leaving out
``seed`` (and ``paths.*``/``hydra.*``): a row is one configuration, its numbers the mean +- standard error over
its seeds of

* the held-out metrics of ``summary.json``'s ``eval`` (the last round's), win rate included;
* the final train (and validation) metrics of ``summary.json``'s ``train``;
* the wall time of ``timing.json``.

Written to the sweep folder (or ``--out``): ``report.md`` (Markdown table, failed runs, plots), ``report.csv``
(one row per configuration, ``<metric>_mean``/``<metric>_se`` columns), ``runs.csv`` (one row per run),
``beta_<metric>.png`` (metric vs beta, one line per loss type and other swept options) and
``curves_<metric>.png`` (training curves from ``<run>/logs/round_*/metrics.csv``, mean over seeds).
Runs that failed (``error.txt``) or are incomplete (no ``summary.json``) are listed, never dropped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from prefopt.atomic import atomic_write as _atomic_write
from prefopt.errors import PrefoptError
from prefopt.metrics import mean_and_se

#: overrides that never tell configurations apart
IGNORED_PREFIXES = ("paths.", "hydra.", "hydra/")
SEED_KEYS = ("seed",)
#: the train metrics shown in report.md (report.csv has them all; ``--all-train-metrics`` shows them all)
MARKDOWN_TRAIN_METRICS = ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "val/loss",
                          "val/rewards/accuracies")
CURVE_METRICS = ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "val/loss")
#: columns shown first, in this order, when they vary
LEADING_KEYS = ("domain", "experiment", "loss", "loss.loss_type", "loss.beta", "reference")


@dataclass
class Run:
    """One run folder of the sweep."""

    path: Path
    name: str
    overrides: dict[str, str]
    summary: dict[str, Any] | None = None
    error: str | None = None
    timing: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "ok" if self.summary is not None else "incomplete"

    @property
    def seed(self) -> str:
        for key in SEED_KEYS:
            if key in self.overrides:
                return self.overrides[key]
        return str(self.summary.get("seed", "")) if self.summary else ""


# --------------------------------------------------------------------------------------------- reading
def _is_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in (".hydra/overrides.yaml", "summary.json", "error.txt"))


def find_run_folders(sweep_dir: Path) -> list[Path]:
    """Run folders under ``sweep_dir`` (itself included), not descending into a run folder."""
    if _is_run(sweep_dir):
        return [sweep_dir]
    found = []
    for child in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(find_run_folders(child))
    return found


def _parse_overrides(path: Path) -> dict[str, str]:
    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as err:
        raise PrefoptError(f"{path}: not a YAML list of overrides ({err})") from None
    if not isinstance(items, list):
        raise PrefoptError(f"{path}: expected a YAML list of 'key=value' overrides, found {type(items).__name__}")
    overrides = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~")
        if sep and not key.startswith(IGNORED_PREFIXES):
            overrides[key] = value
    return overrides


def _overrides_from_summary(summary: dict[str, Any]) -> dict[str, str]:
    """For a run made without the Hydra CLI: the options that summary.json records."""
    loss = summary.get("loss")
    return {"domain": str(summary.get("domain", "")),
            "loss": loss if isinstance(loss, str) else json.dumps(loss),
            "loss.beta": str(summary.get("beta", "")), "reference": str(summary.get("reference", "")),
            "seed": str(summary.get("seed", ""))}


def read_run(folder: Path, sweep_dir: Path) -> Run:
    name = "." if folder == sweep_dir else folder.relative_to(sweep_dir).as_posix()
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = _parse_overrides(overrides_file) if overrides_file.is_file() else {}
    run = Run(folder, name, overrides)
    error_file = folder / "error.txt"
    if error_file.is_file():
        run.error = error_file.read_text().strip() or "error.txt is empty"
    summary_file = folder / "summary.json"
    if summary_file.is_file() and run.error is None:
        try:
            run.summary = json.loads(summary_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            run.error = f"summary.json is not valid JSON ({err})"
        if run.summary is not None and not isinstance(run.summary.get("eval"), dict):
            run.summary, run.error = None, "summary.json has no 'eval' section"
    timing_file = folder / "timing.json"
    if timing_file.is_file():
        try:
            run.timing = json.loads(timing_file.read_text())
        except json.JSONDecodeError:
            run.timing = {}
    if not overrides_file.is_file() and run.summary is not None:
        run.overrides = _overrides_from_summary(run.summary)
    return run


def collect_runs(sweep_dir: str | os.PathLike) -> list[Run]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise PrefoptError(f"sweep folder {sweep_dir} does not exist or is not a folder")
    runs = [read_run(folder, sweep_dir) for folder in find_run_folders(sweep_dir)]
    if not runs:
        raise PrefoptError(f"sweep folder {sweep_dir} holds no runs: expected folders with .hydra/overrides.yaml, "
                           "summary.json or error.txt (the hydra.sweep.dir of a `prefopt -m ...` sweep)")
    return runs


# -------------------------------------------------------------------------------------------- grouping
def _flatten(tree: Any, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        flat[prefix[:-1]] = float(tree)
    return flat


def eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The held-out numbers of a summary (its per-run standard errors and bookkeeping left out)."""
    flat = _flatten(summary.get("eval", {}))
    return {k: v for k, v in flat.items() if k not in ("round", "num_pairs") and not k.endswith(("_se", ".se"))}


def _sort_value(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _order_keys(keys: Iterable[str]) -> list[str]:
    keys = set(keys)
    leading = [k for k in LEADING_KEYS if k in keys]
    return leading + sorted(keys - set(leading))


@dataclass
class Group:
    """One configuration: the runs that differ only in their seed."""

    config: dict[str, str]
    runs: list[Run]

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.status == "ok"]

    def values(self, metric: str) -> list[float]:
        out = []
        for run in self.ok:
            if metric == "wall_time_s":
                value = run.timing.get("wall_time_s")
            elif metric in run.summary.get("train", {}):
                value = run.summary["train"][metric]
            else:
                value = eval_metrics(run.summary).get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.append(float(value))
        return out

    def stat(self, metric: str) -> tuple[float, float, int] | None:
        values = self.values(metric)
        if not values:
            return None
        mean, se = mean_and_se(values)
        return mean, se, len(values)

    @property
    def beta(self) -> float | None:
        betas = {float(r.summary["beta"]) for r in self.ok if "beta" in r.summary}
        if len(betas) == 1:
            return betas.pop()
        value = self.config.get("loss.beta")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None


@dataclass
class Sweep:
    folder: Path
    runs: list[Run]
    varying: list[str]
    fixed: dict[str, str]
    groups: list[Group]
    eval_names: list[str]
    train_names: list[str]

    @property
    def problems(self) -> list[Run]:
        return [r for r in self.runs if r.status != "ok"]


def build_sweep(sweep_dir: str | os.PathLike) -> Sweep:
    """Read and group every run of ``sweep_dir``."""
    runs = collect_runs(sweep_dir)
    keys = {k for r in runs for k in r.overrides if k not in SEED_KEYS}
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    fixed = {k: runs[0].overrides[k] for k in sorted(keys - set(varying))}
    varying = _order_keys(varying)
    by_config: dict[tuple, Group] = {}
    for run in runs:
        config = {k: run.overrides.get(k, "") for k in varying}
        key = tuple(config.items())
        by_config.setdefault(key, Group(config, [])).runs.append(run)
    groups = sorted(by_config.values(), key=lambda g: [_sort_value(g.config[k]) for k in varying])
    for group in groups:
        group.runs.sort(key=lambda r: _sort_value(r.seed))
    ok = [r for r in runs if r.status == "ok"]
    eval_names: list[str] = []
    for run in ok:
        eval_names += [k for k in eval_metrics(run.summary) if k not in eval_names]
    eval_names = ([k for k in eval_names if k.startswith("policy.")] + [k for k in eval_names if k.startswith("reference.")]
                  + [k for k in eval_names if not k.startswith(("policy.", "reference.")) and k != "win_rate"]
                  + [k for k in eval_names if k == "win_rate"])
    train_names = sorted({k for r in ok for k in r.summary.get("train", {})})
    return Sweep(Path(sweep_dir), runs, varying, fixed, groups, eval_names, train_names)


# -------------------------------------------------------------------------------------------- writing
def _fmt(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "n/a"
    mean, se, n = stat
    return f"{mean:.4g} ± {se:.2g}" if n > 1 else f"{mean:.4g}"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(sweep: Sweep, train_names: list[str]) -> str:
    metrics = [*sweep.eval_names, *train_names, "wall_time_s"]
    header = [*(sweep.varying or ["configuration"]), "runs", *metrics]
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join("---" if i < len(sweep.varying or [0]) else "---:" for i in range(len(header))) + "|"]
    for group in sweep.groups:
        cells = [group.config[k] for k in sweep.varying] if sweep.varying else ["all runs"]
        cells.append(f"{len(group.ok)}/{len(group.runs)}")
        cells += [_fmt(group.stat(m)) for m in metrics]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return "\n".join(lines)


def problems_table(sweep: Sweep) -> str:
    lines = ["| run | status | detail |", "|---|---|---|"]
    for run in sweep.problems:
        detail = run.error if run.status == "failed" else "no summary.json (still running, killed, or crashed)"
        lines.append(f"| {_md_escape(run.name)} | {run.status} | {_md_escape(detail.splitlines()[0][:300])} |")
    return "\n".join(lines)


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def config_rows(sweep: Sweep) -> tuple[list[dict[str, Any]], list[str]]:
    metrics = [*sweep.eval_names, *sweep.train_names, "wall_time_s"]
    columns = [*sweep.varying, "runs", "completed", *(f"{m}_{s}" for m in metrics for s in ("mean", "se"))]
    rows = []
    for group in sweep.groups:
        row: dict[str, Any] = {**group.config, "runs": len(group.runs), "completed": len(group.ok)}
        for metric in metrics:
            stat = group.stat(metric)
            row[f"{metric}_mean"] = stat[0] if stat else ""
            row[f"{metric}_se"] = stat[1] if stat and stat[2] > 1 else ""  # undefined for one seed
        rows.append(row)
    return rows, columns


def run_rows(sweep: Sweep) -> tuple[list[dict[str, Any]], list[str]]:
    override_keys = _order_keys({k for r in sweep.runs for k in r.overrides})
    metrics = [*sweep.eval_names, *sweep.train_names]
    columns = ["run", "status", *override_keys, *metrics, "wall_time_s", "error"]
    rows = []
    for run in sweep.runs:
        row: dict[str, Any] = {"run": run.name, "status": run.status, **run.overrides, "error": run.error or "",
                               "wall_time_s": run.timing.get("wall_time_s", "")}
        if run.summary is not None:
            row.update(eval_metrics(run.summary))
            row.update(run.summary.get("train", {}))
        rows.append(row)
    return rows, columns


# ---------------------------------------------------------------------------------------------- plots
def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _atomic_write(path, buffer.getvalue())


def _safe_name(metric: str) -> str:
    return metric.replace("/", "_").replace(".", "_")


def plot_beta(sweep: Sweep, out_dir: Path, metrics: list[str]) -> list[Path]:
    """``metric`` vs beta, one line per loss type (and per other swept option), error bars = s.e. over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[Group]] = {}
    for group in sweep.groups:
        if group.ok and group.beta is not None:
            label = ", ".join(f"{k}={v}" for k, v in group.config.items() if k != "loss.beta") or "all runs"
            series.setdefault(label, []).append(group)
    if not series:
        return []
    betas = sorted({g.beta for gs in series.values() for g in gs})
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for label, groups in series.items():
            points = sorted((g.beta, g.stat(metric)) for g in groups if g.stat(metric) is not None)
            if points:
                ax.errorbar([b for b, _ in points], [s[0] for _, s in points], yerr=[s[1] for _, s in points],
                            marker="o", capsize=3, label=label)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        if metric.startswith("policy."):  # the untrained reference's score, for scale
            ref = [v for g in sweep.groups for v in g.values("reference." + metric[len("policy."):])]
            if ref:
                ax.axhline(sum(ref) / len(ref), color="gray", linestyle="--", label="reference (before training)")
        if metric == "win_rate":
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        if betas[0] > 0 and betas[-1] / betas[0] >= 10:
            ax.set_xscale("log")
        ax.set_xticks(betas, [f"{b:g}" for b in betas])
        ax.minorticks_off()
        ax.set_xlabel("beta")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs beta (mean ± s.e. over seeds)")
        ax.legend(fontsize=8)
        path = out_dir / f"beta_{_safe_name(metric)}.png"
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def read_curves(run: Run):
    """The run's logged metrics (all rounds, steps made consecutive), a pandas DataFrame, or ``None``."""
    import pandas as pd

    frames, offset = [], 0
    files = sorted((run.path / "logs").glob("round_*/metrics.csv"),
                   key=lambda p: _sort_value(p.parent.name.split("_")[-1]))
    for path in files:
        try:
            frame = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            continue
        if "step" not in frame:
            continue
        frame = frame.assign(step=frame["step"] + offset)
        offset = int(frame["step"].max()) + 1
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None


def plot_curves(sweep: Sweep, out_dir: Path, metrics: Iterable[str] = CURVE_METRICS) -> list[Path]:
    """Training curves (from the CSV logs), one line per configuration: the mean over its seeds. When the
    sweep varies the loss, each loss type gets its own panel (their scales differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    panel_key = "loss" if "loss" in sweep.varying else None
    curves: dict[str, dict[str, Any]] = {}
    for group in sweep.groups:
        frames = [f for f in (read_curves(r) for r in group.ok) if f is not None]
        if not frames:
            continue
        panel = f"{panel_key}={group.config[panel_key]}" if panel_key else ""
        label = ", ".join(f"{k}={v}" for k, v in group.config.items() if k != panel_key) or "all runs"
        curves.setdefault(panel, {})[label] = pd.concat(frames, ignore_index=True)
    written = []
    for metric in metrics:
        panels = {p: {label: frame for label, frame in lines.items() if metric in frame} for p, lines in curves.items()}
        panels = {p: lines for p, lines in panels.items() if lines}
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 3.8), squeeze=False)
        for ax, (panel, lines) in zip(axes[0], panels.items()):
            for label, frame in lines.items():
                mean = frame[["step", metric]].dropna().groupby("step")[metric].mean()
                ax.plot(mean.index, mean.values, label=label, linewidth=1.2, marker="o" if len(mean) < 3 else None)
            ax.set_xlabel("step")
            ax.set_title(f"{panel} (mean over seeds)" if panel else "mean over seeds", fontsize=10)
            if len(lines) <= 12:
                ax.legend(fontsize=7)
        axes[0][0].set_ylabel(metric)
        fig.suptitle(metric)
        path = out_dir / f"curves_{_safe_name(metric)}.png"
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------- main
def _optuna_best(folder: Path) -> str | None:
    path = folder / "optimization_results.yaml"
    if not path.is_file():
        return None
    try:
        best = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None
    params = ", ".join(f"`{k}={v}`" for k, v in (best.get("best_params") or {}).items())
    return f"Optuna best: {params} with value {best.get('best_value')} (optimization_results.yaml)."


def write_report(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 all_train_metrics: bool = False, plots: bool = True) -> dict[str, Any]:
    """Write report.md, report.csv, runs.csv and the plots; return what was written and the table."""
    sweep = build_sweep(sweep_dir)
    out = Path(out_dir) if out_dir else sweep.folder
    out.mkdir(parents=True, exist_ok=True)
    train_names = (sweep.train_names if all_train_metrics
                   else [m for m in MARKDOWN_TRAIN_METRICS if m in sweep.train_names])
    table = markdown_table(sweep, train_names)

    rows, columns = config_rows(sweep)
    _atomic_write(out / "report.csv", _csv_text(rows, columns))
    rows, columns = run_rows(sweep)
    _atomic_write(out / "runs.csv", _csv_text(rows, columns))
    pictures: list[Path] = []
    if plots:
        beta_metrics = [m for m in sweep.eval_names if m.startswith("policy.")][:3] + \
            [m for m in sweep.eval_names if m == "win_rate"]
        pictures += plot_beta(sweep, out, beta_metrics)
        pictures += plot_curves(sweep, out)

    counts = {s: sum(r.status == s for r in sweep.runs) for s in ("ok", "failed", "incomplete")}
    parts = [f"# Sweep report: {sweep.folder.name}", "",
             f"{len(sweep.runs)} runs: {counts['ok']} completed, {counts['failed']} failed, "
             f"{counts['incomplete']} incomplete; {len(sweep.groups)} configurations."]
    if sweep.fixed:
        parts.append("Same in every run: " + ", ".join(f"`{k}={v}`" for k, v in sweep.fixed.items()) + ".")
    parts += ["Each cell is the mean ± standard error over the configuration's seeds (runs = completed/all). "
              "Held-out metrics come from each run's `summary.json` `eval` (last round), train metrics are the "
              "last logged values, `wall_time_s` from `timing.json`.", "", table, ""]
    best = _optuna_best(sweep.folder)
    if best:
        parts += [best, ""]
    if sweep.problems:
        parts += [f"## Failed or incomplete runs ({len(sweep.problems)})", "", problems_table(sweep), ""]
    if pictures:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pictures] + [""]
    _atomic_write(out / "report.md", "\n".join(parts))
    return {"sweep": sweep, "table": table, "out": out, "pictures": pictures,
            "files": [out / "report.md", out / "report.csv", out / "runs.csv", *pictures]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prefopt-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="the sweep folder (hydra.sweep.dir of a `prefopt -m ...` run)")
    parser.add_argument("--out", default=None, help="where to write the report (default: the sweep folder)")
    parser.add_argument("--all-train-metrics", action="store_true",
                        help="show every train/val metric in report.md (report.csv always has them all)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    try:
        result = write_report(args.sweep_dir, args.out, args.all_train_metrics, plots=not args.no_plots)
    except PrefoptError as err:
        print(f"prefopt-report: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    sweep = result["sweep"]
    print(result["table"])
    if sweep.problems:
        print(f"\n{len(sweep.problems)} failed or incomplete runs:")
        print(problems_table(sweep))
    print("\nwrote " + ", ".join(str(p) for p in result["files"]))


if __name__ == "__main__":
    main()
