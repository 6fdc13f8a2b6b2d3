"""prefopt.feedback.losses against hand computations, against TRL's own KTO code, and K=2 == DPO."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prefopt.errors import PrefoptError
from prefopt.feedback.losses import (
    kto_kl,
    pair_indices,
    plackett_luce_loss,
    ranking_loss,
    ranking_pair_losses,
    unpaired_loss,
)
from prefopt.losses import preference_loss

# four samples: two desirable, two undesirable; float64 so hand arithmetic matches to 1e-12
LP = [-1.0, -2.0, -0.5, -3.0]
REF = [-1.5, -1.0, -1.0, -2.0]
U = [0.5, -1.0, 0.5, -1.0]  # LP - REF
LABELS = [1, 1, 0, 0]
BETA = 0.5


def t(values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def close(actual, expected):
    expected = torch.tensor(expected, dtype=torch.float64).reshape(-1).tolist()
    assert actual.reshape(-1).tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)

# ------------------------------------------------------------------------------------------ KTO
def test_kto_by_hand():
    z0 = 0.25
    out = unpaired_loss("kto", t(LP), t(REF), torch.tensor(LABELS), beta=BETA, kl=z0,
                        desirable_weight=2.0, undesirable_weight=0.5)
    expected = [2.0 * (1 - sig(BETA * (0.5 - z0))), 2.0 * (1 - sig(BETA * (-1.0 - z0))),
                0.5 * (1 - sig(BETA * (z0 - 0.5))), 0.5 * (1 - sig(BETA * (z0 + 1.0)))]
    close(out.losses, expected)
    close(out.rewards, [BETA * u for u in U])


def test_apo_zero_unpaired_by_hand():
    out = unpaired_loss("apo_zero_unpaired", t(LP), t(REF), torch.tensor(LABELS), beta=BETA)
    close(out.losses, [1 - sig(0.25), 1 - sig(-0.5), sig(0.25), sig(-0.5)])


def test_kto_kl_is_clamped_detached_mean():
    p = t([0.0, -1.0, 2.0], requires_grad=True)
    kl = kto_kl(p, t([-1.0, -1.0, -1.0]))
    assert float(kl) == pytest.approx((1 + 0 + 3) / 3) and not kl.requires_grad
    assert float(kto_kl(t([-3.0]), t([0.0]))) == 0.0  # a negative estimate is clamped to 0


def test_kto_gradient_does_not_flow_through_kl():
    p = t(LP, requires_grad=True)
    kl = kto_kl(p, t(REF))
    unpaired_loss("kto", p, t(REF), torch.tensor(LABELS), beta=BETA, kl=kl).losses.mean().backward()
    # d/dlp of (1 - sigmoid(b (u - z0))) is -b s (1 - s), with z0 held fixed
    z0 = float(kl)
    s = sig(BETA * (U[0] - z0))
    assert p.grad[0].item() == pytest.approx(-BETA * s * (1 - s) / 4)


def test_unpaired_errors_name_the_option():
    labels = torch.tensor(LABELS)
    with pytest.raises(PrefoptError, match="loss_type='sigmoid' is not supported; allowed: kto, apo_zero_unpaired"):
        unpaired_loss("sigmoid", t(LP), t(REF), labels, beta=BETA)
    with pytest.raises(PrefoptError, match="needs kl"):
        unpaired_loss("kto", t(LP), t(REF), labels, beta=BETA)
    with pytest.raises(PrefoptError, match="desirable_weight=-1"):
        unpaired_loss("kto", t(LP), t(REF), labels, beta=BETA, kl=0.0, desirable_weight=-1)
    with pytest.raises(PrefoptError, match="beta=0"):
        unpaired_loss("apo_zero_unpaired", t(LP), t(REF), labels, beta=0)


# ------------------------------------------------------------------- against TRL's KTOTrainer code
class _FakeLM:
    """Stands in for the model in ``KTOTrainer._compute_loss``: the per-token log-probs of row i sum to
    the log-likelihood given for that row (looked up by the row's first input id)."""

    def __init__(self, table: dict[int, float]):
        self.table, self.training = table, True

    def __call__(self, input_ids, labels=None, **kwargs):
        values = torch.tensor([self.table[int(i)] for i in input_ids[:, 0]], dtype=torch.float64)
        width = input_ids.shape[1] - 1
        log_probs = torch.zeros(input_ids.shape[0], width, dtype=torch.float64)
        log_probs[:, 0] = values
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                               mean_logits=torch.zeros_like(log_probs))


