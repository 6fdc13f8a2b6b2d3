"""prefopt: Direct Preference Optimization for non-text models."""

from prefopt.errors import PrefoptError

__all__ = ["LOSS_TYPES", "PrefoptError", "PreferencePolicy", "preference_loss"]
__version__ = "0.1.0"

# torch-backed names load on first use, so that torch-free tools (``prefopt-report``) import without torch
_LAZY = {"LOSS_TYPES": "prefopt.losses", "preference_loss": "prefopt.losses", "PreferencePolicy": "prefopt.policy"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefopt' has no attribute {name!r}")
