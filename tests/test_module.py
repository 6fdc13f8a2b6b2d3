"""The Lightning module with each reference strategy: what trains, what stays frozen, resume, guards."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from prefopt.errors import PrefoptError
from prefopt.losses import preference_loss
from prefopt.module import NonFiniteError, PreferenceModule
from toy import LossRecorder, loader, make_pairs, make_policy, trainer

SIGMOID = {"loss_type": "sigmoid", "beta": 0.5}


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _fit(reference, loss=SIGMOID, epochs=2, pairs=None, **module_kwargs):
    policy = make_policy()
    module = PreferenceModule(policy, loss=loss, reference=reference,
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.05), **module_kwargs)
    recorder = LossRecorder()
    trainer(epochs, [recorder]).fit(module, loader(pairs or make_pairs()))
    return module, recorder.losses


def test_copy_trains_every_policy_parameter_and_freezes_the_reference():
    policy = make_policy()
    before = _params(policy.network)
    module = PreferenceModule(policy, loss=SIGMOID, reference="copy",
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    ref_before = _params(module.reference.network)
    trainer(2).fit(module, loader(make_pairs()))
    for name, value in policy.network.named_parameters():
        assert not torch.equal(value, before[name]), f"{name} did not change"
    for name, value in module.reference.network.named_parameters():
        assert torch.equal(value, ref_before[name]), f"reference {name} changed"
        assert not value.requires_grad
    # dropout is off in the reference even while the policy trains
    dropout_policy = make_policy()
    dropout_policy.network.insert(1, torch.nn.Dropout(0.5))
    with_dropout = PreferenceModule(dropout_policy, loss=SIGMOID, reference="copy").train()
    batch = dropout_policy.concatenate(next(iter(loader(make_pairs(), batch_size=8))))
    first, second = (with_dropout.reference.logps(dropout_policy, batch, None) for _ in range(2))
    assert torch.equal(first, second)
    optimized = {id(p) for group in module.optimizers().optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.reference.parameters()}


@pytest.mark.parametrize("reference", ["copy", "adapter"])
def test_dropout_is_disabled_in_policy_and_reference_by_default(reference):
    def dropout_module(**kwargs):
        policy = make_policy()
        policy.network.insert(1, torch.nn.Dropout(0.5))
        ref = {"name": "adapter", "rank": 4, "dropout": 0.3, "targets": ["0", "3"]} if reference == "adapter" \
            else reference
        return PreferenceModule(policy, loss=SIGMOID, reference=ref, **kwargs).train()

    batch = next(iter(loader(make_pairs(), batch_size=8)))
    module = dropout_module()
    assert all(m.p == 0.0 for m in module.modules() if isinstance(m, torch.nn.Dropout))  # LoRA dropout too
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    first, ref, _ = module.pair_logps(batch, generator())
    second, _, _ = module.pair_logps(batch, generator())
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # train mode, same draw: the same numbers
    torch.testing.assert_close(first, ref)  # before training the log-ratios are exactly zero
    # disable_dropout=False keeps it: the same call gives two different answers
    noisy = dropout_module(disable_dropout=False)
    assert not torch.equal(noisy.pair_logps(batch, generator())[0], noisy.pair_logps(batch, generator())[0])


def test_adapter_moves_only_lora_weights_and_keeps_no_second_copy():
    policy = make_policy()
    base_before = {k: v.clone() for k, v in policy.network.state_dict().items()}
    module = PreferenceModule(policy, loss=SIGMOID, reference={"name": "adapter", "rank": 4},
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    assert sum(p.numel() for p in module.reference.parameters()) == 0
    lora_before = {k: v.clone() for k, v in policy.network.named_parameters() if "lora_" in k}
    assert lora_before
    trainer(2).fit(module, loader(make_pairs()))
    for name, value in policy.network.named_parameters():
        if "lora_" in name:
            if "lora_B" in name:  # B starts at zero, so it must have moved
                assert not torch.equal(value, lora_before[name]), name
        else:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(value, base_before[key]), f"base weight {name} changed"
    # the reference (adapters disabled) still scores like the untouched base network
    fresh = make_policy()
    batch = policy.concatenate(next(iter(loader(make_pairs(), batch_size=8))))
    draw = policy.draw(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(module.reference.logps(policy, batch, draw),
                               fresh.log_likelihood(fresh.network, batch, draw))


def _lora_network_with_moved_adapters():
    from peft import LoraConfig, get_peft_model

    policy = make_policy()
    network = get_peft_model(policy.network, LoraConfig(r=4, lora_alpha=4, target_modules=list(policy.lora_targets)))
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)  # non-zero adapters: enabled and disabled outputs differ
    return network


def test_adapters_disabled_matches_peft_disable_adapter_without_its_status_scan(monkeypatch):
    from prefopt.reference import adapters_disabled

    network = _lora_network_with_moved_adapters()
    x = torch.randn(5, next(network.parameters()).shape[-1])
    adapted = network(x)
    with network.disable_adapter():
        base = network(x)
    assert not torch.allclose(adapted, base)
    monkeypatch.setattr(type(network), "get_model_status", lambda self: pytest.fail("scanned the model"))
    with adapters_disabled(network):
        torch.testing.assert_close(network(x), base, rtol=0, atol=0)
    torch.testing.assert_close(network(x), adapted, rtol=0, atol=0)  # back on after the context
    assert all(p.requires_grad for n, p in network.named_parameters() if "lora_" in n)
    with pytest.raises(RuntimeError, match="inside"):
        with adapters_disabled(network):
            raise RuntimeError("inside")
    torch.testing.assert_close(network(x), adapted, rtol=0, atol=0)  # also after an error inside


def test_adapters_disabled_leaves_adapters_already_off_to_peft():
    from prefopt.reference import adapters_disabled

    network = _lora_network_with_moved_adapters()
    x = torch.randn(3, next(network.parameters()).shape[-1])
    with network.disable_adapter():
        base = network(x)
        with adapters_disabled(network):  # nested: must not switch them back on when it leaves
            torch.testing.assert_close(network(x), base, rtol=0, atol=0)
        torch.testing.assert_close(network(x), base, rtol=0, atol=0)


def test_sync_moves_the_reference_by_the_tr_dpo_rule():
    module, _ = _fit({"name": "sync", "sync_every": 1, "alpha": 1.0}, epochs=1)
    for ref, pol in zip(module.reference.network.parameters(), module.policy.network.parameters()):
        torch.testing.assert_close(ref, pol)  # alpha = 1: a hard copy after every step
    soft, _ = _fit({"name": "sync", "sync_every": 2, "alpha": 0.5}, epochs=1)
    start = make_policy().network
    moved = [not torch.equal(r, s) for r, s in zip(soft.reference.network.parameters(), start.parameters())]
    assert all(moved)
    differs = [not torch.allclose(r, p) for r, p in zip(soft.reference.network.parameters(),
                                                         soft.policy.network.parameters())]
    assert any(differs)


def test_sync_update_is_the_weighted_average():
    module = PreferenceModule(make_policy(), loss=SIGMOID, reference={"name": "sync", "sync_every": 3,
                                                                     "alpha": 0.25})
    ref_before = [p.clone() for p in module.reference.network.parameters()]
    with torch.no_grad():
        for p in module.policy.network.parameters():
            p.add_(1.0)
    module.reference.after_step(module.policy, step=2)  # not a multiple of 3: no update
    assert all(torch.equal(a, b) for a, b in zip(ref_before, module.reference.network.parameters()))
    module.reference.after_step(module.policy, step=3)
    for before, ref, pol in zip(ref_before, module.reference.network.parameters(), module.policy.network.parameters()):
        torch.testing.assert_close(ref, 0.25 * pol + 0.75 * before)


def test_precomputed_gives_the_same_losses_as_copy():
    _, copy_losses = _fit("copy")
    _, cached_losses = _fit("precomputed")
    assert len(copy_losses) == len(cached_losses) == 8
    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(copy_losses))


def test_precomputed_refuses_stochastic_policies_without_per_example_seeds():
    with pytest.raises(PrefoptError, match="seed"):
        _fit("precomputed", pairs=make_pairs(with_seed=False))


def test_reference_free_loss_trains_without_reference():
    module, losses = _fit("none", loss={"loss_type": "cpl", "beta": 0.1, "cpl_lambda": 0.5}, epochs=3)
    assert losses[-1] < losses[0]
    with pytest.raises(PrefoptError, match="needs a reference model"):
        PreferenceModule(make_policy(), loss=SIGMOID, reference="none")


@pytest.mark.parametrize("bad, match", [
    ({"reference": "frozen"}, "reference='frozen'.*allowed: copy, adapter"),
    ({"loss": {"loss_type": "sigmoid", "beta": 0.1, "ties": "maybe"}}, "loss.ties='maybe'.*drop, half"),
    ({"loss": {"loss_type": "sigmoid"}}, "'loss_type' and 'beta'"),
    ({"nonfinite": "ignore"}, "nonfinite='ignore'"),
    ({"reference": {"name": "adapter", "rank": 0}}, "rank >= 1"),
    ({"reference": {"name": "sync", "alpha": 1.5}}, r"alpha=1.5 must be in \(0, 1\]"),
    ({"reference": {"name": "copy", "rank": 4}}, "reference=copy: bad options"),
])
def test_bad_module_options_are_one_clear_error(bad, match):
    kwargs = {"loss": SIGMOID, "reference": "copy", **bad}
    with pytest.raises(PrefoptError, match=match):
        PreferenceModule(make_policy(), **kwargs)


def test_ties_are_dropped_or_counted_half_each_way():
    policy = make_policy()
    pairs = make_pairs(8)
    pairs.tie[:3] = True
    batch = next(iter(torch.utils.data.DataLoader(pairs, batch_size=8)))
    for mode in ("drop", "half"):
        module = PreferenceModule(policy, loss={**SIGMOID, "ties": mode}, reference="copy")
        loss = module._shared_step(batch, "train", 0)
        samples = policy.concatenate(batch)
        draw = policy.draw(samples, module._generator("train", 0))
        logps = policy.log_likelihood(policy.network, samples, draw).detach()
        pc, pr = logps[:8], logps[8:]
        forward = preference_loss("sigmoid", pc, pr, pc, pr, beta=0.5).losses  # ref == policy at start
        backward = preference_loss("sigmoid", pr, pc, pr, pc, beta=0.5).losses
        tie = batch["tie"]
        if mode == "drop":
            expected = forward[~tie].mean()
        else:
            expected = torch.where(tie, 0.5 * (forward + backward), forward).mean()
        torch.testing.assert_close(loss.detach(), expected)


def test_nonfinite_log_likelihood_stops_with_a_checkpoint_or_is_skipped(tmp_path):
    pairs = make_pairs(32)
    pairs.chosen["y"][20] = float("nan")  # lands in some batch of the first epoch
    module = PreferenceModule(make_policy(), loss=SIGMOID, reference="copy")
    with pytest.raises(NonFiniteError, match=r"non-finite logps.*train batch"):
        trainer(1, default_root_dir=str(tmp_path)).fit(module, loader(pairs, batch_size=8))
    assert (tmp_path / "nonfinite-last-good.ckpt").is_file()
    skipping = PreferenceModule(make_policy(), loss=SIGMOID, reference="copy", nonfinite="skip")
    recorder = LossRecorder()
    before = _params(skipping.policy.network)
    t = trainer(1, [recorder])
    t.fit(skipping, loader(pairs, batch_size=8))
    assert all(torch.isfinite(v).all() for v in skipping.policy.network.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in skipping.policy.network.named_parameters())
    assert len(recorder.losses) == 3  # one of the 4 batches was skipped


def test_resume_reproduces_the_uninterrupted_run_and_restores_the_reference(tmp_path):
    full, full_losses = _fit("copy", epochs=4)
    first = PreferenceModule(make_policy(), loss=SIGMOID, reference="copy",
                             optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer(2, [ckpt], enable_checkpointing=True).fit(first, loader(make_pairs()))
    untouched = make_policy().network

    uninterrupted = PreferenceModule(make_policy(), loss=SIGMOID, reference="copy",
                                     optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    rec_full = LossRecorder()
    trainer(4, [rec_full]).fit(uninterrupted, loader(make_pairs()))

    resumed = PreferenceModule(make_policy(seed=123), loss=SIGMOID, reference="copy",  # different init on purpose
                               optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    rec_resumed = LossRecorder()
    trainer(4, [rec_resumed]).fit(resumed, loader(make_pairs()), ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(rec_resumed.losses) == 8
    torch.testing.assert_close(torch.tensor(rec_resumed.losses), torch.tensor(rec_full.losses[8:]))
    for a, b in zip(resumed.policy.network.parameters(), uninterrupted.policy.network.parameters()):
        torch.testing.assert_close(a, b)
    for ref, base in zip(resumed.reference.network.parameters(), untouched.parameters()):
        assert torch.equal(ref, base), "the resumed run's reference is not the original reference"


def test_precomputed_cache_is_restored_on_resume_not_recomputed(tmp_path):
    first = PreferenceModule(make_policy(), loss=SIGMOID, reference="precomputed",
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer(1, [ckpt], enable_checkpointing=True).fit(first, loader(make_pairs()))
    cache = first.reference.cache.clone()
    resumed = PreferenceModule(make_policy(seed=5), loss=SIGMOID, reference="precomputed",
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    trainer(2).fit(resumed, loader(make_pairs()), ckpt_path=str(tmp_path / "last.ckpt"))
    assert torch.equal(resumed.reference.cache, cache)


@pytest.mark.parametrize("reference", ["copy", {"name": "adapter", "rank": 4}, {"name": "sync", "sync_every": 1}])
def test_frozen_baseline_holds_no_second_copy_and_scores_the_untrained_policy(reference):
    from prefopt.train import frozen_baseline

    policy = make_policy()
    untouched = make_policy()  # the same seed: the policy before training
    module = PreferenceModule(policy, loss=SIGMOID, reference=reference,
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    baseline = frozen_baseline(module)
    shared = {id(p) for p in module.parameters()}
    own = [p for p in baseline.parameters() if id(p) not in shared]
    name = reference if isinstance(reference, str) else reference["name"]
    # copy: the strategy's frozen copy; adapter: the network with its adapters disabled; sync: one copy
    assert sum(p.numel() for p in own) == (sum(p.numel() for p in untouched.parameters()) if name == "sync" else 0)
    trainer(2).fit(module, loader(make_pairs()))
    batch = policy.concatenate(next(iter(loader(make_pairs(), batch_size=8))))
    draw = policy.draw(batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = untouched.log_likelihood(untouched.network, batch, draw)
        torch.testing.assert_close(baseline.log_likelihood(baseline.network, batch, draw), expected)
        assert not torch.allclose(policy.log_likelihood(policy.network, batch, draw), expected)  # it trained
    assert baseline.network is not policy.network


def test_eval_mode_switches_every_submodule_and_restores_each_ones_own_mode():
    from prefopt.reference import eval_mode

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    net.train()
    net[2].eval()  # a submodule the user keeps in eval mode
    x = torch.randn(8, 4)
    before = {name: m.training for name, m in net.named_modules()}
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
        torch.testing.assert_close(net(x), net(x))  # no dropout inside
    assert {name: m.training for name, m in net.named_modules()} == before

    calls = []

    class Tracked(torch.nn.Linear):
        def train(self, mode=True):  # an override is honoured, not bypassed
            calls.append(mode)
            return super().train(mode)

    tracked = torch.nn.Sequential(Tracked(4, 4), torch.nn.Dropout(0.5)).train()
    calls.clear()
    with eval_mode(tracked):
        assert not tracked[1].training
    assert calls == [False, True] and tracked[1].training
