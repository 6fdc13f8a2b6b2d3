"""A content-checked cache for built artefacts (base models, parsed data, preference pairs).

An entry is keyed by the config that produced it, so every run of a sweep that shares that config
(only the loss or beta differ, say) reuses one build. Entries are safetensors files (no pickle) written
through a temporary file and a rename; a ``.sha256`` sidecar written *after* the data marks the entry
complete. A missing, partial or corrupted entry is detected and rebuilt, never used. A file lock lets
parallel runs (``hydra/launcher=joblib``) wait for one build instead of racing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from prefopt.atomic import atomic_path, atomic_write

log = logging.getLogger(__name__)

#: how many times each kind of entry was built in this process (tests assert on it)
BUILD_COUNTS: Counter[str] = Counter()


def config_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-serializable config."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def entry_path(cache_dir: str | os.PathLike, kind: str, config: Mapping[str, Any]) -> Path:
    """Where the entry for ``config`` lives: ``<cache_dir>/<kind>/<hash>.safetensors``."""
    return Path(cache_dir) / kind / f"{config_key(config)}.safetensors"


def _load_checked(path: Path) -> dict[str, torch.Tensor] | None:
    sidecar = path.with_suffix(".sha256")
    if not path.is_file() or not sidecar.is_file():
        return None
    if sidecar.read_text().strip() != _digest(path):
        log.warning("cache entry %s does not match its checksum: rebuilding it", path)
        return None
    try:
        return load_file(str(path))
    except Exception as err:  # a checksum-valid file that safetensors still rejects
        log.warning("cache entry %s is unreadable (%s): rebuilding it", path, err)
        return None


def cached_tensors(cache_dir: str | os.PathLike, kind: str, config: Mapping[str, Any],
                   build: Callable[[], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors built by ``build()`` for ``config``, from the cache when a valid entry exists."""
    path = entry_path(cache_dir, kind, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        tensors = _load_checked(path)
        if tensors is not None:
            log.info("cache: reused %s entry %s", kind, path)
            return tensors
        tensors = {k: v.detach().cpu().contiguous() for k, v in build().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"config": json.dumps(config, sort_keys=True, default=str)})
        atomic_write(path.with_suffix(".sha256"), _digest(path))
        BUILD_COUNTS[kind] += 1
        log.info("cache: built %s entry %s", kind, path)
        return tensors
