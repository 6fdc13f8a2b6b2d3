"""prefopt from Python, without the CLI: DPO for a Pendulum-v1 control policy.

The same steps as ``prefopt domain=control``, written out for people who embed prefopt in their own code:
build the domain's task, its base policy and a frozen copy of it, the round's preference pairs, the
Lightning module and a ``lightning.Trainer``; fit; evaluate against the copy. The task's constructor takes
the arguments listed in ``conf/domain/control.yaml``.

    python examples/python_api_control.py                                 # a few minutes on a CPU
    PREFOPT_EXAMPLE_FAST=1 python examples/python_api_control.py          # seconds (used by the tests)
"""

from __future__ import annotations

import copy
import os
import tempfile
from functools import partial
from pathlib import Path

import lightning as L
import torch

from prefopt.module import PreferenceModule
from prefopt.tasks.control import ControlTask

FAST = os.environ.get("PREFOPT_EXAMPLE_FAST") == "1"


def main(output_dir: str | os.PathLike | None = None) -> dict:
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="prefopt-control-"))
    L.seed_everything(0, verbose=False)
    task = ControlTask(
        env_id="Pendulum-v1", env_kwargs={"max_episode_steps": 60 if FAST else 200}, num_envs=8 if FAST else 32,
        hidden=(32, 32) if FAST else (64, 64), gamma=0.9,
        base={"kind": "bc", "behaviour": "pendulum_energy", "episodes": 4 if FAST else 32, "epochs": 10 if FAST else 50,
              "behaviours": {"pendulum_energy": {"gain": 0.05, "kp": 3.0, "kd": 0.5, "noise": 0.5}}},
        segment_length=20 if FAST else 50, num_pairs=64 if FAST else 1024, num_heldout=16 if FAST else 256,
        eval_episodes=8 if FAST else 50, batch_size=16 if FAST else 64, seed=0, cache_dir=output_dir / "cache")

    policy = task.build_policy()                                  # behaviour-cloned (and cached) base policy
    reference = copy.deepcopy(policy).requires_grad_(False).eval()  # what evaluate() compares against
    pairs = task.pairs(policy, round_index=0)                     # teacher-labelled segment pairs
    val = task.val_pairs()

    module = PreferenceModule(policy, loss={"loss_type": "sigmoid", "beta": 1.0}, reference="copy",
                              optimizer=partial(torch.optim.AdamW, lr=1e-3))
    trainer = L.Trainer(max_epochs=3 if FAST else 10, accelerator="cpu", default_root_dir=str(output_dir),
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=not FAST)
    trainer.fit(module, train_dataloaders=task.dataloader(pairs),
                val_dataloaders=task.dataloader(val, train=False) if val is not None else None)

    result = task.evaluate(reference, module.policy, output_dir, round_index=0)
    result["train"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    print({k: v for k, v in result.items() if k in ("reference", "policy", "win_rate")})
    return result


if __name__ == "__main__":
    main()
