"""DPO-family preference losses on per-pair log-likelihoods.

Every loss here is a pure function of four ``[B]`` tensors -- the policy's and the reference's
log-likelihood of the chosen and the rejected sample of each pair -- plus a few scalars. Nothing is
reduced: :func:`preference_loss` returns one loss per pair, and the caller averages (or weights) them.
The names and the math follow TRL's ``DPOTrainer`` (and ``CPOTrainer`` for ``simpo``); where TRL is
ambiguous or batch-stateful, the choice made here is written next to the formula.

Notation: ``lp_c, lp_r`` policy log-likelihoods, ``ref_c, ref_r`` reference log-likelihoods,
``u_c = lp_c - ref_c`` and ``u_r = lp_r - ref_r`` the log-ratios, ``s_c = f(u_c)``, ``s_r = f(u_r)``
their f-divergence *scores* (``f`` is the identity for the default ``reverse_kl``), ``d = s_c - s_r``
the margin, ``b = beta``, ``eps = label_smoothing``, ``L_c, L_r`` the lengths, ``ls(x) = log sigmoid(x)``.

Per-pair losses (``extra`` lists what else the type reads)::

    sigmoid       -(1-eps) ls(b d) - eps ls(-b d)          (eps > 0 is cDPO, see below)   extra: eps
    hinge         relu(1 - b d)
    ipo           (d' - 1/(2b))^2, d' = s_c/L_c - s_r/L_r with lengths, else d    extra: lengths (optional)
    exo_pair      q (ls(b d) - log(1-eps)) + (1-q) (ls(-b d) - log eps), q = sigmoid(b d)   extra: eps > 0
    nca_pair      -ls(b u_c) - ls(-b u_c)/2 - ls(-b u_r)/2
    robust        (-(1-eps) ls(b d) + eps ls(-b d)) / (1 - 2 eps)               extra: eps
    bco_pair      -ls(b u_c - delta) - ls(delta - b u_r)                        extra: bco_delta
    sppo_hard     (u_c - 1/(2b))^2 + (u_r + 1/(2b))^2
    aot           sigmoid/cDPO form on sort(lp_c - lp_r) - sort(ref_c - ref_r)  extra: eps
    aot_unpaired  sigmoid/cDPO form on sort(u_c) - sort(u_r)                    extra: eps
    apo_zero      1 - sigmoid(b u_c) + sigmoid(b u_r)
    apo_down      sigmoid(b u_c) + 1 - sigmoid(b (u_c - u_r))
    discopop      (1-m) (-ls(b d)) + m exp(-b d), m = sigmoid(b d / tau)        extra: discopop_tau
    sigmoid_norm  -ls(b (s_c/L_c - s_r/L_r))                                    extra: lengths (required)
    sft           -lp_c / L_c  (-lp_c without chosen_lengths)                   reference-free
    simpo         -(1-eps) ls(z) - eps ls(-z), z = b (lp_c/L_c - lp_r/L_r) - gamma
                                                  reference-free; extra: simpo_gamma, eps, lengths (required)
    cpl           -ls(b lp_c - lambda b lp_r)                                   reference-free; extra: cpl_lambda

Decisions where TRL is unclear, stateful or text-specific:

* ``bco_pair``: TRL once subtracted a *running* mean of the rewards (newer TRL subtracts nothing).
  This module is stateless, so ``bco_delta`` is a float the caller may keep as a running mean; the
  default ``None`` uses the detached mean of this batch's ``b u_c`` and ``b u_r`` together (the chosen
  and rejected rewards). ``bco_delta=0.0`` gives TRL 1.16's loss.
* ``sigmoid_norm`` and length-normalized ``ipo`` divide the f-divergence scores by the lengths, as TRL
  divides by the completion token counts. ``sigmoid_norm`` needs both lengths; ``ipo`` takes both or none.
  (``sigmoid_norm`` is recent in TRL; this is its definition as ports of it describe it, and also the
  plain reading "sigmoid loss on length-normalized log-ratios".)
* ``simpo`` (TRL ``CPOTrainer``): ``z = b (avg_c - avg_r) - gamma``. TRL writes it as
  ``b (avg_c - avg_r - gamma / b)``, so gamma is the margin in reward units and is *not* divided by
  beta in the final expression. The lengths are required (SimPO is defined on average log-likelihoods).
* ``sft``: per pair ``-lp_c / L_c``. TRL averages token cross-entropy over the whole batch, which
  equals the mean of these only when all lengths are equal.
* ``cpl`` (Contrastive Preference Learning, Hejna et al. 2023): ``lp_c``, ``lp_r`` are the (discounted)
  sums of ``log pi`` over each segment, CPL's temperature ``alpha`` *is* ``beta`` here, and ``cpl_lambda``
  in ``(0, 1]`` is the conservative bias (1.0 = unbiased).
* ``discopop``: the exponential term is evaluated as ``exp(log m - b d)``, which equals TRL's
  ``m * exp(-b d)`` but stays finite (TRL's form gives ``0 * inf = nan`` for very negative margins).
* ``sigmoid`` with ``label_smoothing > 0`` is conservative DPO (cDPO, Mitchell 2023): the label is taken
  to be flipped with probability ``eps``. TRL 1.16's ``DPOTrainer`` ignores ``label_smoothing`` for
  ``sigmoid`` (it uses it only for ``robust`` and ``exo_pair``); prefopt keeps cDPO, so ``sigmoid`` with
  ``label_smoothing=0.1`` trains differently here than in TRL 1.16 (``conf/loss/cdpo.yaml`` selects it).
* Label smoothing is the probability that a label is flipped; it must lie in ``[0, 0.5)`` for every
  type that uses it (``robust`` divides by ``1 - 2 eps``; at 0.5 and above the preference inverts).
  ``exo_pair`` needs ``eps > 0`` (it takes ``log eps``; TRL's recommended value is ``1e-3``).

f-divergences (option ``f_divergence_type``, the f-DPO scores ``s = f'(exp u)`` of TRL 1.16's
``DPOTrainer``, additive constants included): ``reverse_kl`` ``s = u``; ``forward_kl`` ``s = 1 - exp(-u)``;
``js_divergence`` ``s = log 2 + log sigmoid(u)``; ``alpha_divergence`` ``s = (exp((a-1) u) - 1) / (a-1)``
with ``a = alpha_divergence_coef``, default 0.5 as TRL's ``f_alpha_divergence_coef`` (``a = 1`` is
``reverse_kl``, ``a = 0`` is ``forward_kl``). The constants cancel in ``d = s_c - s_r`` but not in the
length-normalized margin of ``ipo`` and ``sigmoid_norm`` (``s_c/L_c - s_r/L_r``). Exponents are capped
as in TRL (80, or 11 in float16) -- here also for ``forward_kl``, which TRL leaves uncapped -- so huge
log-ratios saturate instead of overflowing. As in TRL 1.16, a non-default f-divergence applies only to
the types built on the chosen-rejected difference of scores: sigmoid, hinge, ipo, exo_pair, robust,
discopop, sigmoid_norm (the f-DPO reparameterization leaves a ``b log Z(x)`` term that cancels only in
that difference). ``nca_pair``, ``bco_pair`` and ``sppo_hard`` use the raw log-ratios (``s = u``) and,
with aot, aot_unpaired, apo_zero, apo_down and the reference-free types, reject a non-default
f-divergence.

Input rules:

* The reference log-likelihoods may be ``None`` only when every selected type is reference-free
  (:data:`REFERENCE_FREE`); given ones are detached, so no gradient ever reaches the reference, and
  ignored by the reference-free types. Passing only one of the two is an error.
* Lengths are ``[B]`` tensors (or scalars) of positive numbers; types that don't use them ignore them.
* An option that no selected type uses must keep its default value; otherwise it is an error (so a
  misspelled setup fails loudly instead of silently training something else). Unknown keys are errors.
* ``loss_type`` may be a list: the result is ``sum_i loss_weights[i] * loss_i`` per pair. All options
  are shared by the listed types (as in TRL), so e.g. ``label_smoothing`` smooths every listed type
  that uses it.

Rewards (detached, ``[B]``): ``b u`` for reference-based types; ``b lp`` for ``cpl``; ``b lp / L`` for
``simpo``; ``b u`` for ``sft`` when references are given, else ``b lp``. A list of two or more types
uses the standard DPO rewards ``b u`` when references are given, else ``b lp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Real
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.errors import PrefoptError, check_choice

__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOSS_ALIASES",
    "LOSS_TYPES",
    "LossConfig",
    "OPTION_DEFAULTS",
    "REFERENCE_FREE",
    "PreferenceLossOutput",
    "compute_loss",
    "normalize_loss_type",
    "preference_loss",
]

F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

OPTION_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "loss_weights": None,  # one weight per loss type; None = all 1.0
    "f_divergence_type": "reverse_kl",
    "alpha_divergence_coef": 0.5,  # TRL's f_alpha_divergence_coef (DPOConfig default 0.5)
    "bco_delta": None,  # None = detached batch mean of the bco rewards
    "discopop_tau": 0.05,
    "simpo_gamma": 0.5,  # TRL CPOConfig default
    "cpl_lambda": 1.0,
})


class PreferenceLossOutput(NamedTuple):
    """Per-pair results of :func:`preference_loss`; nothing is reduced."""

    losses: Tensor  # [B], differentiable w.r.t. the policy log-likelihoods
    chosen_rewards: Tensor  # [B], detached
    rejected_rewards: Tensor  # [B], detached


# --------------------------------------------------------------------------------------------------
# What one loss function sees


class _Pairs(NamedTuple):
    """The prepared inputs of one call. Tensors are ``[B]``; reference tensors are detached."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor | None
    ref_rejected_logps: Tensor | None
    chosen_scores: Tensor | None  # f(chosen log-ratio); None without references
    rejected_scores: Tensor | None
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    beta: float
    label_smoothing: float
    options: Mapping[str, Any]

    @property
    def chosen_logratios(self) -> Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def margin(self) -> Tensor:
        return self.chosen_scores - self.rejected_scores


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """Logistic loss on ``z`` whose label is flipped with probability ``eps`` (cDPO)."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _per_length(values: Tensor, lengths: Tensor) -> Tensor:
    """Length normalization: a sum over a sample turned into a per-element average."""
    return values / lengths


def _normalized_margin(p: _Pairs) -> Tensor:
    """Margin of length-normalized scores: ``s_c / L_c - s_r / L_r``."""
    return _per_length(p.chosen_scores, p.chosen_lengths) - _per_length(p.rejected_scores, p.rejected_lengths)


def _capped_exp(x: Tensor) -> Tensor:
    """``exp`` with TRL's exponent cap, computed in at least float32 and cast back."""
    cap = 11.0 if x.dtype == torch.float16 else 80.0
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.exp(wide.clamp(max=cap)).to(x.dtype)


