"""Tests for prefopt.losses: every loss type against values worked out by hand from its formula.

Shared batch of three pairs (float64 so that hand arithmetic and torch agree to ~1e-12):

    policy chosen  [ 0.0, -1.0, -2.0]   ref chosen   [-1.0, -0.5, -2.0]   -> u_c = [ 1.0, -0.5, 0.0]
    policy reject  [-1.0, -2.0, -1.0]   ref rejected [-0.5, -2.0, -3.0]   -> u_r = [-0.5,  0.0, 2.0]
    margin d = u_c - u_r = [1.5, -0.5, -2.0],  beta = 0.5 unless a test says otherwise.

The expected values below are written out with ``math`` from each formula, never by calling the
function under test.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from prefopt.errors import PrefoptError
from prefopt.losses import (LOSS_TYPES, REFERENCE_FREE, LossConfig, PreferenceLossOutput, compute_loss,
                            normalize_loss_type, preference_loss)

PC = [0.0, -1.0, -2.0]
PR = [-1.0, -2.0, -1.0]
RC = [-1.0, -0.5, -2.0]
RR = [-0.5, -2.0, -3.0]
UC = [1.0, -0.5, 0.0]
UR = [-0.5, 0.0, 2.0]
D = [1.5, -0.5, -2.0]
LC = [2.0, 1.0, 4.0]  # chosen lengths
LR = [1.0, 2.0, 4.0]  # rejected lengths
BETA = 0.5


def t(values, requires_grad=False, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


def ls(x: float) -> float:
    """log sigmoid(x), written out."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def run(loss_type, *, refs=True, **kwargs) -> PreferenceLossOutput:
    kwargs.setdefault("beta", BETA)
    ref_c, ref_r = (t(RC), t(RR)) if refs else (None, None)
    return preference_loss(loss_type, t(PC), t(PR), ref_c, ref_r, **kwargs)


