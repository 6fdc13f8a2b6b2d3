"""Scale-out on Lightning's engines: DDP on CPU (gloo) matches one process, the reference strategies stay
consistent across ranks, gradient accumulation matches the full batch, bf16-mixed runs on CPU, FSDP units."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp_worker import run as run_worker
from prefopt.data.pairs import TensorPairs
from prefopt.distributed import preference_networks, preference_wrap_policy
from prefopt.module import PreferenceModule
from prefopt.tasks.base import EpochShuffleSampler
from prefopt.train import train
from toy import make_policy

WORKER = Path(__file__).with_name("ddp_worker.py")
NUM_PAIRS = 128


@pytest.fixture(scope="module")
def ddp_states(tmp_path_factory):
    """Two DDP ranks (batch 16 each) and one process (batch 32): sync and precomputed references."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(WORKER), str(out / "ddp"), "--devices", "2", "--batch-size", "16"],
                            capture_output=True, text=True, env=env, timeout=600, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {ref: [load_file(str(out / "ddp" / f"{ref}-rank{r}.safetensors")) for r in (0, 1)]
             for ref in ("sync", "precomputed")}
    single = run_worker(out / "single", devices=1, batch_size=32, num_pairs=NUM_PAIRS)
    return ranks, single


@pytest.mark.parametrize("reference", ["sync", "precomputed"])
def test_two_ddp_processes_match_one_process_with_the_same_global_batch(ddp_states, reference):
    ranks, single = ddp_states
    rank0, rank1 = ranks[reference]
    assert int(rank0["global_step"]) == int(single[reference]["global_step"]) == 2 * NUM_PAIRS // 32
    start = make_start_policy_state()
    for key, value in rank0.items():
        if key.startswith("policy.body"):
            assert not torch.allclose(value, start[key[len("policy."):]]), f"{key} did not train"
        torch.testing.assert_close(value, single[reference][key], rtol=1e-5, atol=1e-5, msg=key)


def make_start_policy_state():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from prefopt.cli import config_dir
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["domain=bandit", f"domain.task.num_pairs={NUM_PAIRS}", "paths.output_dir=.",
                                          "paths.cache_dir=."])
    return instantiate(cfg.domain.task).build_policy().network.state_dict()


def test_sync_updates_the_reference_identically_on_every_rank(ddp_states):
    ranks, single = ddp_states
    rank0, rank1 = ranks["sync"]
    ref_keys = [k for k in rank0 if k.startswith("reference.")]
    assert ref_keys
    for key in ref_keys:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single["sync"][key], rtol=1e-5, atol=1e-5)
    moved = rank0["reference.body.0.weight"] - single["sync"]["policy.body.0.weight"]
    assert moved.abs().max() > 1e-4  # a soft update (alpha=0.5): the reference trails the policy


def test_precomputed_scores_every_example_once_and_all_ranks_read_the_same_cache(ddp_states):
    ranks, single = ddp_states
    rank0, rank1 = ranks["precomputed"]
    assert rank0["cache"].shape == (NUM_PAIRS, 2)  # each rank scored half; the gathered cache covers all
    assert not torch.isnan(rank0["cache"]).any()
    assert torch.equal(rank0["cache"], rank1["cache"])
    torch.testing.assert_close(rank0["cache"], single["precomputed"]["cache"])


