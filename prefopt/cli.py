"""``prefopt``: the Hydra command line. Hydra composes the config; :func:`prefopt.train.train` runs it.

Around Hydra this module adds what a user meets first: where the configs are (a source checkout's ``conf/`` or
the installed package's ``prefopt/conf``), one-line messages for mistakes (a misspelt group or option with the
closest valid names, a missing mandatory value, a missing optional package with the extra that provides it),
a quiet console, and a short summary at the end of every run (also written to ``summary.txt``).
"""

from __future__ import annotations

import difflib
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from prefopt.errors import PrefoptError
from prefopt.runlock import release_all, run_id

log = logging.getLogger("prefopt")

#: longest sweep run-folder name kept as is (file systems refuse names over 255 bytes)
MAX_SUBDIR = 150

#: the installed configs, as Hydra's search path names them
PACKAGE_CONFIGS = "pkg://prefopt.conf"


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
OmegaConf.register_new_resolver("prefopt_run_id", run_id, replace=True)  # prefopt.runlock: unique run folders


def _checkout_configs() -> Path | None:
    """``conf/`` of a source checkout (an editable install or ``PYTHONPATH=<clone>``), if this is one."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "conf" / "train.yaml").is_file():
        return root / "conf"
    return None


def config_dir() -> str:
    """The folder of prefopt's configs: ``$PREFOPT_CONFIG_DIR``, else the installed package's ``prefopt/conf``
    (a wheel or a non-editable install), else ``conf/`` of the source checkout this module runs from."""
    override = os.environ.get("PREFOPT_CONFIG_DIR")
    packaged = Path(__file__).resolve().parent / "conf"
    candidates = [Path(override)] if override else [packaged, _checkout_configs()]
    for path in candidates:
        if path is not None and (path / "train.yaml").is_file():
            return str(path)
    where = override or f"{packaged} (installed) or the repository's conf/"
    raise SystemExit(f"prefopt: error: no configs at {where} (expected train.yaml); reinstall prefopt "
                     "(pip install .), or set PREFOPT_CONFIG_DIR to a folder laid out like conf/")


def _hydra_config_path() -> str:
    """What ``hydra.main`` searches: the installed package through ``pkg://prefopt.conf``, else the folder."""
    path = config_dir()
    if not os.environ.get("PREFOPT_CONFIG_DIR") and Path(path) == Path(__file__).resolve().parent / "conf":
        return PACKAGE_CONFIGS
    return path


# ------------------------------------------------------------------------------------------- quiet console
_THIRD_PARTY_WARNINGS = (
    # what prefopt does on purpose: the frozen reference stays in eval mode; a module that defines validation_step
    # runs on tasks without validation pairs; every round and every resumed run write to the run folder's own
    # checkpoints/ and logs/ (the logs of a resumed run are kept, not deleted); in-process data loading
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"You defined a `validation_step` but have no `val_dataloader`",
    r"Checkpoint directory .* exists and is not empty",
    r"Experiment logs directory .* exists and is not empty",
    r"The '\w+_dataloader' does not have many workers",
    # Lightning's pytree helper on newer torch versions
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)  # pyproject.toml's pytest filterwarnings holds the same patterns for the test suite

#: Lightning lines that every round's Trainer repeats; shown once per run
_ONCE = ("GPU available:", "TPU available:", "HPU available:")


