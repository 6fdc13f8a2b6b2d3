"""What the training loop (:mod:`prefopt.train`) needs for ``feedback=binary|ranking|scores``.

``feedback`` is a config group (``conf/feedback/``). Its options:

``kind``        ``pairs`` (the default: the domain's own pairs), ``binary``, ``ranking`` or ``scores``
``group_size``  ``K``: samples drawn per group (context, class, prompt, start state). ``binary`` labels each
                sample on its own; ``ranking`` ranks the ``K``; ``scores`` scores them
``threshold``   ``binary``: a sample is desirable when its (teacher-perceived) return is above this number,
                the median of the round's samples (``median``) or the mean of its group (``group_mean``)
``to``          ``scores``: turned into ``pairs`` (by ``rule``, trained by the pair module) or a ``ranking``
``rule``        ``scores`` -> pairs: ``best_vs_worst`` or ``all_pairs`` (see :mod:`prefopt.feedback.convert`)
``margin``      ``scores``: pairs whose score gap is ``<= margin`` are ties (dropped under ``loss.ties=drop``)
``path``        read the round-0 feedback from a file instead (see :mod:`prefopt.feedback.files`); ``split``

A domain supports these kinds by giving its task a ``groups(policy, round_index, size)`` method that returns
:class:`~prefopt.feedback.data.Groups`: ``size`` samples of the policy per group and their true rewards,
about ``2 * num_pairs`` samples in all, so every kind labels as many samples as ``feedback=pairs`` does.
The task's scripted teacher (``task.teacher``) labels, ranks or scores them (:mod:`prefopt.feedback.teach`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from prefopt.data.teachers import ScriptedTeacher
from prefopt.errors import PrefoptError, check_choice
from prefopt.feedback.convert import PAIR_RULES, score_pairs, score_ranking
from prefopt.feedback.data import Groups, TensorRankings, TensorSamples, sample_conditions
from prefopt.feedback.files import load_feedback
from prefopt.feedback.losses import (KL_ESTIMATES, LISTWISE_LOSS_TYPES, UNPAIRED_LOSS_TYPES, ranking_loss,
                                     unpaired_loss)
from prefopt.feedback.teach import binary_labels, rank, teacher_scores

FEEDBACK_KINDS = ("pairs", "binary", "ranking", "scores")
SCORE_TARGETS = ("pairs", "ranking")


@dataclass(frozen=True)
class FeedbackConfig:
    kind: str = "pairs"
    group_size: int = 4
    threshold: Any = "median"
    to: str = "pairs"
    rule: str = "best_vs_worst"
    margin: float = 0.0
    path: str | None = None
    split: str | None = None

    def __post_init__(self):
        check_choice("feedback.kind", self.kind, FEEDBACK_KINDS)
        check_choice("feedback.to", self.to, SCORE_TARGETS)
        check_choice("feedback.rule", self.rule, PAIR_RULES)
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size < (1 if self.kind == "binary" else 2):
            raise PrefoptError(f"feedback.group_size={size!r} is not supported; allowed: an integer >= 2 "
                               "(>= 1 for binary)")
        if not (self.threshold in ("median", "group_mean") or isinstance(self.threshold, (int, float))
                and not isinstance(self.threshold, bool)):
            raise PrefoptError(f"feedback.threshold={self.threshold!r} is not supported; allowed: a number, median "
                               "or group_mean")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not self.margin >= 0:
            raise PrefoptError(f"feedback.margin={self.margin!r} is not supported; allowed: a number >= 0")

    @property
    def layout(self) -> str:
        """The batch layout the module trains on: ``pairs``, ``binary`` or ``ranking``."""
        if self.kind == "scores":
            return self.to
        return self.kind


def feedback_config(cfg: DictConfig | Mapping[str, Any]) -> FeedbackConfig:
    node = cfg.get("feedback") if cfg is not None else None
    if node is None:
        return FeedbackConfig()
    options = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    try:
        return FeedbackConfig(**options)
    except TypeError as err:
        known = ", ".join(FeedbackConfig.__dataclass_fields__)
        raise PrefoptError(f"feedback: bad options {sorted(options)} ({err}); allowed: {known}") from None


def _loss_names(loss_type) -> list:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type or [])


def training_layout(cfg) -> str:
    """The batch layout a run trains on: the feedback's layout, except that pairs trained with an unpaired loss
    (``kto``) are split into their desirable and undesirable samples (TRL's ``unpair_preference_dataset``) and
    pairs trained with ``plackett_luce`` are rankings of two."""
    layout = feedback_config(cfg).layout
    names = _loss_names(cfg.get("loss", {}).get("loss_type") if cfg.get("loss") is not None else None)
    if layout == "pairs" and names and all(n in UNPAIRED_LOSS_TYPES for n in names):
        return "binary"
    if layout == "pairs" and names and all(n in LISTWISE_LOSS_TYPES for n in names):
        return "ranking"
    return layout


def module_class(cfg):
    """The Lightning module class for the run's training layout."""
    from prefopt.module import PreferenceModule

    layout = training_layout(cfg)
    if layout == "binary":
        from prefopt.feedback.module import BinaryFeedbackModule
        return BinaryFeedbackModule
    if layout == "ranking":
        from prefopt.feedback.module import RankingFeedbackModule
        return RankingFeedbackModule
    return PreferenceModule


def check_loss(cfg, loss: Mapping[str, Any]) -> bool:
    """Check the loss options of a binary or ranking layout on dummy values; False for the pair layout
    (checked by :func:`prefopt.train.validate_config`)."""
    fc = feedback_config(cfg)
    layout = training_layout({"feedback": cfg.get("feedback"), "loss": loss})
    loss = dict(loss)
    loss_type, beta = loss.pop("loss_type", None), loss.pop("beta", None)
    loss.pop("ties", None)
    if layout == "pairs":
        mixed = [n for n in _loss_names(loss_type) if n in UNPAIRED_LOSS_TYPES + LISTWISE_LOSS_TYPES]
        if mixed:
            raise PrefoptError(f"loss: loss_type {mixed} cannot be combined with pairwise loss types in a list")
        return False
    reference = cfg.get("reference")
    if reference is not None:
        from prefopt.reference import PrecomputedReference, make_reference

        node = OmegaConf.to_container(reference, resolve=True) if OmegaConf.is_config(reference) else reference
        if isinstance(make_reference(node), PrecomputedReference):
            raise PrefoptError(f"reference=precomputed caches pair batches only; feedback={fc.kind} with loss "
                               f"{loss_type} supports reference=copy, adapter, sync or none")
    dummy = torch.zeros(2)
    try:
        if layout == "binary":
            check_choice(f"loss_type (feedback={fc.kind})", loss_type, UNPAIRED_LOSS_TYPES)
            options = {k: loss.pop(k) for k in ("desirable_weight", "undesirable_weight") if k in loss}
            kl = loss.pop("kl", "mismatched")
            check_choice("loss.kl", kl, KL_ESTIMATES)
            if loss.pop("label_smoothing", 0.0) != 0.0 or loss:
                raise PrefoptError(f"loss options {sorted(loss) or ['label_smoothing']} are not used by "
                                   f"loss_type {loss_type!r}; allowed: beta, desirable_weight, undesirable_weight, kl")
            unpaired_loss(loss_type, dummy, dummy, torch.tensor([1, 0]), beta=beta,
                          kl=0.0 if loss_type == "kto" else None, **options)
        else:
            if loss_type in UNPAIRED_LOSS_TYPES:
                raise PrefoptError(f"loss_type={loss_type!r} trains on binary feedback; feedback={fc.kind} gives a "
                                   "ranking: use loss=plackett_luce or a pairwise loss (sigmoid, ipo, ...)")
            grid = torch.zeros(1, 3)
            if loss_type in LISTWISE_LOSS_TYPES:
                if loss.pop("label_smoothing", 0.0) != 0.0 or loss:
                    raise PrefoptError(f"loss options {sorted(loss) or ['label_smoothing']} are not used by "
                                       "loss_type 'plackett_luce'; allowed: beta")
                ranking_loss(loss_type, grid, grid, beta=beta)
            else:
                ranking_loss(loss_type, grid, grid, beta=beta, lengths=torch.ones(1, 3), **loss)
    except PrefoptError as err:
        raise PrefoptError(f"loss: {err}") from None
    return True


def _teacher(task) -> ScriptedTeacher:
    teacher = getattr(task, "teacher", None)
    return teacher if isinstance(teacher, ScriptedTeacher) else ScriptedTeacher()


def _groups(cfg, task, policy, round_index: int, fc: FeedbackConfig) -> Groups:
    make = getattr(task, "groups", None)
    if make is None:
        raise PrefoptError(f"domain={getattr(task, 'name', type(task).__name__)} cannot make feedback={fc.kind}: its "
                           f"task ({type(task).__name__}) has no groups(policy, round_index, size) method; "
                           "use feedback=pairs, or feedback.path to read the feedback from a file")
    if round_index > 0 or not cfg.get("cache_pairs", True) or not cfg.get("paths"):
        return make(policy, round_index, fc.group_size)
    from prefopt.cache import cached_tensors

    def build():
        groups = make(policy, round_index, fc.group_size)
        flat = {f"items.{k}": v for k, v in groups.items.items()}
        flat.update({f"shared.{k}": v for k, v in groups.shared.items()})
        flat["rewards"] = groups.rewards
        if groups.mask is not None:
            flat["mask"] = groups.mask
        if groups.start_size is not None:
            flat["start_size"] = torch.tensor(groups.start_size)
        return flat

    task_cfg = OmegaConf.to_container(cfg.domain.task, resolve=True) if OmegaConf.is_config(cfg.domain.task) \
        else dict(cfg.domain.task)
    # format 2: groups record start_size (entries written before it lack it and are not reused)
    key = {"task": task_cfg, "round": round_index, "group_size": fc.group_size, "format": 2}
    flat = cached_tensors(cfg.paths.cache_dir, f"groups-{cfg.domain.name}", key, build)
    part = {"items": {}, "shared": {}}
    for name, value in flat.items():
        if "." in name:
            where, key_name = name.split(".", 1)
            part[where][key_name] = value
    start = flat.get("start_size")
    return Groups(part["items"], part["shared"], flat["rewards"], flat.get("mask"),
                  None if start is None else int(start))


def feedback_from_groups(groups: Groups, fc: FeedbackConfig, teacher: ScriptedTeacher,
                         conditions: tuple[str, ...] = ()):
    """The round's dataset of the configured kind from a task's groups and its teacher.

    ``conditions``: item keys that are what a sample is judged *given* (a control segment's observations),
    kept as the binary rows' condition, so KTO's mismatched rows pair them with another row's sample."""
    if fc.kind == "binary":
        rewards, mask = groups.flat_rewards()
        labels = binary_labels(teacher, rewards, mask, threshold=fc.threshold, group_size=groups.shape[1],
                               start_size=groups.start_size)
        keep = labels.keep.nonzero().flatten()
        items = {k: v[keep] for k, v in groups.flat_items().items() if k not in conditions}
        condition = {k: v[keep] for k, v in groups.flat_shared().items()}
        condition.update({k: v[keep] for k, v in groups.flat_items().items() if k in conditions})
        return TensorSamples(items, condition, labels.label[keep])
    if fc.kind == "ranking":
        ranking = rank(teacher, groups.rewards, groups.mask, start_size=groups.start_size)
        return groups.ranked(ranking.order, ranking.keep, ranking.tie)
    scores = teacher_scores(teacher, groups.rewards, groups.mask, start_size=groups.start_size)
    return scores_dataset(Groups(groups.items, groups.shared, scores), fc)


def scores_dataset(groups: Groups, fc: FeedbackConfig):
    """Pairs or a ranking from groups whose ``rewards`` are the scores."""
    if fc.to == "pairs":
        pairs = score_pairs(groups.rewards, fc.rule, fc.margin)
        return groups.pairs(pairs.group, pairs.chosen, pairs.rejected, pairs.tie)
    ranking = score_ranking(groups.rewards, fc.margin)
    return groups.ranked(ranking.order, ranking.keep, ranking.tie)


def round_feedback(cfg, task, policy, round_index: int):
    """The round's training data for ``feedback`` other than ``pairs`` (see the module docstring)."""
    fc = feedback_config(cfg)
    if fc.path is not None:
        if round_index > 0:
            raise PrefoptError(f"feedback.path={fc.path!r} holds one round of feedback; this task has "
                               f"rounds={task.rounds} (set the domain's rounds to 1)")
        loaded = load_feedback(fc.kind, fc.path, fc.split)
        if isinstance(loaded, TensorSamples):  # sample_obs of a control file: the condition of its actions
            conditions = [k for k in sample_conditions(policy) if k in loaded.items]
            return TensorSamples({k: v for k, v in loaded.items.items() if k not in conditions},
                                 {**loaded.condition, **{k: loaded.items[k] for k in conditions}}, loaded.label)
        return scores_dataset(loaded, fc) if fc.kind == "scores" else loaded
    groups = _groups(cfg, task, policy, round_index, fc)
    data = feedback_from_groups(groups, fc, _teacher(task), sample_conditions(policy))
    if len(data) == 0:
        raise PrefoptError(f"feedback={fc.kind}: the teacher kept no samples this round (check its skip/equal "
                           "thresholds)")
    return data


def samples_per_row(data) -> int:
    """How many samples one dataset row holds: 1 (binary), ``K`` (a ranking), 2 (a pair)."""
    if isinstance(data, TensorSamples):
        return 1
    if isinstance(data, TensorRankings):
        return data.k
    return 2


def round_dataloader(cfg, task, data, train: bool = True):
    """``task.dataloader(data)`` with batches of as many *samples* as a batch of ``task.batch_size`` pairs, so
    every feedback kind takes as many optimizer steps per epoch on the same number of samples."""
    per_row = samples_per_row(data)
    if per_row == 2:
        return task.dataloader(data, train=train)
    size = task.batch_size
    task.batch_size = max(1, round(2 * size / per_row))  # read by the task's dataloader; restored below
    try:
        return task.dataloader(data, train=train)
    finally:
        task.batch_size = size


__all__ = ["FEEDBACK_KINDS", "FeedbackConfig", "check_loss", "feedback_config", "feedback_from_groups",
           "module_class", "round_dataloader", "round_feedback", "scores_dataset"]
