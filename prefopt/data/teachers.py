"""Scripted preference teachers in the style of B-Pref.

B-Pref (Lee, Smith, Dragan and Abbeel, 2021, "B-Pref: Benchmarking
Preference-Based Reinforcement Learning") replaces the human in preference
learning by a *scripted teacher* that looks at the true reward of two segments
and answers which one it prefers. Its teacher has a handful of knobs that model
typical human irrationalities; the six named teachers of the paper are settings
of those knobs. :class:`ScriptedTeacher` implements the same composable model.

Everything here works on the per-step true rewards of the two items of each
pair: ``r1`` and ``r2`` of shape ``[P, H]`` (``P`` pairs, ``H`` steps). An item
with a single scalar reward (an image, a whole generated sequence) is simply
``H = 1``, and a 1-D ``[P]`` tensor is accepted as such.

Labelling a batch of pairs proceeds in this order (the order of B-Pref's
``get_label``):

1. **Returns.** ``R1 = sum_t r1[:, t]`` and ``R2`` likewise (undiscounted; steps
   outside an optional mask count as zero).
2. **Skip.** If ``skip_threshold`` is set, a pair is kept only when the better of
   the two returns is strictly above it: ``keep = max(R1, R2) > skip_threshold``.
   Pairs where both segments are uninteresting (both at or below the threshold)
   get ``keep = False`` and should be discarded by the caller.
3. **Equal.** If ``equal_threshold`` is set, pairs with
   ``|R1 - R2| < equal_threshold`` (strict) are marked as ties. Like skip, this
   uses the undiscounted returns.
4. **Myopia.** For the preference itself the teacher weighs step ``t`` of a
   segment by ``gamma ** (H - 1 - t)``: the last step has weight 1 and earlier
   steps count less, so ``gamma < 1`` models a teacher who mostly remembers the
   end of a segment. With a mask, the exponent counts the real steps after
   ``t`` in that segment, so padded segments are discounted from their own end.
5. **Rational or stochastic choice.** With ``beta = inf`` the teacher is
   rational: it prefers the item with the larger (discounted) return, and an
   exact draw goes to the first item. With finite ``beta >= 0`` it follows the
   Bradley-Terry model ``P(first preferred) = sigmoid(beta * (R1 - R2))`` and
   samples the label (``beta = 0`` is a fair coin).
6. **Mistakes.** Each label is then flipped independently with probability
   ``eps``.
7. Ties from step 3 override the label: a tie row has ``tie = True`` and
   ``preference = 0`` (meaningless for a tie).

Named presets (``kind``), following the B-Pref paper:

- ``oracle``: ``beta = inf, gamma = 1, eps = 0``, no skip, no ties (also the
  defaults of every other preset);
- ``stochastic``: ``beta = 1``;
- ``mistake``: ``eps = 0.1``;
- ``myopic``: ``gamma = 0.9``;
- ``skip``: needs an explicit ``skip_threshold``;
- ``equal``: needs an explicit ``equal_threshold``.

A preset only fills the parameters that were not given explicitly, so
``ScriptedTeacher("myopic", eps=0.2)`` is a myopic teacher that also makes
mistakes, and ``ScriptedTeacher(beta=2.0, gamma=0.95)`` (``kind`` defaults to
``"oracle"``) composes freely. B-Pref sets the skip and equal thresholds relative
to the average return of a segment; here they are absolute, in units of return.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prefopt.errors import PrefoptError, check_choice

TEACHER_KINDS = ("oracle", "stochastic", "mistake", "myopic", "skip", "equal")

# Parameter values each preset sets when the caller did not give them.
_PRESETS: dict[str, dict[str, float]] = {
    "oracle": {},
    "stochastic": {"beta": 1.0},
    "mistake": {"eps": 0.1},
    "myopic": {"gamma": 0.9},
    "skip": {},
    "equal": {},
}
_DEFAULTS = {"beta": math.inf, "gamma": 1.0, "eps": 0.0}


@dataclass
class Labels:
    """Answers of a teacher for ``P`` pairs.

    Attributes:
        preference: int64 ``[P]``; 0 = the first item is preferred, 1 = the second.
            It is 0 for tie rows, where it carries no information.
        tie: bool ``[P]``; True where the teacher judged the two items equally good.
        keep: bool ``[P]``; False where the teacher skipped the query. Skipped rows
            still have a preference and tie value, but should not be trained on.
    """

    preference: torch.Tensor
    tie: torch.Tensor
    keep: torch.Tensor

    def __len__(self) -> int:
        return int(self.preference.shape[0])

    def target(self) -> torch.Tensor:
        """Float ``[P]`` probability that the *second* item is preferred: 0, 1, or 0.5 for a tie."""
        out = self.preference.to(torch.float32)
        return torch.where(self.tie, torch.full_like(out, 0.5), out)


@dataclass
class OrderedPairs:
    """Kept pairs sorted into chosen and rejected items (see :func:`to_pairs`).

    Attributes:
        chosen, rejected: the items, in the same container type as the inputs.
        tie: bool ``[K]``; for a tie the first item is ``chosen`` by convention.
        index: int64 ``[K]``; the row of each pair in the teacher's input.
    """

    chosen: Any
    rejected: Any
    tie: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])


def _uniform(n: int, generator) -> torch.Tensor:
    """``n`` uniforms in [0, 1) as float64, from a torch or numpy generator."""
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(generator.random(n))
    return torch.rand(n, generator=generator, dtype=torch.float64)


_REAL_KINDS = "iuf"  # numpy dtype kinds accepted as rewards: signed/unsigned int, float


def _as_rewards(name: str, r) -> torch.Tensor:
    if isinstance(r, torch.Tensor):
        t = r.detach().cpu()
        ok = t.is_floating_point() or (not t.is_complex() and t.dtype != torch.bool)
        kind = str(t.dtype)
    else:
        arr = np.asarray(r)
        ok = arr.dtype.kind in _REAL_KINDS
        kind = str(arr.dtype)
        t = torch.from_numpy(arr.astype(np.float64)) if ok else None
    if not ok:
        raise PrefoptError(f"teacher rewards {name}: dtype {kind} is not a real number type; allowed: float or int")
    t = t.to(torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise PrefoptError(
            f"teacher rewards {name}: shape {tuple(t.shape)} has {t.ndim} dims; allowed: [P, H] per-step rewards or [P] scalars"
        )
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise PrefoptError(f"teacher rewards {name}: row {row} contains NaN or inf; rewards must be finite")
    return t


def _as_mask(name: str, m, shape) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).detach().cpu()
    if t.ndim == 1 and len(shape) == 2 and shape[1] == 1:
        t = t[:, None]
    if tuple(t.shape) != tuple(shape):
        raise PrefoptError(f"teacher {name}: shape {tuple(t.shape)} does not match the rewards' shape {tuple(shape)}")
    if t.dtype != torch.bool:
        if t.is_floating_point() and not torch.isin(t, torch.tensor([0.0, 1.0], dtype=t.dtype)).all():
            raise PrefoptError(f"teacher {name}: values must be 0/1 or bool, found other values")
        t = t != 0
    return t


@dataclass
class ScriptedTeacher:
    """A B-Pref scripted teacher; see the module docstring for the definitions.

    Args:
        kind: preset, one of ``oracle, stochastic, mistake, myopic, skip, equal``.
            It fills only the parameters left as ``None``.
        beta: Bradley-Terry rationality, ``>= 0``; ``math.inf`` = perfectly rational.
        gamma: myopia discount in ``(0, 1]``; 1 = not myopic.
        eps: probability of flipping each label, in ``[0, 1]``.
        skip_threshold: keep a pair only if ``max(R1, R2) > skip_threshold``; None = never skip.
        equal_threshold: tie if ``|R1 - R2| < equal_threshold``; None = never tie.
        seed: seed of the teacher's own ``torch.Generator``; used when :meth:`label`
            is not handed a generator. Successive calls continue the same stream.
    """

    kind: str = "oracle"
    beta: float | None = None
    gamma: float | None = None
    eps: float | None = None
    skip_threshold: float | None = None
    equal_threshold: float | None = None
    seed: int = 0
    _generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str):
            raise PrefoptError(f"ScriptedTeacher kind={self.kind!r} must be a string; allowed: {', '.join(TEACHER_KINDS)}")
        check_choice("ScriptedTeacher kind", self.kind, TEACHER_KINDS)
        for name, value in {**_DEFAULTS, **_PRESETS[self.kind]}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.beta, self.gamma, self.eps = float(self.beta), float(self.gamma), float(self.eps)
        if math.isnan(self.beta) or self.beta < 0:
            raise PrefoptError(f"ScriptedTeacher beta={self.beta} is invalid; allowed: beta >= 0 (math.inf = rational)")
        if not 0.0 < self.gamma <= 1.0:
            raise PrefoptError(f"ScriptedTeacher gamma={self.gamma} is invalid; allowed: 0 < gamma <= 1")
        if not 0.0 <= self.eps <= 1.0:
            raise PrefoptError(f"ScriptedTeacher eps={self.eps} is invalid; allowed: 0 <= eps <= 1")
        for name in ("skip_threshold", "equal_threshold"):
            value = getattr(self, name)
            if value is not None:
                value = float(value)
                if not math.isfinite(value):
                    raise PrefoptError(f"ScriptedTeacher {name}={value} is invalid; allowed: a finite number or None")
                setattr(self, name, value)
        if self.kind == "skip" and self.skip_threshold is None:
            raise PrefoptError("ScriptedTeacher kind='skip' needs skip_threshold (a return value); found None")
        if self.kind == "equal" and self.equal_threshold is None:
            raise PrefoptError("ScriptedTeacher kind='equal' needs equal_threshold (a return gap); found None")
        if self.equal_threshold is not None and self.equal_threshold < 0:
            raise PrefoptError(f"ScriptedTeacher equal_threshold={self.equal_threshold} is invalid; allowed: >= 0")
        self._generator = torch.Generator().manual_seed(int(self.seed))

    @property
    def rational(self) -> bool:
        """True when the choice is deterministic before mistakes (``beta = inf``)."""
        return math.isinf(self.beta)

    def reset(self) -> None:
        """Restart the teacher's random stream from ``seed``."""
        self._generator.manual_seed(int(self.seed))

    def returns(self, r: torch.Tensor, mask: torch.Tensor | None = None, discounted: bool = False) -> torch.Tensor:
        """Return per row of ``r`` [P, H]; with ``discounted`` step t weighs ``gamma ** (real steps after t)``."""
        r = _as_rewards("r", r)
        m = torch.ones_like(r, dtype=torch.bool) if mask is None else _as_mask("mask", mask, r.shape)
        r = torch.where(m, r, torch.zeros_like(r))
        if discounted and self.gamma != 1.0:
            after = m.flip(1).to(torch.float64).cumsum(1).flip(1) - m.to(torch.float64)
            r = r * torch.pow(torch.tensor(self.gamma, dtype=torch.float64), after)
        return r.sum(dim=1)

    def label(self, r1, r2, mask1=None, mask2=None, generator=None) -> Labels:
        """Label ``P`` pairs from the true per-step rewards of their two items.

        Args:
            r1, r2: rewards ``[P, H]`` (or ``[P]`` for one scalar per item), torch or numpy.
                The two may differ in ``H``.
            mask1, mask2: optional bool ``[P, H]``; False marks padding, whose reward is ignored.
            generator: a ``torch.Generator`` or ``numpy.random.Generator`` to draw from
                instead of the teacher's own seeded stream.

        Returns:
            :class:`Labels` with ``preference`` (0 = first preferred), ``tie`` and ``keep``.
        """
        r1, r2 = _as_rewards("r1", r1), _as_rewards("r2", r2)
        if r1.shape[0] != r2.shape[0]:
            raise PrefoptError(f"teacher rewards: r1 has {r1.shape[0]} pairs but r2 has {r2.shape[0]}; they must match")
        m1 = None if mask1 is None else _as_mask("mask1", mask1, r1.shape)
        m2 = None if mask2 is None else _as_mask("mask2", mask2, r2.shape)
        gen = self._generator if generator is None else generator
        if not isinstance(gen, (torch.Generator, np.random.Generator)):
            raise PrefoptError(
                f"teacher generator of type {type(gen).__name__} is not supported; allowed: torch.Generator, numpy.random.Generator"
            )
        n = r1.shape[0]

        ret1, ret2 = self.returns(r1, m1), self.returns(r2, m2)
        keep = torch.ones(n, dtype=torch.bool)
        if self.skip_threshold is not None:
            keep = torch.maximum(ret1, ret2) > self.skip_threshold
        tie = torch.zeros(n, dtype=torch.bool)
        if self.equal_threshold is not None:
            tie = (ret1 - ret2).abs() < self.equal_threshold

        d1, d2 = self.returns(r1, m1, discounted=True), self.returns(r2, m2, discounted=True)
        if self.rational:
            pref = (d2 > d1).to(torch.int64)
        else:
            p_second = torch.sigmoid(self.beta * (d2 - d1)) if self.beta > 0 else torch.full((n,), 0.5, dtype=torch.float64)
            pref = (_uniform(n, gen) < p_second).to(torch.int64)
        if self.eps > 0:
            flip = _uniform(n, gen) < self.eps
            pref = torch.where(flip, 1 - pref, pref)
        pref = torch.where(tie, torch.zeros_like(pref), pref)
        return Labels(preference=pref, tie=tie, keep=keep)

    __call__ = label