def _trl_kto_loss(loss_type, lp, ref, labels, kl_lp, kl_ref, beta, dw, uw) -> float:
    """TRL 1.16's ``KTOTrainer._compute_loss`` run on a stand-in model with precomputed reference values."""
    KTOTrainer = pytest.importorskip("trl.trainer.kto_trainer").KTOTrainer  # trl: the `bench` extra

    n = len(lp)
    ids = torch.arange(n)[:, None].repeat(1, 3)  # row i: ids [i, i, i]
    kl_ids = torch.arange(n, 2 * n)[:, None].repeat(1, 3)
    model = _FakeLM({**{i: v for i, v in enumerate(lp)}, **{n + i: v for i, v in enumerate(kl_lp)}})
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids),
             "label": torch.tensor(labels), "ref_logps": torch.tensor(ref, dtype=torch.float64)}
    calculate_kl = loss_type == "kto"
    if calculate_kl:
        batch.update(KL_input_ids=kl_ids, KL_attention_mask=torch.ones_like(kl_ids),
                     KL_completion_mask=torch.ones_like(kl_ids),
                     ref_KL_logps=torch.tensor(kl_ref, dtype=torch.float64))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    fake_self = SimpleNamespace(model=model, accelerator=accelerator, calculate_KL=calculate_kl,
                                precompute_ref_logps=True, loss_type=loss_type, beta=beta, desirable_weight=dw,
                                undesirable_weight=uw, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
                                _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    fake_self._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(fake_self, m, b)
    return float(KTOTrainer._compute_loss(fake_self, model, batch, False)), fake_self._metrics["train"]


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_matches_trl_kto_trainer(loss_type, weights):
    kl_lp, kl_ref = [-2.0, -1.0, -0.2, -3.5], [-2.5, -1.25, -1.0, -3.0]  # mismatched pairs: diffs 0.5, 0.25, 0.8, -0.5, mean 0.2625
    dw, uw = weights
    trl_loss, trl_metrics = _trl_kto_loss(loss_type, LP, REF, LABELS, kl_lp, kl_ref, BETA, dw, uw)
    kl = kto_kl(t(kl_lp), t(kl_ref)) if loss_type == "kto" else None
    ours = unpaired_loss(loss_type, t(LP), t(REF), torch.tensor(LABELS), beta=BETA, kl=kl,
                         desirable_weight=dw, undesirable_weight=uw)
    assert float(ours.losses.mean()) == pytest.approx(trl_loss, rel=1e-12)
    if loss_type == "kto":
        assert float(kl) == pytest.approx(trl_metrics["kl"][0]) and float(kl) == pytest.approx(0.2625)
    assert float(ours.rewards[:2].mean()) == pytest.approx(trl_metrics["rewards/chosen"][0])
    assert float(ours.rewards[2:].mean()) == pytest.approx(trl_metrics["rewards/rejected"][0])


def test_matches_trl_with_negative_kl_estimate():
    kl_lp, kl_ref = [-3.0, -3.0, -3.0, -3.0], [-1.0, -1.0, -1.0, -1.0]  # mean diff -2: clamped to 0
    trl_loss, _ = _trl_kto_loss("kto", LP, REF, LABELS, kl_lp, kl_ref, BETA, 1.0, 1.0)
    ours = unpaired_loss("kto", t(LP), t(REF), torch.tensor(LABELS), beta=BETA, kl=kto_kl(t(kl_lp), t(kl_ref)))
    assert float(ours.losses.mean()) == pytest.approx(trl_loss, rel=1e-12)


# -------------------------------------------------------------------------------- Plackett-Luce
def test_plackett_luce_k3_by_hand():
    # one group, ranked best first: rewards r = b * (lp - ref)
    lp, ref = [[-1.0, -2.0, -0.5]], [[-1.5, -1.0, -1.0]]
    r = [BETA * (a - b) for a, b in zip(lp[0], ref[0])]  # [0.25, -0.5, 0.25]
    expected = (math.log(sum(math.exp(x) for x in r)) - r[0]) + (math.log(math.exp(r[1]) + math.exp(r[2])) - r[1])
    out = plackett_luce_loss(t(lp), t(ref), beta=BETA)
    close(out.losses, [expected])
    close(out.rewards, [r])


def test_plackett_luce_k2_is_dpo_sigmoid_exactly():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(16, 2, generator=g, dtype=torch.float64) * 3
    ref = torch.randn(16, 2, generator=g, dtype=torch.float64) * 3
    pl = plackett_luce_loss(lp, ref, beta=0.7).losses
    dpo = preference_loss("sigmoid", lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], beta=0.7).losses
    assert torch.allclose(pl, dpo, rtol=1e-12, atol=1e-14)