def _f_divergence_scores(logratios: Tensor, kind: str, alpha: float) -> Tensor:
    """Map a log-ratio ``u = log(pi / pi_ref)`` to its f-DPO score ``f'(exp u)`` (see the module docstring)."""
    if kind == "reverse_kl":  # f'(t) = log t + 1, the constant dropped as in TRL
        return logratios
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1.0 - _capped_exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1)) = log 2 + log sigmoid(log t)
        return math.log(2.0) + F.logsigmoid(logratios)
    if abs(alpha - 1.0) < 1e-6:  # the alpha -> 1 limit is reverse KL
        return logratios
    # f'(t) = (t^(a-1) - 1) / (a - 1)
    return (_capped_exp((alpha - 1.0) * logratios) - 1.0) / (alpha - 1.0)


# --------------------------------------------------------------------------------------------------
# One function per loss type


def _sigmoid(p: _Pairs) -> Tensor:
    return _smoothed_logistic(p.beta * p.margin, p.label_smoothing)


def _hinge(p: _Pairs) -> Tensor:
    return torch.relu(1.0 - p.beta * p.margin)


def _ipo(p: _Pairs) -> Tensor:
    margin = p.margin if p.chosen_lengths is None else _normalized_margin(p)
    return (margin - 1.0 / (2.0 * p.beta)) ** 2


