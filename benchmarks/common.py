"""Timing, peak-memory and fitting helpers shared by the benchmarks.

Every benchmark compares *runners*: objects with ``run(steps) -> list[float]`` (seconds of each optimizer
step, measured as the interval between the ends of consecutive steps, so the data fetch, hooks, logging and
the optimizer of the framework are all inside it) and optionally ``close()``. :func:`compare` runs them in
turn, repeat after repeat, reversing the order every other repeat (A B, B A, A B, ...) so that slow drift of a
shared machine hits every runner alike; the first ``warmup`` steps of every run are discarded, the median
step of a run is that run's figure, and the median over repeats is the result. Ratios are the median of the
per-repeat ratios (paired: each candidate repeat against the baseline repeat next to it).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import time
from typing import Callable, Mapping

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


#: "wall": ``time.perf_counter`` after all queued GPU work has finished; "cpu": this process's CPU time
#: (user + sys of all its threads). On a CPU-only machine shared with other jobs the CPU clock does not count
#: the time the process waited for a core, so side-by-side ratios stay resolvable under load.
CLOCKS = ("wall", "cpu")
_clock = "wall"


def set_clock(name: str) -> None:
    global _clock
    if name not in CLOCKS:
        raise ValueError(f"clock={name!r}; allowed: {', '.join(CLOCKS)}")
    _clock = name


def clock() -> str:
    return _clock


def now() -> float:
    """The benchmark clock (:func:`set_clock`): wall time after queued GPU work, or process CPU time."""
    if _clock == "cpu":
        return time.process_time()
    sync()
    return time.perf_counter()


def intervals(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps[:-1], stamps[1:])]


def compare(runners: Mapping[str, object], baseline: str, repeats: int, steps: int, warmup: int,
            progress: Callable[[str], None] | None = None) -> dict:
    """Median seconds per step of each runner, and each runner's ratio to ``baseline``.

    A run does ``warmup + steps + 1`` optimizer steps: ``warmup + steps`` intervals between step ends,
    of which the first ``warmup`` are discarded.
    """
    names = list(runners)
    per_repeat: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times = runners[name].run(warmup + steps + 1)[warmup:]
            per_repeat[name].append(statistics.median(times))
            if progress:
                progress(f"  {name} repeat {r + 1}/{repeats}: {per_repeat[name][-1] * 1e3:.1f} ms/step")
    out = {}
    for name in names:
        ratios = [c / b for c, b in zip(per_repeat[name], per_repeat[baseline])]
        out[name] = {"seconds_per_step": statistics.median(per_repeat[name]),
                     "repeats": per_repeat[name],
                     "ratio": statistics.median(ratios)}
    return out


def fit_exponent(sizes, seconds) -> float:
    """Least-squares slope of log(seconds) against log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


# ------------------------------------------------------------------------------------ peak memory
# Each variant is measured in a fresh subprocess of its own (benchmarks.run.memory_worker), so no variant can
# reuse memory that another one freed but the allocator kept resident.
# On CUDA: torch.cuda.max_memory_allocated above what was allocated before the steps.
# On CPU (Linux): the process's peak resident set (VmHWM) above its resident set before the steps, with the
# peak reset through /proc/self/clear_refs, so the setup's own peak is not counted. tracemalloc does not see
# torch's allocations, so the OS is asked. glibc keeps freed heap memory resident and reuses it, which would
# let the steps reuse what the setup freed; the worker therefore first sets a fixed mmap threshold (mallopt),
# so every tensor above 64 KiB is its own mapping, returned to the OS when freed.

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_memory_supported() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK) and _status_kib("VmHWM") is not None


def enter_memory_mode() -> None:
    """Make freed CPU tensors leave the resident set (see above). Idempotent; no-op off glibc."""
    if torch.cuda.is_available():
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    except OSError:
        pass


def peak_memory(run: Callable[[], object]) -> float | None:
    """Peak memory (MiB) that ``run()`` allocates above what is in use when it starts; ``None`` if unknown."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not cpu_memory_supported():
        return None
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    run()
    peak = _status_kib("VmHWM")
    return (peak - base) / 1024


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameter and buffer storages of ``module`` (shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def machine() -> dict:
    import platform

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device())}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
