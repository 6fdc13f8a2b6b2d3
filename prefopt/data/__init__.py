"""Preference data shared by all domains: pair datasets, scripted teachers, dataset folders.

Offline segment pairs of the control domain live in :mod:`prefopt.tasks.control.segments`.
"""

from prefopt.data.teachers import TEACHER_KINDS, Labels, OrderedPairs, ScriptedTeacher, to_pairs

__all__ = ["TEACHER_KINDS", "Labels", "OrderedPairs", "ScriptedTeacher", "to_pairs"]
