"""The sequence adapter: completion log-likelihoods by hand, one forward for a pair batch, sampling, LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prefopt.adapters.sequence import SequencePolicy, pad_sequences, position_ids, trim_pair_batch
from prefopt.errors import PrefoptError
from prefopt.module import PreferenceModule
from prefopt.policy import concatenate_pairs
from prefopt.tasks.sequence.model import MelodyTransformer

PAD = 3


class Bigram(nn.Module):
    """logits[n, t] = table[ids[n, t]]: the next token depends on the current one only."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids):
        return self.table[input_ids]


TABLE = [[0.0, 1.0, 2.0, 0.5],
         [1.5, -1.0, 0.0, 0.0],
         [0.3, 0.2, -0.7, 2.0],
         [9.0, -9.0, 4.0, 0.0]]  # the padding token's row: scoring after padding would show


def hand_logp(prev: int, token: int) -> float:
    row = TABLE[prev]
    return row[token] - math.log(sum(math.exp(v) for v in row))


def test_log_likelihood_matches_a_hand_computation_with_padding_on_both_sides():
    # row 0: 2 left pads, prompt [0, 1], completion [2, 0, 1]
    # row 1: prompt [1], completion [2], 3 right pads
    # row 2: 1 left pad, prompt [2, 0], completion [1, 1], 1 right pad
    ids = torch.tensor([[PAD, PAD, 0, 1, 2, 0, 1],
                        [1, 2, PAD, PAD, PAD, PAD, PAD],
                        [PAD, 2, 0, 1, 1, PAD, PAD]])
    attention = (ids != PAD).long()
    completion = torch.tensor([[0, 0, 0, 0, 1, 1, 1],
                               [0, 1, 0, 0, 0, 0, 0],
                               [0, 0, 0, 1, 1, 0, 0]])
    policy = SequencePolicy(Bigram(TABLE), pad_id=PAD)
    samples = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    expected = [hand_logp(1, 2) + hand_logp(2, 0) + hand_logp(0, 1),
                hand_logp(1, 2),
                hand_logp(0, 1) + hand_logp(1, 1)]
    got = policy.log_likelihood(policy.network, samples)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert policy.lengths(samples).tolist() == [3.0, 1.0, 2.0]
    # a completion flag on a padded position is not scored
    flagged = dict(samples, completion_mask=completion | (ids == PAD).long() * torch.tensor([0, 0, 0, 0, 0, 1, 1]))
    assert policy.log_likelihood(policy.network, flagged).tolist() == pytest.approx(expected, abs=1e-5)
    assert policy.lengths(flagged).tolist() == [3.0, 1.0, 2.0]


def test_first_position_can_not_be_scored_and_missing_keys_are_named():
    policy = SequencePolicy(Bigram(TABLE))
    ids = torch.tensor([[0, 1, 2]])
    with pytest.raises(PrefoptError, match="first position"):
        policy.log_likelihood(policy.network, {"input_ids": ids, "completion_mask": torch.ones_like(ids)})
    with pytest.raises(PrefoptError, match="completion_mask"):
        policy.log_likelihood(policy.network, {"input_ids": ids})


def _tiny_transformer(seed=0, vocab=11):
    torch.manual_seed(seed)
    return MelodyTransformer(vocab, max_len=32, d_model=16, n_layers=2, n_heads=2, dropout=0.0).eval()


def test_left_padding_gives_the_same_log_likelihood_as_no_padding():
    network = _tiny_transformer()
    policy = SequencePolicy(network, pad_id=0)
    seq = [1, 4, 5, 6, 7, 8]
    plain = pad_sequences([seq], [2])
    padded = {"input_ids": torch.tensor([[0, 0, 0, *seq]]), "attention_mask": torch.tensor([[0, 0, 0] + [1] * 6]),
              "completion_mask": torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1]])}
    assert position_ids(padded["attention_mask"]).tolist() == [[0, 0, 0, 0, 1, 2, 3, 4, 5]]
    a = policy.log_likelihood(network, plain)
    b = policy.log_likelihood(network, padded)
    assert torch.allclose(a, b, atol=1e-5)
    # by hand: the sum of log-softmax entries of the scored tokens, from the full forward
    logits = network(plain["input_ids"]).detach()
    by_hand = sum(float(torch.log_softmax(logits[0, t - 1], -1)[seq[t]]) for t in range(2, 6))
    assert float(a) == pytest.approx(by_hand, abs=1e-5)