def _exo_pair(p: _Pairs) -> Tensor:
    z, eps = p.beta * p.margin, p.label_smoothing
    chosen_term = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    rejected_term = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    return chosen_term + rejected_term


def _nca_pair(p: _Pairs) -> Tensor:
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(p: _Pairs) -> Tensor:
    z, eps = p.beta * p.margin, p.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def _bco_pair(p: _Pairs) -> Tensor:
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    delta = p.options["bco_delta"]
    if delta is None:
        delta = torch.cat([chosen, rejected]).mean().detach()
    return -F.logsigmoid(chosen - delta) - F.logsigmoid(delta - rejected)


def _sppo_hard(p: _Pairs) -> Tensor:
    target = 0.5 / p.beta
    return (p.chosen_logratios - target) ** 2 + (p.rejected_logratios + target) ** 2


def _aot(p: _Pairs) -> Tensor:
    policy_sorted = torch.sort(p.chosen_logps - p.rejected_logps, dim=0).values
    reference_sorted = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0).values
    return _smoothed_logistic(p.beta * (policy_sorted - reference_sorted), p.label_smoothing)


def _aot_unpaired(p: _Pairs) -> Tensor:
    chosen_sorted = torch.sort(p.chosen_logratios, dim=0).values
    rejected_sorted = torch.sort(p.rejected_logratios, dim=0).values
    return _smoothed_logistic(p.beta * (chosen_sorted - rejected_sorted), p.label_smoothing)


