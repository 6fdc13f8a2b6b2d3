"""Scripted B-Pref teachers: each label rule checked against its definition."""

import math

import numpy as np
import pytest
import torch

from prefopt.data.teachers import TEACHER_KINDS, Labels, ScriptedTeacher, to_pairs
from prefopt.errors import PrefoptError


def test_oracle_prefers_higher_return_and_first_on_draw():
    r1 = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0], [1.0, 1.0]])
    r2 = torch.tensor([[0.0, 2.0], [0.0, 0.5], [1.0, 1.0], [1.0, 1.0]])
    lab = ScriptedTeacher("oracle").label(r1, r2)
    assert lab.preference.dtype == torch.int64
    assert lab.preference.tolist() == [0, 1, 0, 0]  # third: 2 vs 2 is a draw -> first
    assert not lab.tie.any() and lab.keep.all()


def test_scalar_rewards_are_one_step_segments():
    lab = ScriptedTeacher().label(np.array([0.3, 0.9]), np.array([0.5, 0.1]))
    assert lab.preference.tolist() == [1, 0]


def test_myopic_disagrees_with_oracle_on_early_reward():
    # first segment earns 1.0 at the first step, second 0.9 at the last step.
    r1 = torch.tensor([[1.0, 0.0, 0.0]])
    r2 = torch.tensor([[0.0, 0.0, 0.9]])
    assert ScriptedTeacher("oracle").label(r1, r2).preference.item() == 0
    myopic = ScriptedTeacher("myopic")
    assert myopic.gamma == 0.9
    # discounted: 1.0 * 0.9**2 = 0.81 < 0.9
    assert myopic.label(r1, r2).preference.item() == 1
    assert torch.allclose(myopic.returns(r1, discounted=True), torch.tensor([0.81], dtype=torch.float64))


def test_myopic_weights_are_gamma_power_h_minus_1_minus_t():
    teacher = ScriptedTeacher(gamma=0.5)
    h = 4
    for t in range(h):
        r = torch.zeros(1, h)
        r[0, t] = 1.0
        assert teacher.returns(r, discounted=True).item() == pytest.approx(0.5 ** (h - 1 - t))


def test_myopic_discounts_padded_segment_from_its_own_end():
    teacher = ScriptedTeacher(gamma=0.5)
    r = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, False]])
    # real length 2: weights 0.5, 1
    assert teacher.returns(r, mask, discounted=True).item() == pytest.approx(2.5)


def test_mask_ignores_padded_rewards():
    r1 = torch.tensor([[1.0, 100.0]])
    r2 = torch.tensor([[2.0, 0.0]])
    mask1 = torch.tensor([[True, False]])
    assert ScriptedTeacher().label(r1, r2).preference.item() == 0
    assert ScriptedTeacher().label(r1, r2, mask1=mask1).preference.item() == 1


def test_stochastic_frequencies_follow_bradley_terry():
    beta = 1.5
    gaps = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])  # R1 - R2
    reps = 20000
    r1 = gaps.repeat(reps)[:, None]
    r2 = torch.zeros_like(r1)
    teacher = ScriptedTeacher("stochastic", beta=beta, seed=3)
    lab = teacher.label(r1, r2)
    first = (lab.preference == 0).to(torch.float64).reshape(reps, len(gaps)).mean(0)
    expected = torch.sigmoid(beta * gaps.to(torch.float64))
    # standard error <= 0.5 / sqrt(20000) ~ 0.0035
    assert torch.allclose(first, expected, atol=0.015), (first, expected)


