"""prefopt from Python, without the CLI: DPO for a melody transformer on Bach chorales.

The same steps as ``prefopt domain=sequence``, written out for people who embed prefopt in their own
code: build the task (chorales parsed from music21's bundled corpus and a small transformer pretrained on
them, both cached), a frozen copy of the base policy, the reward-labelled continuation pairs, the Lightning
module and a ``lightning.Trainer``; fit; evaluate against the copy. The task's arguments are those of
``conf/domain/sequence.yaml``.

    python examples/python_api_sequence.py                                # tens of minutes on a CPU
    PREFOPT_EXAMPLE_FAST=1 python examples/python_api_sequence.py         # under a minute (used by the tests)
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
from prefopt.tasks.sequence.task import ChoraleTask

FAST = os.environ.get("PREFOPT_EXAMPLE_FAST") == "1"


def main(output_dir: str | os.PathLike | None = None) -> dict:
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="prefopt-sequence-"))
    L.seed_everything(0, verbose=False)
    tiny = dict(limit=14, eval_fraction=0.25, prompt_fraction=0.25,
                model={"d_model": 16, "n_layers": 1, "n_heads": 2}, pretrain={"epochs": 2, "batch_size": 8},
                samples_per_prompt=4, max_new_tokens=16, eval_samples=2, num_midi=1, batch_size=4)
    task = ChoraleTask(**(tiny if FAST else {}), progress=not FAST, seed=0, cache_dir=str(output_dir / "cache"))

    policy = task.build_policy()                                    # pretrained (cached) melody transformer
    reference = copy.deepcopy(policy).requires_grad_(False).eval()  # what evaluate() compares against
    pairs = task.pairs(policy, round_index=0)                       # sampled continuations, teacher-labelled

    module = PreferenceModule(policy, loss={"loss_type": "sigmoid", "beta": 0.1}, reference="copy",
                              optimizer=partial(torch.optim.AdamW, lr=1e-4))
    trainer = L.Trainer(max_epochs=1 if FAST else 3, accelerator="cpu", default_root_dir=str(output_dir),
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=not FAST)
    trainer.fit(module, train_dataloaders=task.dataloader(pairs))

    result = task.evaluate(reference, module.policy, output_dir, round_index=0)  # also writes MIDI files
    result["train"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    print({k: v for k, v in result.items() if k in ("reference", "policy", "win_rate")})
    return result


if __name__ == "__main__":
    main()