def _apo_zero(p: _Pairs) -> Tensor:
    return (1.0 - torch.sigmoid(p.beta * p.chosen_logratios)) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: _Pairs) -> Tensor:
    chosen, rejected = p.chosen_logratios, p.rejected_logratios
    return torch.sigmoid(p.beta * chosen) + (1.0 - torch.sigmoid(p.beta * (chosen - rejected)))


def _discopop(p: _Pairs) -> Tensor:
    z, tau = p.beta * p.margin, p.options["discopop_tau"]
    logistic_weight = torch.sigmoid(-z / tau)  # 1 - m
    exponential_term = torch.exp(F.logsigmoid(z / tau) - z)  # m * exp(-z), without 0 * inf
    return logistic_weight * -F.logsigmoid(z) + exponential_term


def _sigmoid_norm(p: _Pairs) -> Tensor:
    return -F.logsigmoid(p.beta * _normalized_margin(p))


def _sft(p: _Pairs) -> Tensor:
    nll = -p.chosen_logps
    return nll if p.chosen_lengths is None else _per_length(nll, p.chosen_lengths)


def _simpo(p: _Pairs) -> Tensor:
    average_margin = _per_length(p.chosen_logps, p.chosen_lengths) - _per_length(p.rejected_logps, p.rejected_lengths)
    return _smoothed_logistic(p.beta * average_margin - p.options["simpo_gamma"], p.label_smoothing)


def _cpl(p: _Pairs) -> Tensor:
    return -F.logsigmoid(p.beta * p.chosen_logps - p.options["cpl_lambda"] * p.beta * p.rejected_logps)


# --------------------------------------------------------------------------------------------------
# Dispatch table: what each type needs and accepts


@dataclass(frozen=True)
class _Spec:
    fn: Callable[[_Pairs], Tensor]
    reference: bool = True  # needs reference log-likelihoods
    lengths: str = "unused"  # "unused" | "optional" (both or none) | "required" (both) | "chosen"
    label_smoothing: bool = False
    f_divergence: bool = False
    options: tuple[str, ...] = ()  # type-specific options from OPTION_DEFAULTS