def test_stochastic_is_reproducible_and_accepts_generators():
    r1, r2 = torch.randn(500, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(500, 3)
    a = ScriptedTeacher("stochastic", seed=7).label(r1, r2).preference
    b = ScriptedTeacher("stochastic", seed=7).label(r1, r2).preference
    assert torch.equal(a, b)
    t = ScriptedTeacher("stochastic", seed=7)
    first_call = t.label(r1, r2).preference
    assert not torch.equal(first_call, t.label(r1, r2).preference)  # stream continues
    t.reset()
    assert torch.equal(first_call, t.label(r1, r2).preference)
    n1 = t.label(r1, r2, generator=np.random.default_rng(1)).preference
    n2 = t.label(r1, r2, generator=np.random.default_rng(1)).preference
    assert torch.equal(n1, n2)
    g1 = t.label(r1, r2, generator=torch.Generator().manual_seed(5)).preference
    g2 = t.label(r1, r2, generator=torch.Generator().manual_seed(5)).preference
    assert torch.equal(g1, g2)


def test_beta_zero_is_a_fair_coin():
    lab = ScriptedTeacher(beta=0.0, seed=1).label(torch.full((20000, 1), 10.0), torch.zeros(20000, 1))
    assert lab.preference.float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_mistake_flip_rate_matches_eps():
    n = 40000
    r1 = torch.rand(n, 5, generator=torch.Generator().manual_seed(0))
    r2 = torch.rand(n, 5, generator=torch.Generator().manual_seed(1))
    oracle = ScriptedTeacher("oracle").label(r1, r2).preference
    teacher = ScriptedTeacher("mistake", seed=2)
    assert teacher.eps == 0.1
    flipped = (teacher.label(r1, r2).preference != oracle).float().mean().item()
    assert flipped == pytest.approx(0.1, abs=0.01)
    high = (ScriptedTeacher(eps=0.3, seed=4).label(r1, r2).preference != oracle).float().mean().item()
    assert high == pytest.approx(0.3, abs=0.01)
    always = ScriptedTeacher(eps=1.0).label(r1, r2).preference
    assert torch.equal(always, 1 - oracle)


def test_skip_threshold_is_strict_on_the_better_return():
    thr = 1.0
    r1 = torch.tensor([[0.5, 0.5], [0.25, 0.25], [2.0, 0.0], [0.0, 0.0]])
    r2 = torch.tensor([[0.0, 0.0], [0.25, 0.5], [-5.0, 0.0], [0.5, 0.75]])
    # max returns: 1.0 (== thr, dropped), 0.75 (dropped), 2.0 (kept), 1.25 (kept)
    lab = ScriptedTeacher("skip", skip_threshold=thr).label(r1, r2)
    assert lab.keep.tolist() == [False, False, True, True]
    assert lab.preference.tolist() == [0, 1, 0, 1]  # labels still computed for skipped rows


def test_equal_threshold_is_strict_on_the_gap():
    thr = 0.5
    r1 = torch.tensor([[1.0], [1.0], [1.0], [1.0], [1.0]])
    r2 = torch.tensor([[1.5], [1.25], [0.5], [0.75], [2.0]])
    # gaps: 0.5 (== thr, not a tie), 0.25 (tie), 0.5 (not), 0.25 (tie), 1.0 (not)
    lab = ScriptedTeacher("equal", equal_threshold=thr).label(r1, r2)
    assert lab.tie.tolist() == [False, True, False, True, False]
    assert lab.preference.tolist() == [1, 0, 0, 0, 1]
    assert lab.target().tolist() == [1.0, 0.5, 0.0, 0.5, 1.0]
    assert lab.keep.all()


def test_skip_and_equal_use_undiscounted_returns():
    # Undiscounted returns 1.0 vs 1.0 (tie), though myopia would separate them.
    r1 = torch.tensor([[1.0, 0.0]])
    r2 = torch.tensor([[0.0, 1.0]])
    t = ScriptedTeacher("myopic", gamma=0.5, equal_threshold=0.1, skip_threshold=0.9)
    lab = t.label(r1, r2)
    assert lab.tie.item() and lab.keep.item()


def test_composed_teacher_ties_override_mistakes():
    r1 = torch.zeros(1000, 2)
    r2 = torch.cat([torch.zeros(500, 2), torch.ones(500, 2)])
    lab = ScriptedTeacher(eps=1.0, equal_threshold=0.5).label(r1, r2)
    assert lab.tie[:500].all() and not lab.tie[500:].any()
    assert (lab.preference[:500] == 0).all()  # ties carry preference 0
    assert (lab.preference[500:] == 0).all()  # oracle would say 1, always flipped


def test_presets_fill_only_unset_parameters():
    assert ScriptedTeacher("stochastic").beta == 1.0
    assert ScriptedTeacher("stochastic", beta=3.0).beta == 3.0
    t = ScriptedTeacher("myopic", eps=0.2)
    assert (t.gamma, t.eps, t.rational) == (0.9, 0.2, True)
    o = ScriptedTeacher()
    assert (o.kind, o.beta, o.gamma, o.eps, o.skip_threshold, o.equal_threshold) == ("oracle", math.inf, 1.0, 0.0, None, None)
    for kind in TEACHER_KINDS:
        extra = {"skip": {"skip_threshold": 0.0}, "equal": {"equal_threshold": 0.1}}.get(kind, {})
        assert isinstance(ScriptedTeacher(kind, **extra).label(torch.ones(3, 2), torch.zeros(3, 2)), Labels)


def test_bad_kind_names_it():
    with pytest.raises(PrefoptError, match="'optimal'") as e:
        ScriptedTeacher("optimal")
    assert "oracle" in str(e.value) and "myopic" in str(e.value)
    with pytest.raises(PrefoptError, match="kind"):
        ScriptedTeacher(kind=3)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"beta": -1.0}, "beta"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"eps": 1.2}, "eps"),
        ({"equal_threshold": -0.1}, "equal_threshold"),
        ({"skip_threshold": math.nan}, "skip_threshold"),
        ({"kind": "skip"}, "skip_threshold"),
        ({"kind": "equal"}, "equal_threshold"),
    ],
)
def test_bad_parameters_raise(kwargs, word):
    with pytest.raises(PrefoptError, match=word):
        ScriptedTeacher(**kwargs)