class _DropAdverts(logging.Filter):
    """Drops Lightning's advert tips, and its device lines after their first appearance."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("\N{ELECTRIC LIGHT BULB} Tip:"):
            return False
        if message.startswith(_ONCE):
            if message in self.seen:
                return False
            self.seen.add(message)
        return True


def quiet_console() -> None:
    """No Lightning advert tips, each Lightning line once (through Hydra's handlers, so also in cli.log), and no
    warnings about what prefopt does on purpose (the frozen reference in eval mode, its own checkpoint folder)."""
    for pattern in _THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # their own console handlers; Hydra's root ones remain
                logger.removeHandler(handler)
        logger.propagate = True


# ------------------------------------------------------------------------------------ missing extras
#: module -> the extra that installs it (pyproject.toml); a domain's own extra is named when it has the module
_EXTRA_OF = {"music21": "sequence", "sklearn": "diffusion", "mujoco": "control", "optuna": "sweeps",
             "hydra_plugins": "sweeps", "submitit": "sweeps", "joblib": "sweeps", "trl": "bench",
             "tokenizers": "bench", "peft": "lora", "transformers": "lora", "datasets": "data",
             "pyarrow": "data", "pandas": "data"}
#: config names that Hydra's plugins (the [sweeps] extra) provide
_HYDRA_PLUGIN_CONFIGS = {"optuna", "joblib", "submitit_local", "submitit_slurm"}
_DOMAIN_EXTRA_HAS = {"diffusion": {"sklearn", "peft", "transformers", "datasets", "pyarrow", "pandas"},
                     "sequence": {"music21", "peft", "transformers", "datasets", "pyarrow", "pandas"}}


def missing_extra_message(module: str, domain: str | None = None) -> str | None:
    """One line naming the extra to install for a missing ``module``, or None when no extra provides it."""
    top = module.split(".")[0]
    extra = _EXTRA_OF.get(top)
    if extra is None:
        return None
    if domain in _DOMAIN_EXTRA_HAS and top in _DOMAIN_EXTRA_HAS[domain]:
        extra = domain
    need = "the MuJoCo envs need" if top == "mujoco" else (f"the {domain} domain needs" if domain else "this run needs")
    return f"{need} {top}, which is not installed; install it with: pip install \"prefopt[{extra}]\""


def _missing_module(err: BaseException) -> str | None:
    """The name of a missing optional module somewhere in ``err``'s chain of causes."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ImportError) and getattr(err, "name", None):
            return err.name
        if type(err).__name__ == "DependencyNotInstalled" and "mujoco" in str(err).lower():
            return "mujoco"
        err = err.__cause__ or err.__context__
    return None


# --------------------------------------------------------------------------------- configuration mistakes
def _closest(word: str, choices, n: int = 3) -> list[str]:
    choices = sorted({str(c) for c in choices})
    return difflib.get_close_matches(word, choices, n=n, cutoff=0.6)  # a weak match misleads: list them all


def _suggest(word: str, choices) -> str:
    close = _closest(word, choices)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else \
        f"allowed: {', '.join(sorted(map(str, choices)))}"


def config_error_message(err: BaseException) -> str | None:
    """prefopt's one line for a Hydra composition error (a misspelt group, option or key), or None."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        if group in ("hydra/launcher", "hydra/sweeper") and name in _HYDRA_PLUGIN_CONFIGS:
            return missing_extra_message("hydra_plugins")
        if err.options:
            return f"{group}={name}: there is no such {group} option; {_suggest(name, err.options)}"
        return f"{group}={name}: no such config group or option ({str(err).splitlines()[0]})"
    if isinstance(err, ConfigCompositionException) and isinstance(err.__cause__, OmegaConfBaseException) \
            and getattr(err.__cause__, "key", None) is not None:
        cause = err.__cause__
        key = str(getattr(cause, "key", "") or "")
        full = str(getattr(cause, "full_key", "") or key)
        parent = getattr(cause, "parent_node", None)
        known = [str(k) for k in parent.keys()] if parent is not None else []
        known = [k for k in known if k != "hydra"]
        where = full.rpartition(".")[0]
        what = "option" if where else "config group or option"
        inside = f" under {where}" if where else ""
        return f"{full}: there is no such {what}{inside}; {_suggest(key, known)}"
    if isinstance(err, OverrideParseException):
        return f"cannot read an override: {str(err).splitlines()[0]} (write key=value, e.g. loss.beta=0.1)"
    if isinstance(err, ConfigCompositionException):
        return str(err).splitlines()[0]
    return None


def check_mandatory(cfg: DictConfig) -> None:
    """One PrefoptError naming every mandatory value (``???``) the run's config leaves unset."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = " ".join(f"{key}=..." for key in missing)
        raise PrefoptError(f"{', '.join(missing)}: mandatory value{'s' if len(missing) > 1 else ''} not set; "
                           f"add {example} to the command")


# --------------------------------------------------------------------------------------------- the run
def _run(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from prefopt.atomic import atomic_write
    from prefopt.run_summary import write_run_summary
    from prefopt.train import train

    quiet_console()
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    domain = OmegaConf.select(cfg, "domain.name", default=None)

    def fail(message: str) -> None:
        print(f"prefopt: error: {message}", file=sys.stderr)
        if multirun:  # keep the sweep going; the report lists this run as failed
            Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
            atomic_write(Path(cfg.paths.output_dir) / "error.txt", f"PrefoptError: {message}\n")
            return None
        raise SystemExit(2)

    try:
        check_mandatory(cfg)
        summary = train(cfg)
    except SIGTERMException:  # Lightning stops after the current batch; the last complete epoch is saved
        where = Path(cfg.paths.output_dir)
        print(f"prefopt: interrupted by SIGTERM; {where / 'checkpoints' / 'last.ckpt'} holds the last complete "
              f"epoch. Resume with: prefopt <the same options> hydra.run.dir={where} ckpt_path=last",
              file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except PrefoptError as err:  # one clear line, no traceback soup
        return fail(str(err))
    except Exception as err:
        module = _missing_module(err)
        message = missing_extra_message(module, domain) if module else None
        if message is None:
            raise
        return fail(message)
    write_run_summary(summary, Path(cfg.paths.output_dir))
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
    """The ``prefopt`` command. Composition errors come back to this function (Hydra would print them with its
    own advice) and leave as one line; set HYDRA_FULL_ERROR=1 for Hydra's full report instead."""
    user_full_error = os.environ.get("HYDRA_FULL_ERROR")
    if not user_full_error:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(config_path=_hydra_config_path(), config_name="train", version_base="1.3")(_run)()
    except Exception as err:
        if user_full_error:
            raise
        message = config_error_message(err)
        module = None if message else _missing_module(err)
        if module:
            message = missing_extra_message(module)
        if message is None:
            raise
        print(f"prefopt: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        release_all()  # the run folder's lock (prefopt.runlock), also when the run ended with SystemExit
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
