"""Option types and ranges checked once, before any model is built or any pair is made; strict ``summary.json``.

:func:`validate_options` walks the composed config: the trainer's numeric and boolean options, the task's sizes
(``num_pairs``, ``num_eval``, ``batch_size``, ...), every seed, and every ``*_path`` option of the task (it must
exist). Each failure is one :class:`~prefopt.errors.PrefoptError` naming the option, the value and what is allowed.
Domains with options of their own keep checking them in their task's constructor; this module holds the rules that
hold for every domain, by option name.

:func:`summary_json` writes a summary as strict JSON: a NaN or infinite number becomes ``null`` and its key is
listed under ``"nonfinite"`` (JSON has no NaN; Python's ``json`` would write a bare ``NaN`` that other readers
refuse).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from prefopt.errors import PrefoptError

SEED_LIMIT = 2**32  # numpy's and torch's generators take seeds in [0, 2**32)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(low: int, note: str = "") -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}{note}"


def fraction_or_count(low_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    lower = (lambda v: v > 0) if low_open else (lambda v: v >= 0)
    return ((lambda v: (_is_int(v) and v >= (1 if low_open else 0))
             or (isinstance(v, float) and lower(v) and v <= 1.0)),
            f"a count (integer >= {1 if low_open else 0}) or a fraction in {'(0' if low_open else '[0'}, 1.0]")


BOOLEAN = (lambda v: isinstance(v, bool)), "true or false"

#: Lightning Trainer options with a fixed type (None is always allowed: Lightning's default)
TRAINER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_epochs": integer(-1, " (-1: no limit)"),
    "min_epochs": integer(0),
    "max_steps": integer(-1, " (-1: no limit)"),
    "min_steps": integer(0),
    "log_every_n_steps": integer(1),
    "accumulate_grad_batches": integer(1),
    "check_val_every_n_epoch": integer(1),
    "num_sanity_val_steps": integer(-1, " (-1: all)"),
    "num_nodes": integer(1),
    "limit_train_batches": fraction_or_count(),
    "limit_val_batches": fraction_or_count(),
    "limit_test_batches": fraction_or_count(),
    "limit_predict_batches": fraction_or_count(),
    "val_check_interval": fraction_or_count(low_open=True),
    "gradient_clip_val": ((lambda v: _is_number(v) and math.isfinite(v) and v >= 0), "a finite number >= 0"),
    "enable_progress_bar": BOOLEAN,
    "enable_checkpointing": BOOLEAN,
    "enable_model_summary": BOOLEAN,
    "fast_dev_run": ((lambda v: isinstance(v, bool) or (_is_int(v) and v >= 0)), "true, false or an integer >= 0"),
}

#: sizes of a task (any domain): a positive integer where set (null keeps the task's default behaviour)
POSITIVE_SIZES = ("num_pairs", "num_eval", "batch_size", "rounds", "eval_episodes", "eval_samples",
                  "samples_per_prompt", "num_envs", "group_size", "segment_length")
#: sizes where 0 means "none" (``num_heldout=0``: no held-out pairs for the agreement metric)
COUNTS = ("num_heldout",)


#: path options that name a folder whatever their suffix (``model_path``: a ``save_pretrained`` folder)
FOLDERS = ("model_path",)


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, str, Any]]:
    """(dotted key, last key, value) of every leaf under ``node``; interpolations resolved."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            try:
                value = node[key]
            except Exception:  # noqa: BLE001 - a missing (???) value: check_mandatory names it
                continue
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, ListConfig):
        return
    else:
        yield prefix, prefix.rpartition(".")[2], node


def _refuse(key: str, value: Any, allowed: str) -> None:
    raise PrefoptError(f"{key}={value!r} is not supported; allowed: {allowed}")


def check_writable_folder(key: str, value: Any) -> None:
    """A folder prefopt writes to (``paths.cache_dir``): created if needed, and a file can be made in it. A path
    under a regular file, on a read-only file system, or not writable is refused (tried, not guessed from mode
    bits, which do not hold for root)."""
    import tempfile

    path = Path(str(value)).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise PrefoptError(f"{key}={value}: cannot be written ({err.strerror or type(err).__name__}); allowed: a "
                           "folder prefopt can create and write to") from None


def check_seed(key: str, value: Any) -> None:
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        _refuse(key, value, "an integer in [0, 2**32)")


def check_path(key: str, value: Any) -> None:
    """A ``*_path``/``*_file``/``*_folder`` option: it exists; a ``*_file`` is a file, a ``*_folder``/``*_dir`` a
    folder. Unset (null or empty) passes: the task decides whether it needs it."""
    if value in (None, ""):
        return
    path = Path(str(value)).expanduser()
    name = key.rpartition(".")[2]
    if not path.exists():
        raise PrefoptError(f"{key}={value}: no such file or folder")
    if name.endswith("_file") and not path.is_file():
        raise PrefoptError(f"{key}={value}: is a folder; allowed: a file")
    if (name.endswith("_folder") or name in FOLDERS) and not path.is_dir():
        raise PrefoptError(f"{key}={value}: is a file; allowed: a folder")
    check_weights(key, path)
    check_content(key, path)