_SPECS: dict[str, _Spec] = {
    "sigmoid": _Spec(_sigmoid, label_smoothing=True, f_divergence=True),
    "hinge": _Spec(_hinge, f_divergence=True),
    "ipo": _Spec(_ipo, lengths="optional", f_divergence=True),
    "exo_pair": _Spec(_exo_pair, label_smoothing=True, f_divergence=True),
    "nca_pair": _Spec(_nca_pair),
    "robust": _Spec(_robust, label_smoothing=True, f_divergence=True),
    "bco_pair": _Spec(_bco_pair, options=("bco_delta",)),
    "sppo_hard": _Spec(_sppo_hard),
    "aot": _Spec(_aot, label_smoothing=True),
    "aot_unpaired": _Spec(_aot_unpaired, label_smoothing=True),
    "apo_zero": _Spec(_apo_zero),
    "apo_down": _Spec(_apo_down),
    "discopop": _Spec(_discopop, f_divergence=True, options=("discopop_tau",)),
    "sigmoid_norm": _Spec(_sigmoid_norm, lengths="required", f_divergence=True),
    "sft": _Spec(_sft, reference=False, lengths="chosen"),
    "simpo": _Spec(_simpo, reference=False, lengths="required", label_smoothing=True, options=("simpo_gamma",)),
    "cpl": _Spec(_cpl, reference=False, options=("cpl_lambda",)),
}

LOSS_TYPES: tuple[str, ...] = tuple(_SPECS)
#: other names accepted for a loss type (``loss_type="dpo"`` or ``loss=dpo`` is the sigmoid loss)
LOSS_ALIASES: Mapping[str, str] = MappingProxyType({"dpo": "sigmoid"})
REFERENCE_FREE: frozenset[str] = frozenset(name for name, spec in _SPECS.items() if not spec.reference)


# --------------------------------------------------------------------------------------------------
# Options: one frozen config, validated once


def _show(value: Any) -> str:
    if torch.is_tensor(value):
        return f"<tensor shape={tuple(value.shape)} dtype={value.dtype}>"
    return repr(value)


