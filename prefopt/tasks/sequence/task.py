"""The chorale default: DPO of a small melody transformer toward a music-theory reward.

1. :func:`~prefopt.tasks.sequence.chorales.load_chorales` parses the Bach chorales of the music21 corpus
   (cached) and splits them, with a fixed permutation, into *base* (pretraining), *prompt* (the opening
   bars that candidate pairs continue) and *eval* chorales (held out from both).
2. :meth:`ChoraleTask.build_policy` pretrains a :class:`~prefopt.tasks.sequence.model.MelodyTransformer`
   on the base chorales by maximum likelihood (cached, keyed by data, model and training config).
3. :meth:`ChoraleTask.pairs` samples ``samples_per_prompt`` continuations of every prompt chorale's
   opening bars from the current policy (cached for round 0), scores them with
   :class:`~prefopt.tasks.sequence.reward.ChoraleReward`, pairs consecutive samples of one prompt and has a
   :class:`~prefopt.data.teachers.ScriptedTeacher` label each pair.
4. :meth:`ChoraleTask.evaluate` continues the eval chorales' opening bars ``eval_samples`` times with the
   reference and the policy, with the same seeds (common random numbers), and reports the mean reward of
   each, the win rate (policy reward above the reference's on the same prompt and seed; a tie counts one
   half), and the held-out negative log-likelihood per token of the real eval chorales under each model.
   For calibration, Bach's own continuations of the same openings are scored and compared with the same
   reference samples (``eval.data``: their mean reward and win rate).
   A few melodies are written as MIDI files and a piano roll of reference vs policy samples as a PNG.
"""

from __future__ import annotations

import logging
import math
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from prefopt.adapters.sequence import SequencePolicy, pad_sequences, trim_pair_batch
from prefopt.cache import cached_tensors
from prefopt.data.pairs import TensorPairs, collate_pairs
from prefopt.data.teachers import ScriptedTeacher, to_pairs
from prefopt.feedback.data import Groups
from prefopt.errors import PrefoptError, check_choice
from prefopt.metrics import mean_and_se, win_rate
from prefopt.tasks.base import EpochShuffleSampler, Task
from prefopt.tasks.sequence.chorales import (BOS, EOS, MAJOR, MINOR, PAD, PARSE_VERSION, ChoraleTokenizer, Chorales,
                                             load_chorales, write_midi)
from prefopt.tasks.sequence.model import MelodyTransformer
from prefopt.tasks.sequence.reward import ChoraleReward

log = logging.getLogger(__name__)

#: how candidates of one prompt become pairs (see :meth:`ChoraleTask.pairs`)
PAIRINGS = ("consecutive", "best_worst", "branched")
MODEL_DEFAULTS = {"d_model": 96, "n_layers": 3, "n_heads": 4, "d_ff": None, "dropout": 0.1, "max_len": 256}
PRETRAIN_DEFAULTS = {"epochs": 12, "batch_size": 8, "lr": 3.0e-3, "weight_decay": 0.01, "warmup_steps": 30,
                     "seed": 0}


