"""``python -m benchmarks``: prefopt's training step against TRL, the Diffusion-DPO script, a hand-written loop.

Runs six benchmarks (CPU by default, the GPU when one is present), writes one JSON file and prints a
Markdown table. See the README section "Performance" for the method and the measured results.

1. ``trl``: TRL ``DPOTrainer`` vs prefopt on the same tiny GPT-2, pairs, beta, sigmoid loss, frozen copy.
2. ``diffusion_script``: the ``train_diffusion_dpo.py`` step as a plain loop vs prefopt on the same LoRA UNet.
2b. ``flow``: a hand-written flow-matching DPO loop (flow_grpo's SD3 DPO math) vs prefopt on the same LoRA UNet
   with ``FlowMatchEulerDiscreteScheduler``, and both at other batch and image sizes.
3. ``overhead``: prefopt through Lightning vs a hand-written loop of the same math, per domain.
4. ``reference``: ``copy`` / ``adapter`` / ``precomputed`` / ``none`` on the diffusion and sequence domains.
5. ``scaling``: prefopt's step time against batch size, sequence length and image size; log-log exponent.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import common, setups, trl_runner
from prefopt.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]

FULL = dict(repeats=3, steps=3, warmup=1, memory_steps=3,
            flow=dict(size=16, width=32, batch=8, batches=4, scale_batch=[2, 4, 8, 16], scale_size=[8, 16, 24]),
            seq=dict(vocab=512, layers=4, width=256, prompt=16, completion=48, batch=16, batches=4),
            diff=dict(size=16, width=32, batch=8, batches=4),
            ctrl=dict(batch=64, horizon=50, hidden=(256, 256), batches=4),
            scale=dict(repeats=2, seq_batch=[2, 4, 8, 16], seq_len=[16, 32, 64, 128], diff_batch=[2, 4, 8, 16],
                       diff_size=[8, 16, 24, 32]))
SMOKE = dict(repeats=1, steps=1, warmup=0, memory_steps=2,
             flow=dict(size=8, width=8, batch=2, batches=2, scale_batch=[1, 2], scale_size=[8, 16]),
             seq=dict(vocab=64, layers=1, width=32, prompt=4, completion=8, batch=2, batches=2),
             diff=dict(size=8, width=8, batch=2, batches=2),
             ctrl=dict(batch=4, horizon=5, hidden=(16, 16), batches=2),
             scale=dict(repeats=1, seq_batch=[1, 2], seq_len=[4, 8], diff_batch=[1, 2], diff_size=[8, 16]))

SEQ_BETA, DIFF_BETA = 0.1, 2500.0
TARGETS = {"trl": 1.0, "diffusion_script": 1.0, "flow": 1.05, "overhead": 1.05, "precomputed": 0.75, "scaling": 1.1}
FLOW_BETA = 100.0  # flow_grpo's config/dpo.py


def _le(value, target):
    return None if value is None else value <= target


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    """Runs comparisons and remembers which variants still need a peak-memory run."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.benchmark = None  # the name of the benchmark now running (set by main)
        self.memory_jobs: list[dict] = []  # benchmark, title, variant, make (the factory), slot (its result dict)

    def compare(self, title: str, factories: dict[str, Callable[[], Any]], baseline: str, memory: bool = True):
        if self.cfg.get("memory_only"):
            out = {name: {"seconds_per_step": None, "repeats": [], "ratio": None} for name in factories}
        else:
            log(f"{title}: timing {', '.join(factories)}")
            runners = {name: make() for name, make in factories.items()}
            out = common.compare(runners, baseline, self.cfg["repeats"], self.cfg["steps"], self.cfg["warmup"], log)
            for runner in runners.values():
                getattr(runner, "close", lambda: None)()
            del runners
            gc.collect()
        if memory:
            for name, make in factories.items():
                out[name]["peak_mib"] = None
                self.memory_jobs.append({"benchmark": self.benchmark, "title": title, "variant": name,
                                         "make": make, "slot": out[name]})
        return out

    def run_memory(self, threads: int | None) -> None:
        """Measure every variant's peak memory in a fresh subprocess of its own (see :func:`memory_worker`)."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        for i, job in enumerate(self.memory_jobs):
            log(f"peak memory {i + 1}/{len(self.memory_jobs)}: {job['title']}/{job['variant']} (subprocess)")
            spec = {"cfg": self.cfg, "threads": threads, **{k: job[k] for k in ("benchmark", "title", "variant")}}
            proc = subprocess.run([sys.executable, "-m", "benchmarks", "--_memory-worker", json.dumps(spec)],
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT, check=True)
            job["slot"].update(json.loads(proc.stdout.strip().splitlines()[-1]))


def memory_worker(spec: dict) -> dict:
    """The child of :meth:`Bench.run_memory`: rebuild one benchmark's setup, measure one variant, print JSON.

    A fresh process per variant, so no variant reuses memory another one left resident.
    """
    common.enter_memory_mode()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    bench = Bench({**spec["cfg"], "memory_only": True})
    bench.benchmark = spec["benchmark"]
    BENCHMARKS[spec["benchmark"]](bench)
    make = next(j["make"] for j in bench.memory_jobs if (j["title"], j["variant"]) == (spec["title"], spec["variant"]))
    runner = make()
    result = {"peak_mib": common.peak_memory(lambda: runner.run(spec["cfg"]["memory_steps"])),
              "memory_pid": os.getpid()}
    print(json.dumps(result), flush=True)
    return result


# --------------------------------------------------------------------------------------- 1. TRL
def seq_setup(c: dict, batch: int | None = None, completion: int | None = None):
    batch = batch or c["batch"]
    completion = completion or c["completion"]
    tokens = setups.sequence_tokens(batch * c["batches"], c["prompt"], completion, c["vocab"])
    model = setups.gpt2(c["vocab"], c["layers"], c["width"], c["prompt"] + completion)
    return tokens, model, batch


def bench_trl(b: Bench) -> dict:
    c = b.cfg["seq"]
    if not trl_runner.available():
        return {"status": "skipped", "reason": "trl (or tokenizers) is not importable: pip install -e '.[bench]'"}
    import trl

    tokens, model, batch = seq_setup(c)
    pairs = setups.sequence_pairs(*tokens)
    loss = {"loss_type": "sigmoid", "beta": SEQ_BETA}
    factories = {
        "trl": lambda: trl_runner.TRLRunner(_clone(model), *tokens, vocab=c["vocab"], batch_size=batch,
                                            beta=SEQ_BETA, weight_decay=0.0,
                                            gradient_checkpointing=b.cfg.get("trl_checkpointing", False)),
        "prefopt": lambda: setups.LightningRunner(setups.sequence_policy(_clone(model)), pairs, batch, loss,
                                                  "copy", weight_decay=0.0),
    }
    probe = factories["trl"]()
    lengths = probe.lengths
    probe.close()
    del probe
    out = b.compare("trl", factories, baseline="trl")
    ratio = out["prefopt"]["ratio"]
    return {"status": "ok", "trl_version": trl.__version__,
            "trl_gradient_checkpointing": bool(b.cfg.get("trl_checkpointing", False)),
            "trl_token_lengths": lengths, "variants": out,
            "ratio": ratio, "target": TARGETS["trl"], "goal": 0.8, "met": _le(ratio, TARGETS["trl"])}


def _clone(model):
    twin = type(model)(model.config) if hasattr(model, "config") and hasattr(model, "save_pretrained") else None
    if twin is None:
        import copy
        return copy.deepcopy(model)
    twin.load_state_dict(model.state_dict())
    return twin.float()


# --------------------------------------------------------------------------- 2. Diffusion-DPO script
def bench_diffusion_script(b: Bench) -> dict:
    import copy

    c = b.cfg["diff"]
    net = setups.unet(c["size"], c["width"])
    pairs = setups.diffusion_pairs(c["batch"] * c["batches"], c["size"], with_seed=False)
    loss = {"loss_type": "sigmoid", "beta": DIFF_BETA}
    factories = {
        "script": lambda: setups.DiffusionScriptLoop(copy.deepcopy(net), pairs, c["batch"], DIFF_BETA),
        "prefopt": lambda: setups.LightningRunner(setups.diffusion_policy(copy.deepcopy(net)), pairs, c["batch"],
                                                  loss, {"name": "adapter", "rank": setups.LORA_RANK}),
    }
    out = b.compare("diffusion_script", factories, baseline="script")
    ratio = out["prefopt"]["ratio"]
    return {"status": "ok", "variants": out, "ratio": ratio, "target": TARGETS["diffusion_script"],
            "met": _le(ratio, TARGETS["diffusion_script"])}


# ------------------------------------------------------------------------------ 2b. flow matching
def bench_flow(b: Bench) -> dict:
    """prefopt's flow-matching step (``DiffusionPolicy`` + ``FlowMatchEulerDiscreteScheduler``, ``reference=adapter``,
    ``likelihood_scale=0.5``) against :class:`~benchmarks.setups.FlowScriptLoop`, then both at other batch sizes
    and image sizes (timing only)."""
    import copy

    c = b.cfg["flow"]
    loss = {"loss_type": "sigmoid", "beta": FLOW_BETA}
    adapter = {"name": "adapter", "rank": setups.LORA_RANK}

    def factories(batch, size):
        net = setups.unet(size, c["width"])
        pairs = setups.diffusion_pairs(batch * c["batches"], size, with_seed=False)
        return {"script": lambda: setups.FlowScriptLoop(copy.deepcopy(net), pairs, batch, FLOW_BETA),
                "prefopt": lambda: setups.LightningRunner(setups.flow_policy(copy.deepcopy(net)), pairs, batch,
                                                          loss, adapter)}

    out = b.compare("flow", factories(c["batch"], c["size"]), baseline="script")
    ratio = out["prefopt"]["ratio"]
    result = {"status": "ok", "variants": out, "ratio": ratio, "target": TARGETS["flow"],
              "met": _le(ratio, TARGETS["flow"]), "scaling": {}}
    saved, b.cfg["repeats"] = b.cfg["repeats"], b.cfg["scale"]["repeats"]
    for axis, sizes, make, work in (("batch", c["scale_batch"], lambda n: factories(n, c["size"]), lambda n: n),
                                    ("image", c["scale_size"], lambda n: factories(c["batch"], n), lambda n: n * n)):
        made = {}
        for n in sizes:
            pair = make(n)
            made.update({str(n): pair["prefopt"], f"script_{n}": pair["script"]})
        timed = b.compare(f"flow/scaling/{axis}", made, baseline=str(sizes[0]), memory=False)
        seconds = [timed[str(n)]["seconds_per_step"] for n in sizes]
        script = [timed[f"script_{n}"]["seconds_per_step"] for n in sizes]
        units = [work(n) for n in sizes]
        result["scaling"][axis] = {"sizes": sizes, "work_units": units, "seconds_per_step": seconds,
                                   "script_seconds_per_step": script,
                                   "ratio_per_size": [p / s for p, s in zip(seconds, script)],
                                   "exponent": common.fit_exponent(units, seconds),
                                   "script_exponent": common.fit_exponent(units, script)}
    b.cfg["repeats"] = saved
    return result


# ------------------------------------------------------------------------------------ 3. overhead
def bench_overhead(b: Bench) -> dict:
    import copy

    results = {}
    s, d, k = b.cfg["seq"], b.cfg["diff"], b.cfg["ctrl"]
    tokens, gpt, batch = seq_setup(s)
    seq_pairs = setups.sequence_pairs(*tokens)
    net = setups.unet(d["size"], d["width"])
    diff_pairs = setups.diffusion_pairs(d["batch"] * d["batches"], d["size"])
    ctrl = setups.control_network(hidden=k["hidden"])
    ctrl_pairs = setups.control_pairs(k["batch"] * k["batches"], k["horizon"])
    domains = {
        # name: (policy factory, pairs, batch size, loss, reference)
        "control": (lambda: setups.control_policy(copy.deepcopy(ctrl)), ctrl_pairs, k["batch"],
                    {"loss_type": "sigmoid", "beta": 0.1}, "copy"),
        "diffusion": (lambda: setups.diffusion_policy(copy.deepcopy(net)), diff_pairs, d["batch"],
                      {"loss_type": "sigmoid", "beta": DIFF_BETA}, "adapter"),
        "sequence": (lambda: setups.sequence_policy(_clone(gpt)), seq_pairs, batch,
                     {"loss_type": "sigmoid", "beta": SEQ_BETA}, "copy"),
    }
    for name, (policy, pairs, size, loss, ref) in domains.items():
        lightning_ref = ref if ref == "copy" else {"name": "adapter", "rank": setups.LORA_RANK}
        factories = {
            "hand_loop": lambda policy=policy, pairs=pairs, size=size, loss=loss, ref=ref:
                setups.HandLoop(policy(), pairs, size, loss, ref),
            "prefopt": lambda policy=policy, pairs=pairs, size=size, loss=loss, lref=lightning_ref:
                setups.LightningRunner(policy(), pairs, size, loss, lref),
        }
        out = b.compare(f"overhead/{name}", factories, baseline="hand_loop")
        ratio = out["prefopt"]["ratio"]
        results[name] = {"reference": ref, "variants": out, "ratio": ratio, "target": TARGETS["overhead"],
                         "met": _le(ratio, TARGETS["overhead"])}
    return results


# --------------------------------------------------------------------------- 4. reference strategies
def bench_reference(b: Bench) -> dict:
    import copy

    results = {}
    s, d = b.cfg["seq"], b.cfg["diff"]
    tokens, gpt, batch = seq_setup(s)
    seq_pairs = setups.sequence_pairs(*tokens)
    net = setups.unet(d["size"], d["width"])
    diff_pairs = setups.diffusion_pairs(d["batch"] * d["batches"], d["size"])
    domains = {
        "diffusion": (lambda: setups.diffusion_policy(copy.deepcopy(net)), diff_pairs, d["batch"], DIFF_BETA, net),
        "sequence": (lambda: setups.sequence_policy(_clone(gpt)), seq_pairs, batch, SEQ_BETA, gpt),
    }
    for name, (policy, pairs, size, beta, bare) in domains.items():
        factories = {}
        for ref in ("copy", "adapter", "precomputed", "none"):
            loss = {"loss_type": "cpl" if ref == "none" else "sigmoid", "beta": beta}
            reference = {"name": "adapter", "rank": setups.LORA_RANK} if ref == "adapter" else ref
            factories[ref] = (lambda policy=policy, pairs=pairs, size=size, loss=loss, reference=reference:
                              setups.LightningRunner(policy(), pairs, size, loss, reference))
        out = b.compare(f"reference/{name}", factories, baseline="copy")
        policy_mib = common.tensor_bytes(bare) / 2**20
        for ref, make in factories.items():
            runner = make()
            out[ref]["param_mib"] = common.tensor_bytes(runner.module) / 2**20
            out[ref]["param_ratio_vs_policy"] = out[ref]["param_mib"] / policy_mib
            del runner
        gc.collect()
        pre = out["precomputed"]["ratio"]
        results[name] = {"variants": out, "policy_param_mib": policy_mib,
                         "precomputed_ratio": pre, "precomputed_target": TARGETS["precomputed"],
                         "precomputed_met": _le(pre, TARGETS["precomputed"]),
                         "adapter_extra_param_mib": out["adapter"]["param_mib"] - policy_mib,
                         # LoRA's own factors are the only addition: no second copy of the weights (<= 10%)
                         "adapter_met": out["adapter"]["param_mib"] <= 1.1 * policy_mib}
    return results


# ------------------------------------------------------------------------------------ 5. scaling
def bench_scaling(b: Bench) -> dict:
    import copy

    s, d, sc = b.cfg["seq"], b.cfg["diff"], b.cfg["scale"]
    saved = b.cfg["repeats"]
    b.cfg["repeats"] = sc["repeats"]
    results = {}
    seq_loss = {"loss_type": "sigmoid", "beta": SEQ_BETA}
    diff_loss = {"loss_type": "sigmoid", "beta": DIFF_BETA}

    def seq_runner(batch=None, completion=None, hand=False):
        tokens, gpt, size = seq_setup(s, batch=batch, completion=completion)
        runner = setups.HandLoop if hand else setups.LightningRunner
        return runner(setups.sequence_policy(gpt), setups.sequence_pairs(*tokens), size, seq_loss)

    def diff_runner(batch, size, hand=False):
        net = setups.unet(size, d["width"])
        pairs = setups.diffusion_pairs(batch * d["batches"], size)
        if hand:
            return setups.HandLoop(setups.diffusion_policy(copy.deepcopy(net)), pairs, batch, diff_loss, "adapter")
        return setups.LightningRunner(setups.diffusion_policy(copy.deepcopy(net)), pairs, batch, diff_loss,
                                      {"name": "adapter", "rank": setups.LORA_RANK})

    axes = {
        # name: (sizes, runner factory (size, hand), the size the step should be linear in)
        "sequence_batch": (sc["seq_batch"], lambda n, hand: seq_runner(batch=n, hand=hand), lambda n: n),
        "sequence_length": (sc["seq_len"], lambda n, hand: seq_runner(completion=n, hand=hand),
                            lambda n: n + s["prompt"]),
        "diffusion_batch": (sc["diff_batch"], lambda n, hand: diff_runner(n, d["size"], hand), lambda n: n),
        "diffusion_image": (sc["diff_size"], lambda n, hand: diff_runner(d["batch"], n, hand), lambda n: n * n),
    }
    for name, (sizes, make, work) in axes.items():
        # prefopt's step at every size, and the hand-written loop of the same math beside it: the loop's
        # exponent is the model's own (e.g. attention, quadratic in length), prefopt's should not exceed it
        factories = {str(n): (lambda n=n: make(n, False)) for n in sizes}
        factories.update({f"hand_{n}": (lambda n=n: make(n, True)) for n in sizes})
        out = b.compare(f"scaling/{name}", factories, baseline=str(sizes[0]), memory=False)
        seconds = [out[str(n)]["seconds_per_step"] for n in sizes]
        hand = [out[f"hand_{n}"]["seconds_per_step"] for n in sizes]
        units = [work(n) for n in sizes]
        exponent = common.fit_exponent(units, seconds)
        results[name] = {"sizes": sizes, "work_units": units, "seconds_per_step": seconds, "exponent": exponent,
                         "hand_loop_seconds_per_step": hand, "hand_loop_exponent": common.fit_exponent(units, hand),
                         "target": TARGETS["scaling"], "met": exponent <= TARGETS["scaling"]}
    b.cfg["repeats"] = saved
    return results


BENCHMARKS = {"trl": bench_trl, "diffusion_script": bench_diffusion_script, "flow": bench_flow,
              "overhead": bench_overhead,
              "reference": bench_reference, "scaling": bench_scaling}


# --------------------------------------------------------------------------------------- table
def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    rows = ["| benchmark | variant | ms/step | ratio | peak MiB | target | met |",
            "|---|---|---:|---:|---:|---|---|"]

    def add(bench, variants, baseline, target_text="", met=None, ratio_key=None):
        for name, v in variants.items():
            is_candidate = name != baseline and (ratio_key is None or name == ratio_key)
            rows.append(f"| {bench} | {name}{' (baseline)' if name == baseline else ''} | "
                        f"{_fmt(v['seconds_per_step'] and v['seconds_per_step'] * 1e3, '.1f')} | {_fmt(v['ratio'])} | "
                        f"{_fmt(v.get('peak_mib'), '.1f')} | "
                        f"{target_text if is_candidate else ''} | {'' if not is_candidate or met is None else ('yes' if met else 'NO')} |")

    bm = results["benchmarks"]
    if "trl" in bm:
        r = bm["trl"]
        if r["status"] == "ok":
            add("1 TRL DPOTrainer", r["variants"], "trl", "<= 1.0 (goal 0.8)", r["met"])
        else:
            rows.append(f"| 1 TRL DPOTrainer | skipped: {r['reason']} | | | | | |")
    if "diffusion_script" in bm:
        r = bm["diffusion_script"]
        v = r["variants"]
        mem_ok = None if v["prefopt"].get("peak_mib") is None else v["prefopt"]["peak_mib"] <= v["script"]["peak_mib"]
        add("2 Diffusion-DPO script", v, "script",
            "<= 1.0, peak <= script" + ("" if mem_ok is None else f" (peak {'ok' if mem_ok else 'NOT ok'})"),
            r["met"])
    if "flow" in bm:
        r = bm["flow"]
        add("2b flow-matching DPO script", r["variants"], "script", "<= 1.05", r["met"])
        for axis, a in r["scaling"].items():
            steps = ", ".join(f"{n}: {t * 1e3:.1f} / {h * 1e3:.1f}" for n, t, h in
                              zip(a["sizes"], a["seconds_per_step"], a["script_seconds_per_step"]))
            rows.append(f"| 2b flow scaling {axis} | ms/step prefopt / script by size: {steps} | | exponent "
                        f"{a['exponent']:.2f} (script: {a['script_exponent']:.2f}) | | | |")
    for name, r in bm.get("overhead", {}).items():
        add(f"3 overhead {name} ({r['reference']})", r["variants"], "hand_loop", "<= 1.05", r["met"])
    for name, r in bm.get("reference", {}).items():
        v = r["variants"]
        add(f"4 reference {name}", v, "copy", "precomputed <= 0.75", r["precomputed_met"], ratio_key="precomputed")
        rows.append(f"| 4 reference {name} | parameter MiB: policy alone {r['policy_param_mib']:.2f}; "
                    + "; ".join(f"{k} {v[k]['param_mib']:.2f}" for k in v) + " | | | | adapter adds no parameter "
                    f"memory | {'yes' if r['adapter_met'] else 'NO'} "
                    f"(+{r['adapter_extra_param_mib']:.3f} MiB LoRA) |")
    for name, r in bm.get("scaling", {}).items():
        steps = ", ".join(f"{n}: {t * 1e3:.1f}" for n, t in zip(r["sizes"], r["seconds_per_step"]))
        hand = ", ".join(f"{t * 1e3:.1f}" for t in r["hand_loop_seconds_per_step"])
        rows.append(f"| 5 scaling {name} | ms/step by size: {steps} (hand-written loop: {hand}) | | exponent "
                    f"{r['exponent']:.2f} (hand-written loop: {r['hand_loop_exponent']:.2f}) | | <= 1.1 | "
                    f"{'yes' if r['met'] else 'NO'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (the test suite runs this)")
    parser.add_argument("--out", default="benchmark-results.json", help="JSON file of results")
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--trl-checkpointing", action="store_true",
                        help="keep TRL 1.x's default activation checkpointing on (off by default: prefopt has none)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the peak-memory runs (no timing; ratios are left empty)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; default 1 on CPU (stable figures on a shared machine), "
                             "torch's default on GPU")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every variant (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 3; smoke 1)")
    parser.add_argument("--clock", choices=common.CLOCKS, default=None,
                        help="what a step's time is: 'cpu' = this process's CPU time (default on a CPU-only machine: "
                             "robust to other jobs on it), 'wall' = elapsed time (default with a GPU)")
    parser.add_argument("--_memory-worker", metavar="SPEC", help=argparse.SUPPRESS)  # see Bench.run_memory
    args = parser.parse_args(argv)
    if args._memory_worker:
        return memory_worker(json.loads(args._memory_worker))
    threads = args.threads or (None if torch.cuda.is_available() else 1)
    if threads:
        torch.set_num_threads(threads)
    common.set_clock(args.clock or ("wall" if torch.cuda.is_available() else "cpu"))
    cfg = {**(SMOKE if args.smoke else FULL)}
    cfg = json.loads(json.dumps(cfg))  # a private copy
    for key in ("repeats", "steps"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                parser.error(f"--{key} must be >= 1")
            cfg[key] = value
    cfg["memory_only"] = bool(args.memory_only)
    cfg["trl_checkpointing"] = bool(args.trl_checkpointing)
    bench = Bench(cfg)
    results: dict[str, Any] = {"mode": "smoke" if args.smoke else "full", "machine": common.machine(),
                               "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
                               "settings": cfg, "clock": common.clock(),
                               "threads": threads, "targets": TARGETS, "benchmarks": {}}
    out = Path(args.out)
    for name in args.only or list(BENCHMARKS):
        torch.manual_seed(0)
        bench.benchmark = name
        results["benchmarks"][name] = BENCHMARKS[name](bench)
        _write(out, results)  # partial results survive an interrupted run
    if not args.no_memory:
        bench.run_memory(threads)
    results["peak_memory_method"] = "each variant in a fresh subprocess of its own (memory_pid); " + (
        "cuda max_memory_allocated above the allocation before the steps" if torch.cuda.is_available() else
        "CPU: peak resident set (VmHWM, reset via /proc/self/clear_refs) above the resident set before the "
        "steps, glibc mmap threshold fixed at 64 KiB")
    results["table"] = table(results)
    _write(out, results)
    print(results["table"])
    return results


def _write(out: Path, results: dict) -> None:
    atomic_write(out, json.dumps(results, indent=2))
