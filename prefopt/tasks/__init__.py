"""Domains: where preference pairs come from and how a trained policy is judged."""

from prefopt.tasks.base import Task

__all__ = ["Task"]
