"""One run per run folder: a lock, collision-free default folder names, and no silent overwrite of a finished run.

* :func:`hold_run_folder` takes an exclusive lock on ``<run folder>/.prefopt-run.lock`` (``flock``: an OS
  lock, released by the OS when the process dies, so a killed run never leaves a stale lock; the file is deleted
  when the run ends, safely: see :class:`_FolderLock`). A second run into
  the same folder is refused with one line naming the holder (pid, host, start time, read from
  ``.prefopt-run.lock.json``). The lock is re-entrant within a process: the CLI takes it before Hydra writes
  ``.hydra/`` (:class:`RunFolderCallback`), and :func:`prefopt.train.train` takes it again for Python API users.
* :func:`check_not_finished` refuses to start a fresh run in a folder that holds a finished run
  (``summary.json``) or an interrupted one (``checkpoints/last.ckpt``) unless ``overwrite=true`` (which first
  removes the old run's results) or ``ckpt_path`` resumes it.
* :func:`run_id` is the ``${prefopt_run_id:}`` resolver of the default run and sweep folder names: the pid and a
  short random suffix after the time stamp, so two runs started in the same second never share a folder.

Only the global rank 0 process locks and checks: the other ranks of a DDP/FSDP run share rank 0's folder.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from prefopt.atomic import atomic_write
from prefopt.errors import PrefoptError

LOCK_NAME = ".prefopt-run.lock"
HOLDER_NAME = ".prefopt-run.lock.json"
#: what a finished or interrupted run leaves; overwrite=true removes these (and only these) before the new run
RUN_RESULTS = ("summary.json", "summary.txt", "timing.json", "policy.safetensors", "error.txt",
               "nonfinite-last-good.ckpt", "checkpoints", "logs")

_held: dict[Path, list] = {}  # folder -> [_FolderLock, count] of the locks this process holds


class _FolderLock:
    """An exclusive, non-blocking OS lock on ``path`` whose file is deleted when it is released.

    Deleting a lock file is safe only with both halves of this protocol: the holder deletes the file *before* it
    unlocks, and a process that got the lock checks that ``path`` still names the file it locked (a process that
    opened the old file just before it was deleted would otherwise lock a deleted file while a third one creates and
    locks a new one: two holders). Where ``fcntl`` is missing (Windows), ``filelock`` locks and the file stays.
    """

    def __init__(self, path: Path):
        self.path, self._fd, self._fallback = Path(path), None, None

    def acquire(self) -> None:
        """Raise :class:`filelock.Timeout` when another process holds the lock."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            self._fallback = FileLock(str(self.path), timeout=0)
            self._fallback.acquire()
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise Timeout(str(self.path)) from None
            except BaseException:
                os.close(fd)
                raise
            if _names_file(self.path, fd):
                self._fd = fd
                return
            os.close(fd)  # locked a file its holder deleted on release: lock the one the path names now

    def release(self) -> None:
        if self._fallback is not None:  # pragma: no cover - Windows
            self._fallback.release(force=True)
            return
        if self._fd is None:
            return
        import fcntl

        if _names_file(self.path, self._fd):
            self.path.unlink(missing_ok=True)  # deleted while still locked (see the class docstring)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _names_file(path: Path, fd: int) -> bool:
    """True when ``path`` is the file open as ``fd`` (same device and inode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
_RUN_ID: list[str] = []


def run_id() -> str:
    """``<pid>-<4 random hex digits>``, the same for the whole process (``${prefopt_run_id:}``)."""
    if not _RUN_ID:
        _RUN_ID.append(f"{os.getpid()}-{secrets.token_hex(2)}")
    return _RUN_ID[0]


def is_rank_zero() -> bool:
    """True unless an environment variable Lightning reads for the rank says this is another rank."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key)
        if value not in (None, "", "0"):
            return False
    return True


def _holder_text(folder: Path) -> str:
    try:
        info = json.loads((folder / HOLDER_NAME).read_text())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown (it is just starting)"


def acquire(folder: Path) -> None:
    """Lock ``folder`` for this process (re-entrant); raise a PrefoptError naming the holder when another has it."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder][1] += 1
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = _FolderLock(folder / LOCK_NAME)
        lock.acquire()
    except Timeout:
        raise PrefoptError(f"run folder {folder} is in use by another run ({_holder_text(folder)}); wait for it to "
                           "end, or pick another folder with hydra.run.dir=...") from None
    except OSError as err:
        raise PrefoptError(f"run folder {folder}: cannot be written ({err.strerror or err}); pick a writable folder "
                           "with hydra.run.dir=...") from None
    _held[folder] = [lock, 1]
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds")}
    atomic_write(folder / HOLDER_NAME, json.dumps(holder))


def release(folder: Path) -> None:
    folder = Path(folder).resolve()
    entry = _held.get(folder)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        (folder / HOLDER_NAME).unlink(missing_ok=True)
        entry[0].release()
        del _held[folder]


@contextmanager
def hold_run_folder(folder: Path) -> Iterator[None]:
    """Hold the run folder's lock for the ``with`` block (rank 0 only)."""
    if not is_rank_zero():
        yield
        return
    acquire(folder)
    try:
        yield
    finally:
        release(folder)


