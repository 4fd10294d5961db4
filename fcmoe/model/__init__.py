"""Model building and the expert-unit layout: the one place that knows how experts are stored."""

from fcmoe.model.build import (base_fingerprint, build_model, checkpoint_activations, load_trainable_state,
                               trainable_state)
from fcmoe.model.layout import ExpertLayout, UnitKey

__all__ = [
    "ExpertLayout",
    "UnitKey",
    "base_fingerprint",
    "build_model",
    "checkpoint_activations",
    "load_trainable_state",
    "trainable_state",
]
