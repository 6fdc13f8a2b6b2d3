"""Kill-and-resume matrix (issue 15, class 2): a run killed with SIGKILL at any point, then resumed with
``ckpt_path=last``, ends with the ``summary.json``, ``policy.safetensors`` and ``metrics.csv`` of an uninterrupted run;
resuming it once more changes nothing.

Each killed run is a fork of this test process (the imports are already paid for) that patches the function of one
phase to SIGKILL its own process on its n-th call and then runs ``prefopt.cli.main``; no fault-injection hook lives in
prefopt. The resume runs the CLI in this process. The bandit domain has every phase: single-round runs for the kills
inside a round, ``rounds=2`` for the kills between and in later rounds.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import signal
import sys
from pathlib import Path

import pytest

from prefopt import cli as cli_module
from prefopt import runlock

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="the killed runs are forks of the test process")]

EPOCHS, PER_EPOCH = 3, 4  # 64 pairs in batches of 16
RUN = ["domain=bandit", "domain.task.num_pairs=64", "domain.task.num_eval=32", "domain.task.batch_size=16",
       f"trainer.max_epochs={EPOCHS}", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]
STEP = "prefopt.module:PreferenceModule.training_step"
FIT = "lightning.pytorch:Trainer.fit"
EVALUATE = "prefopt.tasks.bandit:BanditTask.evaluate"
PAIRS = "prefopt.tasks.bandit:BanditTask.pairs"
ROUND_STEPS = EPOCHS * PER_EPOCH

#: (id, rounds, the function killed, before or after its call, which call); the ids in NOOP_AGAIN also check that
#: resuming the finished run once more changes nothing (test_reliability2 checks it on its own)
NOOP_AGAIN = ("during the final evaluation", "after summary.json, before summary.txt",
              "round 1, during the final evaluation")
KILL_POINTS = [
    ("training, epoch 2 of 3", 1, STEP, "before", 2 * PER_EPOCH + 2),
    ("after the last epoch, before the evaluation", 1, FIT, "after", 1),
    ("during the final evaluation", 1, EVALUATE, "before", 1),
    ("after policy.safetensors, before summary.json", 1, "prefopt.train:export_policy", "after", 1),
    ("after summary.json, before summary.txt", 1, "prefopt.run_summary:write_run_summary", "before", 1),
    ("round 0 of 2, during its evaluation", 2, EVALUATE, "before", 1),
    ("between rounds, before round 1's pairs", 2, PAIRS, "before", 1),  # round 0's come from the cache
    ("round 1, epoch 0 (before its first checkpoint)", 2, STEP, "before", ROUND_STEPS + 2),
    ("round 1, epoch 2", 2, STEP, "before", ROUND_STEPS + 2 * PER_EPOCH + 1),
    ("round 1, after its last epoch", 2, FIT, "after", 2),
    ("round 1, during the final evaluation", 2, EVALUATE, "before", 2),
]


pytestmark.append(pytest.mark.usefixtures("one_torch_thread"))  # tiny models: one thread (tests/conftest.py)


def _argv(run: Path, cache: Path, rounds: int, *extra: str) -> list[str]:
    return ["prefopt", *RUN, f"domain.task.rounds={rounds}", f"hydra.run.dir={run}", f"paths.cache_dir={cache}",
            *extra]


def _main(argv: list[str]) -> int:
    old = sys.argv
    sys.argv = argv
    try:
        cli_module.main()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = old
    return 0


def _kill_at(target: str, when: str, nth: int) -> None:
    """Patch ``module:attr`` or ``module:Class.attr`` to SIGKILL this process before/after its ``nth`` call."""
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    calls = [0]

    def killing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, killing)
    if module_name == "prefopt.run_summary":  # the CLI imports it by name when the run ends
        import prefopt.run_summary as run_summary
        setattr(run_summary, name, killing)


def run_killed(argv: list[str], target: str, when: str, nth: int) -> None:
    """The CLI in a forked child that SIGKILLs itself at the kill point; fails if it ends any other way."""
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 90
        try:
            _kill_at(target, when, nth)
            code = 91 + _main(argv)  # 91: the run finished without reaching the kill point
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"the run was not killed at {target} ({when} call {nth}): status {status:#x}"


def results(run: Path) -> dict[str, str]:
    """What an uninterrupted run and a resumed one must share: summary.json, policy.safetensors, every metrics.csv
    (sha256 of the bytes; the timing is in timing.json, not compared)."""
    files = [run / "summary.json", run / "policy.safetensors", *sorted((run / "logs").glob("round_*/metrics.csv"))]
    return {str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def tree(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in (runlock.LOCK_NAME, "cli.log")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The results of uninterrupted runs of 1 and 2 rounds (sharing the pairs cache the killed runs use)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    found = {}
    for rounds in (1, 2):
        run = root / f"rounds{rounds}"
        assert _main(_argv(run, root / "cache", rounds)) == 0
        found[rounds] = results(run)
        assert len(found[rounds]) == 2 + rounds
    return root / "cache", found


@pytest.mark.parametrize("point", KILL_POINTS, ids=[p[0] for p in KILL_POINTS])
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_results(point, uninterrupted, tmp_path, capsys):
    name, rounds, target, when, nth = point
    cache, expected = uninterrupted
    run = tmp_path / "run"
    run_killed(_argv(run, cache, rounds), target, when, nth)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    finished = (run / "summary.json").is_file()  # the kill came after it: the resume changes nothing
    assert _main(_argv(run, cache, rounds, "ckpt_path=last")) == 0, capsys.readouterr().err[-3000:]
    assert results(run) == expected[rounds]
    assert not list(run.rglob("*.before-resume")), "a metrics.csv backup was left behind"
    assert (run / "summary.txt").is_file()
    # the record of the resume once it was checked (a no-op resume leaves the run's own)
    assert ("ckpt_path=last" in (run / ".hydra" / "overrides.yaml").read_text()) is not finished
    assert "output_subdir: .hydra" in (run / ".hydra" / "hydra.yaml").read_text()
    if name in NOOP_AGAIN:
        before = tree(run)
        assert _main(_argv(run, cache, rounds, "ckpt_path=last")) == 0  # resuming a finished run: a no-op
        assert tree(run) == before