def _pair_batch():
    chosen = pad_sequences([[1, 4, 5, 6, 2], [1, 7, 8, 2], [1, 9, 4, 4, 4, 5, 2]], [2, 2, 3], width=8)
    rejected = pad_sequences([[1, 4, 9, 2], [1, 7, 6, 6, 6, 6, 2], [1, 9, 4, 2]], [2, 2, 3], width=8)
    batch = {f"chosen_{k}": v for k, v in chosen.items()}
    batch.update({f"rejected_{k}": v for k, v in rejected.items()})
    batch["tie"] = torch.zeros(3, dtype=torch.bool)
    return batch, chosen, rejected


def test_concatenated_forward_equals_separate_forwards():
    network = _tiny_transformer()
    policy = SequencePolicy(network, pad_id=0)
    batch, chosen, rejected = _pair_batch()
    calls = []
    network.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    together = policy.log_likelihood(network, concatenate_pairs(batch))
    assert len(calls) == 1 and calls[0][0] == 6  # chosen and rejected in one forward
    apart = torch.cat([policy.log_likelihood(network, trim_pair_batch(dict(chosen))),
                       policy.log_likelihood(network, trim_pair_batch(dict(rejected)))])
    assert torch.allclose(together, apart, atol=1e-5)
    lengths = policy.lengths(concatenate_pairs(batch))
    assert lengths.tolist() == [3.0, 2.0, 4.0, 2.0, 5.0, 1.0]


def test_trim_pair_batch_drops_only_all_padding_columns():
    batch, _, _ = _pair_batch()
    trimmed = trim_pair_batch(batch)
    assert trimmed["chosen_input_ids"].shape == (3, 7) and trimmed["rejected_input_ids"].shape == (3, 7)
    assert torch.equal(trimmed["tie"], batch["tie"])


def test_module_pair_logps_and_training_step_change_only_the_policy():
    network = _tiny_transformer()
    module = PreferenceModule(SequencePolicy(network, pad_id=0), reference="copy")
    batch, _, _ = _pair_batch()
    logps, ref, lengths = module.pair_logps(batch)
    assert torch.allclose(logps, ref) and lengths.tolist() == [3.0, 2.0, 4.0, 2.0, 5.0, 1.0]
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    ref_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    optimizer = torch.optim.SGD(module.policy.parameters(), lr=0.5)
    loss = module._shared_step(batch, "val", 0)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in module.policy.state_dict().items())
    assert all(torch.equal(ref_before[k], v) for k, v in module.reference.state_dict().items())


class NoCache(nn.Module):
    """The same network, called without a key/value cache (the adapter then recomputes the prefix)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids)


def test_sampling_with_the_cache_equals_recomputation_and_is_seeded():
    network = _tiny_transformer(seed=3)
    policy = SequencePolicy(network, pad_id=0)
    prompts = [[1, 4, 5], [1, 7], [1, 9, 4, 4]]
    cached = policy.sample(prompts, max_new_tokens=12, eos_id=2, seed=5, banned=(0, 1))
    recomputed = policy.sample(prompts, max_new_tokens=12, eos_id=2, seed=5, banned=(0, 1), network=NoCache(network))
    assert cached == recomputed
    assert cached == policy.sample(prompts, max_new_tokens=12, eos_id=2, seed=5, banned=(0, 1))
    assert cached != policy.sample(prompts, max_new_tokens=12, eos_id=2, seed=6, banned=(0, 1))
    for completion in cached:
        assert 1 <= len(completion) <= 12 and not {0, 1} & set(completion)
        assert 2 not in completion[:-1]  # stops right after EOS


def test_sampling_a_module_without_attention_mask_groups_prompts_by_length():
    class IdsOnly(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids)

    network = _tiny_transformer(seed=4)
    policy = SequencePolicy(IdsOnly(network), pad_id=0)
    out = policy.sample([[1, 4, 5], [1, 7], [1, 3, 3]], max_new_tokens=5, eos_id=None, seed=1)
    assert [len(c) for c in out] == [5, 5, 5]
    # rows of one length are sampled together: the same as sampling that group alone
    alone = SequencePolicy(IdsOnly(network), pad_id=0).sample([[1, 7]], max_new_tokens=5, eos_id=None, seed=1)
    assert out[1] == alone[0]


def test_reference_adapter_wraps_the_transformer_in_lora_and_disables_it():
    pytest.importorskip("peft")
    network = _tiny_transformer()
    policy = SequencePolicy(network, pad_id=0)
    batch, _, _ = _pair_batch()
    base_logps = policy.log_likelihood(network, concatenate_pairs(batch)).detach()
    module = PreferenceModule(policy, reference={"name": "adapter", "rank": 2})
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("c_attn" in n for n in trainable) and any("c_fc" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in module.policy.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        module._shared_step(batch, "val", 0).backward()
        optimizer.step()
    logps, ref, _ = module.pair_logps(batch)
    assert torch.allclose(ref, base_logps, atol=1e-5)  # adapters disabled = the base network
    assert not torch.allclose(logps, base_logps, atol=1e-4)  # the policy moved
    # sampling goes through the peft wrapper too
    assert len(module.policy.sample([[1, 4]], max_new_tokens=3, eos_id=None)[0]) == 3


def test_lora_targets_follow_the_network():
    assert SequencePolicy(_tiny_transformer()).lora_targets[:3] == ("c_attn", "c_proj", "c_fc")
    assert SequencePolicy(_tiny_transformer(), lora_targets=["c_attn"]).lora_targets == ("c_attn",)
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_positions=16, n_embd=8,
                                                                n_layer=1, n_head=2))
    assert SequencePolicy(gpt2).lora_targets == ("c_attn",)  # peft's table for gpt2


# ------------------------------------------------------------------ logits at the scored positions only
class FullLogits(nn.Module):
    """The same network behind a forward that can only return every position's logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids)


