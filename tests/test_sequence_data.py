"""User pairs of token sequences: JSONL / parquet / datasets folders, bad input, and a tiny GPT-2 end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefopt.errors import PrefoptError
from prefopt.tasks.sequence.data import pairs_from_rows, read_pairs

ROWS = [
    {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10], "tie": False},
    {"prompt_ids": [5], "chosen_ids": [11], "rejected_ids": [12, 13, 14, 15], "tie": True},
    {"prompt_ids": [], "chosen_ids": [3, 4], "rejected_ids": [4, 3]},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_parquet_and_datasets_folder_read_the_same_rows(tmp_path):
    expected = [{**r, "tie": bool(r.get("tie", False))} for r in ROWS]
    assert read_pairs(write_jsonl(tmp_path / "p.jsonl", ROWS)) == expected

    import pyarrow as pa
    import pyarrow.parquet as pq
    full = [{**r, "tie": bool(r.get("tie", False))} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(full), tmp_path / "p.parquet")
    assert read_pairs(tmp_path / "p.parquet") == expected

    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(full),
                          "test": datasets.Dataset.from_list(full[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert read_pairs(tmp_path / "dd") == expected
    assert read_pairs(tmp_path / "dd", split="test") == expected[:1]
    with pytest.raises(PrefoptError, match="split='dev'"):
        read_pairs(tmp_path / "dd", split="dev")


def test_pairs_from_rows_pads_and_masks_the_prompt(tmp_path):
    pairs = pairs_from_rows([{**r, "tie": bool(r.get("tie", False))} for r in ROWS], pad_id=0, bos_id=1)
    assert len(pairs) == 3 and pairs.tie.tolist() == [False, True, False]
    row = pairs[0]
    assert row["chosen_input_ids"].tolist() == [5, 6, 7, 8, 9]  # the longest sequence has 5 tokens
    assert row["rejected_input_ids"].tolist() == [5, 6, 10, 0, 0]
    assert row["chosen_completion_mask"].tolist() == [0, 0, 1, 1, 1]
    assert row["rejected_attention_mask"].tolist() == [1, 1, 1, 0, 0]
    assert pairs[2]["chosen_input_ids"].tolist()[:3] == [1, 3, 4]  # the empty prompt became [bos]
    cut = pairs_from_rows(ROWS[1:2], max_length=3)
    assert cut[0]["rejected_input_ids"].tolist() == [5, 12, 13]


@pytest.mark.parametrize("row, message", [
    ({"prompt_ids": [1], "chosen_ids": [2]}, "missing columns \\['rejected_ids'\\]"),
    ({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": []}, "rejected_ids is empty"),
    ({"prompt_ids": [1], "chosen_ids": [-2], "rejected_ids": [3]}, "chosen_ids holds -2"),
    ({"prompt_ids": [1], "chosen_ids": [2.5], "rejected_ids": [3]}, "chosen_ids holds 2.5"),
    ({"prompt_ids": "1 2", "chosen_ids": [2], "rejected_ids": [3]}, "prompt_ids is str"),
    ({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [99]}, "outside the model's vocabulary"),
    ({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "tie": "yes"}, "tie='yes'"),
])
def test_bad_rows_name_the_file_row_and_problem(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(PrefoptError, match=message) as err:
        read_pairs(path, vocab_size=50)
    assert "bad.jsonl row 2" in str(err.value)


def test_unreadable_files_and_empty_prompts_are_errors(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt_ids": [1]}\nnot json\n')
    with pytest.raises(PrefoptError, match="broken.jsonl:2"):
        read_pairs(tmp_path / "broken.jsonl")
    with pytest.raises(PrefoptError, match="suffix '.csv'"):
        (tmp_path / "p.csv").write_text("x")
        read_pairs(tmp_path / "p.csv")
    with pytest.raises(PrefoptError, match="does not exist"):
        read_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(PrefoptError, match="set bos_id"):
        pairs_from_rows(ROWS[2:], bos_id=None)
    with pytest.raises(PrefoptError, match="max_length=2"):
        pairs_from_rows(ROWS[:1], max_length=2)


VOCAB = 40


@pytest.fixture
def tiny_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    folder = tmp_path / "tiny-gpt2"
    model.save_pretrained(str(folder))
    return folder, model


def _pairs_file(tmp_path, n=24):
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(1, 4, (1,), generator=generator)),),
                               generator=generator).tolist()
        good = [7] * (1 + i % 3)  # the preferred completions repeat token 7
        bad = torch.randint(8, VOCAB, (1 + (i + 1) % 4,), generator=generator).tolist()
        rows.append({"prompt_ids": prompt, "chosen_ids": good + [2], "rejected_ids": bad + [2]})
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_tiny_gpt2_from_a_local_folder_trains_on_a_jsonl_pairs_file(make_config, tmp_path, tiny_gpt2):
    from safetensors.torch import load_file

    from prefopt.train import train

    folder, model = tiny_gpt2
    cfg = make_config("experiment=sequence_local_lm", f"domain.task.model_path={folder}",
                      f"domain.task.pairs_path={_pairs_file(tmp_path)}", "domain.task.val_fraction=0.25",
                      "domain.task.batch_size=6", "trainer.max_epochs=3", "optimizer.lr=5e-2")
    summary = train(cfg)
    assert summary["reference"] == "adapter" and summary["domain"] == "sequence"
    result = summary["eval"]
    assert result["eval_pairs"] == 6 and result["num_pairs"] == 18
    # LoRA with a large learning rate on an easy preference: the policy ranks held-out pairs better
    assert result["policy"]["margin_mean"] > result["reference"]["margin_mean"]
    assert result["implicit_reward_accuracy"] > 0.5
    assert "val/loss" in summary["train"] and "train/loss" in summary["train"]
    # the exported policy (LoRA merged) loads into the plain GPT-2 and differs from the base weights
    exported = load_file(str(Path(cfg.paths.output_dir) / "policy.safetensors"))
    base = model.state_dict()
    assert set(exported) <= set(base)
    assert any(not torch.allclose(exported[k], base[k]) for k in exported if "c_attn" in k)


def test_missing_model_path_or_both_sources_are_errors(tmp_path):
    from prefopt.tasks.sequence.data import SequencePairsTask
    from prefopt.tasks.sequence.model import MelodyTransformer

    with pytest.raises(PrefoptError, match="exactly one of model_path"):
        SequencePairsTask(pairs_path="x.jsonl")
    with pytest.raises(PrefoptError, match="no config.json"):
        SequencePairsTask(pairs_path="x.jsonl", model_path=str(tmp_path)).build_policy()
    task = SequencePairsTask(pairs_path=str(_pairs_file(tmp_path)), network=MelodyTransformer(VOCAB, max_len=16),
                             bos_id=1, val_fraction=0.0)
    policy = task.build_policy()
    pairs = task.pairs(policy, 0)
    assert len(pairs) == 24 and task.val_pairs() is None
