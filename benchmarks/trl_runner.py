"""TRL's ``DPOTrainer`` on a tiny GPT-2 with a word-level tokenizer built here (nothing is downloaded).

The time of a step is the interval between two consecutive ``on_step_end`` callbacks of ``trainer.train()``:
the whole Hugging Face Trainer loop (data collation, TRL's concatenated policy forward and reference forward,
backward, AdamW, metric bookkeeping) is inside it, as the whole Lightning loop is inside prefopt's figure.
"""

from __future__ import annotations

import tempfile

import torch

from benchmarks.common import intervals, now


def available() -> bool:
    try:
        import tokenizers  # noqa: F401
        import trl  # noqa: F401
    except Exception:  # ImportError, or a trl that fails against the installed transformers
        return False
    return True


def word_tokenizer(vocab: int):
    """``[PAD]`` = 0, ``w1 .. w{vocab-2}``, ``[EOS]`` = vocab - 1: the ids :func:`sequence_tokens` draws."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[PAD]": 0, **{f"w{i}": i for i in range(1, vocab - 1)}, "[EOS]": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]")


def text(ids: torch.Tensor) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


class TRLRunner:
    """``DPOTrainer`` with ``loss_type=sigmoid``, a frozen copy as ``ref_model``, fp32, dropout off, and no
    activation checkpointing unless ``gradient_checkpointing=True`` (TRL 1.x's own default)."""

    def __init__(self, model, prompt, chosen, rejected, vocab: int, batch_size: int, beta: float, lr: float = 1e-4,
                 weight_decay: float = 0.0, gradient_checkpointing: bool = False):
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        # The completions hold EOS as their last id; TRL appends EOS itself, so it is left out of the text.
        data = Dataset.from_dict({"prompt": [text(p) for p in prompt],
                                  "chosen": [" " + text(c[:-1]) for c in chosen],
                                  "rejected": [" " + text(r[:-1]) for r in rejected]})
        self.stamps: list[float] = []
        stamps = self.stamps

        class StepEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                stamps.append(now())

        self.tmp = tempfile.TemporaryDirectory(prefix="prefopt-bench-trl-")
        args = DPOConfig(output_dir=self.tmp.name, per_device_train_batch_size=batch_size, max_steps=1,
                         learning_rate=lr, weight_decay=weight_decay, lr_scheduler_type="constant",
                         warmup_steps=0, beta=beta, loss_type=["sigmoid"], max_length=None,
                         logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
                         disable_tqdm=True, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
                         dataloader_num_workers=0, dataloader_pin_memory=False, seed=0,
                         # TRL 1.x turns activation checkpointing on by default; prefopt does not checkpoint,
                         # so the same math means it off (the CLI's --trl-checkpointing measures TRL's default)
                         gradient_checkpointing=gradient_checkpointing)
        ref = type(model)(model.config)
        ref.load_state_dict(model.state_dict())
        self.trainer = DPOTrainer(model=model, ref_model=ref.eval(), args=args, train_dataset=data,
                                  processing_class=word_tokenizer(vocab), callbacks=[StepEnd()])
        row = self.trainer.train_dataset[0]
        self.lengths = {k: len(row[k]) for k in row if k.endswith("ids")}

    def run(self, n: int) -> list[float]:
        self.stamps.clear()
        self.trainer.args.max_steps = n
        self.trainer.optimizer, self.trainer.lr_scheduler = None, None  # a fresh AdamW every run, as Lightning's
        self.trainer.train()
        self.trainer.model.zero_grad(set_to_none=True)
        return intervals(self.stamps)

    def close(self):
        self.tmp.cleanup()
