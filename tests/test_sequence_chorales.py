"""The chorale default: the reward on hand-written melodies, the tokenizer, parsing, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefopt.errors import PrefoptError
from prefopt.tasks.sequence.chorales import (BOS, EOS, MAJOR, MINOR, ChoraleTokenizer, chorale_paths,
                                             parse_chorale)
from prefopt.tasks.sequence.reward import ChoraleReward

R = ChoraleReward()


def melody(*pitches, duration=1.0):
    return [(p, duration) for p in pitches]


def test_a_clean_stepwise_melody_ending_on_the_tonic_scores_one():
    parts = R.components(melody(62, 64, 65, 67, 65, 64, 62, 60), "major", melody(60))
    assert parts["reward"] == 1.0
    assert (parts["out_of_key"], parts["repeats"], parts["leaps"], parts["tonic"]) == (0, 0, 0, 1)
    # rests are skipped by every rule
    with_rest = melody(62, 64, 65, 67) + [(None, 1.0)] + melody(65, 64, 62, 60)
    assert R(with_rest, "major", melody(60)) == 1.0


def test_repeats_out_of_key_and_an_unresolved_leap_into_the_last_note():
    # prompt ends on D: the run D D D D reaches 4 at the third completion D (one repeat); F# is out of C
    # major; G -> E5 (+9) resolves by a step down; B -> E (-7) into the last note is unresolved.
    completion = melody(62, 62, 62, 66, 67, 76, 74, 72, 71, 64)
    parts = R.components(completion, "major", melody(60, 62))
    assert (parts["repeats"], parts["out_of_key"], parts["leaps"], parts["notes"]) == (1, 1, 1, 10)
    assert parts["tonic"] == 0
    assert parts["reward"] == pytest.approx(0.0 - (1 + 1 + 1) / 10)


def test_minor_scale_leaps_beyond_an_octave_and_the_short_and_unfinished_terms():
    # A minor allows G# (raised 7th); A# is out.  A -> A5 (+12) is a leap followed by a step in the same
    # direction (unresolved); B5 -> A (-14) is wider than an octave (always counts).
    completion = melody(68, 69, 81, 83, 69, 70, 69)
    parts = R.components(completion, "minor", melody(69), finished=False)
    assert (parts["out_of_key"], parts["repeats"], parts["leaps"]) == (1, 0, 2)
    assert parts["short"] == 1 and parts["finished"] == 0 and parts["tonic"] == 0  # unfinished: no tonic bonus
    assert parts["reward"] == pytest.approx(-(1 + 0 + 2) / 7 - 1.0 - 1.0)


def test_a_leap_is_resolved_only_by_a_step_back():
    resolved = melody(65, 67, 65, 64, 62, 64, 62, 60)  # C5 -> F (-7) then up a step
    assert R(resolved, "major", melody(72)) == 1.0
    unresolved = melody(65, 64, 65, 64, 62, 64, 62, 60)  # then down a step: same direction
    assert R.components(unresolved, "major", melody(72))["leaps"] == 1
    assert R(unresolved, "major", melody(72)) == pytest.approx(1.0 - 1 / 8)


def test_reward_options_and_mode_are_checked():
    with pytest.raises(PrefoptError, match="mode"):
        R(melody(60), "dorian")
    with pytest.raises(PrefoptError, match="leap"):
        ChoraleReward(leap=2)
    # the weights are options: a larger tonic bonus scales that term only
    assert ChoraleReward(tonic_bonus=2.0)(melody(62, 64, 65, 67, 65, 64, 62, 60), "major", melody(60)) == 2.0


def test_tokenizer_round_trip_and_nearest_duration():
    tok = ChoraleTokenizer()
    notes = [(60, 1.0), (None, 0.5), (88, 4.0), (52, 0.25)]
    tokens = tok.encode(notes, "minor")
    assert tokens[:2] == [BOS, MINOR] and tokens[-1] == EOS
    assert tok.notes(tokens) == notes and tok.mode_of(tokens) == "minor"
    assert max(tokens) < tok.vocab_size == 5 + 8 * (1 + 37)
    assert tok.decode_note(tok.note_token(60, 0.125)) == (60, 0.25)  # nearest on a log scale
    assert tok.decode_note(tok.note_token(60, 6.0)) == (60, 4.0)
    with pytest.raises(PrefoptError, match="outside"):
        tok.note_token(40, 1.0)
    assert tok.encode([], "major", eos=False) == [BOS, MAJOR]


def test_parse_a_real_chorale_from_the_bundled_corpus():
    paths = chorale_paths()
    assert len(paths) > 400 and all(p.suffix in (".mxl", ".xml", ".krn") for p in paths)
    tok = ChoraleTokenizer()
    tokens, prompt = parse_chorale(paths[0], tok, prompt_bars=2)
    assert tokens[0] == BOS and tokens[1] in (MAJOR, MINOR) and tokens[-1] == EOS
    assert 2 < prompt < len(tokens) - 1
    notes = tok.notes(tokens)
    assert all(tok.low <= p <= tok.high for p, _ in notes if p is not None)
    # transposed to C major / A minor: most notes are in the scale
    from prefopt.tasks.sequence.reward import SCALES
    mode = tok.mode_of(tokens)
    in_key = sum(p % 12 in SCALES[mode] for p, _ in notes if p is not None) / len(notes)
    assert in_key > 0.8


TINY = ["domain=sequence", "domain.task.limit=14", "domain.task.eval_fraction=0.25",
        "domain.task.prompt_fraction=0.25", "domain.task.model.d_model=16", "domain.task.model.n_layers=1",
        "domain.task.model.n_heads=2", "domain.task.pretrain.epochs=2", "domain.task.pretrain.batch_size=8",
        "domain.task.samples_per_prompt=4", "domain.task.max_new_tokens=16", "domain.task.eval_samples=2",
        "domain.task.num_midi=2", "domain.task.progress=false", "domain.task.batch_size=4",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2"]


def test_chorale_task_runs_end_to_end_and_reuses_its_caches(make_config, monkeypatch):
    from prefopt.cache import BUILD_COUNTS
    from prefopt.tasks.sequence.task import ChoraleTask
    from prefopt.train import train

    sampled = []  # the progress label of every sampling call
    original = ChoraleTask.continue_prompts

    def counting(self, policy, prompts, seed, label="sampling continuations"):
        sampled.append(label)
        return original(self, policy, prompts, seed, label)

    monkeypatch.setattr(ChoraleTask, "continue_prompts", counting)
    cfg = make_config(*TINY)
    summary = train(cfg)
    # the frozen reference is sampled for evaluation once, not once per round: every round judges the policy
    # against the same reference samples (same model, same seeds)
    assert sampled.count("evaluation: reference samples") == 1
    assert sampled.count("evaluation: policy samples") == 2
    assert summary["rounds"][0]["reference"] == summary["rounds"][1]["reference"]
    run = Path(cfg.paths.output_dir)
    result = summary["eval"]
    assert summary["domain"] == "sequence" and 0.0 <= result["win_rate"] <= 1.0
    assert result["win_rate"] == pytest.approx(result["win_rate_strict"] + 0.5 * result["tie_rate"])
    for side in ("reference", "policy"):
        assert torch.isfinite(torch.tensor(result[side]["nll_per_token"])) and result[side]["nll_per_token"] > 0
        assert -5.0 <= result[side]["reward_mean"] <= 1.0
    assert result["eval_samples"] == 2 * result["eval_prompts"]
    # Bach's own continuations end with EOS: no unfinished penalty, so the reward is at least -2
    assert -2.0 <= result["data"]["reward_mean"] <= 1.0 and 0.0 <= result["data"]["win_rate"] <= 1.0
    assert "train/rewards/accuracies" in summary["train"]
    assert [r["round"] for r in summary["rounds"]] == [0, 1]  # iterative DPO: two rounds by default
    assert sorted(p.name for p in (run / "midi").glob("*.mid")) == [
        f"round{r}_prompt{k}_{side}.mid" for r in (0, 1) for k in (0, 1) for side in ("policy", "reference")]
    for r in (0, 1):
        assert (run / f"pianoroll_round{r}.png").stat().st_size > 1000
    assert json.loads((run / "summary.json").read_text())["eval"]["win_rate"] == result["win_rate"]

    # a second run (LoRA reference, another loss) reuses the parsed chorales, the base model and the
    # round-0 candidates
    counts = dict(BUILD_COUNTS)
    assert summary["reference"] == "copy" and summary["loss"] == ["sigmoid", "sft"]  # the domain's defaults
    again = train(make_config(*TINY, "loss=ipo", "reference=adapter", f"paths.cache_dir={cfg.paths.cache_dir}",
                              subdir="ipo"))
    assert again["reference"] == "adapter" and again["loss"] == "ipo"
    assert again["eval"]["reference"] == result["reference"]  # same base, same prompts, same seeds
    for kind in ("sequence-chorales", "sequence-base", "sequence-candidates"):
        assert BUILD_COUNTS[kind] == counts.get(kind, 0)


def test_parsing_in_two_processes_gives_the_tokens_of_one_and_keeps_the_order():
    from prefopt.tasks.sequence.chorales import parse_chorales

    tok = ChoraleTokenizer()
    paths = chorale_paths()[:6]
    serial = parse_chorales(paths, tok, prompt_bars=2, workers=1)
    assert serial == [parse_chorale(p, tok, prompt_bars=2) for p in paths]
    assert sum(r is not None for r in serial) >= 4
    assert parse_chorales(paths, tok, prompt_bars=2, workers=2) == serial


def test_chorale_task_options_are_checked(tmp_path):
    from prefopt.tasks.sequence.task import ChoraleTask

    with pytest.raises(PrefoptError, match="samples_per_prompt"):
        ChoraleTask(samples_per_prompt=3, cache_dir=str(tmp_path))
    with pytest.raises(PrefoptError, match="eval_fraction"):
        ChoraleTask(eval_fraction=0.6, prompt_fraction=0.5, cache_dir=str(tmp_path))
    with pytest.raises(PrefoptError, match="model has unknown options"):
        ChoraleTask(model={"width": 3}, cache_dir=str(tmp_path))
    with pytest.raises(PrefoptError, match="parse_workers"):
        ChoraleTask(parse_workers=0, cache_dir=str(tmp_path))


def test_branched_pairs_share_a_start_and_differ_after_it(tmp_path, monkeypatch):
    from prefopt.tasks.sequence.task import ChoraleTask

    task = ChoraleTask(pairing="branched", samples_per_prompt=4, max_new_tokens=6, cache_dir=str(tmp_path))
    calls = []

    def fake_continue(policy, prompts, seed, label=""):
        calls.append([list(p) for p in prompts])
        if len(calls) == 1:  # trunks: 5 notes and EOS
            return [[10, 11, 12, 13, 14, EOS] for _ in prompts]
        return [[20 + i, 30 + i, EOS] for i in range(len(prompts))]  # tails: one per row

    monkeypatch.setattr(task, "continue_prompts", fake_continue)
    prompts = [[BOS, MAJOR, 7]] * 4 + [[BOS, MINOR, 8]] * 4
    out = task._branched(None, prompts, seed=0)
    assert len(calls[0]) == 4  # one trunk per pair
    assert len(out) == 8
    for i in range(4):
        a, b = out[2 * i], out[2 * i + 1]
        branch = calls[1][2 * i]
        assert branch == calls[1][2 * i + 1]  # both continuations start from the same cut trunk
        cut = len(branch) - 3
        assert 0 <= cut <= 4  # at least the last note is resampled
        assert a[:cut] == b[:cut] == [10, 11, 12, 13, 14][:cut]
        assert a[cut:] == [20 + 2 * i, 30 + 2 * i, EOS][: 6 - cut] and a[cut] != b[cut]
        assert len(a) <= 6
    with pytest.raises(PrefoptError, match="pairing"):
        ChoraleTask(pairing="random", cache_dir=str(tmp_path))


def test_win_rate_counts_ties_as_one_half():
    from prefopt.metrics import win_rate

    result = win_rate(torch.tensor([1.0, 0.0, 0.5, 0.2]), torch.tensor([0.0, 0.0, 1.0, 0.2]))
    assert result == {"win_rate": pytest.approx((1 + 0.5 + 0 + 0.5) / 4), "win_rate_strict": 0.25,
                      "tie_rate": 0.5}


@pytest.mark.parametrize("name", ["bwv104.6.mxl",    # pickup bar, ties
                                  "bwv101.7.mxl",    # bars numbered "4a" (music21: bar 4)
                                  "bwv111.6.mxl",    # a <forward> gap after the last note
                                  "bwv299.mxl"])     # refused by the small reader: music21 parses it
def test_the_small_musicxml_reader_gives_music21s_tokens(name, monkeypatch):
    pytest.importorskip("music21")
    from prefopt.tasks.sequence import chorales
    from prefopt.tasks.sequence.musicxml import read_score

    path = next(p for p in chorale_paths() if p.name == name)
    assert (read_score(path) is None) == (name == "bwv299.mxl")
    tokenizer = ChoraleTokenizer()
    fast = parse_chorale(path, tokenizer, 2)
    monkeypatch.setattr(chorales, "read_score", lambda path: None)  # music21 for every score
    assert fast == parse_chorale(path, tokenizer, 2)
    assert fast is None or (fast[0][0] == BOS and fast[0][-1] == EOS)
