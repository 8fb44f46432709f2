"""Training and evaluation: the XE + SCST trainer on Accelerate, SCST rewards, evaluation, cached features.

``TrainingConfig`` (YAML/JSON + overrides) and ``train(config)`` are the entry points; ``hfcap train`` and
``examples/train.py`` wrap them. ``datasets`` and the metric packages load only when training runs.
"""

from .config import TrainingConfig
from .trainer import Trainer, train

__all__ = ["Trainer", "TrainingConfig", "train"]