def close(actual: torch.Tensor, expected) -> None:
    assert actual.shape == (len(expected),)
    assert actual.tolist() == pytest.approx(list(expected), rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Registry


def test_registry():
    assert set(LOSS_TYPES) == {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "cpl",
    }
    assert len(LOSS_TYPES) == len(set(LOSS_TYPES))
    assert REFERENCE_FREE == frozenset({"sft", "simpo", "cpl"})


def test_package_exports():
    import prefopt

    assert prefopt.preference_loss is preference_loss
    assert prefopt.LOSS_TYPES == LOSS_TYPES


def test_dpo_is_an_alias_of_sigmoid():
    assert normalize_loss_type("dpo") == ("sigmoid",)
    assert normalize_loss_type(["dpo", "sft"]) == ("sigmoid", "sft")
    close(run("dpo").losses, [-ls(BETA * d) for d in D])
    with pytest.raises(PrefoptError, match=r"loss_type='dop'.*dpo, an alias of sigmoid"):
        normalize_loss_type("dop")


def test_loss_config_is_checked_once_at_construction_and_frozen():
    config = LossConfig(loss_type="dpo", beta=0.5)
    assert config.loss_type == ("sigmoid",) and config.loss_weights == (1.0,) and config.needs_reference
    assert not LossConfig(loss_type=["simpo", "cpl"]).needs_reference
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.beta = 1.0
    with pytest.raises(PrefoptError, match="label_smoothing"):
        LossConfig(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(PrefoptError, match="unknown loss option.*'betta'"):
        LossConfig.from_mapping({"loss_type": "ipo", "betta": 0.1})
    # the step's entry point reads no option again: same numbers as the checked public function
    out = compute_loss(config, t(PC), t(PR), t(RC), t(RR))
    close(out.losses, [-ls(BETA * d) for d in D])
    with pytest.raises(PrefoptError, match="chosen_lengths"):
        compute_loss(LossConfig(loss_type="sigmoid_norm"), t(PC), t(PR), t(RC), t(RR))


# ------------------------------------------------------------------------------------------------
# Reference-based losses, one by one


def test_sigmoid():
    close(run("sigmoid").losses, [-ls(BETA * d) for d in D])


def test_sigmoid_cdpo_label_smoothing():
    eps = 0.1
    close(
        run("sigmoid", label_smoothing=eps).losses,
        [-(1 - eps) * ls(BETA * d) - eps * ls(-BETA * d) for d in D],
    )


def test_hinge():
    # relu(1 - 0.5 * [1.5, -0.5, -2.0])
    close(run("hinge").losses, [0.25, 1.25, 2.0])


def test_ipo_raw_log_ratios():
    # (d - 1/(2 * 0.5))^2 = (d - 1)^2
    close(run("ipo").losses, [0.25, 2.25, 9.0])


def test_ipo_length_normalized():
    # d' = u_c / L_c - u_r / L_r = [1/2 + 1/2, -1/2 - 0, 0 - 2/4] = [1.0, -0.5, -0.5]
    out = run("ipo", chosen_lengths=t(LC), rejected_lengths=t(LR))
    close(out.losses, [0.0, 2.25, 2.25])
    close(out.chosen_rewards, [BETA * u for u in UC])  # rewards stay unnormalized


def test_ipo_scalar_lengths():
    # both lengths 2 -> d' = d / 2 = [0.75, -0.25, -1.0]
    close(run("ipo", chosen_lengths=2, rejected_lengths=2.0).losses, [0.0625, 1.5625, 4.0])


def test_exo_pair():
    eps = 1e-3
    expected = []
    for d in D:
        z = BETA * d
        expected.append(sig(z) * (ls(z) - math.log(1 - eps)) + sig(-z) * (ls(-z) - math.log(eps)))
    close(run("exo_pair", label_smoothing=eps).losses, expected)


def test_nca_pair():
    expected = [
        -ls(BETA * uc) - 0.5 * ls(-BETA * uc) - 0.5 * ls(-BETA * ur) for uc, ur in zip(UC, UR)
    ]
    close(run("nca_pair").losses, expected)


def test_robust():
    eps = 0.1
    expected = [(-(1 - eps) * ls(BETA * d) + eps * ls(-BETA * d)) / (1 - 2 * eps) for d in D]
    close(run("robust", label_smoothing=eps).losses, expected)


def test_robust_without_smoothing_is_sigmoid():
    close(run("robust").losses, [-ls(BETA * d) for d in D])


def test_bco_pair_default_delta_is_batch_mean():
    rc = [BETA * u for u in UC]  # [0.5, -0.25, 0.0]
    rr = [BETA * u for u in UR]  # [-0.25, 0.0, 1.0]
    delta = (sum(rc) + sum(rr)) / 6  # = 1/6
    assert delta == pytest.approx(1 / 6)
    close(run("bco_pair").losses, [-ls(c - delta) - ls(delta - r) for c, r in zip(rc, rr)])


def test_bco_pair_explicit_delta():
    delta = 0.2
    expected = [-ls(BETA * uc - delta) - ls(delta - BETA * ur) for uc, ur in zip(UC, UR)]
    close(run("bco_pair", bco_delta=delta).losses, expected)


def test_sppo_hard():
    # (u_c - 1)^2 + (u_r + 1)^2 with 1/(2 beta) = 1
    close(run("sppo_hard").losses, [0.25, 3.25, 10.0])


def test_aot_sorts_policy_and_reference_margins():
    # policy margins lp_c - lp_r = [1, 1, -1] -> sorted [-1, 1, 1]
    # reference margins          = [-0.5, 1.5, 1.0] -> sorted [-0.5, 1.0, 1.5]
    diff = [-0.5, 0.0, -0.5]
    close(run("aot").losses, [-ls(BETA * x) for x in diff])
    eps = 0.2
    close(
        run("aot", label_smoothing=eps).losses,
        [-(1 - eps) * ls(BETA * x) - eps * ls(-BETA * x) for x in diff],
    )


def test_aot_unpaired_sorts_chosen_and_rejected_ratios():
    # sorted u_c = [-0.5, 0, 1], sorted u_r = [-0.5, 0, 2] -> diff [0, 0, -1]
    close(run("aot_unpaired").losses, [math.log(2), math.log(2), -ls(-0.5)])


def test_apo_zero():
    expected = [1 - sig(BETA * uc) + sig(BETA * ur) for uc, ur in zip(UC, UR)]
    close(run("apo_zero").losses, expected)


def test_apo_down():
    expected = [sig(BETA * uc) + 1 - sig(BETA * d) for uc, d in zip(UC, D)]
    close(run("apo_down").losses, expected)


def discopop_expected(d: float, tau: float, beta: float = BETA) -> float:
    z = beta * d
    m = sig(z / tau)
    return (1 - m) * -ls(z) + m * math.exp(-z)


def test_discopop_default_tau():
    close(run("discopop").losses, [discopop_expected(d, 0.05) for d in D])


def test_discopop_custom_tau():
    close(run("discopop", discopop_tau=2.0).losses, [discopop_expected(d, 2.0) for d in D])


def test_discopop_stays_finite_for_very_negative_margins():
    # float32: exp(400) overflows, and sigmoid(-8000) == 0, so m * exp(-z) would be 0 * inf.
    out = preference_loss(
        "discopop", t([-400.0], dtype=torch.float32), t([0.0], dtype=torch.float32),
        t([0.0], dtype=torch.float32), t([0.0], dtype=torch.float32), beta=1.0,
    )
    assert torch.isfinite(out.losses).all()
    assert out.losses.item() == pytest.approx(400.0)


def test_sigmoid_norm():
    # d' = [1.0, -0.5, -0.5] as in the ipo test
    out = run("sigmoid_norm", chosen_lengths=t(LC), rejected_lengths=t(LR))
    close(out.losses, [-ls(BETA * x) for x in (1.0, -0.5, -0.5)])


def test_reference_based_rewards():
    out = run("sigmoid")
    close(out.chosen_rewards, [0.5, -0.25, 0.0])
    close(out.rejected_rewards, [-0.25, 0.0, 1.0])
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


# ------------------------------------------------------------------------------------------------
# Reference-free losses


def test_sft_with_lengths():
    # -lp_c / L_c = [0/2, 1/1, 2/4]
    out = run("sft", refs=False, chosen_lengths=t(LC))
    close(out.losses, [0.0, 1.0, 0.5])
    close(out.chosen_rewards, [BETA * x for x in PC])  # no refs -> beta * logps
    close(out.rejected_rewards, [BETA * x for x in PR])


def test_sft_without_lengths_and_rewards_with_refs():
    out = run("sft")
    close(out.losses, [0.0, 1.0, 2.0])
    close(out.chosen_rewards, [BETA * u for u in UC])  # refs given -> beta * log-ratio
    close(out.rejected_rewards, [BETA * u for u in UR])


def test_simpo():
    # averages: chosen [0/2, -1/1, -2/4] = [0, -1, -0.5]; rejected [-1/1, -2/2, -1/4] = [-1, -1, -0.25]
    # beta = 2, gamma = 0.5: z = 2 * [1, 0, -0.25] - 0.5 = [1.5, -0.5, -1.0]
    out = run("simpo", refs=False, beta=2.0, chosen_lengths=t(LC), rejected_lengths=t(LR))
    close(out.losses, [-ls(z) for z in (1.5, -0.5, -1.0)])
    close(out.chosen_rewards, [0.0, -2.0, -1.0])
    close(out.rejected_rewards, [-2.0, -2.0, -0.5])


def test_simpo_gamma_is_not_divided_by_beta_and_label_smoothing():
    eps = 0.1
    out = run(
        "simpo", refs=False, beta=2.0, simpo_gamma=1.0, label_smoothing=eps,
        chosen_lengths=t(LC), rejected_lengths=t(LR),
    )
    zs = [2.0 * x - 1.0 for x in (1.0, 0.0, -0.25)]
    close(out.losses, [-(1 - eps) * ls(z) - eps * ls(-z) for z in zs])


def test_simpo_ignores_given_references():
    kw = dict(beta=2.0, chosen_lengths=t(LC), rejected_lengths=t(LR))
    with_refs, without = run("simpo", **kw), run("simpo", refs=False, **kw)
    close(with_refs.losses, without.losses.tolist())
    close(with_refs.chosen_rewards, without.chosen_rewards.tolist())


def test_cpl_conservative_lambda():
    # z = 0.5 * lp_c - 0.5 * 0.5 * lp_r = [0 + 0.25, -0.5 + 0.5, -1 + 0.25]
    out = run("cpl", refs=False, cpl_lambda=0.5)
    close(out.losses, [-ls(0.25), math.log(2), -ls(-0.75)])
    close(out.chosen_rewards, [0.0, -0.5, -1.0])
    close(out.rejected_rewards, [-0.5, -1.0, -0.5])


def test_cpl_unbiased_default():
    # z = 0.5 * (lp_c - lp_r) = [0.5, 0.5, -0.5]
    close(run("cpl", refs=False).losses, [-ls(0.5), -ls(0.5), -ls(-0.5)])


# ------------------------------------------------------------------------------------------------
# f-divergences


def sigmoid_on_scores(sc, sr, beta=BETA):
    return [-ls(beta * (c - r)) for c, r in zip(sc, sr)]


def test_forward_kl():
    sc = [1 - math.exp(-u) for u in UC]  # f'(t) = 1 - 1/t
    sr = [1 - math.exp(-u) for u in UR]
    out = run("sigmoid", f_divergence_type="forward_kl")
    close(out.losses, sigmoid_on_scores(sc, sr))
    close(out.chosen_rewards, [BETA * u for u in UC])  # rewards are the plain log-ratios


def test_js_divergence():
    sc = [math.log(2) + ls(u) for u in UC]  # f'(t) = log(2t / (t + 1))
    sr = [math.log(2) + ls(u) for u in UR]
    close(run("sigmoid", f_divergence_type="js_divergence").losses, sigmoid_on_scores(sc, sr))


@pytest.mark.parametrize("alpha", [0.5, 2.0, 0.0])
def test_alpha_divergence(alpha):
    if alpha == 0.0:  # a = 0 is forward KL: (exp(-u) - 1) / -1
        score = lambda u: 1 - math.exp(-u)  # noqa: E731
    else:  # f'(t) = (t^(a-1) - 1) / (a - 1)
        score = lambda u: (math.exp((alpha - 1) * u) - 1) / (alpha - 1)  # noqa: E731
    out = run("sigmoid", f_divergence_type="alpha_divergence", alpha_divergence_coef=alpha)
    close(out.losses, sigmoid_on_scores([score(u) for u in UC], [score(u) for u in UR]))


def test_alpha_divergence_at_one_is_reverse_kl():
    close(run("sigmoid", f_divergence_type="alpha_divergence", alpha_divergence_coef=1.0).losses,
          [-ls(BETA * d) for d in D])


def test_alpha_divergence_default_coefficient_is_one_half():
    # TRL's DPOConfig.f_alpha_divergence_coef = 0.5: s = (exp(-u/2) - 1) / (-1/2) = 2 (1 - exp(-u/2))
    score = lambda u: 2 * (1 - math.exp(-u / 2))  # noqa: E731
    close(run("sigmoid", f_divergence_type="alpha_divergence").losses,
          sigmoid_on_scores([score(u) for u in UC], [score(u) for u in UR]))


def test_alpha_divergence_exponent_is_capped():
    out = preference_loss(
        "sigmoid", t([1000.0], dtype=torch.float32), t([0.0], dtype=torch.float32),
        t([0.0], dtype=torch.float32), t([0.0], dtype=torch.float32), beta=0.1,
        f_divergence_type="alpha_divergence", alpha_divergence_coef=2.0,
    )
    assert torch.isfinite(out.losses).all()


@pytest.mark.parametrize("name", ["nca_pair", "bco_pair", "sppo_hard"])
def test_f_divergence_is_refused_where_log_z_does_not_cancel(name):
    # TRL 1.16 refuses these too: their per-side terms keep the f-DPO reparameterization's b log Z(x)
    with pytest.raises(PrefoptError, match="f_divergence_type"):
        run(name, f_divergence_type="js_divergence")


def test_f_divergence_with_length_normalized_ipo():
    # the constant 1 of forward KL's score does not cancel once each side is divided by its length
    sc = [(1 - math.exp(-u)) / n for u, n in zip(UC, LC)]
    sr = [(1 - math.exp(-u)) / n for u, n in zip(UR, LR)]
    out = run("ipo", f_divergence_type="forward_kl", chosen_lengths=t(LC), rejected_lengths=t(LR))
    close(out.losses, [(c - r - 1.0) ** 2 for c, r in zip(sc, sr)])


# ------------------------------------------------------------------------------------------------
# Combinations


def test_weighted_combination():
    out = run(["sigmoid", "sft"], loss_weights=[0.8, 0.2], chosen_lengths=t(LC))
    sft = [0.0, 1.0, 0.5]
    close(out.losses, [0.8 * -ls(BETA * d) + 0.2 * s for d, s in zip(D, sft)])
    close(out.chosen_rewards, [BETA * u for u in UC])  # standard DPO rewards
    close(out.rejected_rewards, [BETA * u for u in UR])


def test_combination_default_weights_are_one():
    # hinge [0.25, 1.25, 2.0] + ipo [0.25, 2.25, 9.0]
    close(run(("hinge", "ipo")).losses, [0.5, 3.5, 11.0])


def test_combination_shares_label_smoothing_with_types_that_use_it():
    eps = 0.1
    out = run(["sigmoid", "sft"], label_smoothing=eps)
    expected = [-(1 - eps) * ls(BETA * d) - eps * ls(-BETA * d) - pc for d, pc in zip(D, PC)]
    close(out.losses, expected)


def test_reference_free_combination_rewards():
    out = run(["simpo", "cpl"], refs=False, chosen_lengths=t(LC), rejected_lengths=t(LR))
    close(out.chosen_rewards, [BETA * x for x in PC])  # beta * logps, not the simpo averages


def test_single_element_list_matches_string():
    a = run(["simpo"], refs=False, beta=2.0, chosen_lengths=t(LC), rejected_lengths=t(LR), loss_weights=[1.0])
    b = run("simpo", refs=False, beta=2.0, chosen_lengths=t(LC), rejected_lengths=t(LR))
    close(a.losses, b.losses.tolist())
    close(a.chosen_rewards, b.chosen_rewards.tolist())


def test_default_valued_options_are_accepted_by_any_type():
    out = run("sigmoid", simpo_gamma=0.5, cpl_lambda=1.0, bco_delta=None, discopop_tau=0.05,
              f_divergence_type="reverse_kl", alpha_divergence_coef=0.5, loss_weights=None)
    close(out.losses, [-ls(BETA * d) for d in D])


# ------------------------------------------------------------------------------------------------
# Shapes and gradients, every type


def call_kwargs(name: str) -> dict:
    kwargs = {"beta": BETA}
    if name == "exo_pair":
        kwargs["label_smoothing"] = 1e-3
    if name in ("simpo", "sigmoid_norm", "ipo", "sft"):
        kwargs["chosen_lengths"] = t(LC)
        kwargs["rejected_lengths"] = t(LR)
    return kwargs


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_gradients_reach_policy_only(name):
    pc, pr = t(PC, requires_grad=True), t(PR, requires_grad=True)
    rc, rr = t(RC, requires_grad=True), t(RR, requires_grad=True)
    out = preference_loss(name, pc, pr, rc, rr, **call_kwargs(name))
    assert out.losses.shape == (3,)
    assert torch.isfinite(out.losses).all()
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert pc.grad is not None and torch.isfinite(pc.grad).all() and pc.grad.abs().sum() > 0
    if name != "sft":  # sft only reads the chosen sample
        assert pr.grad is not None and torch.isfinite(pr.grad).all() and pr.grad.abs().sum() > 0
    assert rc.grad is None and rr.grad is None


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_types_accept_no_references(name):
    pc = t(PC, requires_grad=True)
    out = preference_loss(name, pc, t(PR), None, None, **call_kwargs(name))
    assert out.losses.shape == (3,)
    out.losses.sum().backward()
    assert pc.grad is not None


# ------------------------------------------------------------------------------------------------
# Bad inputs: each raises PrefoptError naming the option


def base(**overrides):
    kwargs = dict(
        loss_type="sigmoid", policy_chosen_logps=t(PC), policy_rejected_logps=t(PR),
        ref_chosen_logps=t(RC), ref_rejected_logps=t(RR), beta=BETA,
    )
    kwargs.update(overrides)
    return kwargs


LENGTHS = dict(chosen_lengths=t(LC), rejected_lengths=t(LR))

BAD_INPUTS = [
    ("unknown loss type", base(loss_type="dop"), "loss_type"),
    ("unknown name in a list", base(loss_type=["sigmoid", "nope"]), "loss_type"),
    ("empty list", base(loss_type=[]), "loss_type"),
    ("not a name", base(loss_type=3), "loss_type"),
    ("beta zero", base(beta=0.0), "beta"),
    ("beta negative", base(beta=-1.0), "beta"),
    ("beta nan", base(beta=float("nan")), "beta"),
    ("beta bool", base(beta=True), "beta"),
    ("beta string", base(beta="0.1"), "beta"),
    ("label smoothing 0.5", base(label_smoothing=0.5), "label_smoothing"),
    ("label smoothing negative", base(label_smoothing=-0.1), "label_smoothing"),
    ("label smoothing unused", base(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
    ("label smoothing unused by cpl", base(loss_type="cpl", label_smoothing=0.1), "label_smoothing"),
    ("exo_pair needs smoothing", base(loss_type="exo_pair"), "label_smoothing"),
    ("unknown option", base(foo=1), "foo"),
    ("bad f-divergence", base(f_divergence_type="kl"), "f_divergence_type"),
    ("f-divergence unused", base(loss_type="aot", f_divergence_type="forward_kl"), "f_divergence_type"),
    ("f-divergence with apo", base(loss_type="apo_zero", f_divergence_type="js_divergence"), "f_divergence_type"),
    ("alpha coef without alpha", base(alpha_divergence_coef=0.3), "alpha_divergence_coef"),
    ("alpha coef not a number", base(f_divergence_type="alpha_divergence", alpha_divergence_coef="a"),
     "alpha_divergence_coef"),
    ("cpl lambda zero", base(loss_type="cpl", cpl_lambda=0.0), "cpl_lambda"),
    ("cpl lambda above one", base(loss_type="cpl", cpl_lambda=1.5), "cpl_lambda"),
    ("cpl lambda unused", base(cpl_lambda=0.5), "cpl_lambda"),
    ("discopop tau zero", base(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    ("discopop tau unused", base(discopop_tau=0.1), "discopop_tau"),
    ("simpo gamma negative", base(loss_type="simpo", simpo_gamma=-1.0, **LENGTHS), "simpo_gamma"),
    ("simpo gamma unused", base(simpo_gamma=1.0), "simpo_gamma"),
    ("bco delta not a number", base(loss_type="bco_pair", bco_delta="x"), "bco_delta"),
    ("bco delta unused", base(bco_delta=0.1), "bco_delta"),
    ("weights length", base(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights"),
    ("weights negative", base(loss_type=["sigmoid", "sft"], loss_weights=[1.0, -1.0]), "loss_weights"),
    ("weights string", base(loss_type=["sigmoid", "sft"], loss_weights="ab"), "loss_weights"),
    ("missing refs", base(ref_chosen_logps=None, ref_rejected_logps=None), "ref_chosen_logps"),
    ("missing refs in a combination", base(loss_type=["sft", "sigmoid"], ref_chosen_logps=None,
                                           ref_rejected_logps=None), "ref_chosen_logps"),
    ("only one ref", base(loss_type="sft", ref_rejected_logps=None), "ref_rejected_logps"),
    ("simpo without lengths", base(loss_type="simpo"), "chosen_lengths"),
    ("sigmoid_norm without rejected lengths", base(loss_type="sigmoid_norm", chosen_lengths=t(LC)),
     "rejected_lengths"),
    ("ipo with one length", base(loss_type="ipo", chosen_lengths=t(LC)), "rejected_lengths"),
    ("zero length", base(loss_type="simpo", chosen_lengths=t([1.0, 0.0, 2.0]), rejected_lengths=t(LR)),
     "chosen_lengths"),
    ("length shape", base(loss_type="simpo", chosen_lengths=t(LC), rejected_lengths=t([1.0, 2.0])),
     "rejected_lengths"),
    ("policy shape mismatch", base(policy_rejected_logps=t([1.0, 2.0])), "policy_rejected_logps"),
    ("policy not 1-D", base(policy_chosen_logps=t([[0.0], [1.0], [2.0]])), "policy_chosen_logps"),
    ("policy integer", base(policy_chosen_logps=torch.tensor([0, 1, 2])), "policy_chosen_logps"),
    ("policy not a tensor", base(policy_chosen_logps=[0.0, 1.0, 2.0]), "policy_chosen_logps"),
    ("ref shape mismatch", base(ref_chosen_logps=t([1.0])), "ref_chosen_logps"),
]


@pytest.mark.parametrize("kwargs, option", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs(kwargs, option):
    with pytest.raises(PrefoptError) as info:
        preference_loss(**kwargs)
    message = str(info.value)
    assert option in message
    assert "allowed" in message or "known options" in message
    assert isinstance(info.value, ValueError)


def test_unknown_option_lists_known_options():
    with pytest.raises(PrefoptError, match="cpl_lambda") as info:
        preference_loss(**base(simpo_margin=1.0))
    assert "simpo_margin" in str(info.value)


def test_bad_value_is_in_the_message():
    with pytest.raises(PrefoptError, match=r"beta=-2\.0"):
        preference_loss(**base(beta=-2.0))
    with pytest.raises(PrefoptError, match="'sigmoid_plus'"):
        preference_loss(**base(loss_type="sigmoid_plus"))
