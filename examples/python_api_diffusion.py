"""prefopt from Python, without the CLI: Diffusion-DPO for a class-conditional digits DDPM.

The same steps as ``prefopt domain=diffusion``, written out for people who embed prefopt in their own
code: build the task (a small ``UNet2DModel`` pretrained on scikit-learn's 8x8 digits, cached), a frozen
copy of the base policy, the teacher-labelled image pairs, the Lightning module and a ``lightning.Trainer``;
fit; evaluate against the copy. The task's arguments are those of ``conf/diffusion_task/digits.yaml``.

    python examples/python_api_diffusion.py                               # tens of minutes on a CPU
    PREFOPT_EXAMPLE_FAST=1 python examples/python_api_diffusion.py        # under a minute (used by the tests)
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
from prefopt.tasks.diffusion.digits import DigitsDiffusionTask

FAST = os.environ.get("PREFOPT_EXAMPLE_FAST") == "1"


def main(output_dir: str | os.PathLike | None = None) -> dict:
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="prefopt-diffusion-"))
    L.seed_everything(0, verbose=False)
    tiny_unet = {"steps": 60, "batch_size": 32, "block_out_channels": [8, 16], "norm_num_groups": 4}
    task = DigitsDiffusionTask(
        base=tiny_unet if FAST else None, reward="ink", pairs_per_class=4 if FAST else 100,
        sample_steps=4 if FAST else 25, eval_per_class=4 if FAST else 50, grid_per_class=2 if FAST else 8,
        batch_size=8 if FAST else 64, seed=0, cache_dir=output_dir / "cache")

    policy = task.build_policy()                                    # the pretrained (cached) DDPM
    reference = copy.deepcopy(policy).requires_grad_(False).eval()  # what evaluate() compares against
    pairs = task.pairs(policy, round_index=0)                       # sampled image pairs, teacher-labelled

    # beta in the convention of diffusers' train_diffusion_dpo.py (--beta_dpo 2500)
    module = PreferenceModule(policy, loss={"loss_type": "sigmoid", "beta": 2500.0}, reference="copy",
                              optimizer=partial(torch.optim.AdamW, lr=1e-4))
    trainer = L.Trainer(max_epochs=2 if FAST else 10, accelerator="cpu", default_root_dir=str(output_dir),
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=not FAST, gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=task.dataloader(pairs))

    result = task.evaluate(reference, module.policy, output_dir, round_index=0)  # also writes an image grid
    result["train"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    print({k: v for k, v in result.items() if k in ("reference", "policy", "win_rate")})
    return result


if __name__ == "__main__":
    main()