def _select(a, b, idx: torch.Tensor, second: torch.Tensor, what: str):
    """Rows ``idx`` of ``b`` where ``second`` else of ``a``; same container type as the inputs."""
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) != set(b):
            raise PrefoptError(f"to_pairs {what}: items_a and items_b must be mappings with the same keys")
        return {k: _select(a[k], b[k], idx, second, f"{what}[{k!r}]") for k in a}
    if isinstance(a, torch.Tensor) or isinstance(a, np.ndarray):
        ta = torch.as_tensor(a)
        tb = torch.as_tensor(b)
        if ta.shape != tb.shape:
            raise PrefoptError(f"to_pairs {what}: items_a shape {tuple(ta.shape)} != items_b shape {tuple(tb.shape)}")
        ia = idx.to(ta.device)
        ta, tb = ta[ia], tb[ia]
        s = second.to(ta.device).reshape((-1,) + (1,) * (ta.ndim - 1))
        out = torch.where(s, tb, ta)
        return out.numpy() if isinstance(a, np.ndarray) else out
    if isinstance(a, Sequence) and not isinstance(a, (str, bytes)):
        return [b[i] if s else a[i] for i, s in zip(idx.tolist(), second.tolist())]
    raise PrefoptError(f"to_pairs {what}: items of type {type(a).__name__} are not supported; allowed: tensor, ndarray, list, dict of these")