def test_bad_rewards_raise():
    t = ScriptedTeacher()
    with pytest.raises(PrefoptError, match="r2: row 1"):
        t.label(torch.zeros(3, 2), torch.tensor([[0.0, 0.0], [0.0, math.inf], [0.0, 0.0]]))
    with pytest.raises(PrefoptError, match="3 pairs but r2 has 2"):
        t.label(torch.zeros(3, 2), torch.zeros(2, 2))
    with pytest.raises(PrefoptError, match="r1.*dims"):
        t.label(torch.zeros(3, 2, 1), torch.zeros(3, 2))
    with pytest.raises(PrefoptError, match="r1.*dtype"):
        t.label(np.array(["a", "b"]), np.zeros(2))
    with pytest.raises(PrefoptError, match="mask1"):
        t.label(torch.zeros(3, 2), torch.zeros(3, 2), mask1=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(PrefoptError, match="generator"):
        t.label(torch.zeros(3, 2), torch.zeros(3, 2), generator=42)


def test_to_pairs_orders_kept_pairs_and_passes_ties():
    a = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    b = torch.tensor([[20.0], [21.0], [22.0], [23.0]])
    labels = Labels(
        preference=torch.tensor([0, 1, 1, 0]),
        tie=torch.tensor([False, False, False, True]),
        keep=torch.tensor([True, True, False, True]),
    )
    out = to_pairs(a, b, labels)
    assert len(out) == 3
    assert out.index.tolist() == [0, 1, 3]
    assert out.chosen[:, 0].tolist() == [10.0, 21.0, 13.0]
    assert out.rejected[:, 0].tolist() == [20.0, 11.0, 23.0]
    assert out.tie.tolist() == [False, False, True]
    # dicts of arrays and lists keep their container types
    d = to_pairs({"x": a.numpy(), "name": ["a0", "a1", "a2", "a3"]}, {"x": b.numpy(), "name": ["b0", "b1", "b2", "b3"]}, labels)
    assert isinstance(d.chosen["x"], np.ndarray)
    assert d.chosen["name"] == ["a0", "b1", "a3"] and d.rejected["name"] == ["b0", "a1", "b3"]


def test_to_pairs_with_teacher_labels_puts_higher_return_first():
    g = torch.Generator().manual_seed(0)
    r1, r2 = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    out = to_pairs(r1, r2, ScriptedTeacher().label(r1, r2))
    assert (out.chosen.sum(1) >= out.rejected.sum(1)).all()


def test_to_pairs_bad_inputs():
    labels = ScriptedTeacher().label(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(PrefoptError, match="items_b has 2 items"):
        to_pairs(torch.zeros(3, 1), torch.zeros(2, 1), labels)
    with pytest.raises(PrefoptError, match="same keys"):
        to_pairs({"x": torch.zeros(3)}, {"y": torch.zeros(3)}, labels)