def _mixed_batch():
    """Prompts of different lengths, right padding, one row with a left pad: the kept window is ragged."""
    batch = pad_sequences([[1, 4, 5, 6, 2], [1, 7, 8, 9, 6, 6, 2], [1, 9, 4, 4, 4, 5, 2, 3]], [2, 4, 3])
    batch["input_ids"][1] = torch.tensor([0, 1, 7, 8, 9, 6, 6, 2])
    batch["attention_mask"][1] = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1])
    batch["completion_mask"][1] = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    batch["input_ids"][0, 5:] = 10  # padding of another value: must not matter
    return batch


def _gpt2(cls=None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=11, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return (cls or transformers.GPT2LMHeadModel)(config).double().eval()


def test_scored_logits_equal_the_full_logits_for_a_hugging_face_lm_and_the_melody_transformer():
    batch = _mixed_batch()
    for network in (_gpt2(), _tiny_transformer(seed=2).double()):
        calls = []
        network.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
        policy = SequencePolicy(network, pad_id=0)
        kept = policy.log_likelihood(network, batch)
        # logits_to_keep: from the first predicting column (row 0's prompt ends at column 1) to the last
        # predicting column (6): the 8th input column is never fed
        assert calls[-1]["logits_to_keep"] == 6 and calls[-1]["attention_mask"].shape == (3, 7)
        full = SequencePolicy(FullLogits(network), pad_id=0).log_likelihood(FullLogits(network), batch)
        assert kept.dtype == torch.float64
        assert torch.allclose(kept, full, rtol=0, atol=1e-6)
        by_hand = [sum(float(torch.log_softmax(_row_logits(network, batch, i, t).detach(), -1)[batch["input_ids"][i, t]])
                       for t in range(1, 8) if batch["completion_mask"][i, t]) for i in range(3)]
        assert kept.tolist() == pytest.approx(by_hand, abs=1e-6)


def _row_logits(network, batch, i, t):
    """The logits predicting token t of row i, from a forward of that row's real tokens before t alone."""
    ids = batch["input_ids"][i, :t][batch["attention_mask"][i, :t].bool()][None]
    out = network(ids)
    return (out.logits if hasattr(out, "logits") else out)[0, -1]


def test_scored_logits_run_the_backbone_and_head_of_a_model_without_logits_to_keep():
    transformers = pytest.importorskip("transformers")

    class NoKeep(transformers.GPT2LMHeadModel):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache)

    network = _gpt2(NoKeep)
    network.load_state_dict(_gpt2().state_dict())
    seen = []
    network.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    batch = _mixed_batch()
    kept = SequencePolicy(network, pad_id=0).log_likelihood(network, batch)
    assert seen == [torch.Size([int(SequencePolicy(network).lengths(batch).sum()), 16])]  # the K scored positions
    full = SequencePolicy(FullLogits(_gpt2()), pad_id=0).log_likelihood(FullLogits(_gpt2()), batch)
    assert torch.allclose(kept, full, rtol=0, atol=1e-6)
    # a logit soft-cap in the config: the head alone would be wrong, so the full logits are used
    network.config.final_logit_softcapping = 30.0
    seen.clear()
    SequencePolicy(network, pad_id=0).log_likelihood(network, batch)
    assert seen[0][:2] == (3, 8)


