"""Preference data shared by all domains: scripted teachers and offline segment pairs."""

from prefopt.data.segments import SegmentPairs, collate, load_segment_pairs, pair_segments, save_segment_pairs
from prefopt.data.teachers import TEACHER_KINDS, Labels, OrderedPairs, ScriptedTeacher, to_pairs

__all__ = [
    "TEACHER_KINDS",
    "Labels",
    "OrderedPairs",
    "ScriptedTeacher",
    "SegmentPairs",
    "collate",
    "load_segment_pairs",
    "pair_segments",
    "save_segment_pairs",
    "to_pairs",
]