def test_plackett_luce_gradient_matches_the_formula():
    # d loss / d r_1 = softmax(r)_1 - 1 for the best item of a K=3 group (only the first factor has r_1)
    lp = t([[0.3, -0.2, 0.1]], requires_grad=True)
    plackett_luce_loss(lp, torch.zeros(1, 3, dtype=torch.float64), beta=1.0).losses.sum().backward()
    r = [0.3, -0.2, 0.1]
    softmax0 = math.exp(r[0]) / sum(math.exp(x) for x in r)
    assert lp.grad[0, 0].item() == pytest.approx(softmax0 - 1)


# -------------------------------------------------------------------------------- all pairs
def test_pair_indices_row_major():
    a, b = pair_indices(4)
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_all_pairs_by_hand_with_ties():
    lp, ref = t([[-1.0, -2.0, -0.5]]), t([[-1.5, -1.0, -1.0]])
    u = [0.5, -1.0, 0.5]

    def dpo(x):
        return math.log1p(math.exp(-BETA * x))

    tie = torch.tensor([[False, False, True]])  # pairs (0,1), (0,2), (1,2): the last is tied
    drop = ranking_pair_losses("sigmoid", lp, ref, beta=BETA, tie=tie, ties="drop")
    close(drop.losses[0], [dpo(u[0] - u[1]), dpo(u[0] - u[2]), dpo(u[1] - u[2])])
    close(drop.weights[0], [1.0, 1.0, 0.0])
    half = ranking_pair_losses("sigmoid", lp, ref, beta=BETA, tie=tie, ties="half")
    close(half.losses[0], [dpo(u[0] - u[1]), dpo(u[0] - u[2]), 0.5 * (dpo(u[1] - u[2]) + dpo(u[2] - u[1]))])
    close(half.weights[0], [1.0, 1.0, 1.0])


def test_all_pairs_k2_equals_the_pairwise_loss():
    lp, ref = t([[-1.0, -2.0], [0.0, -0.5]]), t([[-1.5, -1.0], [-0.2, 0.1]])
    out = ranking_loss("ipo", lp, ref, beta=BETA)
    expected = preference_loss("ipo", lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], beta=BETA).losses
    close(out.losses[:, 0], expected.tolist())


def test_ranking_reference_free_pairwise_loss():
    lp, lengths = t([[-1.0, -2.0, -4.0]]), t([[1.0, 2.0, 2.0]])
    out = ranking_loss("simpo", lp, None, beta=BETA, lengths=lengths, simpo_gamma=0.0)
    z = [BETA * (-1.0 + 1.0), BETA * (-1.0 + 2.0), BETA * (-1.0 + 2.0)]
    close(out.losses[0], [math.log1p(math.exp(-x)) for x in z])


def test_ranking_errors():
    with pytest.raises(PrefoptError, match=r"expected \[G, K\] with K >= 2"):
        plackett_luce_loss(t([[1.0]]), None, beta=BETA)
    with pytest.raises(PrefoptError, match="tie has shape"):
        ranking_pair_losses("sigmoid", t([[1.0, 0.0, 2.0]]), t([[0.0, 0.0, 0.0]]), beta=BETA,
                            tie=torch.zeros(1, 2, dtype=torch.bool))
