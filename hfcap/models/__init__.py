"""hfcap model architectures; each sub-package is self-contained (shippable as Hub remote code)."""

from .show_attend_tell import ShowAttendTellConfig, ShowAttendTellForConditionalGeneration

__all__ = ["ShowAttendTellConfig", "ShowAttendTellForConditionalGeneration"]