def test_a_plain_ids_to_logits_module_gets_the_full_logits():
    network = Bigram(TABLE).double()
    batch = _mixed_batch()
    batch["input_ids"] = batch["input_ids"].clamp_max(3)
    got = SequencePolicy(network, pad_id=PAD).log_likelihood(network, batch)
    ids = batch["input_ids"]
    expected = [sum(hand_logp(int(ids[i, t - 1]), int(ids[i, t])) for t in range(1, 8)
                    if batch["completion_mask"][i, t] and batch["attention_mask"][i, t]) for i in range(3)]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------- sampling
def _sample_one_row_at_a_time(network, prompts, max_new_tokens, eos_id, seed, banned):
    """The sampler's definition, written plainly: each row recomputed from scratch, alone; at every step one
    uniform per row of the chunk is drawn (finished rows included), and the token is the inverse CDF of it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003)
    rows, done = [list(p) for p in prompts], [False] * len(prompts)
    out = [[] for _ in prompts]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            u = torch.rand(len(prompts), 1, generator=generator)
            for i, row in enumerate(rows):
                if done[i]:
                    continue
                logits = network(torch.tensor([row]))[0, -1].float()
                logits[list(banned)] = float("-inf")
                cdf = torch.softmax(logits, -1).cumsum(-1)
                token = int(torch.searchsorted(cdf, u[i] * cdf[-1:]).clamp_max(len(cdf) - 1))
                row.append(token), out[i].append(token)
                done[i] = token == eos_id
            if all(done):
                break
    return out


def test_the_cached_batched_sampler_draws_the_tokens_of_the_plain_definition():
    network = _tiny_transformer(seed=7)
    prompts = [[1] + [4 + (i * j) % 7 for j in range(i % 5)] for i in range(24)]  # lengths 1-5: left padding
    expected = _sample_one_row_at_a_time(network, prompts, 14, 2, seed=3, banned=(0, 1))
    lengths = [len(c) for c in expected]
    assert min(lengths) < 5 and max(lengths) == 14  # rows finish at different steps: finished rows get dropped
    policy = SequencePolicy(network, pad_id=0)
    dropped = []
    original = __import__("prefopt.tasks.sequence.model", fromlist=["KVCache"]).KVCache.batch_select_indices

    def spy(cache, indices):
        dropped.append(cache.keys[0].shape[0] - len(indices))
        original(cache, indices)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("prefopt.tasks.sequence.model.KVCache.batch_select_indices", spy)
        cached = policy.sample(prompts, 14, 2, seed=3, banned=(0, 1), batch_size=64)
    assert dropped and sum(dropped) < len(prompts)
    assert cached == expected
    assert policy.sample(prompts, 14, 2, seed=3, banned=(0, 1), network=NoCache(network), batch_size=64) == expected


def test_kv_cache_keeps_selected_rows_and_refuses_to_overflow():
    from prefopt.tasks.sequence.model import KVCache

    network = _tiny_transformer(seed=1)
    ids = torch.tensor([[1, 4, 5], [1, 6, 7], [1, 8, 9]])
    with torch.no_grad():
        out = network(ids, use_cache=True)
        out.cache.batch_select_indices(torch.tensor([2, 0]))
        step = network(torch.tensor([[3], [3]]), cache=out.cache, use_cache=True)
        whole = network(torch.tensor([[1, 8, 9, 3], [1, 4, 5, 3]]))
    assert step.cache.length == 4
    assert torch.allclose(step.logits[:, -1], whole[:, -1], atol=1e-5)
    cache = KVCache(1, 1, 1, 2, capacity=2, dtype=torch.float32, device=torch.device("cpu"))
    cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    cache.length = 2
    with pytest.raises(PrefoptError, match="capacity 2"):
        cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_right_padded_rows_score_as_if_alone():
    network = _tiny_transformer(seed=5)
    batch = pad_sequences([[1, 4, 5, 6, 2], [1, 7, 2], [1, 9, 4, 4, 4, 5, 2]], [1, 1, 1])
    logits = network(batch["input_ids"], attention_mask=batch["attention_mask"])
    for i, n in enumerate([5, 3, 7]):
        alone = network(batch["input_ids"][i:i + 1, :n])
        assert torch.allclose(logits[i, :n], alone[0], atol=1e-5)
