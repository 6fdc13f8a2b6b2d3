"""prefopt's losses against TRL 1.16's own ``DPOTrainer`` loss code (not a transcription of it).

``DPOTrainer._compute_loss`` is called unbound on a stand-in trainer (the attributes its loss code reads,
with TRL's own config defaults) and a stand-in model whose fused LM head returns per-token log-probs that
sum to the given sequence log-likelihoods; the reference log-likelihoods go in as precomputed. Both sides run in float32 (TRL's alpha-divergence code
has no float64 branch). Completion lengths come from TRL's ``completion_mask``.
"""

from __future__ import annotations

import collections
import types

import pytest
import torch

trl = pytest.importorskip("trl")
from trl import DPOConfig, DPOTrainer  # noqa: E402

from prefopt.losses import OPTION_DEFAULTS, preference_loss  # noqa: E402

# four pairs (float64): policy / reference log-likelihoods and completion lengths
PC = [-4.0, -7.5, -12.0, -3.0]
PR = [-6.0, -7.0, -9.0, -8.0]
RC = [-5.0, -7.0, -11.0, -4.5]
RR = [-5.5, -8.0, -10.0, -6.0]
LC = [3, 5, 9, 2]
LR = [4, 2, 6, 7]
BETA = 0.3
DTYPE = torch.float32  # TRL's alpha-divergence cap table knows float16, bfloat16 and float32 only
TOL = dict(rel=1e-6, abs=1e-7)


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def _trl_default(name: str):
    return DPOConfig.__dataclass_fields__[name].default


def trl_batch_loss(loss_type: str, pairs: list[int], f_divergence_type: str = "reverse_kl",
                   label_smoothing: float = 0.0, f_alpha_divergence_coef: float | None = None) -> float:
    """TRL's (batch-mean) loss over the pairs ``pairs`` (indices into the lists above)."""
    if f_alpha_divergence_coef is None:
        f_alpha_divergence_coef = _trl_default("f_alpha_divergence_coef")
    logps = [PC[i] for i in pairs] + [PR[i] for i in pairs]  # TRL's batch: chosen rows, then rejected rows
    lengths = [LC[i] for i in pairs] + [LR[i] for i in pairs]
    steps = max(lengths) + 1
    completion_mask = torch.zeros(len(logps), steps + 1, dtype=torch.long)
    log_probs = torch.zeros(len(logps), steps, dtype=DTYPE)  # the fused head's per-token log-probs
    for row, (logp, length) in enumerate(zip(logps, lengths)):
        completion_mask[row, 1:1 + length] = 1
        log_probs[row, 0] = logp
    outputs = types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(len(logps), steps),
                                    mean_logits=torch.zeros(len(logps), steps),
                                    is_top1=torch.zeros(len(logps), steps, dtype=torch.bool))
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, beta=BETA, loss_types=[loss_type], loss_weights=[1.0],
        label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=_trl_default("discopop_tau")),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(len(logps), steps + 1, dtype=torch.long),
              "attention_mask": torch.ones(len(logps), steps + 1, dtype=torch.long),
              "completion_mask": completion_mask,
              "ref_chosen_logps": torch.tensor([RC[i] for i in pairs], dtype=DTYPE),
              "ref_rejected_logps": torch.tensor([RR[i] for i in pairs], dtype=DTYPE)}
    return float(DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False))


def trl_losses(loss_type: str, f_divergence_type: str = "reverse_kl", **config) -> list[float]:
    """Per-pair losses: one pair per call, so TRL's batch mean is that pair's loss."""
    return [trl_batch_loss(loss_type, [i], f_divergence_type, **config) for i in range(len(PC))]


def prefopt_losses(loss_type: str, **options) -> list[float]:
    t = lambda v: torch.tensor(v, dtype=DTYPE)  # noqa: E731
    return preference_loss(loss_type, t(PC), t(PR), t(RC), t(RR), beta=BETA, chosen_lengths=t(LC),
                           rejected_lengths=t(LR), **options).losses.tolist()


def test_default_alpha_divergence_coefficient_is_trls():
    assert OPTION_DEFAULTS["alpha_divergence_coef"] == _trl_default("f_alpha_divergence_coef") == 0.5


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm"])
@pytest.mark.parametrize("f_divergence", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_losses_match_trl(loss_type, f_divergence):
    # ipo and sigmoid_norm divide each side's score by its length: there TRL's additive constants matter
    assert prefopt_losses(loss_type, f_divergence_type=f_divergence) == pytest.approx(
        trl_losses(loss_type, f_divergence), **TOL)


@pytest.mark.parametrize("alpha", [0.25, 2.0])
def test_alpha_divergence_coefficient_matches_trl(alpha):
    for loss_type in ("ipo", "sigmoid_norm"):
        ours = prefopt_losses(loss_type, f_divergence_type="alpha_divergence", alpha_divergence_coef=alpha)
        assert ours == pytest.approx(trl_losses(loss_type, "alpha_divergence", f_alpha_divergence_coef=alpha),
                                     **TOL)


@pytest.mark.parametrize("f_divergence", ["reverse_kl", "forward_kl"])
def test_exo_pair_matches_trl(f_divergence):
    assert prefopt_losses("exo_pair", label_smoothing=1e-3, f_divergence_type=f_divergence) == pytest.approx(
        trl_losses("exo_pair", f_divergence, label_smoothing=1e-3), **TOL)


@pytest.mark.parametrize("loss_type", ["nca_pair", "sppo_hard", "apo_zero", "apo_down"])
def test_reverse_kl_only_types_match_trl(loss_type):
    assert prefopt_losses(loss_type) == pytest.approx(trl_losses(loss_type), **TOL)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_batch_sorting_types_match_trl(loss_type):
    # these sort margins across the batch: compare the mean over all four pairs
    mean = sum(prefopt_losses(loss_type)) / len(PC)
    assert mean == pytest.approx(trl_batch_loss(loss_type, list(range(len(PC)))), **TOL)


def test_bco_pair_with_zero_delta_is_trls():
    assert prefopt_losses("bco_pair", bco_delta=0.0) == pytest.approx(trl_losses("bco_pair"), **TOL)


def test_sigmoid_label_smoothing_is_cdpo_unlike_trl():
    # TRL 1.16 ignores label_smoothing for sigmoid; prefopt's sigmoid with eps > 0 is conservative DPO
    eps = 0.1
    trl_plain = trl_losses("sigmoid", label_smoothing=eps)
    assert trl_plain == pytest.approx(trl_losses("sigmoid"), rel=1e-12)
    ours = prefopt_losses("sigmoid", label_smoothing=eps)
    margins = [(a - c) - (b - d) for a, b, c, d in zip(PC, PR, RC, RR)]
    softplus = lambda x: torch.nn.functional.softplus(torch.tensor(x, dtype=DTYPE)).item()  # noqa: E731
    expected = [(1 - eps) * softplus(-BETA * m) + eps * softplus(BETA * m) for m in margins]
    assert ours == pytest.approx(expected, **TOL) and ours != pytest.approx(trl_plain, rel=1e-3)
