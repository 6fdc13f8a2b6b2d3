"""``python -m benchmarks.profile_step``: where prefopt's fixed per-step cost goes (torch profiler).

A small control step (MLP 17-64-64-6, 64 pairs of 50-step segments, ``reference=copy``), small enough that
per-step costs outside the model show: the median step of the hand-written loop and of prefopt's Lightning
step (two alternating repeats of 40 steps each), then 40 Lightning steps under Lightning's
``PyTorchProfiler`` (torch.profiler with Lightning's hooks labelled), its table sorted by total CPU time.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from functools import partial

import torch


def main() -> None:
    import lightning as L
    from lightning.pytorch.profilers import PyTorchProfiler
    from torch.utils.data import DataLoader

    from benchmarks import setups
    from prefopt.data.pairs import collate_pairs
    from prefopt.module import PreferenceModule

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    pairs = setups.control_pairs(64 * 4, 50)
    loss = {"loss_type": "sigmoid", "beta": 0.1}

    def policy():
        return setups.control_policy(setups.control_network(hidden=(64, 64)))

    hand = setups.HandLoop(policy(), pairs, 64, loss, "copy")
    for repeat in range(2):
        hand_ms = statistics.median(hand.run(40)) * 1e3
        lightning_ms = statistics.median(setups.LightningRunner(policy(), pairs, 64, loss, "copy").run(40)) * 1e3
        print(f"repeat {repeat}: hand-written loop {hand_ms:.1f} ms/step, prefopt (Lightning) {lightning_ms:.1f} ms/step")
    module = PreferenceModule(policy(), loss=loss, reference="copy",
                              optimizer=partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01))
    with tempfile.TemporaryDirectory() as folder:
        profiler = PyTorchProfiler(dirpath=folder, filename="profile", sort_by_key="cpu_time_total", row_limit=30)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=40, max_epochs=-1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, profiler=profiler)
        trainer.fit(module, DataLoader(pairs, batch_size=64, collate_fn=collate_pairs))
        print(open(f"{folder}/fit-profile.txt").read())


if __name__ == "__main__":
    main()