def _options(name: str, given: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise PrefoptError(f"{name} has unknown options {unknown}; allowed: {', '.join(sorted(defaults))}")
    return {**defaults, **given}


class LengthGroupedSampler(EpochShuffleSampler):
    """:class:`EpochShuffleSampler` whose batches hold pairs of similar length (less padding to compute on).

    Each epoch's shuffled order (seeded by ``(seed, epoch)``, so a resumed run sees the same batches) is cut
    into windows of ``window`` batches; a window is sorted by length and cut into batches, and the full
    batches of the epoch are shuffled (a short last batch stays last, so the loader's cuts fall between
    batches). Every pair still comes once an epoch, as the first or any other pair of some batch; only which
    pairs share a batch changes. Under ``torch.distributed`` the batches are ``world * batch_size`` long and
    rank ``r`` takes every ``world``-th pair of them, as in :class:`EpochShuffleSampler`.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, window: int = 8):
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size, self.window = [int(x) for x in lengths], int(batch_size), int(window)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        world = self.num_replicas
        step = self.batch_size * world
        full, last = [], []
        for start in range(0, len(order), step * self.window):
            chunk = sorted(order[start:start + step * self.window], key=self.lengths.__getitem__)
            for k in range(0, len(chunk), step):
                (full if len(chunk[k:k + step]) == step else last).append(chunk[k:k + step])
        batches = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + last
        order = [i for batch in batches for i in batch]
        if world == 1:
            return iter(order)
        total = len(self) * world
        order = (order * (total // max(self.size, 1) + 1))[:total]  # pad: repeat the start of the order
        return iter(order[self.rank:total:world])


def pair_widths(dataset: Dataset) -> list[int] | None:
    """The padded width each pair of a :class:`TensorPairs` of sequences needs (None for other datasets)."""
    if not isinstance(dataset, TensorPairs) or "attention_mask" not in dataset.chosen:
        return None
    return torch.maximum(dataset.chosen["attention_mask"].sum(1), dataset.rejected["attention_mask"].sum(1)).tolist()


def sequence_dataloader(dataset: Dataset, batch_size: int, seed: int, train: bool = True) -> DataLoader:
    """Batches of pair rows with the all-padding columns at the end trimmed away.

    Training batches group pairs of similar length (:class:`LengthGroupedSampler`): with random batches
    about half of the chorale default's compute went to padding.
    """
    sampler = None
    if train:
        widths = pair_widths(dataset)
        sampler = (EpochShuffleSampler(len(dataset), seed) if widths is None
                   else LengthGroupedSampler(widths, batch_size, seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      collate_fn=lambda rows: trim_pair_batch(collate_pairs(rows)))


def pair_dataset(prompts: Sequence[Sequence[int]], first: Sequence[Sequence[int]], second: Sequence[Sequence[int]],
                 labels, pad_id: int) -> TensorPairs:
    """Pairs of ``prompt + completion`` sequences, padded to one width, sorted by a teacher's labels."""
    seq_a = [list(p) + list(c) for p, c in zip(prompts, first)]
    seq_b = [list(p) + list(c) for p, c in zip(prompts, second)]
    width = max(len(s) for s in seq_a + seq_b)
    plen = [len(p) for p in prompts]
    items_a = pad_sequences(seq_a, plen, pad_id, width)
    items_b = pad_sequences(seq_b, plen, pad_id, width)
    return TensorPairs.from_ordered(to_pairs(items_a, items_b, labels))


def _length_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """A shuffled epoch of batches whose rows have similar lengths (less padding to compute on)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = 4 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class ChoraleTask(Task):
    """See the module docstring. Every option is in ``conf/domain/sequence.yaml``."""

    name = "sequence"

    def __init__(self, limit: int | None = None, prompt_bars: int = 2, eval_fraction: float = 0.1,
                 prompt_fraction: float = 0.15, split_seed: int = 0, tokenizer: Mapping[str, Any] | None = None,
                 model: Mapping[str, Any] | None = None, pretrain: Mapping[str, Any] | None = None,
                 samples_per_prompt: int = 64, pairing: str = "branched", group_size: int = 8,
                 max_new_tokens: int = 96, temperature: float = 1.0,
                 eval_samples: int = 8, eval_prompts: int | None = None, reward: Mapping[str, Any] | None = None,
                 teacher: Mapping[str, Any] | None = None, batch_size: int = 32, rounds: int = 2,
                 num_midi: int = 4, progress: bool = True, seed: int = 0, cache_dir: str = ".cache/prefopt",
                 parse_workers: int = 2):
        if not 0 < eval_fraction < 1 or not 0 < prompt_fraction < 1 or eval_fraction + prompt_fraction >= 1:
            raise PrefoptError(f"eval_fraction={eval_fraction}, prompt_fraction={prompt_fraction}: each must be in "
                               "(0, 1) and their sum below 1 (the rest pretrains the base model)")
        check_choice("pairing", pairing, PAIRINGS)
        size = int(group_size) if pairing == "best_worst" else 2
        if size < 2 or samples_per_prompt < size or samples_per_prompt % size:
            raise PrefoptError(f"samples_per_prompt={samples_per_prompt} must be a multiple of {size} (pairing={pairing}"
                               f"{', group_size=' + str(size) if pairing == 'best_worst' else ''}; groups of >= 2)")
        self.pairing, self.group_size = pairing, size
        for option, value in (("max_new_tokens", max_new_tokens), ("eval_samples", eval_samples),
                              ("batch_size", batch_size), ("rounds", rounds)):
            if int(value) < 1:
                raise PrefoptError(f"{option}={value!r} must be an integer >= 1")
        if temperature <= 0:
            raise PrefoptError(f"temperature={temperature!r} must be > 0")
        self.limit, self.prompt_bars = limit, int(prompt_bars)
        self.eval_fraction, self.prompt_fraction, self.split_seed = float(eval_fraction), float(prompt_fraction), int(split_seed)
        self.tokenizer = ChoraleTokenizer(**dict(tokenizer or {}))
        self.model_options = _options("model", model, MODEL_DEFAULTS)
        self.pretrain_options = _options("pretrain", pretrain, PRETRAIN_DEFAULTS)
        self.samples_per_prompt, self.max_new_tokens = int(samples_per_prompt), int(max_new_tokens)
        self.temperature, self.eval_samples = float(temperature), int(eval_samples)
        self.eval_prompts = None if eval_prompts is None else int(eval_prompts)
        self.reward = ChoraleReward(**dict(reward or {}))
        self.teacher_options = dict(teacher or {})
        self.teacher = ScriptedTeacher(**self.teacher_options, seed=seed)
        self.batch_size, self.rounds, self.num_midi = int(batch_size), int(rounds), int(num_midi)
        self.progress, self.seed, self.cache_dir = bool(progress), int(seed), str(cache_dir)
        if int(parse_workers) < 1:
            raise PrefoptError(f"parse_workers={parse_workers!r} must be an integer >= 1")
        self.parse_workers = int(parse_workers)
        self._splits: dict[str, Chorales] | None = None
        self.base_nll: float | None = None
        self._reference_eval: tuple | None = None  # (weakref to the reference, prompts, results, samples)

    # --------------------------------------------------------------------------------------- data
    @property
    def banned(self) -> tuple[int, ...]:
        """Tokens a continuation may not contain (all specials but EOS)."""
        return PAD, BOS, MAJOR, MINOR

    def splits(self) -> dict[str, Chorales]:
        if self._splits is None:
            data = load_chorales(self.cache_dir, self.tokenizer, self.prompt_bars, self.limit, self.progress,
                                 self.parse_workers)
            if len(data) < 3:
                raise PrefoptError(f"limit={self.limit} leaves {len(data)} chorales; need at least 3 "
                                   "(one each for pretraining, pair prompts and evaluation)")
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
            n_eval = max(1, round(self.eval_fraction * len(data)))
            n_prompt = max(1, round(self.prompt_fraction * len(data)))
            self._splits = {"eval": data.subset(order[:n_eval]),
                            "prompt": data.subset(order[n_eval:n_eval + n_prompt]),
                            "base": data.subset(order[n_eval + n_prompt:])}
            log.info("chorales: %s", {k: len(v) for k, v in self._splits.items()})
        return self._splits

    def _data_config(self) -> dict[str, Any]:
        import music21

        return {"parse_version": PARSE_VERSION, "music21": music21.__version__,
                "tokenizer": self.tokenizer.config(), "prompt_bars": self.prompt_bars, "limit": self.limit,
                "eval_fraction": self.eval_fraction, "prompt_fraction": self.prompt_fraction,
                "split_seed": self.split_seed}

    def base_config(self) -> dict[str, Any]:
        return {"data": self._data_config(), "model": self.model_options, "pretrain": self.pretrain_options}

    # ----------------------------------------------------------------------------------- the base
    def _network(self, **overrides) -> MelodyTransformer:
        return MelodyTransformer(self.tokenizer.vocab_size, **{**self.model_options, **overrides})

    def build_policy(self) -> SequencePolicy:
        splits = self.splits()
        longest = max(len(t) for part in splits.values() for t in part.tokens)
        needed = max(longest, max(p for part in splits.values() for p in part.prompt_lengths) + self.max_new_tokens)
        if needed > self.model_options["max_len"]:
            raise PrefoptError(f"model.max_len={self.model_options['max_len']} is shorter than the longest sequence "
                               f"({needed} tokens: a chorale, or a prompt + max_new_tokens); raise model.max_len")
        state = cached_tensors(self.cache_dir, "sequence-base", self.base_config(),
                               lambda: self._pretrain(splits["base"]))
        # dropout is for pretraining only: with it, DPO's policy/reference log-ratios would be noisy and
        # biased (the reference is scored in eval mode), so the policy is built without (as TRL does)
        network = self._network(dropout=0.0)
        network.load_state_dict(state)
        policy = SequencePolicy(network, pad_id=PAD)
        total, count = policy.token_nll(splits["eval"].tokens, skip=2)
        self.base_nll = total / max(count, 1)
        log.info("base model: held-out NLL %.4f nats/token on %d eval chorales", self.base_nll, len(splits["eval"]))
        return policy

    def _pretrain(self, data: Chorales) -> dict[str, torch.Tensor]:
        """Maximum likelihood on the base chorales (every token after BOS); returns the state dict."""
        from tqdm.auto import tqdm

        opts = self.pretrain_options
        with torch.random.fork_rng():
            torch.manual_seed(int(opts["seed"]))
            network = self._network()
            policy = SequencePolicy(network, pad_id=PAD)
            optimizer = torch.optim.AdamW(network.parameters(), lr=float(opts["lr"]),
                                          weight_decay=float(opts["weight_decay"]))
            batch_size = int(opts["batch_size"])
            steps_per_epoch = math.ceil(len(data) / batch_size)
            total_steps = max(1, int(opts["epochs"]) * steps_per_epoch)
            warmup = min(int(opts["warmup_steps"]), total_steps // 2)

            def lr_at(step):  # linear warmup, cosine decay to 10%
                if step < warmup:
                    return (step + 1) / warmup
                progress = (step - warmup) / max(1, total_steps - warmup)
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
            generator = torch.Generator().manual_seed(int(opts["seed"]))
            network.train()
            bar = tqdm(total=total_steps, desc="pretraining the base melody model", disable=not self.progress)
            for _ in range(int(opts["epochs"])):
                for rows in _length_batches([len(t) for t in data.tokens], batch_size, generator):
                    batch = pad_sequences([data.tokens[i] for i in rows], [1] * len(rows), PAD)
                    loss = -policy.log_likelihood(network, batch).sum() / policy.lengths(batch).sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
                    optimizer.step()
                    scheduler.step()
                    bar.update(1)
                    bar.set_postfix(nll=f"{loss.item():.3f}")
            bar.close()
        return {k: v.detach().clone() for k, v in network.state_dict().items()}

    # ------------------------------------------------------------------------------------ samples
    def continue_prompts(self, policy: SequencePolicy, prompts: Sequence[Sequence[int]], seed: int,
                         label: str = "sampling continuations") -> list[list[int]]:
        return policy.sample(prompts, self.max_new_tokens, EOS, seed=seed, temperature=self.temperature,
                             banned=self.banned, batch_size=1024, progress=label if self.progress else None)

    def score(self, prompt: Sequence[int], completion: Sequence[int]) -> dict[str, float]:
        finished = bool(completion) and completion[-1] == EOS
        return self.reward.components(self.tokenizer.notes(completion), self.tokenizer.mode_of(prompt),
                                      self.tokenizer.notes(prompt), finished)

    def _candidates(self, policy: SequencePolicy, round_index: int) -> tuple[list[list[int]], list[list[int]]]:
        """``samples_per_prompt`` continuations of every prompt chorale (cached for the base policy)."""
        data = self.splits()["prompt"]
        prompts = [t[:p] for t, p in zip(data.tokens, data.prompt_lengths)]
        repeated = [p for p in prompts for _ in range(self.samples_per_prompt)]
        seed = self.seed * 7919 + round_index

        def build():
            log.info("sampling %d candidate continuations (%s)", len(repeated), self.pairing)
            if self.pairing == "branched":
                completions = self._branched(policy, repeated, seed)
            else:
                completions = self.continue_prompts(policy, repeated, seed, f"sampling {len(repeated)} candidates")
            out = torch.full((len(completions), self.max_new_tokens), PAD, dtype=torch.int64)
            for i, c in enumerate(completions):
                out[i, : len(c)] = torch.tensor(c, dtype=torch.int64)
            return {"completions": out, "lengths": torch.tensor([len(c) for c in completions])}

        if round_index == 0:  # the base policy is fixed by its config: cache its samples
            config = {"base": self.base_config(), "samples_per_prompt": self.samples_per_prompt,
                      "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "seed": seed,
                      "branched": self.pairing == "branched"}
            tensors = cached_tensors(self.cache_dir, "sequence-candidates", config, build)
        else:
            tensors = build()
        completions = [row[:n].tolist() for row, n in zip(tensors["completions"], tensors["lengths"].tolist())]
        return repeated, completions

    def _branched(self, policy: SequencePolicy, prompts: Sequence[Sequence[int]], seed: int) -> list[list[int]]:
        """Pairs of continuations that share a start: a trunk is sampled per pair, cut at a uniformly drawn
        point, and two continuations are sampled from there (entries ``2i`` and ``2i + 1`` share trunk ``i``)."""
        heads = prompts[0::2]
        trunks = self.continue_prompts(policy, heads, seed, f"sampling {len(heads)} shared starts")
        generator = torch.Generator().manual_seed(seed + 17)
        cuts = [int(torch.randint(0, max(1, len(t) - (t[-1] == EOS)), (1,), generator=generator)) if t else 0
                for t in trunks]
        branch_prompts = [list(h) + t[:c] for h, t, c in zip(heads, trunks, cuts) for _ in range(2)]
        tails = self.continue_prompts(policy, branch_prompts, seed + 1, f"sampling {len(branch_prompts)} endings")
        return [trunks[i // 2][:cuts[i // 2]] + tail[: self.max_new_tokens - cuts[i // 2]]
                for i, tail in enumerate(tails)]

    def pairs(self, policy: SequencePolicy, round_index: int) -> TensorPairs:
        """Candidates of each prompt, paired and labelled by the teacher.

        ``pairing="consecutive"``: samples ``2i`` and ``2i + 1`` of a prompt form a pair
        (``samples_per_prompt / 2`` pairs per prompt). ``"branched"``: the same, but the two samples of a
        pair share a start (see :meth:`_branched`): they differ only after a random point, so the pair
        says which *ending* is better, and the shared part cancels in the DPO log-ratio difference.
        ``"best_worst"``: the samples of a prompt are cut into groups of ``group_size``; each group gives
        one pair, its highest- and lowest-reward samples (the first of equals; a group whose rewards are
        all equal gives a tie), as in iterative DPO with a reward model. Either way the teacher labels
        every pair from the two rewards, so its noise (mistakes, ties, skips) applies.
        """
        prompts, completions = self._candidates(policy, round_index)
        rewards = torch.tensor([self.score(p, c)["reward"] for p, c in zip(prompts, completions)], dtype=torch.float64)
        if self.pairing in ("consecutive", "branched"):
            first, second = torch.arange(0, len(rewards), 2), torch.arange(1, len(rewards), 2)
        else:
            groups = rewards.view(-1, self.group_size)
            offsets = torch.arange(groups.shape[0]) * self.group_size
            first, second = offsets + groups.argmax(1), offsets + groups.argmin(1)
        labels = self.teacher.label(rewards[first], rewards[second])
        labels.tie = labels.tie | (first == second)  # a group of equal rewards: the same sample twice
        labels.preference = torch.where(labels.tie, torch.zeros_like(labels.preference), labels.preference)
        pick = lambda items, index: [items[i] for i in index.tolist()]  # noqa: E731
        pairs = pair_dataset(pick(prompts, first), pick(completions, first), pick(completions, second), labels, PAD)
        if len(pairs) == 0:
            raise PrefoptError("the teacher kept no candidate pair; loosen teacher.skip_threshold")
        log.info("round %d: %d pairs (%d ties) from %d candidates of mean reward %.4f", round_index, len(pairs),
                 int(pairs.tie.sum()), len(completions), float(rewards.mean()))
        return pairs

    def groups(self, policy: SequencePolicy, round_index: int, size: int) -> Groups:
        """The round's candidates cut into groups of ``size`` samples of one prompt (binary, ranking and score
        feedback, :mod:`prefopt.feedback`): the same samples :meth:`pairs` pairs."""
        if self.samples_per_prompt % size:
            raise PrefoptError(f"feedback.group_size={size} must divide samples_per_prompt={self.samples_per_prompt}")
        prompts, completions = self._candidates(policy, round_index)
        rewards = torch.tensor([self.score(p, c)["reward"] for p, c in zip(prompts, completions)], dtype=torch.float64)
        items = pad_sequences([list(p) + list(c) for p, c in zip(prompts, completions)], [len(p) for p in prompts],
                              PAD)
        count = len(completions) // size
        return Groups({k: v.reshape(count, size, -1) for k, v in items.items()}, {}, rewards.reshape(count, size))

    def dataloader(self, dataset: Dataset, train: bool = True) -> DataLoader:
        return sequence_dataloader(dataset, self.batch_size, self.seed, train)

    # --------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, reference: SequencePolicy, policy: SequencePolicy, output_dir: Path,
                 round_index: int) -> dict[str, Any]:
        data = self.splits()["eval"]
        count = len(data) if self.eval_prompts is None else min(self.eval_prompts, len(data))
        prompts = [t[:p] for t, p in zip(data.tokens[:count], data.prompt_lengths[:count])]
        repeated = [p for p in prompts for _ in range(self.eval_samples)]
        seed = 1_000_000 + self.seed  # the same for both models: common random numbers
        results, samples = {}, {}
        for name, model in (("reference", reference), ("policy", policy)):
            # the reference is the same frozen model in every round, sampled with the same seeds: judged once
            cached = self._reference_eval if name == "reference" else None
            if cached is not None and cached[0]() is model and cached[1] == count:
                results[name], samples[name] = cached[2], cached[3]
                continue
            completions = self.continue_prompts(model, repeated, seed, f"evaluation: {name} samples")
            scores = [self.score(p, c) for p, c in zip(repeated, completions)]
            rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float64)
            mean, se = mean_and_se(rewards)
            total, tokens = model.token_nll(data.tokens, skip=2)
            summary = {"reward_mean": mean, "reward_se": se, "nll_per_token": total / max(tokens, 1),
                       "length_mean": float(sum(len(c) for c in completions) / len(completions))}
            for key in ("out_of_key", "repeats", "leaps", "violation_rate", "tonic", "finished", "short"):
                summary[f"{key}_mean"] = float(sum(s[key] for s in scores) / len(scores))
            results[name], samples[name] = (summary, rewards), completions
            if name == "reference":
                self._reference_eval = (weakref.ref(model), count, results[name], completions)
        (ref, ref_rewards), (pol, pol_rewards) = results["reference"], results["policy"]
        # calibration: Bach's own continuations of the same openings, against the same reference samples
        real = [self.score(t[:p], t[p:])["reward"] for t, p in zip(data.tokens[:count], data.prompt_lengths[:count])]
        real_rewards = torch.tensor(real, dtype=torch.float64).repeat_interleave(self.eval_samples)
        output_dir = Path(output_dir)
        self._write_outputs(output_dir, round_index, repeated, samples)
        return {"reference": ref, "policy": pol, **win_rate(pol_rewards, ref_rewards),
                "nll_ratio": pol["nll_per_token"] / ref["nll_per_token"],
                "data": {"reward_mean": float(torch.tensor(real).mean()),
                         "win_rate": win_rate(real_rewards, ref_rewards)["win_rate"]},
                "eval_prompts": count, "eval_samples": len(repeated)}

    def _write_outputs(self, output_dir: Path, round_index: int, prompts, samples) -> None:
        shown = list(range(0, min(self.num_midi * self.eval_samples, len(prompts)), self.eval_samples))
        if not shown:
            return
        midi_dir = output_dir / "midi"
        midi_dir.mkdir(parents=True, exist_ok=True)
        rolls = []
        for k, i in enumerate(shown):
            row = []
            for name in ("reference", "policy"):
                prompt_notes = self.tokenizer.notes(prompts[i])
                notes = prompt_notes + self.tokenizer.notes(samples[name][i])
                write_midi(notes, midi_dir / f"round{round_index}_prompt{k}_{name}.mid")
                row.append((name, notes, len(prompt_notes), self.score(prompts[i], samples[name][i])["reward"]))
            rolls.append(row)
        from prefopt.tasks.sequence.render import piano_roll

        piano_roll(rolls, output_dir / f"pianoroll_round{round_index}.png")


__all__ = ["ChoraleTask", "LengthGroupedSampler", "pair_dataset", "pair_widths", "sequence_dataloader"]
