"""The benchmark command's smoke mode writes a JSON file with every benchmark's keys (timings never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fit_exponent_recovers_a_power_law():
    from benchmarks.common import fit_exponent

    sizes = [2, 4, 8, 16]
    assert fit_exponent(sizes, [3.0 * s ** 1.5 for s in sizes]) == pytest.approx(1.5)
    assert fit_exponent(sizes, [0.2 * s for s in sizes]) == pytest.approx(1.0)


def test_cpu_clock_counts_work_not_waiting():
    import time

    from benchmarks import common

    try:
        with pytest.raises(ValueError, match="allowed: wall, cpu"):
            common.set_clock("gpu")
        common.set_clock("cpu")
        start, wall = common.now(), time.perf_counter()
        time.sleep(0.3)  # waiting, as for a core taken by another job
        assert common.now() - start < 0.1 and time.perf_counter() - wall >= 0.3
        start = common.now()
        total = 0
        while common.now() - start < 0.05:  # the CPU clock does advance with work
            total += sum(range(1000))
        assert total > 0
        common.set_clock("wall")
        start = common.now()
        time.sleep(0.1)
        assert common.now() - start >= 0.1
    finally:
        common.set_clock("wall")


def test_trl_benchmark_is_skipped_when_trl_is_missing(monkeypatch):
    from benchmarks import run, trl_runner

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl now raises ImportError
    assert not trl_runner.available()
    result = run.bench_trl(run.Bench(json.loads(json.dumps(run.SMOKE))))
    assert result["status"] == "skipped" and "trl" in result["reason"]
    table = run.table({"benchmarks": {"trl": result}})
    assert "skipped" in table


def test_cpu_peak_memory_sees_a_torch_allocation():
    # in a subprocess: the measurement changes glibc's malloc settings for the rest of the process
    code = ("import torch; from benchmarks import common; common.enter_memory_mode(); "
            "print(common.peak_memory(lambda: torch.ones(32, 2**20)))")  # 128 MiB of float32
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = proc.stdout.strip().splitlines()[-1]
    if peak == "None":
        pytest.skip("no /proc/self/clear_refs on this system")
    assert 120 <= float(peak) < 400


def test_smoke_peak_memory_is_measured_in_a_subprocess_per_variant(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--only", "diffusion_script", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert "subprocess" in results["peak_memory_method"]
    variants = results["benchmarks"]["diffusion_script"]["variants"]
    pids = {v["memory_pid"] for v in variants.values()}
    assert len(pids) == len(variants)  # one fresh process per variant
    for v in variants.values():
        if v["peak_mib"] is None:
            pytest.skip("no /proc/self/clear_refs on this system")
        assert isinstance(v["peak_mib"], float) and v["peak_mib"] > 0


def check_variants(variants, names, memory=True):
    assert set(variants) == set(names)
    for v in variants.values():
        assert v["seconds_per_step"] > 0 and v["ratio"] > 0 and len(v["repeats"]) == 1
        if memory:
            assert "peak_mib" in v


def test_smoke_run_writes_every_benchmark(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--no-memory", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "smoke"
    assert results["clock"] == "cpu" and results["threads"] == 1  # the defaults without a GPU
    assert {"machine", "settings", "targets", "table", "benchmarks", "peak_memory_method"} <= set(results)
    bench = results["benchmarks"]
    assert set(bench) == {"trl", "diffusion_script", "flow", "overhead", "reference", "scaling"}
    flow = bench["flow"]
    check_variants(flow["variants"], {"script", "prefopt"})
    assert set(flow["scaling"]) == {"batch", "image"}
    for axis in flow["scaling"].values():
        assert len(axis["seconds_per_step"]) == len(axis["script_seconds_per_step"]) == len(axis["sizes"])
    assert "| benchmark |" in proc.stdout and proc.stdout.strip().endswith("|")

    trl = bench["trl"]
    try:
        import trl as _  # noqa: F401
        has_trl = True
    except Exception:
        has_trl = False
    if has_trl:
        assert trl["status"] == "ok"
        assert set(trl["variants"]) == {"trl", "prefopt"}
        assert {"ratio", "target", "met", "trl_version"} <= set(trl)
    else:
        assert trl["status"] == "skipped"

    check_variants(bench["diffusion_script"]["variants"], {"script", "prefopt"})
    assert bench["diffusion_script"]["variants"]["script"]["ratio"] == 1.0
    assert set(bench["overhead"]) == {"control", "diffusion", "sequence"}
    for domain in bench["overhead"].values():
        check_variants(domain["variants"], {"hand_loop", "prefopt"})
    assert set(bench["reference"]) == {"diffusion", "sequence"}
    for domain in bench["reference"].values():
        check_variants(domain["variants"], {"copy", "adapter", "precomputed", "none"})
        v = domain["variants"]
        # a frozen copy doubles the parameters; the adapter keeps one copy plus its LoRA factors
        assert v["copy"]["param_mib"] == pytest.approx(2 * domain["policy_param_mib"], rel=0.01)
        assert domain["policy_param_mib"] < v["adapter"]["param_mib"] < v["copy"]["param_mib"]
        assert {"precomputed_ratio", "precomputed_met", "adapter_extra_param_mib", "adapter_met"} <= set(domain)
    assert set(bench["scaling"]) == {"sequence_batch", "sequence_length", "diffusion_batch", "diffusion_image"}
    for axis in bench["scaling"].values():
        assert len(axis["sizes"]) == len(axis["seconds_per_step"]) == len(axis["hand_loop_seconds_per_step"]) >= 2
        assert isinstance(axis["exponent"], float) and isinstance(axis["hand_loop_exponent"], float)
