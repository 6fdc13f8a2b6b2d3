"""Used by tests/test_ddp.py: train the bandit with the project's trainer configs and save what each rank holds.

``python tests/ddp_worker.py OUT --devices 2 --batch-size 16`` runs Lightning DDP on CPU (gloo); Lightning
starts rank 1 by running this script again with ``LOCAL_RANK=1``. For every reference strategy given, each
rank writes ``OUT/<reference>-rank<r>.safetensors`` with its policy network, its reference network (if the
strategy has one) and its precomputed cache (if any).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFERENCES = {
    "sync": ["reference=sync", "reference.sync_every=2", "reference.alpha=0.5"],
    "precomputed": ["reference=precomputed"],
    "copy": ["reference=copy"],
}


def run(out: Path, devices: int = 1, batch_size: int = 32, references=("sync", "precomputed"),
        accumulate: int = 1, num_pairs: int = 128, epochs: int = 2) -> dict[str, dict]:
    """Train once per reference strategy; returns ``{reference: state}`` of this rank (and saves it)."""
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from safetensors.torch import save_file

    from prefopt.cli import config_dir
    from prefopt.train import build_module

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trainer_args = ["trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={devices}"] if devices > 1 else []
    results = {}
    for reference in references:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=[
                f"paths.output_dir={out / reference}", f"paths.cache_dir={out / 'cache'}", "domain=bandit",
                f"domain.task.num_pairs={num_pairs}", f"domain.task.batch_size={batch_size}", *REFERENCES[reference],
                *trainer_args, f"trainer.max_epochs={epochs}", f"trainer.accumulate_grad_batches={accumulate}",
                "trainer.enable_progress_bar=false", "+trainer.enable_checkpointing=false",
                "optimizer.lr=0.01"])
        L.seed_everything(0, verbose=False)
        task = instantiate(cfg.domain.task)
        policy = task.build_policy()
        pairs = task.pairs(policy, 0)
        module = build_module(cfg, policy)
        trainer = instantiate(cfg.trainer, default_root_dir=str(out / reference), logger=False, callbacks=[])
        trainer.fit(module, train_dataloaders=task.dataloader(pairs))
        state = {f"policy.{k}": v.detach().clone() for k, v in module.policy.network.state_dict().items()}
        network = getattr(module.reference, "network", None)
        if network is not None:
            state.update({f"reference.{k}": v.detach().clone() for k, v in network.state_dict().items()})
        if reference == "precomputed":
            state["cache"] = module.reference.cache.detach().clone()
        state["num_pairs"] = torch.tensor(len(pairs))
        state["global_step"] = torch.tensor(trainer.global_step)
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(out / f"{reference}-rank{trainer.global_rank}.safetensors"))
        results[reference] = state
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--references", default="sync,precomputed")
    args = parser.parse_args(argv)
    run(Path(args.out), args.devices, args.batch_size, tuple(args.references.split(",")))


if __name__ == "__main__":
    sys.exit(main())