#: what the first bytes of a data file must be, by suffix
MAGIC = {".parquet": ((b"PAR1",), "a parquet file"),
         ".npz": ((b"PK\x03\x04", b"PK\x05\x06"), "a NumPy .npz (zip) archive"),  # an empty zip: its end record
         ".npy": ((b"\x93NUMPY",), "a NumPy .npy array")}


def check_content(key: str, path: Path) -> None:
    """A data file's first bytes match its suffix: ``.parquet``, ``.npz`` and ``.npy`` by their magic bytes;
    ``.jsonl``/``.json`` must be UTF-8 text, not gzip. Read: the first 64 KiB only."""
    if not path.is_file():
        return
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError as err:
        raise PrefoptError(f"{key}={path}: cannot be read ({err.strerror or err})") from None
    if suffix in MAGIC:
        magic, what = MAGIC[suffix]
        if not head.startswith(magic):  # str.startswith takes a tuple
            found = "empty" if not head else ("gzip-compressed" if head[:2] == b"\x1f\x8b" else
                                              "text" if _is_text(head) else "of another format")
            raise PrefoptError(f"{key}={path}: is not {what} (its first bytes are not {magic[0]!r}; the file is {found})")
    elif suffix in (".jsonl", ".json"):
        if head[:2] == b"\x1f\x8b":
            raise PrefoptError(f"{key}={path}: is gzip-compressed; decompress it first (gunzip -c {path.name} > "
                               f"plain{suffix})")
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as err:
            if len(head) < 1 << 16 or err.start < len(head) - 4:  # not a character cut at the 64 KiB boundary
                line = head[: err.start].count(b"\n") + 1
                raise PrefoptError(f"{key}={path}: is not UTF-8 text (byte {err.start}, line {line}: "
                                   f"{head[err.start:err.start + 1]!r}); JSON lines must be UTF-8") from None


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


#: file suffixes of pickled weights (torch.save / pickle): refused in a model folder, never unpickled
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def _check_safetensors(key: str, file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PrefoptError(f"{key}: {file} is not a complete safetensors file ({detail}); it is damaged or cut "
                           "short: write it again (save_pretrained / safetensors.torch.save_file)") from None


def check_weights(key: str, path: Path) -> None:
    """Weights named by a path option are checked without loading them: every ``.safetensors`` file's header must
    read and cover the file (a cut or foreign file is refused), and a model folder whose weights are pickle files
    only (``.bin``, ``.pt``, ...) is refused, never unpickled."""
    if path.is_file():
        if path.suffix == ".safetensors":
            _check_safetensors(key, path)
        return
    if not path.is_dir():
        return
    found = [f for pattern in ("*", "*/*") for f in sorted(path.glob(pattern)) if f.is_file()]
    tensors = [f for f in found if f.suffix == ".safetensors"]
    pickled = [f for f in found if f.suffix in PICKLE_SUFFIXES]
    for file in tensors:
        _check_safetensors(key, file)
    if pickled and not tensors:
        raise PrefoptError(f"{key}={path}: holds pickle weights only ({', '.join(f.name for f in pickled[:3])}); "
                           "prefopt never unpickles model files. Save the model as safetensors "
                           "(save_pretrained(..., safe_serialization=True))")


def validate_options(cfg: DictConfig) -> None:
    """Check the run's generic options (types, ranges, paths) once, before anything is built."""
    if "seed" in cfg:
        check_seed("seed", cfg.seed)
    trainer = cfg.get("trainer")
    if isinstance(trainer, DictConfig):
        for name, (ok, allowed) in TRAINER_RULES.items():
            value = trainer.get(name)
            if value is not None and not ok(value):
                _refuse(f"trainer.{name}", value, allowed)
    cache = OmegaConf.select(cfg, "paths.cache_dir", default=None)
    if cache not in (None, ""):
        check_writable_folder("paths.cache_dir", cache)
    leaves = [leaf for where in ("domain.task", "feedback") if isinstance(OmegaConf.select(cfg, where), DictConfig)
              for leaf in _walk(OmegaConf.select(cfg, where), where)]
    for key, name, value in leaves:
        if value is None:
            continue
        if name in POSITIVE_SIZES and not (_is_int(value) and value >= 1):
            _refuse(key, value, "an integer >= 1")
        elif name in COUNTS and not (_is_int(value) and value >= 0):
            _refuse(key, value, "an integer >= 0 (0: none)")
        elif name == "seed" or name.endswith("_seed"):
            check_seed(key, value)
        elif name in ("path", "file") or name.endswith(("_path", "_file", "_folder")):
            check_path(key, value)


# ----------------------------------------------------------------------------------------- strict summary
def strict(value: Any, key: str = "", found: list[str] | None = None) -> Any:
    """``value`` with every NaN/inf float replaced by None; the dotted keys replaced are appended to ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(key)
        return None
    if isinstance(value, dict):
        return {k: strict(v, f"{key}.{k}" if key else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v, f"{key}[{i}]", found) for i, v in enumerate(value)]
    return value


def summary_json(summary: dict[str, Any]) -> str:
    """``summary`` as strict JSON text (``allow_nan=False``): NaN/inf become null, listed under ``"nonfinite"``."""
    found: list[str] = []
    clean = strict(summary, "", found)
    if found:
        clean["nonfinite"] = sorted(found)
    return json.dumps(clean, indent=2, sort_keys=True, allow_nan=False)
