"""prefopt: Direct Preference Optimization for non-text models."""

from prefopt.errors import PrefoptError
from prefopt.losses import LOSS_TYPES, preference_loss
from prefopt.policy import PreferencePolicy

__all__ = ["LOSS_TYPES", "PrefoptError", "PreferencePolicy", "preference_loss"]
__version__ = "0.1.0"