def _reject(option: str, value: Any, allowed: str) -> PrefoptError:
    return PrefoptError(f"{option}={_show(value)} is not supported; allowed: {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def normalize_loss_type(loss_type: Any) -> tuple[str, ...]:
    """The selected loss type(s) as a tuple of names from :data:`LOSS_TYPES`.

    Takes a name or a non-empty list of names; aliases (:data:`LOSS_ALIASES`: ``dpo`` is ``sigmoid``) are
    replaced by the type they name. This is the one place where loss-type names are checked.
    """
    names = (loss_type,) if isinstance(loss_type, str) else loss_type
    if isinstance(names, (bytes, Mapping)) or not isinstance(names, Sequence) or not names:
        raise _reject("loss_type", loss_type, f"a name or a non-empty list of names from {', '.join(LOSS_TYPES)}")
    out = []
    for name in names:
        name = LOSS_ALIASES.get(name, name) if isinstance(name, str) else name
        if name not in _SPECS:
            raise _reject("loss_type", name, f"{', '.join(LOSS_TYPES)} (or {', '.join(LOSS_ALIASES)}, an alias of "
                                             f"{', '.join(sorted(set(LOSS_ALIASES.values())))})")
        out.append(name)
    return tuple(out)


def _check_number(option: str, value: Any, ok: Callable[[float], bool], allowed: str) -> float:
    if not _is_number(value) or not ok(value):
        raise _reject(option, value, allowed)
    return float(value)


@dataclass(frozen=True)
class LossConfig:
    """The loss options, checked once when the config is made (as TRL's ``DPOConfig.__post_init__``).

    ``loss_type`` is normalized to a tuple of names (aliases resolved) and ``loss_weights`` to one float per
    type. Every bad value or combination raises a :class:`~prefopt.errors.PrefoptError` naming the option,
    the value and what is allowed; an option that no selected type uses must keep its default. The fields
    and their meaning are those of :func:`preference_loss`; the training step calls :func:`compute_loss`
    with a config made once, which checks no option again.
    """

    loss_type: Any = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_weights: Any = None
    f_divergence_type: str = OPTION_DEFAULTS["f_divergence_type"]
    alpha_divergence_coef: float = OPTION_DEFAULTS["alpha_divergence_coef"]
    bco_delta: float | None = OPTION_DEFAULTS["bco_delta"]
    discopop_tau: float = OPTION_DEFAULTS["discopop_tau"]
    simpo_gamma: float = OPTION_DEFAULTS["simpo_gamma"]
    cpl_lambda: float = OPTION_DEFAULTS["cpl_lambda"]

    def __post_init__(self):
        names = normalize_loss_type(self.loss_type)
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("loss_type", names)
        set_("beta", _check_number("beta", self.beta, lambda v: v > 0, "a finite number > 0"))
        set_("label_smoothing", _check_number("label_smoothing", self.label_smoothing, lambda v: 0 <= v < 0.5,
                                              "a number in [0, 0.5)"))
        weights = self.loss_weights
        if weights is None:
            set_("loss_weights", (1.0,) * len(names))
        else:
            allowed = f"a list of {len(names)} finite numbers >= 0, one per loss type"
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(names):
                raise _reject("loss_weights", weights, allowed)
            if not all(_is_number(w) and w >= 0 for w in weights):
                raise _reject("loss_weights", weights, allowed)
            set_("loss_weights", tuple(float(w) for w in weights))
        check_choice("f_divergence_type", self.f_divergence_type, F_DIVERGENCE_TYPES)
        set_("alpha_divergence_coef", _check_number("alpha_divergence_coef", self.alpha_divergence_coef,
                                                    lambda v: True, "a finite number"))
        if self.bco_delta is not None:
            set_("bco_delta", _check_number("bco_delta", self.bco_delta, lambda v: True,
                                            "None (batch mean) or a finite number"))
        set_("discopop_tau", _check_number("discopop_tau", self.discopop_tau, lambda v: v > 0, "a number > 0"))
        set_("simpo_gamma", _check_number("simpo_gamma", self.simpo_gamma, lambda v: v >= 0, "a number >= 0"))
        set_("cpl_lambda", _check_number("cpl_lambda", self.cpl_lambda, lambda v: 0 < v <= 1, "a number in (0, 1]"))
        self._check_used()

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> "LossConfig":
        """A config from a mapping (a Hydra ``loss`` group without ``ties``); unknown keys are errors."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise PrefoptError(f"unknown loss option(s) {', '.join(map(repr, unknown))}; known options: "
                               f"{', '.join(known)}")
        return cls(**options)

    @property
    def options(self) -> dict[str, Any]:
        """The type-specific options, as :func:`preference_loss` takes them."""
        return {name: getattr(self, name) for name in OPTION_DEFAULTS}

    @property
    def needs_reference(self) -> bool:
        """Whether some selected type needs reference log-likelihoods."""
        return any(_SPECS[name].reference for name in self.loss_type)

    def _check_used(self) -> None:
        """Non-default values of options that no selected type uses are errors."""
        names = self.loss_type
        specs = [_SPECS[name] for name in names]
        selected = ", ".join(map(repr, names))

        def users(predicate: Callable[[_Spec], bool]) -> str:
            return ", ".join(name for name, spec in _SPECS.items() if predicate(spec))

        eps = self.label_smoothing
        if eps != 0.0 and not any(s.label_smoothing for s in specs):
            raise _reject("label_smoothing", eps,
                          f"0.0 for loss_type {selected}; it is used by {users(lambda s: s.label_smoothing)}")
        if "exo_pair" in names and not 0.0 < eps < 0.5:
            raise _reject("label_smoothing", eps, "a number in (0, 0.5) with exo_pair (e.g. 1e-3)")
        kind = self.f_divergence_type
        # every selected type that reads the reference must take the scores (reference-free ones ignore them)
        refuse = [s for s in specs if s.reference and not s.f_divergence] or not any(s.f_divergence for s in specs)
        if kind != OPTION_DEFAULTS["f_divergence_type"] and refuse:
            raise _reject("f_divergence_type", kind, f"'reverse_kl' for loss_type {selected}; other f-divergences "
                                                     f"apply to {users(lambda s: s.f_divergence)} only")
        alpha = self.alpha_divergence_coef
        if alpha != OPTION_DEFAULTS["alpha_divergence_coef"] and kind != "alpha_divergence":
            raise _reject("alpha_divergence_coef", alpha, f"{OPTION_DEFAULTS['alpha_divergence_coef']} unless "
                                                          f"f_divergence_type='alpha_divergence' (it is {kind!r})")
        for option, default in OPTION_DEFAULTS.items():
            owners = [name for name, spec in _SPECS.items() if option in spec.options]
            value = getattr(self, option)
            if owners and value != default and not set(owners) & set(names):
                raise _reject(option, value, f"{default!r} for loss_type {selected}; it is used by {', '.join(owners)}")


# --------------------------------------------------------------------------------------------------
# Input checks of the public function (the training step skips them: its inputs come from the policy)


def _check_logps(option: str, value: Any, like: Tensor | None) -> Tensor:
    if not torch.is_tensor(value) or not value.is_floating_point():
        raise _reject(option, value, "a floating-point tensor of shape [B]")
    if like is None:
        if value.dim() != 1:
            raise _reject(option, value, "a floating-point tensor of shape [B]")
    elif value.shape != like.shape:
        raise _reject(option, value, f"a floating-point tensor of shape {list(like.shape)}, like policy_chosen_logps")
    return value


def _check_lengths(option: str, value: Any, like: Tensor) -> Tensor:
    allowed = f"None or positive lengths, a number or a tensor of shape {list(like.shape)}"
    if isinstance(value, bool) or not (torch.is_tensor(value) or isinstance(value, Real)):
        raise _reject(option, value, allowed)
    lengths = torch.as_tensor(value, device=like.device).detach().to(like.dtype)
    if lengths.dim() != 0 and lengths.shape != like.shape:
        raise _reject(option, value, allowed)
    if not bool(torch.isfinite(lengths).all()) or bool((lengths <= 0).any()):  # reads the values: a device sync
        raise _reject(option, value, allowed)
    return lengths


def _check_length_needs(names: tuple[str, ...], chosen: Any, rejected: Any) -> None:
    """Which types need lengths: a check of ``None``-ness only (no tensor values are read)."""
    for name in names:
        need = _SPECS[name].lengths
        if need == "required":
            for option, value in (("chosen_lengths", chosen), ("rejected_lengths", rejected)):
                if value is None:
                    raise _reject(option, None, f"positive lengths; loss_type {name!r} length-normalizes")
        elif need == "optional" and (chosen is None) != (rejected is None):
            missing = "chosen_lengths" if chosen is None else "rejected_lengths"
            raise _reject(missing, None, f"both lengths or neither for loss_type {name!r}")


# --------------------------------------------------------------------------------------------------
# Entry points


def preference_loss(
    loss_type: str | Sequence[str],
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | float | None = None,
    rejected_lengths: Tensor | float | None = None,
    **options: Any,
) -> PreferenceLossOutput:
    """Per-pair preference loss and rewards; see the module docstring for every formula.

    Args:
        loss_type: one of :data:`LOSS_TYPES` (or an alias, ``dpo``), or a list of them (weighted sum, see
            ``loss_weights``).
        policy_chosen_logps, policy_rejected_logps: ``[B]`` policy log-likelihoods.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-likelihoods, or both ``None`` when
            every selected type is in :data:`REFERENCE_FREE`.
        beta: inverse temperature, > 0 (CPL's alpha for ``cpl``).
        label_smoothing: label-flip probability in ``[0, 0.5)``; > 0 only with a type that uses it.
        chosen_lengths, rejected_lengths: positive lengths for the length-normalized types.
        **options: ``loss_weights`` (None = all 1.0), ``f_divergence_type`` ("reverse_kl"),
            ``alpha_divergence_coef`` (0.5), ``bco_delta`` (None = batch mean), ``discopop_tau`` (0.05),
            ``simpo_gamma`` (0.5), ``cpl_lambda`` (1.0).

    Every option and input is checked here (a :class:`LossConfig` is made and the tensors' shapes and the
    lengths' values are checked). A training loop that makes its :class:`LossConfig` once calls
    :func:`compute_loss` instead, which repeats none of that.

    Raises:
        PrefoptError: for any bad input; the message names the option, its value and what is allowed.
    """
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise PrefoptError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for preference_loss; "
            f"known options: {', '.join(OPTION_DEFAULTS)}"
        )
    config = LossConfig(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, **options)
    chosen = _check_logps("policy_chosen_logps", policy_chosen_logps, None)
    rejected = _check_logps("policy_rejected_logps", policy_rejected_logps, chosen)
    refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    needs_reference = [name for name in config.loss_type if _SPECS[name].reference]
    for option, value in refs.items():
        if value is None and (needs_reference or any(v is not None for v in refs.values())):
            why = (
                f"loss_type {', '.join(map(repr, needs_reference))} needs reference log-likelihoods"
                if needs_reference
                else "both reference tensors or neither"
            )
            raise _reject(option, None, f"a floating-point tensor of shape {list(chosen.shape)}; {why}")
        if value is not None:
            _check_logps(option, value, chosen)
    _check_length_needs(config.loss_type, chosen_lengths, rejected_lengths)
    lengths_c = None if chosen_lengths is None else _check_lengths("chosen_lengths", chosen_lengths, chosen)
    lengths_r = None if rejected_lengths is None else _check_lengths("rejected_lengths", rejected_lengths, chosen)
    return compute_loss(config, chosen, rejected, ref_chosen_logps, ref_rejected_logps, lengths_c, lengths_r)


def compute_loss(
    config: LossConfig,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> PreferenceLossOutput:
    """:func:`preference_loss` for a :class:`LossConfig` made once: the training step's entry point.

    No option is checked again and no tensor value is read on the host (no device sync). Which inputs
    are present is still checked (a ``None`` test): a policy without lengths under a length-normalized
    type, or a missing reference, is one clear error.
    """
    names = config.loss_type
    if ref_chosen_logps is None and config.needs_reference:
        raise _reject("ref_chosen_logps", None, f"reference log-likelihoods; loss_type {names} needs them")
    _check_length_needs(names, chosen_lengths, rejected_lengths)
    ref_chosen = None if ref_chosen_logps is None else ref_chosen_logps.detach()
    ref_rejected = None if ref_rejected_logps is None else ref_rejected_logps.detach()
    scores_c = scores_r = None
    if ref_chosen is not None:
        kind, alpha = config.f_divergence_type, config.alpha_divergence_coef
        scores_c = _f_divergence_scores(policy_chosen_logps - ref_chosen, kind, alpha)
        scores_r = _f_divergence_scores(policy_rejected_logps - ref_rejected, kind, alpha)
    pairs = _Pairs(
        chosen_logps=policy_chosen_logps,
        rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_scores=scores_c,
        rejected_scores=scores_r,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        options=config.options,
    )
    losses = sum(weight * _SPECS[name].fn(pairs) for name, weight in zip(names, config.loss_weights))
    chosen_rewards, rejected_rewards = _rewards(names, pairs)
    return PreferenceLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def _rewards(names: tuple[str, ...], p: _Pairs) -> tuple[Tensor, Tensor]:
    """Implicit rewards; see the end of the module docstring."""
    only = names[0] if len(set(names)) == 1 else None
    if only == "simpo":
        return p.beta * _per_length(p.chosen_logps, p.chosen_lengths), p.beta * _per_length(
            p.rejected_logps, p.rejected_lengths
        )
    if only == "cpl" or p.ref_chosen_logps is None:
        return p.beta * p.chosen_logps, p.beta * p.rejected_logps
    return p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