def test_the_sampler_shards_one_epoch_order_across_ranks(monkeypatch):
    import torch.distributed as dist

    whole = list(EpochShuffleSampler(10, seed=3))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    shards = []
    for rank in range(4):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        sampler = EpochShuffleSampler(10, seed=3)
        assert len(sampler) == 3
        shards.append(list(sampler))
    assert [shards[r][i] for i in range(3) for r in range(4)] == whole + whole[:2]  # padded like DistributedSampler


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    full = run_worker(tmp_path / "full", batch_size=32, references=("sync",), num_pairs=NUM_PAIRS)["sync"]
    accumulated = run_worker(tmp_path / "acc", batch_size=16, accumulate=2, references=("sync",),
                             num_pairs=NUM_PAIRS)["sync"]
    assert int(accumulated["global_step"]) == int(full["global_step"])
    for key, value in full.items():  # the policy and the sync reference (moved once per optimizer step)
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_bf16_mixed_precision_trains_on_cpu(make_config):
    args = ["domain.task.num_pairs=64", "domain.task.num_eval=32", "trainer.max_epochs=2", "callbacks=none"]
    full = train(make_config(*args, subdir="fp32"))
    mixed = train(make_config(*args, "trainer.precision=bf16-mixed", subdir="bf16"))
    loss, reference = mixed["train"]["train/loss"], full["train"]["train/loss"]
    assert torch.isfinite(torch.tensor(loss))
    assert loss != reference and loss == pytest.approx(reference, rel=0.05)  # bf16 rounding, same training


@pytest.mark.parametrize("reference", ["copy", "sync", "precomputed"])
def test_fsdp_wraps_policy_and_frozen_reference_as_separate_uniform_units(reference):
    module = PreferenceModule(make_policy(), reference=reference)
    policy = preference_wrap_policy(module)
    units = policy._run_policy(module, ignored_modules=set(), root_kwargs={})
    wrapped = [m for m in units if m is not module]
    assert wrapped == preference_networks(module)
    assert wrapped[0] is module.policy.network
    if reference in ("copy", "sync"):
        assert wrapped[1] is module.reference.network and len(wrapped) == 2
    for unit in wrapped:  # FSDP's rule: one requires_grad value per unit
        assert len({p.requires_grad for p in unit.parameters()}) == 1
    in_units = {id(p) for unit in wrapped for p in unit.parameters()}
    assert [n for n, p in module.named_parameters() if id(p) not in in_units] == []  # nothing left for the root


def test_fsdp_leaves_distribution_valued_networks_in_the_root_unit():
    # FSDP hooks the backward through the tensors a unit's forward returns; a control network returns a
    # torch Distribution, so wrapping it alone fails at the first backward (seen on an H100)
    from prefopt.adapters.control import ControlPolicy, GaussianMLP

    module = PreferenceModule(ControlPolicy(GaussianMLP(3, 2, (8,))), reference="copy")
    assert preference_networks(module) == []
    assert preference_networks(PreferenceModule(make_policy(), reference="copy")) != []


def test_gradient_clipping_by_norm_goes_through_fsdp_under_fsdp():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from prefopt.distributed import clip_fsdp_gradients

    calls = []
    strategy = FSDPStrategy()
    strategy.model = SimpleNamespace(clip_grad_norm_=calls.append)
    assert clip_fsdp_gradients(strategy, 1.5, "norm") and calls == [1.5]
    assert clip_fsdp_gradients(strategy, 2.0, None) and calls == [1.5, 2.0]
    assert not clip_fsdp_gradients(strategy, 1.0, "value")  # Lightning's own path handles value clipping
    assert not clip_fsdp_gradients(strategy, None, "norm") and len(calls) == 2
    assert not clip_fsdp_gradients(SimpleNamespace(), 1.0, "norm")  # not FSDP: Lightning clips as usual


def test_a_gathered_full_state_dict_loads_into_a_plain_policy_copy():
    # what train() does after fit under FSDP: the module's full state dict (policy.*, reference.*) -> a
    # plain copy of the policy taken before fit
    from prefopt.distributed import is_fsdp, load_policy_state

    trained = PreferenceModule(make_policy(seed=1), reference="copy")
    template = make_policy(seed=2)
    load_policy_state(template, trained.state_dict())
    for (name, a), (_, b) in zip(template.state_dict().items(), trained.policy.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="Missing key"):
        load_policy_state(make_policy(), {"reference.network.0.weight": torch.zeros(16, 3)})
    assert not is_fsdp(object())