def _length(x) -> int:
    if isinstance(x, Mapping):
        lengths = {_length(v) for v in x.values()}
        if len(lengths) != 1:
            raise PrefoptError(f"to_pairs: the entries of a dict of items have different lengths {sorted(lengths)}")
        return lengths.pop()
    return len(x)


def to_pairs(items_a, items_b, labels: Labels) -> OrderedPairs:
    """Sort the kept pairs into chosen and rejected items.

    ``items_a[i]`` and ``items_b[i]`` are the two items of pair ``i`` (the ones whose
    rewards were ``r1[i]`` and ``r2[i]``). They can be tensors or arrays with the pair
    on the first axis, lists, or dicts of these (e.g. ``{"obs": ..., "actions": ...}``).
    Pairs with ``keep = False`` are dropped; for ``preference = 1`` the second item
    becomes ``chosen``. Ties are passed through with ``tie = True``, first item as
    ``chosen``.
    """
    n = len(labels)
    for name, items in (("items_a", items_a), ("items_b", items_b)):
        if _length(items) != n:
            raise PrefoptError(f"to_pairs: {name} has {_length(items)} items but labels has {n} pairs")
    idx = labels.keep.nonzero().flatten()
    second = (labels.preference[idx] == 1) & ~labels.tie[idx]
    return OrderedPairs(
        chosen=_select(items_a, items_b, idx, second, "chosen"),
        rejected=_select(items_b, items_a, idx, second, "rejected"),
        tie=labels.tie[idx].clone(),
        index=idx.to(torch.int64),
    )