def _resuming(ckpt_path: Any) -> bool:
    return ckpt_path not in (None, "", "none", "null")


def check_not_finished(folder: Path, ckpt_path: Any = None, overwrite: Any = False) -> None:
    """Refuse a fresh run in a folder holding a finished or interrupted run unless ``overwrite``; with
    ``overwrite=true`` the old run's results (:data:`RUN_RESULTS`) are removed first. Resuming is never refused."""
    if not isinstance(overwrite, bool):
        raise PrefoptError(f"overwrite={overwrite!r} is not supported; allowed: true, false")
    folder = Path(folder)
    if _resuming(ckpt_path) or not is_rank_zero():
        return
    finished = (folder / "summary.json").is_file()
    interrupted = (folder / "checkpoints" / "last.ckpt").exists()
    if not (finished or interrupted):
        return
    if not overwrite:
        what = "a finished run (summary.json)" if finished else "an interrupted run (checkpoints/last.ckpt)"
        raise PrefoptError(f"run folder {folder} holds {what}; refusing to overwrite it. Resume it with "
                           "ckpt_path=last, pick another folder with hydra.run.dir=..., or add overwrite=true to "
                           "replace it")
    for name in RUN_RESULTS:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


try:  # the CLI's hook: lock the run folder and check it before Hydra writes .hydra/ into it
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a core dependency
    _HydraCallback = object


def _check_resume_early(folder: Path, config) -> None:
    """A resume whose loss, reference or domain differ from the checkpoint's is refused here, before Hydra
    writes the new config over the run's ``.hydra/`` (the network is checked once built, in train)."""
    from prefopt.checkpoint_io import check_checkpoint_file, check_resume, check_resume_allow, run_signature

    ckpt = config.get("ckpt_path")
    if not _resuming(ckpt):
        return
    path = folder / "checkpoints" / "last.ckpt" if str(ckpt) == "last" else Path(str(ckpt))
    if path.is_file():  # a missing one is named by train
        check_checkpoint_file(path)
        check_resume(path, run_signature(config), check_resume_allow(config.get("resume_allow")))


_pending_records: dict[Path, dict[Path, str]] = {}  # run folder -> the .hydra/ files a resume writes once checked


def _defer_run_record(folder: Path, config) -> None:
    """A resume: Hydra is told not to write ``.hydra/`` (``hydra.output_subdir`` null for this job); the files it
    would write are kept here and written by :func:`write_run_record` once the resume has passed every check
    (the network's signature needs the task built), so a refused resume leaves the run's record as it was."""
    import copy
    import os

    from omegaconf import OmegaConf, open_dict, read_write

    subdir = OmegaConf.select(config, "hydra.output_subdir")
    if subdir is None:
        return
    full = copy.deepcopy(config)
    with read_write(full.hydra.runtime), open_dict(full.hydra.runtime):
        full.hydra.runtime.output_dir = os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir")))
    task = copy.deepcopy(full)
    with read_write(task), open_dict(task):
        del task["hydra"]
    where = Path(full.hydra.runtime.output_dir) / str(subdir)
    hydra_cfg = OmegaConf.masked_copy(full, "hydra")  # what Hydra writes as hydra.yaml (HydraConfig's copy)
    _pending_records[folder] = {where / "config.yaml": OmegaConf.to_yaml(task),
                                where / "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
                                where / "overrides.yaml": OmegaConf.to_yaml(full.hydra.overrides.task)}
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.output_subdir = None


def write_run_record(folder: Path) -> None:
    """Write the ``.hydra/`` files a checked resume into ``folder`` holds back (nothing when there are none)."""
    for path, text in _pending_records.pop(Path(folder).resolve(), {}).items():
        atomic_write(path, text)


class RunFolderCallback(_HydraCallback):
    """Hydra callback (``hydra.callbacks.run_folder`` in ``conf/hydra/default.yaml``): in a single run, lock
    ``hydra.run.dir`` and refuse to overwrite a finished run before Hydra saves the config into it; the lock is
    released when the run ends. Sweeps lock each job's folder in :func:`prefopt.train.train`."""

    def __init__(self) -> None:
        self._folder: Path | None = None

    def on_run_start(self, config, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        if not is_rank_zero():
            return
        folder = Path(str(OmegaConf.select(config, "hydra.run.dir"))).resolve()
        try:
            acquire(folder)
            self._folder = folder
            check_not_finished(folder, config.get("ckpt_path"), config.get("overwrite", False))
            _check_resume_early(folder, config)
            if _resuming(config.get("ckpt_path")):
                _defer_run_record(folder, config)
        except PrefoptError as err:  # Hydra turns a callback's Exception into a warning: leave here, as the CLI does
            if self._folder is not None:
                release(folder)
                self._folder = None
            print(f"prefopt: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def on_run_end(self, config, **kwargs: Any) -> None:
        _pending_records.clear()
        if self._folder is not None:
            release(self._folder)
            self._folder = None


def release_all() -> None:
    """Release every run-folder lock this process holds (the CLI's last step, whatever ended the run)."""
    for folder, (lock, _) in list(_held.items()):
        (folder / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()
        del _held[folder]
    _pending_records.clear()
