"""``prefopt``: the Hydra command line. Hydra composes the config; :func:`prefopt.train.train` runs it."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from prefopt.errors import PrefoptError

log = logging.getLogger("prefopt")

#: longest sweep run-folder name kept as is (file systems refuse names over 255 bytes)
MAX_SUBDIR = 150


def sweep_subdir(override_dirname: str, job_num) -> str:
    """A sweep run's folder name (``hydra.sweep.subdir``): its overrides, or, when those are too long for a
    file name, the job number, their start and a hash. ``prefopt-report`` reads ``.hydra/overrides.yaml``."""
    if not override_dirname:
        return str(job_num)
    if len(override_dirname.encode()) <= MAX_SUBDIR:
        return override_dirname
    import hashlib

    digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:8]
    return f"{job_num}_{override_dirname.encode()[:100].decode(errors='ignore')}_{digest}"


OmegaConf.register_new_resolver("prefopt_subdir", sweep_subdir, replace=True)


def config_dir() -> str:
    """``conf/`` at the repository root (found from an editable install), or ``$PREFOPT_CONFIG_DIR``."""
    override = os.environ.get("PREFOPT_CONFIG_DIR")
    path = Path(override) if override else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "train.yaml").is_file():
        raise SystemExit(f"prefopt: no configs at {path} (expected train.yaml); install with `pip install -e .` "
                         "from a clone, or set PREFOPT_CONFIG_DIR to the conf/ folder")
    return str(path)


def _run(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from prefopt.atomic import atomic_write
    from prefopt.train import train

    try:
        summary = train(cfg)
    except SIGTERMException:  # Lightning stops after the current batch; the last complete epoch is saved
        where = Path(cfg.paths.output_dir)
        print(f"prefopt: interrupted by SIGTERM; {where / 'checkpoints' / 'last.ckpt'} holds the last complete "
              f"epoch. Resume with: prefopt <the same options> hydra.run.dir={where} ckpt_path=last",
              file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except PrefoptError as err:  # one clear line, no traceback soup
        print(f"prefopt: error: {err}", file=sys.stderr)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            # keep the sweep going; the report lists this run as failed
            Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
            atomic_write(Path(cfg.paths.output_dir) / "error.txt", f"{type(err).__name__}: {err}\n")
            return None
        raise SystemExit(2) from None
    log.info("summary: %s", {k: summary[k] for k in ("domain", "loss", "beta", "reference", "seed")})
    log.info("eval: %s", summary["eval"])
    metric = cfg.get("optimized_metric")
    if metric:
        value = summary
        for part in str(metric).split("."):
            if not isinstance(value, dict) or part not in value:
                allowed = ", ".join(sorted(value)) if isinstance(value, dict) else "nothing (a number)"
                print(f"prefopt: error: optimized_metric={metric!r}: summary.json has no {part!r} there; "
                      f"found: {allowed}", file=sys.stderr)
                raise SystemExit(2)
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            print(f"prefopt: error: optimized_metric={metric!r} is {value!r} in summary.json; it must name a number",
                  file=sys.stderr)
            raise SystemExit(2)
        return float(value)
    return None


def main() -> None:
    hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")(_run)()


if __name__ == "__main__":
    main()
